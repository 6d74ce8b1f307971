"""Embeddings, neighbour statistics and the diversity-aware selections: speed at 10k and 100k, and
what each selection keeps on real data.

Speed: `embed` on the Alpaca instructions (alpaca_cherry_5pct.json in ../shared) against the naive
loop (llama-cpp-python's Llama(embedding=True).embed per text); then, on 10k and 100k vectors made
from those real embeddings (each a real one plus a little seeded noise, renormalised: the search
costs the same whatever the vectors say), the neighbour search, facility location (--diverse n/10),
k-means (--clusters n/100) and the balanced pick, each in a fresh process for its peak RSS, beside
the naive full-matrix search where that fits. Then import, curate, select (each strategy) and export
of 10k and 100k Alpaca records through the API, to show how they grow (select over stand-in scores
and vectors: scoring and embedding 100k turns here would take hours).

Evidence: a pool of Alpaca samples and generated pairs, scored, tagged and embedded; selections of
the same size by random draw, top IFD, --diverse, --clusters/--per-cluster and --balance, compared
by mean pairwise cosine, near-duplicate pairs kept, task categories covered and mean IFD.

    python -m tests.bench.diversity [--sizes 10000,100000] [--pool 400] [--generated 100]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import RESULTS, build_info

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_cherry_5pct.json"
VECTORS = RESULTS / "alpaca_embeddings.npy"


def alpaca_records(n: int) -> list[dict]:
    """n Alpaca records: the real ones, cycled, each past the first pass made distinct by a number."""
    data = json.loads(DATA.read_text())
    return [dict(d, instruction=d["instruction"] + (f" (variant {i // len(data)})" if i >= len(data) else ""))
            for i, d in ((i, data[i % len(data)]) for i in range(n))]


def embed_speed() -> tuple[dict, dict]:
    """(ours, naive) on every Alpaca instruction; ours stores the vectors for the scale runs."""
    import magpie_local.api as api
    from magpie_local.llama_lib import llama_cpp
    from magpie_local.models import resolve_model
    from magpie_local.neighbours import from_blobs
    from magpie_local.respond import user_text
    from magpie_local.store import Store

    records = json.loads(DATA.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.json"
        src.write_text(json.dumps(records))
        db = Path(tmp) / "e.db"
        api.import_file(db, src)
        start = time.perf_counter()
        done = api.embed(db)
        ours = {"seconds": time.perf_counter() - start, "texts": done.embedded}
        with Store(db, create=False, write=False) as store:
            np.save(VECTORS, from_blobs(store.embedding_rows(done.run.id)[1]))
    lc = llama_cpp()
    llm = lc.Llama(str(resolve_model(None).path), embedding=True, pooling_type=lc.LLAMA_POOLING_TYPE_MEAN,
                   n_ctx=256, n_batch=256, verbose=False)
    texts = [user_text(r["instruction"], r["input"] or None) for r in records[:1000]]  # its rate: 1000 are enough
    start = time.perf_counter()
    for text in texts:
        llm.embed(text, truncate=True)
    return ours, {"seconds": time.perf_counter() - start, "texts": len(texts)}


def scaled(n: int, seed: int = 0) -> np.ndarray:
    real = np.load(VECTORS)
    rng = np.random.default_rng(seed)
    out = real[np.arange(n) % len(real)] + rng.normal(scale=0.02, size=(n, real.shape[1])).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def worker(step: str, n: int) -> dict:
    """One timed step on n vectors, in this process (run by main in a fresh one)."""
    from magpie_local import diversity
    from magpie_local.neighbours import nearest_neighbours

    vectors = scaled(n)
    weights = np.random.default_rng(1).uniform(0.3, 1.0, n)
    start = time.perf_counter()
    extra = {}
    if step == "neighbours":
        found = nearest_neighbours(vectors)
        extra = {"repeated": int((found.repeats > 0).sum())}
    elif step == "full matrix":
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        _ = sims.argmax(axis=1), (sims >= 0.95).sum(axis=1)
    elif step.startswith("diverse"):
        neighbours = int(step.split()[-1]) if step.split()[-1].isdigit() else n - 1
        _, value = diversity.facility_location(vectors, weights, n // 10, neighbours)
        extra = {"objective": value}
    elif step == "kmeans":
        labels = diversity.kmeans(vectors, n // 100)
        diversity.first_per_cluster(labels, 5)
    elif step == "balance":
        groups = [str(g) for g in np.random.default_rng(2).integers(0, 12, n)]
        diversity.balanced(groups, n // 10)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def timed(step: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.bench.diversity", "--worker", step, str(n)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stand_ins(db: Path, n: int) -> None:
    """A scoring run and an embedding run over every stored turn, their values stand-ins (seeded IFD
    in (0.3, 1); the scaled real vectors): scoring or embedding 100k turns on 2 cores takes hours, and
    select's time does not depend on the values. The neighbour statistics are the real computation."""
    from magpie_local.neighbours import RADIUS, nearest_neighbours, to_blob
    from magpie_local.store import Store

    with Store(db) as store:
        turn_ids = [t[0] for t in store.kept_turns()]
        ifd = np.random.default_rng(1).uniform(0.3, 1.0, len(turn_ids))
        model = {"name": "stand-in", "path": "-", "sha256": "-"}
        score = store.create_run(kind="score", target=n, config_key="stand-in", config={}, model=model,
                                 backend="none", versions={})
        store.commit_scores(score.id, [dict(turn_id=t, ifd=float(v), answer_tokens=1, context_tokens=1, truncated=0)
                                       for t, v in zip(turn_ids, ifd)])
        vectors = scaled(len(turn_ids))
        embed = store.create_run(kind="embed", target=n, config_key="stand-in", config={}, model=model,
                                 backend="none", versions={})
        store.commit_scores(embed.id, [dict(turn_id=t, vector=to_blob(v)) for t, v in zip(turn_ids, vectors)],
                            table="embeddings")
        found = nearest_neighbours(vectors, RADIUS)
        store.replace_neighbours(embed.id, [dict(turn_id=t, nearest_turn_id=turn_ids[j], distance=float(d),
                                                 repeats=int(k), radius=RADIUS)
                                            for t, j, d, k in zip(turn_ids, found.nearest, found.distance,
                                                                  found.repeats)])


def pipeline(n: int) -> dict[str, float]:
    """Seconds of import, curate, select (each strategy) and export of n Alpaca records."""
    import magpie_local.api as api

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.json"
        src.write_text(json.dumps(alpaca_records(n)))
        db, times = Path(tmp) / "p.db", {}
        steps = (("import", lambda: api.import_file(db, src)), ("curate", lambda: api.curate(db)),
                 ("export", lambda: api.export(db, Path(tmp) / "out")),
                 ("(stand-in scores, vectors)", lambda: stand_ins(db, n)),
                 ("select --top 10%", lambda: api.select(db, "top", top=0.1)),
                 ("select --max-repeats 0", lambda: api.select(db, "spaced", max_repeats=0, min_distance=0.02)),
                 ("select --diverse n/10", lambda: api.select(db, "diverse", diverse=n // 10)),
                 ("select --clusters n/100", lambda: api.select(db, "clusters", clusters=n // 100, per_cluster=5)),
                 ("export --selection", lambda: api.export(db, Path(tmp) / "sel", selection="diverse")))
        for name, call in steps:
            start = time.perf_counter()
            call()
            times[name] = time.perf_counter() - start
    return times


def evidence(pool: int, generated: int, size: int) -> dict[str, dict]:
    """Each selection's measures on a scored, tagged, embedded pool of Alpaca and generated pairs."""
    import magpie_local.api as api
    from magpie_local.neighbours import from_blobs
    from magpie_local.store import Store

    data = json.loads(DATA.read_text())
    picked = random.Random(0).sample(data, pool)
    with tempfile.TemporaryDirectory() as tmp:
        src, db = Path(tmp) / "a.json", Path(tmp) / "pool.db"
        src.write_text(json.dumps(picked))
        api.import_file(db, src)
        api.generate(db, generated)
        api.score(db)
        api.tag(db)
        embedded = api.embed(db)
        with Store(db, create=False, write=False) as store:
            turn_ids, blobs = store.embedding_rows(embedded.run.id)
            tag_run = store.latest_run("tag").id
            category = {t: v[0] for t, v in store.tags_by_turn(tag_run).items()}
            ifd = dict(store.conn.execute("SELECT turn_id, ifd FROM scores WHERE ifd IS NOT NULL"))
        vectors = dict(zip(turn_ids, from_blobs(blobs)))
        eligible = api.select(db, "all").turn_ids
        choices = {"random (mean of 5 draws)": [random.Random(s).sample(eligible, size) for s in range(5)],
                   "top IFD": [api.select(db, "top", top_k=size).turn_ids],
                   "--diverse": [api.select(db, "diverse", diverse=size).turn_ids],
                   "--clusters/--per-cluster 2": [api.select(db, "clusters", clusters=size // 2,
                                                             per_cluster=2).turn_ids],
                   "--balance task_category": [api.select(db, "balanced", balance="task_category",
                                                          top_k=size).turn_ids]}
    out = {}
    for name, draws in choices.items():
        rows = []
        for chosen in draws:
            v = np.stack([vectors[t] for t in chosen])
            sims = v @ v.T
            upper = sims[np.triu_indices(len(chosen), 1)]
            rows.append([float(upper.mean()), int((upper >= 0.95).sum()),
                         len({category.get(t) for t in chosen}), float(np.mean([ifd[t] for t in chosen])),
                         len(chosen)])
        out[name] = dict(zip(("mean cosine", "near-dup pairs", "categories", "mean IFD", "size"),
                             np.mean(rows, axis=0).tolist()))
    out["pool"] = {"size": len(eligible), "categories": len({category.get(t) for t in eligible})}
    return out


def print_pipeline(sizes: list[int]) -> None:
    print(f"\n{'pipeline, through the API':<28}" + "".join(f"{f'{n:,} s':>12}" for n in sizes) + f"{'growth':>9}")
    runs = [pipeline(n) for n in sizes]
    for step in runs[0]:
        print(f"{step:<28}" + "".join(f"{r[step]:>12.2f}" for r in runs) + f"{runs[-1][step] / runs[0][step]:>8.1f}x")
    print(f"peak RSS of the pipeline process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def print_evidence(pool_size: int, generated: int, size: int) -> None:
    print(f"\nselections of {size} from {pool_size} Alpaca samples + {generated} generated pairs "
          "(default model: scored, tagged, embedded)")
    found = evidence(pool_size, generated, size)
    pool = found.pop("pool")
    print(f"{'selection':<30}{'mean cosine':>12}{'near-dup pairs':>15}{'categories':>11}{'mean IFD':>10}")
    for name, r in found.items():
        print(f"{name:<30}{r['mean cosine']:>12.3f}{r['near-dup pairs']:>15.1f}{r['categories']:>11.1f}"
              f"{r['mean IFD']:>10.3f}")
    print(f"pool: {pool['size']} scored pairs, {pool['categories']} task categories")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--pool", type=int, default=400)
    p.add_argument("--generated", type=int, default=100)
    p.add_argument("--select", type=int, default=100)
    p.add_argument("--worker", nargs=2)
    p.add_argument("--pipeline", action="store_true", help="only the pipeline table")
    p.add_argument("--evidence", action="store_true", help="only the selections' comparison")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    if not DATA.exists():
        sys.exit(f"benchmark data not found: {DATA} (the ../shared folder beside the checkout)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"\nEmbeddings and diversity-aware selection; {build_info()}")
    if args.pipeline:  # the real vectors the stand-ins are made from: embedded once
        if not VECTORS.exists():
            embed_speed()
        print_pipeline([int(s) for s in args.sizes.split(",")])
        return
    if args.evidence:
        print_evidence(args.pool, args.generated, args.select)
        return
    ours, naive = embed_speed()
    rate, naive_rate = ours["texts"] / ours["seconds"], naive["texts"] / naive["seconds"]
    print(f"embed {ours['texts']} Alpaca instructions, default model: {rate:.1f} texts/s (stored, resumable) vs "
          f"naive Llama.embed loop {naive_rate:.1f} texts/s (first {naive['texts']}): {rate / naive_rate:.2f}x")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"\n{'step':<28}" + "".join(f"{f'{n:,} s':>12}{'peak MiB':>10}" for n in sizes) + f"{'growth':>9}")
    steps = ["neighbours", "full matrix", "diverse 32", "kmeans", "balance"]
    for step in steps:
        cells, seconds = "", []
        for n in sizes:
            if step == "full matrix" and n * n * 4 > 8 * 2**30:
                cells += f"{'(n x n: ' + str(n * n * 4 // 2**30) + ' GiB)':>22}"
                continue
            r = timed(step, n)
            seconds.append(r["seconds"])
            cells += f"{r['seconds']:>12.2f}{r['peak_mib']:>10.0f}"
        growth = f"{seconds[-1] / seconds[0]:>8.1f}x" if len(seconds) > 1 else ""
        label = {"neighbours": "neighbours (blocked exact)", "full matrix": "naive: full n x n matrix",
                 "diverse 32": "--diverse n/10 (32 nbrs)", "kmeans": "--clusters n/100 (k-means)",
                 "balance": "--balance (12 groups)"}[step]
        print(f"{label:<28}{cells}{growth}")
    n = min(sizes[0], 5000)
    exact = timed("diverse exact", n)
    print(f"\nfacility location on {n:,} vectors, --diverse {n // 10}: objective and time by graph degree "
          f"(exact: the full similarity matrix)")
    for degree in (8, 16, 32, 64):
        r = timed(f"diverse {degree}", n)
        print(f"  {degree:>3} neighbours: {r['objective'] / exact['objective']:.4f} of exact, {r['seconds']:.2f} s")
    print(f"  exact:        1.0000, {exact['seconds']:.2f} s, peak {exact['peak_mib']:.0f} MiB")
    print_pipeline(sizes)
    print_evidence(args.pool, args.generated, args.select)


if __name__ == "__main__":
    main()
