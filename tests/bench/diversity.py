"""Embeddings, neighbour statistics and the diversity-aware selections: speed at 10k and 100k, and
what each selection keeps on real data.

Speed: `embed` on the Alpaca instructions (alpaca_cherry_5pct.json in ../shared) against the naive
loop (llama-cpp-python's Llama(embedding=True).embed per text); then, on 10k and 100k vectors made
from those real embeddings (each a real one plus a little seeded noise, renormalised: the search
costs the same whatever the vectors say), the neighbour search, facility location (--diverse n/10),
k-means (--clusters n/100) and the balanced pick, each in a fresh process for its peak RSS, beside
the naive full-matrix search where that fits; --diverse over filtered shares, from the stored graph
against searching the candidates again. Then import, curate, select (each strategy) and export
of 10k and 100k Alpaca records through the API, to show how they grow (select over stand-in scores
and vectors: scoring and embedding 100k turns here would take hours).

Evidence: a pool of Alpaca samples and generated pairs, scored, tagged and embedded; selections of
the same size by random draw, top IFD, --diverse, --clusters/--per-cluster and --balance, compared
by mean pairwise cosine, near-duplicate pairs kept, task categories covered and mean IFD.

    python -m tests.bench.diversity [--sizes 10000,100000] [--pool 400] [--generated 100]
                                    [--pipeline | --evidence | --graph N | --embedders]
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
        _, value = diversity.facility_location(weights, n // 10, diversity.similarity_graph(vectors, neighbours))
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
    from magpie_local.api import store_neighbours
    from magpie_local.neighbours import RADIUS, to_blob
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
        store_neighbours(store, embed.id, RADIUS)


def pipeline(n: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of import, curate, select (each strategy) and export of n Alpaca records, and the
    process's peak RSS (MiB) so far after each."""
    import magpie_local.api as api

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.json"
        src.write_text(json.dumps(alpaca_records(n)))
        db, times, peaks = Path(tmp) / "p.db", {}, {}
        steps = (("import", lambda: api.import_file(db, src)), ("curate", lambda: api.curate(db)),
                 ("export", lambda: api.export(db, Path(tmp) / "out")),
                 ("(stand-in scores, vectors)", lambda: stand_ins(db, n)),
                 ("select --top 10%", lambda: api.select(db, "top", top=0.1)),
                 ("select --max-repeats 0", lambda: api.select(db, "spaced", max_repeats=0, min_distance=0.02)),
                 ("select --diverse n/10", lambda: api.select(db, "diverse", diverse=n // 10)),
                 ("select --top 30% --diverse n/20", lambda: api.select(db, "top-diverse", top=0.3,
                                                                        diverse=n // 20)),
                 ("select --clusters n/100", lambda: api.select(db, "clusters", clusters=n // 100, per_cluster=5)),
                 ("select --clusters 100", lambda: api.select(db, "clusters-100", clusters=100, per_cluster=50)),
                 ("export --selection", lambda: api.export(db, Path(tmp) / "sel", selection="diverse")))
        for name, call in steps:
            start = time.perf_counter()
            call()
            times[name] = time.perf_counter() - start
            peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times, peaks


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


def stored_graph_on_subsets(n: int, shares=(1.0, 0.5, 0.3, 0.2, 0.1)) -> list[dict]:
    """--diverse over a filtered share of n turns: the graph from the stored one (diversity.candidate_graph,
    rows left with fewer than MIN_KEPT searched again) against searching among the candidates, by
    time and by the exact objective of the set each one's greedy picks."""
    from magpie_local import diversity
    from magpie_local.neighbours import nearest_neighbours

    vectors = scaled(n)
    weights = np.random.default_rng(1).uniform(0.3, 1.0, n)
    stored = nearest_neighbours(vectors)
    rng, out = np.random.default_rng(2), []

    def exact_objective(v, w, chosen):  # F over the full similarities, in blocks
        best = np.concatenate([np.maximum(v[i:i + 2048] @ v[chosen].T, 0).max(axis=1) for i in range(0, len(v), 2048)])
        best[chosen] = 1.0
        return float((w * best).sum())

    for share in shares:
        picked = np.sort(rng.choice(n, int(n * share), replace=False))
        v, w, k = vectors[picked], weights[picked], len(picked) // 10
        position = np.full(n + 1, -1)
        position[picked] = np.arange(len(picked))
        start = time.perf_counter()
        searched_graph = diversity.similarity_graph(v)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        similar, cosine, rows = diversity.candidate_graph(v, diversity.NEIGHBOURS, position[stored.similar[picked]],
                                                          stored.cosine[picked])
        stored_s = time.perf_counter() - start
        by_search = exact_objective(v, w, diversity.facility_location(w, k, searched_graph)[0])
        by_stored = exact_objective(v, w, diversity.facility_location(w, k, (similar, cosine))[0])
        out.append(dict(share=share, search_s=search_s, stored_s=stored_s, rows=rows / len(picked),
                        objective=by_stored / by_search))
    return out


def print_stored_graph(n: int) -> None:
    print(f"\n--diverse over a filtered share of {n:,} turns: graph from the stored one vs searching the candidates")
    print(f"{'share':>6}{'search s':>10}{'stored s':>10}{'rows searched':>15}{'objective vs search':>21}")
    for r in stored_graph_on_subsets(n):
        print(f"{r['share']:>6.0%}{r['search_s']:>10.2f}{r['stored_s']:>10.2f}{r['rows']:>15.0%}{r['objective']:>21.4f}")


# Instructions and a paraphrase of each, written for this comparison.
PARAPHRASES = [("Name three primary colors.", "List the three primary colours."),
               ("How do I bake bread at home?", "What is the way to bake bread in my own kitchen?"),
               ("Translate 'good morning' into French.", "How do you say 'good morning' in French?"),
               ("Write a haiku about the sea.", "Compose a haiku about the ocean."),
               ("What causes rain?", "Why does it rain?"),
               ("Give me tips to sleep better.", "How can I improve my sleep?"),
               ("Summarize the plot of Romeo and Juliet.", "Give a short summary of the story of Romeo and Juliet."),
               ("What is the capital of Australia?", "Which city is Australia's capital?"),
               ("Explain how vaccines work.", "How do vaccines protect the body?"),
               ("Suggest a name for a coffee shop.", "Come up with a name for a new cafe."),
               ("Write a Python function that reverses a string.", "How do I reverse a string in Python?"),
               ("List some benefits of regular exercise.", "What are the advantages of exercising regularly?"),
               ("Convert 5 kilometers to miles.", "How many miles are 5 km?"),
               ("Describe the water cycle.", "Explain the stages of the water cycle."),
               ("Give an example of a metaphor.", "What is an example of a metaphor?"),
               ("Why is the sky blue?", "What makes the sky look blue?")]


def embedder_separation(models=("default", "minilm"), unrelated: int = 400) -> dict[str, dict]:
    """For each embedding model: the paraphrase pairs' cosine, the cosine of unrelated Alpaca
    instructions, how often a paraphrase's nearest among all the texts is its pair, and texts/s."""
    import magpie_local.api as api
    from magpie_local.neighbours import from_blobs
    from magpie_local.store import Store

    others = [d["instruction"] for d in random.Random(0).sample(json.loads(DATA.read_text()), unrelated)]
    texts = [t for pair in PARAPHRASES for t in pair] + others
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "p.json"
        src.write_text(json.dumps([{"instruction": t, "input": "", "output": "-"} for t in texts]))
        for model in models:
            db = Path(tmp) / f"{model}.db"
            api.import_file(db, src)
            start = time.perf_counter()
            done = api.embed(db, model=None if model == "default" else model)
            seconds = time.perf_counter() - start
            with Store(db, create=False, write=False) as store:
                v = from_blobs(store.embedding_rows(done.run.id)[1])
            sims = v @ v.T
            np.fill_diagonal(sims, -np.inf)
            pairs = np.array([sims[2 * k, 2 * k + 1] for k in range(len(PARAPHRASES))])
            first = 2 * len(PARAPHRASES)
            unrelated_sims = sims[first:, first:][np.triu_indices(len(others), 1)]
            hits = [int(sims[i].argmax()) == i ^ 1 for i in range(first)]
            out[model] = dict(name=done.run.model, dim=done.dim, pair_mean=float(pairs.mean()),
                              pair_min=float(pairs.min()), unrelated_mean=float(unrelated_sims.mean()),
                              unrelated_p99=float(np.quantile(unrelated_sims, 0.99)),
                              pairs_above_p99=float((pairs > np.quantile(unrelated_sims, 0.99)).mean()),
                              nearest_is_pair=float(np.mean(hits)), texts_per_s=len(texts) / seconds)
    return out


def print_embedders() -> None:
    print(f"\nembedding models: {len(PARAPHRASES)} paraphrase pairs among 400 unrelated Alpaca instructions")
    print(f"{'model':<32}{'dim':>5}{'pair cos':>10}{'min':>7}{'unrelated':>11}{'p99':>7}{'pairs > p99':>13}"
          f"{'nearest = pair':>16}{'texts/s':>9}")
    for r in embedder_separation().values():
        print(f"{r['name']:<32}{r['dim']:>5}{r['pair_mean']:>10.3f}{r['pair_min']:>7.3f}{r['unrelated_mean']:>11.3f}"
              f"{r['unrelated_p99']:>7.3f}{r['pairs_above_p99']:>13.0%}{r['nearest_is_pair']:>16.0%}"
              f"{r['texts_per_s']:>9.1f}")


def print_pipeline(sizes: list[int]) -> None:
    print(f"\n{'pipeline, through the API':<34}" + "".join(f"{f'{n:,} s':>12}" for n in sizes) + f"{'growth':>9}"
          f"{'peak MiB so far':>17}")
    runs = [pipeline(n) for n in sizes]
    for step in runs[0][0]:
        print(f"{step:<34}" + "".join(f"{r[step]:>12.2f}" for r, _ in runs)
              + f"{runs[-1][0][step] / runs[0][0][step]:>8.1f}x{runs[-1][1][step]:>17.0f}")
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
    p.add_argument("--graph", type=int, metavar="N", help="only --diverse on filtered shares of N turns")
    p.add_argument("--embedders", action="store_true", help="only the embedding models' comparison")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    if not DATA.exists():
        sys.exit(f"benchmark data not found: {DATA} (the ../shared folder beside the checkout)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    print(f"\nEmbeddings and diversity-aware selection; {build_info()}")
    if args.pipeline or args.graph:  # the real vectors the stand-ins are made from: embedded once
        if not VECTORS.exists():
            embed_speed()
        if args.graph:
            print_stored_graph(args.graph)
        else:
            print_pipeline([int(s) for s in args.sizes.split(",")])
        return
    if args.evidence:
        print_evidence(args.pool, args.generated, args.select)
        return
    if args.embedders:
        print_embedders()
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
    print_stored_graph(sizes[0])
    print_embedders()
    print_pipeline(sizes)
    print_evidence(args.pool, args.generated, args.select)


if __name__ == "__main__":
    main()
