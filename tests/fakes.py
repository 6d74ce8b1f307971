"""A fake backend for fast tests of the generation logic (never the only test of a feature)."""

from magpie_local.backends.base import Completion, collect

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class FakeBackend:
    """Instructions are a function of the seed; every fifth seed gives an empty instruction."""

    name = "fake"

    def __init__(self, fail_at_job: int | None = None, instructions=None, window: int = 1):
        self.jobs = 0
        self.fail_at_job = fail_at_job
        self.instructions = instructions  # seed -> instruction text, to plant duplicates
        self.window = window  # jobs pulled at once; their results come back in reverse order
        self.prompts = []

    def stream(self, next_job, progress=None):
        """Drive jobs to their ends `window` at a time, finishing the latest first (a real backend
        interleaves them and finishes them in any order)."""
        while True:
            pulled = []
            while len(pulled) < self.window and (job := next_job()) is not None:
                pulled.append(job)
            if not pulled:
                return
            for key, job in reversed(pulled):
                self.jobs += 1
                if self.jobs == self.fail_at_job:
                    raise KeyboardInterrupt
                completion = None
                try:
                    while True:
                        request = next(job) if completion is None else job.send(completion)
                        completion = self._complete(request, progress)
                except StopIteration as done:
                    yield key, done.value

    def run(self, jobs, progress=None):
        return collect(self, jobs, progress)

    def _complete(self, r, progress):
        self.prompts.append(r.prompt)
        if r.stop_at_control:  # Magpie step 1
            text = "" if r.seed % 5 == 0 else f" Question {r.seed}? "
            if self.instructions:
                text = self.instructions(r.seed)
        else:
            text = f"Answer ({r.prompt.count('Question')})"
        if progress:
            progress(1)
        return Completion(text=text, finish_reason="stop", prompt_tokens=len(r.prompt) // 4,
                          completion_tokens=len(text) // 4 + 1)

    def count_tokens(self, text):
        return len(text) // 4

    def describe(self):
        return {"backend": self.name}

    def close(self):
        pass
