"""What every command that runs a model shares.

A ModelSession is a model chosen for one role of a command (the generator, an answering model,
a scorer, a judge, an embedder): the model, the backend that runs it (chosen by capability, never
by name), the server options and the weight copy. It checks all of that before anything is
opened or written, and then opens the model.

A run's lifecycle is the same for every command that makes one: find the run these settings
made before or make it, set its target, announce it, count tokens and time while it works, and
word a failure with what is committed and how to go on (Lifecycle).

Every API function takes a database as a path or as an open Store (`opened_store`); database
errors reach callers as StoreError, one sentence each.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import ServerOptions, backend_class, backend_key, cache_dir, choose_backend, open_backend, remote, title
from ..backends.base import BackendError, Capabilities
from ..convert import WEIGHTS, cached_copy
from ..errors import UsageError
from ..models import Model, resolve_model, sha256_file
from ..store import Run, Store, StoreError, database_error
from ..tune import copy_wanted

Announce = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass
class Progress:
    """Callbacks a call reports through (all optional): `start(run, done, new)` once the run is
    known, `tokens(k)` as tokens are generated, `item(k)` as items end (generate: 1 if the item
    added a kept pair, else 0; the passes: the rows just committed)."""

    start: Callable[[Run, int, bool], None] | None = None
    tokens: Callable[[int], None] | None = None
    item: Callable[[int], None] | None = None


@dataclass
class GenerateResult:
    """What a generate (or respond) call did: the run, its counts after it, and this call's own work."""

    run: Run
    counts: dict[str, int]  # the run's kept, dropped and next_item, as stored
    made: int = 0  # kept pairs this call added
    tokens: int = 0  # tokens this call generated
    seconds: float = 0.0
    status: str = "complete"  # complete, or already-complete (nothing to do)
    spread: dict[str, int] = field(default_factory=dict)  # requests per endpoint (server backend)
    instructions: GenerateResult | None = None  # with a response model: the instruction run's own result


@contextmanager
def opened_store(db: str | Path | Store, *, create: bool = True, write: bool = True) -> Iterator[Store]:
    """The database `db`: an open Store as it is (left open), or a path opened here and closed after.
    Database errors inside become StoreError with one sentence."""
    try:
        if isinstance(db, Store):
            if write and not db.writable:
                raise UsageError(f"this needs the Store of {db.path} opened with write=True")
            yield db
            return
        with Store(db, create=create, write=write) as store:
            yield store
    except sqlite3.Error as e:
        raise StoreError(database_error(e)) from None


def one_sequence_parallel(caps: Capabilities, parallel: int | None) -> int | None:
    """--parallel for work that decodes one sequence at a time locally (score, judge, embed): on a
    backend that takes concurrent requests, the requests in flight; elsewhere one sequence."""
    return parallel if caps.concurrent_requests else 1


@dataclass
class ModelSession:
    """A model chosen for one role of a command, and how it runs. Make it with `choose`."""

    model: Model
    backend: str  # the registry's name
    server: ServerOptions = field(default_factory=ServerOptions)
    copy: str | None = None  # the weight type of the copy it runs on; None: the file as it is
    why: str | None = None  # why auto passed over other backends

    @property
    def caps(self) -> Capabilities:
        from ..backends import capabilities

        return capabilities(self.backend)

    @property
    def title(self) -> str:
        return title(self.backend)

    @classmethod
    def choose(cls, model: str | None = None, *, backend: str = "auto", server: ServerOptions | None = None,
               tokenizer: str | None = None, needs: str | None = None, work: str | None = None,
               announce: Announce = quiet) -> ModelSession:
        """The model `model` names (default: the embedded one) on the backend `backend` means for
        it; where auto passed over the engine it tries first (MLX on a Mac), one line through
        `announce` says which engine runs and why. With the server backend the model is the served
        model's local tokenizer and chat template (`tokenizer`, or `model`). `needs`: a
        Capabilities flag the work cannot do without (`work` names the work in the error)."""
        server = server or ServerOptions()
        if remote(backend, server.endpoints):
            name = choose_backend(backend, None, server.endpoints).name
            if tokenizer and model:
                raise UsageError("--tokenizer and --model name the same thing with --backend server; give one")
            session = cls(resolve_model(tokenizer or model, weights=False), name, backend_class(name).prepare(server))
        else:
            if tokenizer:
                raise UsageError("--tokenizer is for --backend server; a local backend tokenizes with --model")
            for flag, value in (("--api-key-env", server.api_key_env), ("--served-model", server.served_model)):
                if value:
                    raise UsageError(f"{flag} is for --backend server (with --endpoint URL)")
            m = resolve_model(model)
            chosen = choose_backend(backend, m, needs=needs)
            session = cls(m, chosen.name, server, why=chosen.why)
            if chosen.why:
                announce(f"{session.title} runs {m.name} ({chosen.why})")
        if needs and not getattr(session.caps, needs):
            raise UsageError(f"{work or needs}: the {session.title} backend cannot do it")
        return session

    def with_weights(self, weights: str, work: str, announce: Announce = quiet) -> ModelSession:
        """Choose the copy --weights runs the model on, for `work`: "step" (generate, respond) or
        "prompt" (score, judge, tag, embed). A copy where there can be none is refused."""
        if weights not in WEIGHTS:
            raise UsageError(f"--weights must be one of: {', '.join(WEIGHTS)}")
        if weights not in ("auto", "file") and (not self.caps.weight_copies or self.model.kind != "gguf"):
            role = "model" if work == "step" else {"prompt": "scorer"}.get(work, work)
            raise UsageError(f"--weights {weights} is for a GGUF {role} on the llama.cpp backend")
        self.copy = copy_wanted(self.model, weights, work, announce) if self.caps.weight_copies else None
        return self

    def key(self) -> dict:
        """This session's part of a run's config key: the backend's, and the weight copy's."""
        return {**backend_key(self.backend, self.server.served_model), **({"weights": self.copy} if self.copy else {})}

    def sha256(self, store: Store) -> str:
        return store.cached_sha256(self.model.path, sha256_file)

    def record(self, sha: str) -> dict:
        """The model as a run records it."""
        return {"name": self.model.name, "path": str(self.model.path.resolve()), "sha256": sha}

    def open(self, sha: str, *, ctx: int, parallel: int | None, threads: int | None = None,
             announce: Announce = quiet):
        """Load the model (its weight copy made once in the cache) on its backend."""
        model = self.model
        if self.copy:
            model = resolve_model(str(cached_copy(model, sha, self.copy, cache_dir() / self.copy, announce)))
        return open_backend(self.backend, model, sha, ctx=ctx, parallel=parallel, threads=threads,
                            announce=announce, server=self.server)


@dataclass
class Lifecycle:
    """One run being made or continued: `begin` finds or makes it and announces it, `tokens`
    counts what is generated (passing each report on), `going_on` words a backend failure with
    what is committed, `seconds` is the time since `begin`."""

    store: Store
    progress: Progress = field(default_factory=Progress)
    run: Run | None = None
    is_new: bool = False
    generated: int = 0
    started: float = 0.0

    def begin(self, kind: str, key: str, config: dict, session: ModelSession, sha: str, opened, target: int,
              found: Run | None, done: int) -> Run:
        """Make the run (or continue `found`, with its target set to `target`) and announce it
        with `done` items already in it."""
        if found is None:
            self.run = self.store.create_run(kind=kind, target=target, config_key=key, config=config,
                                             model=session.record(sha), backend=opened.name,
                                             versions=opened.describe())
            self.is_new = True
        else:
            if found.target != target or found.status != "complete":
                self.store.set_target(found.id, target)
                found.target = target
            self.run = found
        if self.progress.start:
            self.progress.start(self.run, done, self.is_new)
        self.started = time.perf_counter()
        return self.run

    def tokens(self, k: int) -> None:
        self.generated += k
        if self.progress.tokens:
            self.progress.tokens(k)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def going_on(self, committed: Callable[[], str]) -> Iterator[None]:
        """A backend failure (a server gone, say) as one line: the failure, then `committed()`
        (what the run holds), then how to go on; everything committed stays."""
        try:
            yield
        except BackendError as e:
            raise BackendError(f"{e}. {committed()}; run the same command again to go on.") from None
