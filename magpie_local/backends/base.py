"""The backend interface: batches of prompts in, batches of completions out.

A backend only turns prompt texts into completions. Templates, stop rules, storage and
resume are shared code above it, so every backend behaves the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from ..errors import MagpieError


class BackendError(MagpieError, RuntimeError):
    """The backend cannot do what was asked (load failure, out of memory, bad settings)."""


DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default DRY sequence breakers


@dataclass(frozen=True)
class Sampling:
    """How one step (instruction or response) samples. Every field after max_tokens is off at its
    default, and `decisive()` leaves fields at their defaults out, so the settings of runs stored
    before a control existed keep their identity."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    max_tokens: int = 256
    repeat_penalty: float = 1.0  # llama.cpp/CTRL: logits of tokens seen in the last repeat_last_n divided by it
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the window
    presence_penalty: float = 0.0  # OpenAI: minus this once a token has occurred in the window
    dry_multiplier: float = 0.0  # DRY (Don't Repeat Yourself); 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_last_n: int = -1  # tokens DRY looks back over; -1 = the whole sequence
    dry_breakers: tuple[str, ...] = DRY_BREAKERS
    ban_first: tuple[str, ...] = ()  # token texts the first generated token may not be
    stop_loops: bool = False  # end the completion (finish_reason "loop") once its tail repeats (see first_loop)

    CORE = ("temperature", "top_p", "top_k", "min_p", "max_tokens")

    def decisive(self) -> dict:
        """The fields that decide the output: the core ones always, the others where not at their default."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.CORE or value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:
        d = dict(d)
        for name in ("dry_breakers", "ban_first"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def controls(self) -> list[str]:
        """Names of the controls that are on, beyond temperature, top-p, top-k and min-p."""
        on = []
        if self.repeat_penalty != 1.0:
            on.append("repeat_penalty")
        if self.frequency_penalty:
            on.append("frequency_penalty")
        if self.presence_penalty:
            on.append("presence_penalty")
        if self.dry_multiplier > 0:
            on.append("dry")
        if self.ban_first:
            on.append("ban_first")
        if self.stop_loops:
            on.append("stop_loops")
        return on

    def problems(self) -> list[str]:
        """What is out of range, one phrase each (empty: valid)."""
        bad = [f"{f.name.replace('_', '-')} must be a finite number, not {getattr(self, f.name)}" for f in fields(self)
               if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        bad += [f"{f.name.replace('_', '-')} must be between -2^63 and 2^63" for f in fields(self)
                if isinstance(getattr(self, f.name), int) and not -2**63 <= getattr(self, f.name) < 2**63]
        if bad:
            return bad
        if self.temperature < 0:
            bad.append("temperature must be at least 0")
        if not 0.0 < self.top_p <= 1.0:
            bad.append("top-p must be in (0, 1]")
        if self.top_k < 0:
            bad.append("top-k must be at least 0")
        if not 0.0 <= self.min_p <= 1.0:
            bad.append("min-p must be in [0, 1]")
        if self.max_tokens < 1:
            bad.append("max-tokens must be at least 1")
        if self.repeat_penalty <= 0:
            bad.append("repeat-penalty must be above 0 (1 = off)")
        if self.repeat_last_n < -1:
            bad.append("repeat-last-n must be -1 (whole sequence), 0 (off) or more")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad.append(f"{name.replace('_', '-')} must be in [-2, 2]")
        if self.dry_multiplier < 0:
            bad.append("dry-multiplier must be at least 0 (0 = off)")
        if self.dry_base < 1.0:
            bad.append("dry-base must be at least 1")
        if self.dry_allowed_length < 1:
            bad.append("dry-allowed-length must be at least 1")
        if self.dry_last_n < -1:
            bad.append("dry-last-n must be -1 (whole sequence), 0 or more")
        if any(not b for b in self.dry_breakers):
            bad.append("dry sequence breakers must not be empty strings")
        if any(not t for t in self.ban_first):
            bad.append("banned first tokens must not be empty strings")
        return bad


# Loop detection (Sampling.stop_loops): a completion loops when its last LOOP_REPEATS * p tokens
# are one span of p tokens (LOOP_MIN_PERIOD <= p <= LOOP_MAX_PERIOD) said LOOP_REPEATS times over.
# Three repeats of a 4+ token span almost never happen in text that does not loop; a list with
# a repeated line prefix ("1. The ... 2. The ...") differs in its numbers and is not caught.
LOOP_MIN_PERIOD, LOOP_MAX_PERIOD, LOOP_REPEATS = 4, 64, 3


def loops(tokens: Sequence[int]) -> bool:
    """Whether the tokens end in a loop (see above). Meant to be called after each new token."""
    n = len(tokens)
    for p in range(LOOP_MIN_PERIOD, min(LOOP_MAX_PERIOD, n // LOOP_REPEATS) + 1):
        if tokens[n - 1] != tokens[n - 1 - p]:  # cheap test first: most periods fail here
            continue
        tail = tokens[n - p:]
        if all(tokens[n - (k + 1) * p:n - k * p] == tail for k in range(1, LOOP_REPEATS)):
            return True
    return False


def first_loop(tokens: Sequence[int]) -> int | None:
    """The smallest k such that tokens[:k] ends in a loop, or None: where a backend that checks
    after every token would have stopped (for backends that get whole completions back)."""
    tokens = list(tokens)
    for k in range(LOOP_MIN_PERIOD * LOOP_REPEATS, len(tokens) + 1):
        if loops(tokens[:k]):
            return k
    return None


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
    finish_reason: str  # "stop" (end-of-turn token or stop string), "length" (max_tokens) or "loop" (stop_loops)
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


def single_token_ids(vocab, texts: Sequence[str]) -> list[int]:
    """The token id of each text, which must be one token of `vocab` (for ban lists)."""
    ids = []
    for text in texts:
        tokens = vocab.tokenize(text, add_bos=False, special=False)
        if len(tokens) != 1:
            raise BackendError(f"{text!r} is not one token of the model's vocabulary "
                               f"({len(tokens)} tokens); a banned first token must be a single token")
        ids.append(tokens[0])
    return ids


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain sampling; callers check these, never backend names."""

    sampling_controls: frozenset[str] = frozenset()  # Sampling.controls() names it applies
    scoring: bool = False  # token_logprobs: prompt log-probabilities for IFD
    grammar: bool = False  # Request.grammar: constrained answers (tagging)
    embeddings: bool = False  # embed(): sentence embeddings
    pooling: str = "mean"  # how embed() pools: "mean" (final hidden states, here) or "server" (its own)
    local: bool = True  # runs a model file in this process (not a server somewhere else)
    weight_copies: bool = False  # runs a GGUF model on a copy in another weight type (--weights)
    concurrent_requests: bool = False  # --parallel counts requests in flight, also for one-sequence work
    scoring_window: int = 2048  # the longest token sequence token_logprobs / choice_logprobs take
    batch_invariant: bool = False  # an item's output never depends on what shares its batch

    def unsupported(self, sampling: Sampling) -> list[str]:
        return [c for c in sampling.controls() if c not in self.sampling_controls]


ALL_CONTROLS = frozenset({"repeat_penalty", "frequency_penalty", "presence_penalty", "dry", "ban_first",
                          "stop_loops"})


class BackendBase:
    """What every backend does the same way on top of its own `stream`, `close` and `vocab`
    (its tokenizer, from vocab.py), and the class-level facts the registry (backends/__init__.py)
    reads without loading anything."""

    name: str = ""
    title: str = ""  # the engine's name as users know it: llama.cpp, MLX
    capabilities: Capabilities = Capabilities()

    @classmethod
    def refuses(cls, model) -> str | None:
        """Why this backend cannot run `model` (a models.Model), read without loading it; None if it can."""
        return None

    @classmethod
    def avoids(cls, model) -> str | None:
        """Why `--backend auto` should run `model` elsewhere although this backend could (None: it need
        not); asked only of a backend auto would otherwise take."""
        return None

    @classmethod
    def open(cls, model, sha256: str, *, ctx: int, parallel: int | None, threads: int | None = None,
             announce: Callable[[str], None] | None = None, server=None):
        """Load `model` (its file's hash: `sha256`) on this backend, ready to run."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, server):
        """The server options (options.ServerOptions) as this backend will use them (a remote
        backend names the served model here, before a run's key is made)."""
        return server

    @classmethod
    def request_record(cls, sampling: Sampling) -> dict | None:
        """What a run's config records of the requests sent for `sampling`, where the backend sends
        them under other names (None: the settings say it all)."""
        return None

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

    def token_ids(self, texts: Sequence[str]) -> list[int]:
        return single_token_ids(self.vocab, texts)

    def prompt_tokens(self, request: Request, ctx: int) -> tuple[list[int], int]:
        """(the request's prompt tokens, how many new tokens fit after them in a `ctx`-token sequence)."""
        tokens = self.tokenize(request.prompt)
        if not tokens:
            raise BackendError("empty prompt")
        room = ctx - len(tokens)
        if room < 1:
            raise BackendError(f"prompt of {len(tokens)} tokens does not fit --ctx {ctx}")
        return tokens, min(request.sampling.max_tokens, room)

    def check_scoring(self, contexts: Sequence[list[int]]) -> None:
        """Raise BackendError if sequences starting like `contexts` cannot be scored here."""

    def choice_logprobs(self, items: Sequence[tuple[list[int], Sequence[int]]]) -> list[Any]:
        """capabilities.scoring: for each (prompt tokens, choice token ids), the log-probability of each
        choice being the next token (closed answers: judge scores, tag labels). Here one scored
        sequence per choice; backends that can read the whole next-token distribution at once do so."""
        import numpy as np

        flat = [(list(prompt) + [choice], len(prompt)) for prompt, choices in items for choice in choices]
        scored = iter(self.token_logprobs(flat))
        out = []
        for _, choices in items:
            row = [next(scored) for _ in choices]
            if bad := next((r for r in row if isinstance(r, str)), None):
                raise BackendError(f"cannot read the answer's probabilities: {bad}")
            out.append(np.array([r[0] for r in row], dtype=np.float64))
        return out

    def spread(self) -> dict[str, int]:
        """Requests each endpoint answered, for backends that spread work over several."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Backend(Protocol):
    """The contract every backend keeps; what it can do beyond generation is in `capabilities`,
    which callers check (never the backend's name). BackendBase gives the shared methods."""

    name: str
    capabilities: Capabilities

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

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def token_ids(self, texts: Sequence[str]) -> list[int]:
        """The id of each text, each one token of the vocabulary (ban lists)."""
        ...

    def token_logprobs(self, items: Sequence[tuple[list[int], int]]) -> list[Any]:
        """capabilities.scoring: log-probabilities of tokens[start:] for each (tokens, start)."""
        ...

    def check_scoring(self, contexts: Sequence[list[int]]) -> None:
        """Raise BackendError if sequences starting like `contexts` cannot be scored here."""
        ...

    def choice_logprobs(self, items: Sequence[tuple[list[int], Sequence[int]]]) -> list[Any]:
        """capabilities.scoring: log-probabilities of each choice token as the next token after each prompt."""
        ...

    def embed(self, texts: Sequence[str]) -> Any:
        """capabilities.embeddings: one L2-normalised embedding row per text."""
        ...

    def spread(self) -> dict[str, int]:
        """Requests each endpoint answered, for backends that spread work over several."""
        ...

    def describe(self) -> dict:
        """Facts recorded with a run: backend name, versions, build, device."""
        ...

    def close(self) -> None: ...
