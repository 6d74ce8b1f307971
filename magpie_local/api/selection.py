"""select: a named selection of scored pairs, by IFD, checks, tags, judge ratings and neighbour
statistics, then optionally by diversity over the embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..store import Store
from .curation import curate_checks
from .session import opened_store
from .settings import numbers_checked


@dataclass
class Selection:
    name: str
    score_run: int
    turn_ids: list[int]  # highest IFD first
    eligible: int  # turns that passed the filters, before top / top_k
    ifd_range: tuple[float, float] | None  # (lowest, highest) IFD chosen


# kind -> (what a run of it is called, what it holds, the command that makes it)
PASS_RUNS = {"score": ("a scoring run", "scores", "score"), "judge": ("a judging run", "ratings", "judge"),
             "embed": ("an embedding run", "embeddings", "embed"), "tag": ("a tagging run", "tags", "tag")}


def pass_run_or_latest(store: Store, kind: str, run_id: int | None) -> int:
    """Run `run_id`, which must be of `kind` (score, judge, embed or tag), or the latest such run."""
    name, holds, command = PASS_RUNS[kind]
    if run_id is not None:
        if store.get_run(run_id).kind != kind:
            raise UsageError(f"run {run_id} is not {name}")
        return run_id
    latest = store.latest_run(kind)
    if latest is None:
        raise UsageError(f"{store.path} holds no {holds} yet; run `magpie-local {command}` first")
    return latest.id


def score_run_or_latest(store: Store, score_run: int | None) -> int:
    return pass_run_or_latest(store, "score", score_run)


def judge_run_or_latest(store: Store, judge_run: int | None) -> int:
    return pass_run_or_latest(store, "judge", judge_run)


def check_spacing(min_distance: float | None, max_repeats: int | None) -> None:
    if min_distance is not None and not 0 <= min_distance <= 2:
        raise UsageError("--min-distance is a cosine distance, from 0 up to 2")
    if max_repeats is not None and max_repeats < 0:
        raise UsageError("--max-repeats must be at least 0")


def check_reviewed(reviewed: str | None) -> None:
    from ..store import REVIEWED

    if reviewed is not None and reviewed not in REVIEWED:
        raise UsageError(f"--reviewed takes {' or '.join(REVIEWED)}")


def _check_arguments(top, top_k, min_distance, max_repeats, diverse, neighbours, clusters, per_cluster, balance,
                     tags) -> None:
    """Refuse select arguments that are out of range or do not go together."""
    from .. import tagging

    if top is not None and top_k is not None:
        raise UsageError("give --top or --top-k, not both")
    if top is not None and not 0 < top <= 1:
        raise UsageError("--top must be between 0% and 100%")
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be at least 1")
    check_spacing(min_distance, max_repeats)
    if diverse is not None and diverse < 1:
        raise UsageError("--diverse must be at least 1")
    if neighbours is not None and neighbours < 1:
        raise UsageError("--neighbours must be at least 1")
    if (clusters is None) != (per_cluster is None):
        raise UsageError("--clusters C and --per-cluster N go together")
    if clusters is not None and (clusters < 1 or per_cluster < 1):
        raise UsageError("--clusters and --per-cluster must be at least 1")
    if sum(x is not None for x in (diverse, clusters, balance)) > 1:
        raise UsageError("use one of --diverse, --clusters/--per-cluster and --balance")
    if balance is not None:
        if balance not in tagging.FIELDS:
            raise UsageError(f"--balance takes a tag field: one of {', '.join(tagging.FIELDS)}")
        if top is None and top_k is None:
            raise UsageError("--balance needs --top or --top-k: the size of the selection")
    for column, wanted in tags or ():
        if column not in tagging.FIELDS or not wanted:
            raise UsageError(f"--tag takes FIELD=VALUE[,VALUE...] with FIELD one of {', '.join(tagging.FIELDS)}; "
                             f"got {column!r} = {wanted!r}")
        unknown = [v for v in wanted if v not in tagging.FIELDS[column]]
        if unknown:
            raise UsageError(f"unknown {column} {unknown[0]!r}; one of: {', '.join(tagging.FIELDS[column])}")


@numbers_checked
def select(db: str | Path | Store, name: str = "selected", *, score_run: int | None = None,
           top: float | None = None, top_k: int | None = None, min_ifd: float | None = None,
           max_ifd: float | None = None, keep_above_1: bool = False, passing: list[str] | str | None = None,
           tags: list[tuple[str, list[str]]] | None = None, min_judge: float | None = None,
           judge_run: int | None = None, min_distance: float | None = None, max_repeats: int | None = None,
           embed_run: int | None = None, diverse: int | None = None, neighbours: int | None = None,
           clusters: int | None = None, per_cluster: int | None = None, balance: str | None = None,
           reviewed: str | None = None, seed: int = 0) -> Selection:
    """Store a named selection (replacing one of that name) of scored pairs: from the scoring run
    (default: the latest), IFD > 1 left out unless `keep_above_1`, within the IFD bounds, passing the
    named curation checks (a list, or 'all'), with one of the given values of each tag (latest
    tagging run), rated at least `min_judge` by the judging run (default: the latest), with the
    nearest neighbour at least `min_distance` away and at most `max_repeats` turns within the radius
    in the embedding run (default: the latest; both members of a close pair are left out: for one
    of each, curate's near_duplicate check); then the highest-IFD share `top` (0-1] or the `top_k`
    best; then, with `diverse=K`, the K of those that cover them best, by IFD-weighted facility
    location over the embedding run's vectors (diversity.py; `neighbours`: its similarity graph's
    degree); or with `clusters=C, per_cluster=N` the N highest-IFD of each of C k-means clusters of
    those vectors (seeded by `seed`); or with `balance=FIELD` (a tag field) the `top`/`top_k` size
    in equal shares per value of that tag. `reviewed` keeps only pairs a reviewer accepted
    ("accepted") or did not reject ("not-rejected"), by their latest review (magpie-local review).
    The arguments are stored with the selection (store.selection_definition)."""
    definition = {k: v for k, v in locals().items() if k not in ("db", "name") and v not in (None, False, [], ())}
    if not name.strip():
        raise UsageError("--name must not be empty")
    if min_ifd is not None and max_ifd is not None and min_ifd > max_ifd:
        raise UsageError(f"--min-ifd {min_ifd} is above --max-ifd {max_ifd}: no pair could be selected")
    _check_arguments(top, top_k, min_distance, max_repeats, diverse, neighbours, clusters, per_cluster, balance, tags)
    check_reviewed(reviewed)
    with opened_store(db, create=False) as store:
        run_id = score_run_or_latest(store, score_run)
        tag_run = _tag_run(store, tags, balance)
        embedded = None
        if min_distance is not None or max_repeats is not None or diverse is not None or clusters is not None:
            embedded = pass_run_or_latest(store, "embed", embed_run)
        rows = store.scored_turns(run_id, keep_above_1=keep_above_1, min_ifd=min_ifd, max_ifd=max_ifd,
                                  passing=(curate_checks(passing, store) if isinstance(passing, str) else passing)
                                  or None, tags=tags, tag_run_id=tag_run, min_judge=min_judge,
                                  judge_run_id=judge_run_or_latest(store, judge_run) if min_judge is not None
                                  else None, min_distance=min_distance, max_repeats=max_repeats,
                                  embed_run_id=embedded, reviewed=reviewed)
        eligible = len(rows)
        size = math.ceil(top * eligible) if top is not None else top_k
        if balance is not None:
            rows = _balanced(store, rows, balance, tag_run, size)
        elif size is not None:
            rows = rows[:size]
        if diverse is not None:
            rows = _diverse(store, rows, diverse, embedded, neighbours)
        if clusters is not None:
            from ..diversity import first_per_cluster, kmeans

            labels = kmeans(_candidate_vectors(store, rows, embedded), clusters, seed=seed)
            rows = [rows[i] for i in first_per_cluster(labels, per_cluster)]
        definition.update(score_run=run_id, **({"embed_run": embedded} if embedded else {}))
        store.replace_selection(name, [r[0] for r in rows], run_id, definition)
    return Selection(name, run_id, [r[0] for r in rows], eligible, (rows[-1][1], rows[0][1]) if rows else None)


def _tag_run(store: Store, tags, balance: str | None) -> int | None:
    """The tagging run --tag and --balance read (the latest), where either is given."""
    if not tags and balance is None:
        return None
    latest = store.latest_run("tag")
    if latest is None:
        what = f"--balance {balance}: " if not tags else ""
        raise UsageError(f"{what}{store.path} holds no tags yet; run `magpie-local tag` first")
    return latest.id


def _balanced(store: Store, rows: list[tuple[int, float]], balance: str, tag_run: int,
              size: int) -> list[tuple[int, float]]:
    """`size` of the candidates in equal shares per value of tag `balance`."""
    from .. import tagging
    from ..diversity import balanced

    column = list(tagging.FIELDS).index(balance)
    tagged = store.tags_by_turn(tag_run)
    groups = [tagged[t][column] if t in tagged else "(untagged)" for t, _ in rows]
    return [rows[i] for i in balanced(groups, size)]


def _diverse(store: Store, rows: list[tuple[int, float]], k: int, embed_run: int,
             neighbours: int | None) -> list[tuple[int, float]]:
    """The k of the (turn id, IFD) candidates IFD-weighted facility location picks, highest IFD first."""
    import numpy as np

    from ..diversity import NEIGHBOURS, candidate_graph, facility_location

    if k > len(rows):
        raise UsageError(f"--diverse {k} is more than the {len(rows)} pairs that pass the other filters")
    neighbours = neighbours or NEIGHBOURS
    vectors = _candidate_vectors(store, rows, embed_run)
    similar, cosine, _ = candidate_graph(vectors, neighbours, *_stored_graph(store, rows, embed_run, neighbours))
    chosen, _ = facility_location(np.array([ifd for _, ifd in rows]), k, (similar, cosine))
    return sorted((rows[j] for j in chosen), key=lambda r: (-r[1], r[0]))


def _stored_graph(store: Store, rows: list[tuple[int, float]], embed_run: int, neighbours: int):
    """(similar, cosine) of the candidates from the embedding run's stored graph, as candidate
    positions (-1: not a candidate); (None, None) when it was stored without one or with fewer than
    `neighbours` per turn (then select searches itself)."""
    import numpy as np

    from ..neighbours import graph_from_blobs

    stored = store.neighbour_graph(embed_run)
    if stored is None or any(t not in stored for t, _ in rows):
        return None, None
    similar, cosine = graph_from_blobs(*zip(*(stored[t] for t, _ in rows)))
    if similar.shape[1] < min(neighbours, len(stored) - 1):
        return None, None
    turn_ids = np.array([t for t, _ in rows], dtype=np.int64)
    order = np.argsort(turn_ids)
    at = np.minimum(np.searchsorted(turn_ids[order], similar), len(rows) - 1)
    return np.where(turn_ids[order][at] == similar, order[at], -1), cosine


def _candidate_vectors(store: Store, rows: list[tuple[int, float]], embed_run: int):
    """The embedding run's vectors of the (turn id, IFD) candidates, in their order."""
    from ..neighbours import from_blobs

    turn_ids, blobs = store.embedding_rows(embed_run)
    at = {t: i for i, t in enumerate(turn_ids)}
    missing = sum(1 for t, _ in rows if t not in at)
    if missing:
        raise UsageError(f"{missing} of the {len(rows)} candidates have no embedding in run {embed_run}; "
                         "run `magpie-local embed` again to embed them")
    return from_blobs([blobs[at[t]] for t, _ in rows])
