"""The data itself: importing a dataset, and reading back what a database holds (runs, show,
stats and the summaries the commands print after a pass)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..store import DATA_KINDS, Run, Store
from .selection import pass_run_or_latest, score_run_or_latest
from .session import opened_store
from .settings import numbers_checked


@dataclass
class ImportResult:
    run: Run
    records: int  # conversations imported
    turns: int
    formats: dict[str, int]  # records per input format (alpaca, sharegpt, messages)
    malformed: list[str]  # one line per record that was skipped, with the reason
    status: str = "imported"  # or already-imported (nothing to do)


@numbers_checked
def import_file(db: str | Path | Store, file: str | Path, *, strict: bool = False, new: bool = False,
                on_skipped: Callable[[list[str]], None] | None = None) -> ImportResult:
    """Import an Alpaca, ShareGPT or OpenAI-messages dataset, or instructions alone (for `respond`),
    from a JSON array or JSON Lines file into `db` as one run, in one transaction. Malformed records
    are skipped and listed (to `on_skipped` as soon as the file is read; `strict`: refuse the file);
    the same file is not imported twice unless `new`."""
    from .._version import __version__
    from ..importers import read_dataset
    from ..models import sha256_file

    file = Path(file)
    if not file.is_file():
        raise UsageError(f"no such file: {file}")
    records, errors = read_dataset(file)
    if errors and strict:
        raise UsageError(f"{errors[0]} ({len(errors)} malformed records in {file}; nothing imported, --strict)")
    if errors and on_skipped:
        on_skipped(errors)
    if not records:
        raise UsageError(f"no valid records in {file}")
    sha = sha256_file(file)
    formats = dict(Counter(r.format for r in records))
    turns = sum(len(r.turns) for r in records)
    with opened_store(db) as store:
        existing = None if new else store.find_run("import", sha[:16])
        if existing is not None:
            return ImportResult(existing, len(records), turns, formats, errors, status="already-imported")
        rows = [(dict(item_index=i, status="pending" if r.pending else "kept", drop_reason=None,
                      system_prompt=r.system_prompt),
                 [dict(t, raw_instruction=None) for t in r.turns]) for i, r in enumerate(records)]
        run = store.import_run(config_key=sha[:16], rows=rows, versions={"magpie_local": __version__},
                               config={"file": file.name, "sha256": sha, "formats": formats, "malformed": len(errors)})
    return ImportResult(run, len(records), turns, formats, errors)


@dataclass
class RunSummary:
    """One row of `magpie-local runs`: a run and what it holds (for a pass: the rows it stored)."""

    id: int
    kind: str
    complete: bool
    held: int  # kept (or pending) conversations; a pass's rows
    target: int
    dropped: int
    tokens: int
    seconds: float
    model: str | None
    backend: str | None
    created: str

    @property
    def rate(self) -> float | None:
        """Generated tokens a second over the committed batches."""
        return self.tokens / self.seconds if self.seconds else None


@numbers_checked
def runs(db: str | Path | Store) -> list[RunSummary]:
    """Every run in `db`, oldest first."""
    with opened_store(db, create=False, write=False) as store:
        return [RunSummary(id=r["id"], kind=r["kind"], complete=r["status"] == "complete", held=r["kept"],
                           target=r["target"], dropped=r["dropped"], tokens=r["tokens"], seconds=r["seconds"],
                           model=r["model"], backend=r["backend"], created=r["created_at"])
                for r in store.list_runs()]


@dataclass
class RunCounts:
    """A data run's counts as stored: kept, dropped, pending, the drop reasons, cut-off responses."""

    run: Run
    kept: int
    dropped: int
    pending: int
    drop_reasons: dict[str, int]
    cut_off: int  # kept turns whose response hit the token limit


@numbers_checked
def run_counts(db: str | Path | Store, run_id: int) -> RunCounts:
    with opened_store(db, create=False, write=False) as store:
        counts = store.run_counts(run_id)
        return RunCounts(store.get_run(run_id), counts["kept"], counts["dropped"], counts["pending"],
                         store.drop_reasons(run_id), store.cut_off_count(run_id))


@dataclass
class Shown:
    run_id: int
    conversations: list[dict]  # each: item_index, system_name, system_prompt, drop_reason, turns (dicts)


@numbers_checked
def show(db: str | Path | Store, run: int | None = None, *, limit: int = 3, dropped: bool = False) -> Shown:
    """The first `limit` kept (or dropped) conversations of run `run` (default: the latest run that
    holds data: a generate, import or respond run)."""
    if limit < 0:
        raise UsageError("--limit must be at least 0")
    with opened_store(db, create=False, write=False) as store:
        run_id = run or max((r.id for kind in DATA_KINDS if (r := store.latest_run(kind))), default=None)
        if run_id is None:
            raise UsageError(f"{store.path} holds no runs yet")
        store.get_run(run_id)
        return Shown(run_id, store.conversations(run_id, "dropped" if dropped else "kept", limit))


@dataclass
class IFDSummary:
    run: Run
    ifd: list[float]  # of the pairs scored (not skipped)
    truncated: int
    skipped: Counter  # reason -> pairs


@dataclass
class TagSummary:
    run: Run
    failed: int  # answers that could not be read
    counts: dict[str, dict[str, int]]  # field -> value -> turns


@dataclass
class RatingSummary:
    run: Run
    scores: list[float]


@numbers_checked
def ifd_summary(db: str | Path | Store, score_run: int | None = None) -> IFDSummary:
    """The IFD distribution of a scoring run (default: the latest)."""
    with opened_store(db, create=False, write=False) as store:
        run_id = score_run_or_latest(store, score_run)
        rows = store.score_rows(run_id)
        return IFDSummary(store.get_run(run_id), [r["ifd"] for r in rows if r["ifd"] is not None],
                          sum(r["truncated"] for r in rows), Counter(r["skip_reason"] for r in rows
                                                                     if r["skip_reason"]))


@numbers_checked
def tag_summary(db: str | Path | Store, tag_run: int | None = None) -> TagSummary:
    """The tag distributions of a tagging run (default: the latest)."""
    from .. import tagging

    with opened_store(db, create=False, write=False) as store:
        run_id = pass_run_or_latest(store, "tag", tag_run)
        failed, counts = store.tag_counts(run_id, tagging.FIELDS)
        return TagSummary(store.get_run(run_id), failed, counts)


@numbers_checked
def rating_summary(db: str | Path | Store, judge_run: int | None = None) -> RatingSummary:
    """The judge's ratings of a judging run (default: the latest)."""
    with opened_store(db, create=False, write=False) as store:
        run_id = pass_run_or_latest(store, "judge", judge_run)
        return RatingSummary(store.get_run(run_id), store.rating_scores(run_id))


@numbers_checked
def check_counts(db: str | Path | Store, runs: list[int] | None = None) -> tuple[int, dict[str, tuple[int, int]]]:
    """(kept turns of `runs` (None: all), {check: (passed, failed)} over every checked turn)."""
    with opened_store(db, create=False, write=False) as store:
        return store.count_turns(runs), store.check_counts()


@dataclass
class Stats:
    """What `magpie-local stats` prints: each data run with its drop reasons, the kept responses'
    lengths, the curation-check counts, and the latest (or a given) scoring, tagging and judging
    runs' summaries where there are such runs."""

    runs: list[RunCounts]
    response_lengths: list[int]
    cut_off: int
    checks: dict[str, tuple[int, int]]
    ifd: IFDSummary | None = None
    tags: TagSummary | None = None
    ratings: RatingSummary | None = None


@numbers_checked
def stats(db: str | Path | Store, score_run: int | None = None) -> Stats:
    with opened_store(db, create=False, write=False) as store:
        data = [r for r in store.list_runs() if r["kind"] in DATA_KINDS]
        if not data:
            raise UsageError(f"{store.path} holds no generated or imported data yet")
        found = Stats([run_counts(store, r["id"]) for r in data], store.kept_response_lengths(),
                      store.cut_off_count(), store.check_counts())
        if score_run is not None or store.latest_run("score") is not None:
            found.ifd = ifd_summary(store, score_run)
        if store.latest_run("tag") is not None:
            found.tags = tag_summary(store)
        if store.latest_run("judge") is not None:
            found.ratings = rating_summary(store)
        return found
