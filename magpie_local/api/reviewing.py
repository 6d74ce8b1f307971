"""Reviewing the data by hand: the pairs table with its filters, one pair with all that is known of
it, decisions (accept, reject, flag with a note) and edits (a new revision; the turn itself is never
changed). The review app (magpie_local.review) is a page over these functions; a notebook can call
them directly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UsageError
from ..store import REVIEW_STATES, Store
from .session import opened_store
from .settings import numbers_checked

PAGE_SIZE = 50
MAX_EDIT_CHARS = 1_000_000
SORTS = ("id", "ifd", "judge", "distance", "length")
REVIEW_FILTERS = ("unreviewed", "accepted", "rejected", "flagged", "edited")


@dataclass
class PairFilters:
    """What the review table shows: every field a filter (None: not filtering), then the sort and page."""

    run: int | None = None  # a data run
    failed: str | None = None  # a curation check the pair failed ("any": any check)
    passed: str | None = None  # a curation check it passed
    min_ifd: float | None = None
    max_ifd: float | None = None
    min_judge: float | None = None
    max_judge: float | None = None
    tag: str | None = None  # FIELD=VALUE of the latest tagging run
    min_distance: float | None = None  # to the nearest neighbour, in the latest embedding run
    max_distance: float | None = None
    selection: str | None = None  # in this named selection
    outside: str | None = None  # not in this named selection
    review: str | None = None  # one of REVIEW_FILTERS
    q: str | None = None  # words to search for in the instruction and the response
    sort: str = "id"
    descending: bool = False
    page: int = 1

    @classmethod
    def from_query(cls, query: dict) -> PairFilters:
        """From a URL's query parameters (strings; empty ones are no filter). Bad values are a UsageError."""
        kinds = {f.name: f.type for f in fields(cls)}
        values = {}
        for name, raw in query.items():
            if name not in kinds or raw in ("", None):
                continue
            kind = str(kinds[name])
            try:
                if "bool" in kind:
                    values[name] = raw in ("1", "true", "on", "yes")
                elif "float" in kind:
                    values[name] = float(raw)
                elif "int" in kind:
                    values[name] = int(raw)
                else:
                    values[name] = str(raw)
            except ValueError:
                raise UsageError(f"{name}: {raw!r} is not a number") from None
        return cls(**values)

    def query(self, **changes) -> dict:
        """The query parameters of these filters with `changes`, leaving out what is not set."""
        values = {**asdict(self), **changes}
        return {k: ("1" if v is True else v) for k, v in values.items() if v not in (None, False, "")
                and not (k == "sort" and v == "id") and not (k == "page" and v == 1)}


@dataclass
class PairsPage:
    rows: list[dict]  # id, run_id, item_index, instruction, response, ifd, judge, distance, tags, state, edited...
    total: int  # pairs that pass the filters
    filters: PairFilters
    runs: dict[str, int | None]  # the scoring, judging, tagging and embedding runs the measures come from
    size: int = PAGE_SIZE
    facts: dict = field(default_factory=dict)  # what the filters can take: data runs, checks, selections, tags

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.size))


@dataclass
class Dashboard:
    runs: list[dict]  # every run: id, kind, status, model, backend, kept, dropped, created_at, settings (JSON)
    pairs: int  # kept pairs
    reviews: dict[str, int]  # by latest decision (accepted, rejected, flagged), and "edited"
    measures: dict[str, int | None]  # the runs the plots come from
    plots: list[str]  # the report's plots, inline SVG

    @property
    def unreviewed(self) -> int:
        return self.pairs - sum(self.reviews.get(s, 0) for s in ("accepted", "rejected", "flagged"))


def dashboard(db: str | Path | Store) -> Dashboard:
    """What the review app's first page shows: the runs with their settings and counts, the review
    counts, and the report's distribution plots from the latest scoring, judging, tagging and
    embedding runs."""
    import json

    from ..report import distribution_plots

    with opened_store(db, create=False, write=False) as store:
        runs = store.list_runs()
        for run in runs:
            run["settings"] = json.dumps(store.get_run(run["id"]).config, indent=1, ensure_ascii=False)[:20_000]
        measures = measure_runs(store)
        turns = store.kept_turns()
        plots = distribution_plots(store, turns, measures["score"], measures["tag"], measures["judge"],
                                   measures["embed"])
        return Dashboard(runs, len(turns), store.review_counts(), measures, plots)


def measure_runs(store: Store) -> dict[str, int | None]:
    """The latest scoring, judging, tagging and embedding runs: the measures the review app shows."""
    return {kind: (run.id if (run := store.latest_run(kind)) else None) for kind in ("score", "judge", "tag", "embed")}


def fts_query(words: str) -> str:
    """A search box's words as an FTS5 query: every word must occur (each quoted, so no word is
    read as FTS5 syntax)."""
    terms = [w.replace('"', '""') for w in words.split()]
    return " AND ".join(f'"{t}"' for t in terms)


def _check_filters(f: PairFilters) -> None:
    from .. import tagging

    if f.sort not in SORTS:
        raise UsageError(f"sort must be one of: {', '.join(SORTS)}")
    if f.review is not None and f.review not in REVIEW_FILTERS:
        raise UsageError(f"review must be one of: {', '.join(REVIEW_FILTERS)}")
    if f.page < 1:
        raise UsageError("page must be at least 1")
    if f.tag is not None:
        column, _, value = f.tag.partition("=")
        if column not in tagging.FIELDS or value not in tagging.FIELDS[column]:
            raise UsageError(f"tag takes FIELD=VALUE with FIELD one of {', '.join(tagging.FIELDS)}")


@numbers_checked
def pairs(db: str | Path | Store, filters: PairFilters | None = None, *, size: int = PAGE_SIZE,
          offset: int | None = None) -> PairsPage:
    """One page of the kept pairs that pass `filters`, with their measures (IFD, judge score, tags,
    neighbour distance, failed checks, review state) from the latest runs of each kind: page
    `filters.page` of `size` rows, or the `size` rows from row `offset` on."""
    filters = filters or PairFilters()
    _check_filters(filters)
    with opened_store(db, create=False, write=False) as store:
        runs = measure_runs(store)
        tag = tuple(filters.tag.split("=", 1)) if filters.tag else None
        rows, total = store.pair_rows(
            runs=runs, data_run=filters.run, failed=filters.failed, passed=filters.passed, min_ifd=filters.min_ifd,
            max_ifd=filters.max_ifd, min_judge=filters.min_judge, max_judge=filters.max_judge, tag=tag,
            min_distance=filters.min_distance, max_distance=filters.max_distance, selection=filters.selection,
            outside_selection=filters.outside, review=filters.review,
            search=fts_query(filters.q) if filters.q and filters.q.strip() else None, sort=filters.sort,
            descending=filters.descending, limit=size,
            offset=(filters.page - 1) * size if offset is None else offset)
        return PairsPage(rows, total, filters, runs, size)


def filter_choices(db: str | Path | Store) -> dict:
    """What the table's filters can take: the data runs, the curation checks, the selections."""
    with opened_store(db, create=False, write=False) as store:
        return {"runs": [r for r in store.list_runs() if r["kind"] in ("generate", "import", "respond")],
                "checks": sorted(store.check_names()), "selections": store.selection_names()}


@numbers_checked
def pair(db: str | Path | Store, turn_id: int) -> dict:
    """Everything known of one pair (store.pair_detail), its most similar pairs as (turn id, cosine,
    instruction), and the measures' runs."""
    from ..neighbours import graph_from_blobs

    with opened_store(db, create=False, write=False) as store:
        runs = measure_runs(store)
        found = store.pair_detail(turn_id, runs)
        if found is None:
            raise UsageError(f"no pair {turn_id} in {store.path}")
        similar, blob = [], found.pop("similar_blob", None)
        if blob is not None and blob[0] is not None:
            ids, cosines = graph_from_blobs([blob[0]], [blob[1]])
            keep = [(int(t), float(c)) for t, c in zip(ids[0], cosines[0]) if t >= 0][:8]
            texts = store.turn_snippets([t for t, _ in keep])
            similar = [(t, c, texts.get(t, "")) for t, c in keep]
        found["similar"] = similar
        found["preference"] = preference_of(found["siblings"])
        found["runs"] = runs
        return found


def preference_of(answers: list[dict]) -> tuple[dict, dict] | None:
    """(chosen, rejected) among one instruction's rated answers, by preference.py's rule (the highest
    and the lowest judge score, the earlier answer on ties); None with fewer than two rated."""
    rated = [a for a in answers if a.get("judge") is not None]
    if len(rated) < 2:
        return None
    best = max(rated, key=lambda a: (a["judge"], -a["sample_index"]))
    worst = min(rated, key=lambda a: (a["judge"], a["sample_index"]))
    return (best, worst) if best is not worst else None


@numbers_checked
def review(db: str | Path | Store, turn_id: int, state: str, note: str | None = None) -> None:
    """Record a decision on a pair: accepted, rejected, flagged (with a note), or unreviewed (taking a
    decision back). Every decision is kept; the latest counts."""
    if state not in REVIEW_STATES:
        raise UsageError(f"a review is one of: {', '.join(REVIEW_STATES)}")
    note = _text("note", note) if note else None
    with opened_store(db, create=False, write=False) as store:
        if not store.turn_exists(turn_id):
            raise UsageError(f"no pair {turn_id} in {store.path}")
        store.add_review(turn_id, state, note)


@numbers_checked
def revise(db: str | Path | Store, turn_id: int, instruction: str, response: str, *, input: str | None = None,
           note: str | None = None) -> int:
    """A new revision of a pair's text (export takes the latest); the turn itself, and every earlier
    revision, stay as they were. Returns the revision's id."""
    instruction, response = _text("instruction", instruction), _text("response", response)
    if not instruction.strip() or not response.strip():
        raise UsageError("an edited pair needs an instruction and a response")
    with opened_store(db, create=False, write=False) as store:
        if not store.turn_exists(turn_id):
            raise UsageError(f"no pair {turn_id} in {store.path}")
        return store.add_revision(turn_id, instruction, _text("input", input) if input else None, response,
                                  _text("note", note) if note else None)


def _text(what: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_EDIT_CHARS or "\x00" in value:
        raise UsageError(f"{what} must be text without NUL bytes, at most {MAX_EDIT_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid Unicode") from None
    return value.replace("\r\n", "\n")
