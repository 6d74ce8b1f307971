"""verify: a generation run's items made again from their seeds and settings, compared byte for byte."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..backends import capabilities
from ..errors import UsageError
from ..generate import REPLAYED_FIELDS, Generation, replay_difference
from ..store import Store
from .generation import _resumed
from .session import Announce, Progress, opened_store, quiet
from .settings import at_least, numbers_checked


@dataclass
class VerifyResult:
    run_id: int
    items: list[int]  # the item indices made again
    identical: int  # how many came out the same, byte for byte
    mismatches: list[str]  # "item N: what differs", one per item that did not
    engine: str  # the engine in words: "llama.cpp (llama-cpp-python 0.3.36), built for AVX2 ..., weights file"
    batch_invariant: bool  # whether the engine promises an item's output whatever shares its batch
    skipped: str | None = None  # why nothing was made again (a run a server made)


@numbers_checked
def verify(db: str | Path | Store, *, run: int | None = None, sample: int = 12, seed: int = 0,
           model: str | None = None, ctx: int = 1024, parallel: int | None = None, threads: int | None = None,
           progress: Progress | None = None, announce: Announce = quiet) -> VerifyResult:
    """Make `sample` randomly chosen items of generation run `run` (default: the latest) again from
    their seeds and the run's settings, model file and weights, on the backend that made them, and
    compare each with what is stored, byte for byte; store the result (the dataset card quotes it).
    Decoding is batch-invariant on llama.cpp, so the items come out the same at any `parallel`; an
    engine that cannot promise it is named through `announce`. `model`: where the run's model file
    has moved (its sha256 must match)."""
    at_least(1, ("--sample", sample), ("--parallel", parallel), ("--threads", threads))
    with opened_store(db, create=False) as store:
        if run is None:
            latest = store.latest_run("generate")
            if latest is None:
                raise UsageError(f"{store.path} holds no generation run to verify")
            run = latest.id
        made_by = store.get_run(run)
        if made_by.kind == "generate" and not capabilities(made_by.backend).local:
            why = (f"run {run} was made by a server ({made_by.backend}), which promises no batch invariance and is "
                   "not here to ask again: nothing verified")
            return VerifyResult(run, [], 0, [], made_by.backend, False, skipped=why)
        found, session, settings, fmt = _resumed(store, run, model, "auto", None, None, announce)
        if session.sha256(store) != found.config["model_sha256"]:
            raise UsageError(f"{session.model.path} is not the model file run {run} was made with (its sha256 "
                             "differs); pass --model with that file")
        stored_indices = store.item_indices(run)
        if not stored_indices:
            raise UsageError(f"run {run} holds no items yet")
        items = sorted(random.Random(seed).sample(stored_indices, min(sample, len(stored_indices))))
        stored = store.stored_items(run, items, REPLAYED_FIELDS)
        if not session.caps.batch_invariant:
            announce(f"{session.title} does not promise batch-invariant decoding: items are made one at a time, "
                     "and a difference may be the engine's rather than the data's")
            parallel = 1
        with session.open(found.config["model_sha256"], ctx=ctx, parallel=parallel, threads=threads,
                          announce=announce) as opened:
            replay = Generation(store, found, opened, fmt, settings)
            queue = list(items)

            def next_job():
                return (queue[0], replay.magpie_job(queue.pop(0))) if queue else None

            made = {}
            for item, row in opened.stream(next_job, None):
                made[item] = row
                if progress and progress.item:
                    progress.item(1)
            facts = opened.describe()
        mismatches = [f"item {i}: {why}" for i in items if (why := replay_difference(stored[i], made[i]))]
        engine = _engine_words(session, facts)
        store.add_verification(run, items, len(items) - len(mismatches), mismatches, dict(facts, words=engine))
    return VerifyResult(run, items, len(items) - len(mismatches), mismatches, engine, session.caps.batch_invariant)


def _engine_words(session, facts: dict) -> str:
    """The engine as the card names it: its versions, the instruction sets llama.cpp was built for,
    and the weights the items were made on."""
    from ..tune import build_features

    versions = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in facts.items()
                         if k in ("llama_cpp_python", "mlx", "mlx_lm") and v)
    line = f"{session.title}" + (f" ({versions})" if versions else "")
    if facts.get("system_info"):
        line += ", built for " + (" ".join(build_features(facts["system_info"])) or "no extensions")
    return line + f", weights {session.copy or 'file'}"
