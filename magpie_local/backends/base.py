"""The backend interface: batches of prompts in, batches of completions out.

A backend only turns prompt texts into completions. Templates, stop rules, storage and
resume are shared code above it, so every backend behaves the same.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(RuntimeError):
    """The backend cannot do what was asked (load failure, out of memory, bad settings)."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_tokens: int = 256


@dataclass(frozen=True)
class Request:
    prompt: str  # fully rendered text, special tokens written out as text
    sampling: Sampling
    seed: int
    stop: tuple[str, ...] = ()
    stop_at_control: bool = False  # end on any control token, not only end-of-generation ones
    grammar: str | None = None  # GBNF the completion must follow (llama.cpp backend only)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0  # wall time from the start of this request to its last token
    stop_sequence: str | None = field(default=None)


ProgressFn = Callable[[int], None]  # called with the number of tokens just generated

# A job is a generator that yields requests and is sent their completions; what it returns is
# its result. Magpie's two steps are one job (the response prompt needs the instruction), so a
# backend can start an item's response the moment its instruction is done.
Job = Generator[Request, Completion, Any]


NextJobFn = Callable[[], "tuple[Any, Job] | None"]  # the next (key, job) to start, or None for none now


class Jobs:
    """The jobs a backend is driving. `start` and `send` return a job's next request, or None
    when it has ended; ended jobs' (key, result) wait in `finished` for the backend to yield."""

    def __init__(self):
        self._running: dict[Any, Job] = {}
        self.finished: list[tuple[Any, Any]] = []

    def start(self, key: Any, job: Job) -> Request | None:
        self._running[key] = job
        return self.send(key, None)

    def send(self, key: Any, completion: Completion | None) -> Request | None:
        job = self._running[key]
        try:
            return next(job) if completion is None else job.send(completion)
        except StopIteration as done:
            del self._running[key]
            self.finished.append((key, done.value))
            return None

    def drain(self) -> list[tuple[Any, Any]]:
        """The results of the jobs that ended since the last drain, in the order they ended."""
        done, self.finished = self.finished, []
        return done


def single(request: Request) -> Job:
    """The job of one request: returns its completion."""
    return (yield request)


def collect(backend: Backend, jobs: Sequence[Job], progress: ProgressFn | None = None) -> list[Any]:
    """Run a fixed list of jobs through `backend.stream`; results in the order of `jobs`."""
    pending = iter(enumerate(jobs))
    results: list[Any] = [None] * len(jobs)
    for index, result in backend.stream(lambda: next(pending, None), progress):
        results[index] = result
    return results


class BackendBase:
    """What every backend does the same way on top of its own `stream`, `close` and `vocab`
    (its tokenizer, from vocab.py)."""

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(tokens)

    def run(self, jobs: Sequence[Job], progress: ProgressFn | None = None) -> list[Any]:
        return collect(self, jobs, progress)

    def complete(self, requests: Sequence[Request], progress: ProgressFn | None = None) -> list[Completion]:
        return self.run([single(r) for r in requests], progress)

    def check_scoring(self, contexts: Sequence[list[int]]) -> None:
        """Raise BackendError if sequences starting like `contexts` cannot be scored here."""

    def spread(self) -> dict[str, int]:
        """Requests each endpoint answered, for backends that spread work over several."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Backend(Protocol):
    name: str

    def stream(self, next_job: NextJobFn, progress: ProgressFn | None = None) -> Iterator[tuple[Any, Any]]:
        """Drive jobs to their ends, yielding (key, result) as each one ends.

        `next_job()` is asked for more work whenever a sequence slot is free, so slots never
        wait for a whole batch to finish; the stream ends when no job is running and
        `next_job()` has none.
        """
        ...

    def run(self, jobs: Sequence[Job], progress: ProgressFn | None = None) -> list[Any]:
        """Drive every job to its end; results are in the order of `jobs`."""
        ...

    def complete(self, requests: Sequence[Request], progress: ProgressFn | None = None) -> list[Completion]:
        """Complete every request; results are in the order of `requests`."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> dict:
        """Facts recorded with a run: backend name, versions, build, device."""
        ...

    def close(self) -> None: ...
