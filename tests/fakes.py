"""A fake backend for fast tests of the generation logic (never the only test of a feature)."""

from magpie_local.backends.base import Completion

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class FakeBackend:
    """Instructions are a function of the seed; every fifth seed gives an empty instruction."""

    name = "fake"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def run(self, jobs, progress=None):
        """Drive each job in turn (a real backend interleaves them)."""
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt
        results = []
        for job in jobs:
            completion = None
            try:
                while True:
                    request = next(job) if completion is None else job.send(completion)
                    completion = self._complete(request, progress)
            except StopIteration as done:
                results.append(done.value)
        return results

    @staticmethod
    def _complete(r, progress):
        if r.stop_at_control:  # Magpie step 1
            text = "" if r.seed % 5 == 0 else f" Question {r.seed}? "
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
