"""The review app at 100k pairs: how long the table page, each filter, each sort, search, one pair
and a decision take over HTTP (the real command, `magpie-local review`, in its own process),
against the same requests on a copy of the database without the indexes the review tables brought
(schema 8) — and the 300 ms target.

The database: 100k real Alpaca records (../shared, cycled and numbered past the 3,111), curated,
with stand-in measures: seeded IFD, judge scores and tags, seeded unit vectors embedded and their
neighbour statistics computed for real, 10% of the pairs reviewed and 1% edited. (Scoring,
judging, tagging and embedding 100k pairs on 2 cores would take hours; what the page's queries
cost does not depend on the values.) Built once and kept in tests/bench/results.

    python -m tests.bench.review [--n 100000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, build_info
from .diversity import DATA, alpaca_records

TARGET_MS = 300
REVIEW_INDEXES = ("scores_run_ifd", "ratings_run_score", "checks_failed")


def stand_ins(db: Path, n: int) -> None:
    """Scoring, judging, tagging and embedding runs over every kept turn with seeded values, the
    neighbour statistics computed; then 10% of the pairs reviewed and 1% edited."""
    import magpie_local.api as api
    from magpie_local import tagging
    from magpie_local.neighbours import RADIUS, to_blob
    from magpie_local.store import Store

    rng = np.random.default_rng(0)
    model = {"name": "stand-in", "path": "-", "sha256": "-"}
    with Store(db) as store:
        turns = [t[0] for t in store.kept_turns()]

        def run(kind: str):
            return store.create_run(kind=kind, target=n, config_key="stand-in", config={}, model=model,
                                    backend="none", versions={})

        ifd = rng.uniform(0.3, 1.1, len(turns))
        store.commit_scores(run("score").id, [dict(turn_id=t, ifd=float(v), answer_tokens=1, context_tokens=1,
                                                   truncated=0) for t, v in zip(turns, ifd)])
        judged = rng.uniform(1, 5, len(turns))
        store.commit_scores(run("judge").id, [dict(turn_id=t, score=float(v), distribution="[]", mass=1.0)
                                              for t, v in zip(turns, judged)], table="ratings")
        values = {c: list(v) for c, v in tagging.FIELDS.items()}
        store.commit_scores(run("tag").id, [dict(turn_id=t, raw="{}", **{c: v[rng.integers(len(v))]
                                                                          for c, v in values.items()})
                                            for t in turns], table="tags")
        vectors = rng.normal(size=(len(turns), 64)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        embed = run("embed")
        store.commit_scores(embed.id, [dict(turn_id=t, vector=to_blob(v)) for t, v in zip(turns, vectors)],
                            table="embeddings")
        api.store_neighbours(store, embed.id, RADIUS)
        picked = rng.choice(turns, len(turns) // 10, replace=False)
        for i, turn in enumerate(picked.tolist()):
            store.add_review(turn, ("accepted", "rejected", "flagged")[i % 3], "stand-in" if i % 3 == 2 else None)
        for turn in picked[: len(turns) // 100].tolist():
            store.add_revision(turn, f"An edited instruction {turn}", None, "An edited answer.")


def build(n: int) -> Path:
    """The benchmark's database of n pairs (made once)."""
    import magpie_local.api as api

    db = RESULTS / f"review-{n}.db"
    if db.exists():
        return db
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = db.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "alpaca.json"
        source.write_text(json.dumps(alpaca_records(n)))
        for step, call in (("import", lambda: api.import_file(partial, source)),
                           ("curate", lambda: api.curate(partial)),
                           ("stand-in measures and reviews", lambda: stand_ins(partial, n)),
                           ("select --top 10%", lambda: api.select(partial, "top", top=0.1))):
            start = time.perf_counter()
            call()
            print(f"  built: {step} in {time.perf_counter() - start:.1f} s", flush=True)
    partial.rename(db)
    return db


def requests(db: Path) -> list[tuple[str, str, dict | None]]:
    """(what, path, form of a POST or None) for the table, each filter, each sort, search, a pair, a decision."""
    conn = sqlite3.connect(db)
    turn = conn.execute("SELECT max(id) FROM turns").fetchone()[0] // 2
    run = conn.execute("SELECT min(id) FROM runs").fetchone()[0]
    check = conn.execute("SELECT name FROM checks WHERE passed = 0 GROUP BY name ORDER BY count(*) DESC").fetchone()
    conn.close()
    check = check[0] if check else "length"
    return [("dashboard", "/", None),
            ("table, page 1", "/pairs", None),
            ("table, page 1000", "/pairs?page=1000", None),
            ("run", f"/pairs?run={run}", None),
            (f"failed {check}", f"/pairs?failed={check}", None),
            ("failed any check", "/pairs?failed=any", None),
            (f"passed {check}", f"/pairs?passed={check}", None),
            ("IFD 0.6-0.7", "/pairs?min_ifd=0.6&max_ifd=0.7", None),
            ("judge at least 4.5", "/pairs?min_judge=4.5", None),
            ("tag difficulty=hard", "/pairs?tag=difficulty%3Dhard", None),
            ("nearest at least 1.2", "/pairs?min_distance=1.2", None),
            ("in selection top", "/pairs?selection=top", None),
            ("outside selection top", "/pairs?outside=top", None),
            ("review accepted", "/pairs?review=accepted", None),
            ("review unreviewed", "/pairs?review=unreviewed", None),
            ("review edited", "/pairs?review=edited", None),
            ("search 'water'", "/pairs?q=water", None),
            ("search 'photosynthesis plants'", "/pairs?q=photosynthesis+plants", None),
            ("sort IFD, highest first", "/pairs?sort=ifd&descending=1", None),
            ("sort judge", "/pairs?sort=judge", None),
            ("sort nearest", "/pairs?sort=distance", None),
            ("sort length, longest first", "/pairs?sort=length&descending=1", None),
            ("filters together: failed any, IFD, sort judge", "/pairs?failed=any&max_ifd=0.9&sort=judge", None),
            ("search + review + sort IFD", "/pairs?q=water&review=unreviewed&sort=ifd", None),
            ("one pair, in the IFD-sorted table", f"/pairs/{turn}?sort=ifd&i=40000", None),
            ("accept a pair (POST)", f"/pairs/{turn}/review", {"state": "accepted"})]


def serve(db: Path):
    """`magpie-local review` on db, in its own process: (process, address, token)."""
    server = subprocess.Popen([sys.executable, "-m", "magpie_local", "review", "--db", str(db), "--no-browser"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", server.stdout.readline())
    if not found:
        server.kill()
        raise SystemExit(f"the review server did not start: {server.stderr.read()}")
    return server, found[1], found[2]


def measure(db: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """{request: (median ms, slowest ms)} over `repeats` after one warm-up, in a fresh server."""
    import httpx

    server, address, token = serve(db)
    try:
        times = {}
        with httpx.Client(base_url=address, cookies={"magpie_review": token}, headers={"X-Magpie-Token": token},
                          timeout=120) as web:
            for what, path, form in requests(db):
                samples = []
                for _ in range(repeats + 1):
                    start = time.perf_counter()
                    reply = web.post(path, data=form) if form else web.get(path)
                    samples.append((time.perf_counter() - start) * 1000)
                    if reply.status_code != 200:
                        raise SystemExit(f"{what}: {reply.status_code} {reply.text[:300]}")
                times[what] = (statistics.median(samples[1:]), max(samples[1:]))
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA} (../shared)")
    print(f"Review app at {args.n:,} pairs on {build_info()}")
    db = build(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.db"
        shutil.copyfile(db, bare)
        conn = sqlite3.connect(bare)
        for index in REVIEW_INDEXES:
            conn.execute(f"DROP INDEX {index}")
        conn.close()
        ours, without = measure(db, args.repeats), measure(bare, max(1, args.repeats // 3))
    print("\n| request | ms (median) | ms (slowest) | without the review indexes (median) | target |")
    print("|---|---:|---:|---:|---:|")
    for what, (median, slowest) in ours.items():
        flag = "" if slowest < TARGET_MS or what == "dashboard" else " **over**"
        print(f"| {what} | {median:.0f} | {slowest:.0f}{flag} | {without[what][0]:.0f} | "
              f"{'-' if what == 'dashboard' else TARGET_MS} |")
    table = [v for k, v in ours.items() if k != "dashboard"]
    print(f"\nSlowest table request: {max(s for _, s in table):.0f} ms (target {TARGET_MS} ms); "
          f"median of the medians {statistics.median(m for m, _ in table):.0f} ms.")


if __name__ == "__main__":
    main()
