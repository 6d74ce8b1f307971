"""export: training files (or DPO preference pairs) and a dataset card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..store import Store
from .curation import curate_checks
from .selection import check_reviewed, check_spacing, judge_run_or_latest, pass_run_or_latest, score_run_or_latest
from .session import opened_store
from .settings import numbers_checked


@dataclass
class ExportResult:
    out: Path
    conversations: int
    files: dict[str, int]  # file name -> conversations in it
    left_out: dict[str, int]  # reason -> conversations left out
    card: Path  # the dataset card (README.md)
    redacted: dict[str, int] | None = None  # with redact: findings replaced by placeholders, by kind


@numbers_checked
def export(db: str | Path | Store, out: str | Path, *, format: str = "messages", selection: str | None = None,
           runs: list[int] | None = None, split: float | None = None, seed: int = 0, include_cut_off: bool = False,
           include_system: bool = True, passing: list[str] | str | None = None, min_judge: float | None = None,
           judge_run: int | None = None, min_margin: float = 0.5, min_distance: float | None = None,
           max_repeats: int | None = None, embed_run: int | None = None, reviewed: str | None = None,
           redact: bool = False, force: bool = False) -> ExportResult:
    """Write the kept conversations (a selection's, or every data run's) as training files in directory
    `out`, with a dataset card: `format` messages, sharegpt, alpaca or parquet; `split` the train share
    (train.jsonl + valid.jsonl), else data.jsonl. Cut-off responses and duplicates across runs are left
    out unless asked; `passing` keeps only conversations whose every turn passed those curation checks
    (a list, or 'all'); `min_judge` those whose every turn the judging run (default: the latest) rated
    at least that; `min_distance` / `max_repeats` those whose every turn's neighbour statistics in the
    embedding run (default: the latest) meet them (as select); `reviewed` ("accepted" or
    "not-rejected") those whose every turn's latest review (magpie-local review) is accepted, or is
    not a rejection. An edited turn is exported as its latest revision. `redact` replaces personal
    data and secrets with typed placeholders (<EMAIL>, <PHONE>, <API_KEY> ...) instead of leaving
    out the pairs that hold them (the pii and secrets checks then filter nothing), and the card
    counts each kind. `format="dpo"` writes
    preference pairs from respond runs (`runs`, default all) instead (preference.py), those whose
    score margin is below `min_margin` left out. Existing files are replaced only with `force`."""
    from ..export import dataset_card, file_counts, plan_export, split_train_valid, write_files

    if split is not None and not 0 < split < 1:
        raise UsageError("--split takes the train share, between 0 and 1 (e.g. 0.95)")
    out = Path(out)
    check_spacing(min_distance, max_repeats)
    check_reviewed(reviewed)
    if format == "dpo":
        if min_distance is not None or max_repeats is not None:
            raise UsageError("--format dpo pairs K answers to one instruction; filter instructions on their "
                             "neighbours with select or the other formats")
        return _export_pairs(db, out, runs=runs, split=split, seed=seed, include_system=include_system,
                             include_cut_off=include_cut_off, passing=passing, judge_run=judge_run,
                             min_margin=min_margin, force=force, selection=selection, min_judge=min_judge,
                             reviewed=reviewed, redact=redact)
    with opened_store(db, create=False, write=False) as store:
        checks = _filtering(passing, store, redact)
        judged = judge_run_or_latest(store, judge_run) if min_judge is not None else None
        spaced = (pass_run_or_latest(store, "embed", embed_run)
                  if min_distance is not None or max_repeats is not None else None)
        plan = plan_export(store, selection=selection, runs=runs or None, include_cut_off=include_cut_off,
                           include_system=include_system, passing=checks or None, min_judge=min_judge,
                           judge_run=judged, min_distance=min_distance, max_repeats=max_repeats, embed_run=spaced,
                           reviewed=reviewed, redact=redact)
        if not plan.conversations:
            left = ", ".join(f"{n} {why}" for why, n in plan.left_out.items()) or "none"
            raise UsageError(f"nothing to export (left out: {left})")
        parts = split_train_valid(plan.conversations, split, seed)
        counts = file_counts(parts, format)
        write_files(out, format, parts, dataset_card(store, plan, format, counts), force=force)
    return ExportResult(out, len(plan.conversations), counts, dict(plan.left_out), out / "README.md",
                        None if plan.redacted is None else dict(plan.redacted))


def _filtering(passing: list[str] | str | None, store: Store, redact: bool) -> list[str] | None:
    """The curation checks an exported pair must pass: those named, less pii and secrets where the
    findings are redacted instead."""
    checks = curate_checks(passing, store) if isinstance(passing, str) else passing
    return [c for c in checks if not (redact and c in ("pii", "secrets"))] if checks else checks


def _export_pairs(db, out: Path, *, runs, split, seed, include_system, include_cut_off, passing, judge_run,
                  min_margin, force, selection, min_judge, reviewed, redact) -> ExportResult:
    """export(format="dpo"): the preference pairs of respond runs, with their card."""
    from collections import Counter
    from dataclasses import asdict

    from ..export import file_counts, preference_card, redact_texts, split_train_valid, write_files
    from ..preference import PreferencePair, preference_pairs

    if selection is not None or min_judge is not None:
        raise UsageError("--format dpo picks its pairs by the judge's scores; --selection and --min-judge are "
                         "for the other formats (use --min-margin)")
    if min_margin < 0:
        raise UsageError("--min-margin must be at least 0")
    with opened_store(db, create=False, write=False) as store:
        checks = _filtering(passing, store, redact)
        if runs:
            for run_id in runs:
                if store.get_run(run_id).kind != "respond":
                    raise UsageError(f"run {run_id} is not a respond run; preference pairs come from "
                                     "`magpie-local respond --responses K`")
        else:
            runs = store.run_ids("respond")
            if not runs:
                raise UsageError(f"{store.path} holds no respond runs; make answers with `magpie-local respond "
                                 "--responses 2` (or more) first")
        judged = judge_run_or_latest(store, judge_run)
        pairs, skipped = [], Counter()
        for run_id in runs:
            got, why = preference_pairs(store, run_id, judged, min_margin=min_margin, passing=checks or None,
                                        include_system=include_system, include_cut_off=include_cut_off,
                                        reviewed=reviewed)
            pairs += got
            skipped += why
        if not pairs:
            left = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"
            raise UsageError(f"no preference pairs to export (skipped: {left})")
        redacted = None
        if redact:
            records = [asdict(p) for p in pairs]
            redacted = redact_texts(records, ("prompt", "chosen", "rejected"))
            pairs = [PreferencePair(**r) for r in records]
        parts = split_train_valid(pairs, split, seed)
        counts = file_counts(parts, "dpo")
        write_files(out, "dpo", parts, preference_card(store, runs, judged, pairs, skipped, counts, min_margin,
                                                       checks or None, reviewed, redacted), force=force)
    return ExportResult(out, len(pairs), counts, dict(skipped), out / "README.md",
                        None if redacted is None else dict(redacted))


@numbers_checked
def report(db: str | Path | Store, out: str | Path, *, score_run: int | None = None, sample: int = 50,
           seed: int = 0) -> int:
    """Write the self-contained HTML report of `db` to `out` (report.py): runs, the IFD, judge,
    neighbour, length and tag distributions of the latest (or given) runs, a seeded sample of
    `sample` pairs. Returns its size in bytes."""
    from ..files import write_bytes
    from ..report import build_report

    if sample < 0:
        raise UsageError("--sample must be at least 0")
    with opened_store(db, create=False, write=False) as store:
        scored = score_run_or_latest(store, score_run) if score_run is not None or store.latest_run("score") \
            else None
        tagged, judged, embedded = store.latest_run("tag"), store.latest_run("judge"), store.latest_run("embed")
        page = build_report(store, scored, tagged.id if tagged else None, sample, seed,
                            judged.id if judged else None, embedded.id if embedded else None).encode("utf-8")
    write_bytes(out, page)
    return len(page)
