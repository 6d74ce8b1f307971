"""curate: the curation checks' verdicts per turn, stored for select, export and generate --passing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..contamination import MIN_WORDS, NGRAM, PARAPHRASE_COSINE, EvalIndex, read_eval_set
from ..errors import UsageError
from ..store import Store
from .session import Announce, ModelSession, Progress, opened_store, quiet
from .settings import numbers_checked


@numbers_checked
def curate(db: str | Path | Store, *, runs: list[int] | None = None, bounds=None, near_dup_model: str | None = None,
           near_dup_threshold: float = 0.95, against: list[str | Path] | None = None,
           against_cosine: float = PARAPHRASE_COSINE, backend: str = "auto", progress: Progress | None = None,
           announce: Announce = quiet) -> dict[str, tuple[int, int]]:
    """Run the curation checks on every kept turn (of `runs`, or all) and store each verdict with its
    reason, replacing earlier ones; `near_dup_model` ('default': the embedded model) adds the
    embedding near-duplicate check; `against` (eval files) the contamination check, which later
    calls repeat against the same files (each must still have the same sha256): a shared word
    sequence, or, where an embedding run of instructions exists, an instruction at least
    `against_cosine` from an eval prompt embedded by that run's model. Returns
    {check: (passed, failed)} over the database. `progress.item(k)` is called as k instructions are
    embedded."""
    import json
    from dataclasses import asdict

    import numpy as np

    from ..curate import Bounds, check_turn, duplicate_reasons, near_duplicates

    bounds = bounds or Bounds()
    progress = progress or Progress()
    if not 0 <= bounds.max_repetition <= 1:
        raise UsageError("--max-repetition must be between 0 and 1")
    if bounds.min_chars < 0 or bounds.max_chars < bounds.min_chars:
        raise UsageError(f"--min-chars must be at least 0 and --max-chars at least --min-chars "
                         f"(got {bounds.min_chars} and {bounds.max_chars})")
    session = None
    if near_dup_model:
        if not 0 < near_dup_threshold <= 1:
            raise UsageError("--near-dup-threshold must be in (0, 1]")
        session = ModelSession.choose(None if near_dup_model == "default" else near_dup_model, backend=backend,
                                      needs="embeddings", work="near-duplicate search", announce=announce)
    settings = json.dumps(dict(asdict(bounds), near_dup_model=near_dup_model,
                               near_dup_threshold=near_dup_threshold if near_dup_model else None), sort_keys=True)
    if not 0 < against_cosine <= 1:
        raise UsageError("--against-cosine must be in (0, 1]")
    eval_sets = [read_eval_set(path) for path in against] if against else None
    with opened_store(db, create=False) as store:
        turns = store.turns_to_check(runs or None)
        if not turns:
            raise UsageError(f"no kept pairs to check in {store.path}")
        if eval_sets is None and (earlier := store.check_settings("contamination")):
            eval_sets = _same_eval_sets(json.loads(earlier[0])["against"])
        contamination = EvalIndex(eval_sets) if eval_sets else None
        embedded = _paraphrases(store, eval_sets, against_cosine, announce) if eval_sets else None
        flagged = [0] * (len(eval_sets or ()) + 1)  # turns each eval set flagged (the last: none)
        # Answers of a respond run repeat their source's instruction on purpose: they take its verdict.
        firsts = [(t["conversation_id"], t["instruction"]) for t in turns if t["turn_index"] == 0
                  and t["source_id"] is None]
        duplicates = duplicate_reasons(firsts)
        near = {}
        if session is not None:
            chunks = []
            with session.open("", ctx=64, parallel=1) as opened:
                for i in range(0, len(firsts), 64):
                    chunks.append(opened.embed([text for _, text in firsts[i:i + 64]]))
                    if progress.item:
                        progress.item(len(chunks[-1]))
            near = near_duplicates([cid for cid, _ in firsts], np.concatenate(chunks), near_dup_threshold)
        rows = []
        for t in turns:
            verdicts = check_turn(t, bounds)
            own = t["source_id"] or t["conversation_id"]
            verdicts["duplicate"] = duplicates.get(own)
            if session is not None:
                verdicts["near_duplicate"] = near.get(own)
            if contamination is not None:
                hit = contamination.check(t["instruction"], t["response"]) or embedded.hits.get(t["id"])
                verdicts["contamination"] = hit[0] if hit else None
                flagged[hit[1] if hit else -1] += 1
            rows += [dict(turn_id=t["id"], name=name, passed=int(reason is None), reason=reason, settings=settings)
                     for name, reason in verdicts.items()]
        if contamination is not None:
            _describe_eval_sets(rows, eval_sets, flagged, embedded)
        store.replace_checks(rows)
        return store.check_counts()


def _same_eval_sets(recorded: list[dict]) -> list:
    """The eval sets an earlier `curate --against` used, read again; each must be unchanged."""
    sets = []
    for entry in recorded:
        again = (read_eval_set(entry["path"]) if Path(entry["path"]).is_file() else None)
        if again is None or again.sha256 != entry["sha256"]:
            raise UsageError(f"the pairs were checked for contamination against {entry['path']}, which is "
                             f"{'gone' if again is None else 'changed'}: pass --against with the eval files to use")
        sets.append(again)
    return sets


@dataclass
class Paraphrases:
    """The eval prompts' near paraphrases among an embedding run's instructions."""

    embed_run: int | None  # None: not searched (no embedding run of instructions with a local model)
    cosine: float
    hits: dict[int, tuple[str, int]]  # turn id: (reason, eval set index)


def _paraphrases(store: Store, eval_sets: list, cosine: float, announce: Announce) -> Paraphrases:
    """Embed the eval prompts with the latest embedding run's model, as it embedded the instructions,
    and find each instruction's most similar prompt: those at `cosine` or more are contaminated."""
    import numpy as np

    from ..neighbours import from_blobs
    from ..respond import user_text

    runs = [store.get_run(r["id"]) for r in store.list_runs() if r["kind"] == "embed"]
    run = max((r for r in runs if r.config.get("text") == "instruction"), key=lambda r: r.id, default=None)
    if run is None:
        return Paraphrases(None, cosine, {})
    if not Path(run.model_path or "").is_file():
        announce(f"contamination: the model of embedding run {run.id} is not here ({run.model_path or 'a server'}); "
                 "eval prompts are matched by shared words only")
        return Paraphrases(None, cosine, {})
    session = ModelSession.choose(run.model_path, needs="embeddings", work="paraphrase search", announce=announce)
    prompts = [(s, p, text) for s, e in enumerate(eval_sets) for p, text in enumerate(e.prompts)]
    with session.open("", ctx=64, parallel=1) as opened:
        vectors = np.concatenate([opened.embed([user_text(text, None) for _, _, text in prompts[i:i + 64]],
                                               max_tokens=run.config.get("max_tokens", 256))
                                  for i in range(0, len(prompts), 64)])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    turn_ids, blobs = store.embedding_rows(run.id)
    hits = {}
    for start in range(0, len(turn_ids), 4096):  # blocks of BLAS products, never a Python loop over pairs
        similar = from_blobs(blobs[start:start + 4096]) @ vectors.T
        best = similar.argmax(axis=1)
        for row in np.flatnonzero(similar[np.arange(len(best)), best] >= cosine):
            s, p, _ = prompts[best[row]]
            hits[turn_ids[start + row]] = (f"its instruction is a near paraphrase (cosine "
                                           f"{similar[row, best[row]]:.3f}, embedding run {run.id}) of "
                                           f"{eval_sets[s].name} prompt {p + 1}", s)
    return Paraphrases(run.id, cosine, hits)


def _describe_eval_sets(rows: list[dict], eval_sets: list, flagged: list[int], embedded: Paraphrases) -> None:
    """Give the contamination verdicts settings that name each eval set (file, sha256, prompts) and
    how many of these turns it flagged, for the dataset card."""
    import json

    settings = json.dumps({"ngram": NGRAM, "min_words": MIN_WORDS, "embed_run": embedded.embed_run,
                           "cosine": embedded.cosine if embedded.embed_run else None, "against": [
        {"file": s.name, "path": s.path, "sha256": s.sha256, "prompts": len(s.prompts),
         "flagged": count} for s, count in zip(eval_sets, flagged)]},
        sort_keys=True)
    for row in rows:
        if row["name"] == "contamination":
            row["settings"] = settings


def curate_checks(spec: str, store: Store) -> list[str]:
    """Check names from --passing for select and export; `all` is every check `curate` has run on
    this database."""
    from ..curate import CHECKS

    if spec.strip() == "all":
        found = store.check_names()
        names = [c for c in CHECKS if c in found]
        if not names:
            raise UsageError("no curation checks in this database yet: run `magpie-local curate` first")
        return names
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown or not names:
        raise UsageError(f"unknown check {', '.join(unknown) or spec!r}; known: all, {', '.join(CHECKS)}")
    return names
