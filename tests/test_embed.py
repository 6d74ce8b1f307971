"""Stored embeddings and neighbour statistics on the real default model: vectors stored once per
turn (float16, normalised), neighbours against a brute-force search over those vectors, resume after
SIGKILL to the same bytes, select filters on them, and bad input."""

import json
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import magpie_local.api as api
from magpie_local.diversity import MIN_KEPT, balanced, candidate_graph, facility_location, kmeans, similarity_graph
from magpie_local.neighbours import from_blobs, graph_from_blobs, nearest_neighbours
from magpie_local.store import Store

from .conftest import REPO, cli
from .test_cli import _error_line

# Six instructions, each with a paraphrase, and four unrelated ones.
PARAPHRASES = [("Name three primary colors.", "List the three primary colours."),
               ("How do I bake bread at home?", "What is the way to bake bread in my own kitchen?"),
               ("Translate 'good morning' into French.", "How do you say 'good morning' in French?"),
               ("Write a haiku about the sea.", "Compose a haiku about the ocean."),
               ("What causes rain?", "Why does it rain?"),
               ("Give me tips to sleep better.", "How can I improve my sleep?")]
OTHERS = ["Explain how a binary search works.", "Who wrote Pride and Prejudice?",
          "Convert 100 degrees Fahrenheit to Celsius.", "Suggest a name for a pet turtle."]


def alpaca(path, instructions):
    path.write_text(json.dumps([{"instruction": text, "input": "", "output": f"An answer to: {text}"}
                                for text in instructions]))
    return path


def stored(db) -> tuple[list[tuple], list[tuple]]:
    conn = sqlite3.connect(db)
    vectors = conn.execute("SELECT run_id, turn_id, vector FROM embeddings ORDER BY run_id, turn_id").fetchall()
    neighbours = conn.execute("SELECT * FROM neighbours ORDER BY run_id, turn_id").fetchall()
    conn.close()
    return vectors, neighbours


def kill_after_embeddings(args: list[str], db) -> None:
    """Start `magpie-local ARGS --db DB` and SIGKILL it once it has committed embeddings."""
    proc = subprocess.Popen([sys.executable, "-m", "magpie_local", *args, "--db", str(db)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = sqlite3.connect(db, timeout=1)
            done = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            conn.close()
        except sqlite3.Error:  # the table is made when the process first opens the database
            done = 0
        if done:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    texts = [t for pair in PARAPHRASES for t in pair] + OTHERS
    db = folder / "e.db"
    assert cli("import", str(alpaca(folder / "a.json", texts)), "--db", str(db)).returncode == 0
    r = cli("embed", "--db", str(db), "--batch-size", "4", "-q")
    assert r.returncode == 0, r.stderr
    assert "Embedding run 2: 16 turns (576 dimensions" in r.stdout, r.stdout
    return folder, db, texts


def test_vectors_and_neighbours_match_a_brute_force_search(embedded):
    _, db, texts = embedded
    vectors, neighbours = stored(db)
    assert len(vectors) == len(texts) == len(neighbours)
    matrix = np.stack([np.frombuffer(v, dtype="<f2").astype(np.float64) for _, _, v in vectors])
    assert matrix.shape == (16, 576) and np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=2e-3)
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    turn_ids = [t for _, t, _ in vectors]
    for i, (run_id, turn_id, nearest, distance, repeats, radius, similar, similarity) in enumerate(neighbours):
        assert (run_id, turn_id, radius) == (2, turn_ids[i], 0.05)
        assert nearest == turn_ids[int(sims[i].argmax())]
        assert abs(distance - (1 - sims[i].max())) < 1e-4
        assert repeats == int((sims[i] >= 0.95).sum())
        # The stored graph: all 15 others (fewer than 32), most similar first, with their cosines.
        ids, cosines = graph_from_blobs([similar], [similarity])
        by_similarity = np.argsort(-sims[i], kind="stable")[:15]
        assert ids[0].tolist() == [turn_ids[j] for j in by_similarity]
        assert np.allclose(cosines[0], sims[i][by_similarity], atol=1e-4)
    # What the embedding measures: a paraphrase lies nearer its pair than the unrelated instructions do.
    closer = [sims[2 * k, 2 * k + 1] > np.max(sims[2 * k, 12:]) for k in range(len(PARAPHRASES))]
    assert sum(closer) >= 4, closer


def test_blocked_search_is_the_full_matrix_search():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors[7] = vectors[3] + 0.01  # a near copy
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    full = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    np.fill_diagonal(full, -np.inf)
    for block in (1, 7, 64):
        found = nearest_neighbours(vectors, radius=0.3, block=block)
        assert (found.nearest == full.argmax(axis=1)).all()
        assert np.allclose(found.distance, 1 - full.max(axis=1), atol=1e-5)
        assert (found.repeats == (full >= 0.7).sum(axis=1)).all()
        assert found.nearest[3] == 7 and found.nearest[7] == 3
        graph = nearest_neighbours(vectors, radius=0.3, degree=5, block=block)
        assert (graph.similar == np.argsort(-full, axis=1, kind="stable")[:, :5]).all()
        assert np.allclose(graph.cosine, -np.sort(-full, axis=1)[:, :5], atol=1e-5)
        some = nearest_neighbours(vectors, degree=5, rows=np.array([7, 3]), block=block)
        assert (some.similar == graph.similar[[7, 3]]).all()
    alone = nearest_neighbours(vectors[:1])
    assert alone.nearest[0] == -1 and np.isnan(alone.distance[0]) and alone.repeats[0] == 0
    assert from_blobs([]).shape == (0, 0)


def test_candidate_graph_from_the_stored_one_is_the_search_among_candidates():
    """The stored graph of all turns, restricted to a filtered subset, keeps each candidate's most
    similar candidates exactly; a candidate left with fewer than MIN_KEPT is searched again."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored = nearest_neighbours(vectors, degree=32)
    for share in (1.0, 0.5, 0.2):
        candidates = np.sort(rng.choice(400, int(400 * share), replace=False))
        position = np.full(401, -1)
        position[candidates] = np.arange(len(candidates))
        mapped = position[stored.similar[candidates]]
        similar, cosine, searched = candidate_graph(vectors[candidates], 32, mapped, stored.cosine[candidates])
        exact, exact_cosine = similarity_graph(vectors[candidates], 32)
        kept = (mapped >= 0).sum(axis=1)
        assert searched == int((kept < MIN_KEPT).sum())
        assert searched == 0 if share == 1.0 else share > 0.2 or searched > 0
        for row in range(len(candidates)):
            width = 32 if kept[row] < MIN_KEPT else kept[row]
            assert similar[row, :width].tolist() == exact[row, :width].tolist()
            assert np.allclose(cosine[row, :width], exact_cosine[row, :width], atol=1e-5)
            assert (similar[row, width:] == -1).all()


def test_embedding_resumes_to_the_same_bytes(embedded):
    folder, db, texts = embedded
    again = cli("embed", "--db", str(db), "--batch-size", "4", "-q")
    assert again.returncode == 0 and stored(db) == stored(db)
    first = stored(db)
    killed = folder / "killed.db"
    assert cli("import", str(folder / "a.json"), "--db", str(killed)).returncode == 0
    kill_after_embeddings(["embed", "--batch-size", "4"], killed)
    conn = sqlite3.connect(killed)
    part = conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    conn.close()
    assert 0 < part < len(texts), "the kill should land mid-run"
    resumed = cli("embed", "--db", str(killed), "--batch-size", "4", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert stored(killed) == first


def test_select_on_neighbour_statistics(embedded, tmp_path):
    _, source, _ = embedded
    db = tmp_path / "s.db"
    db.write_bytes(source.read_bytes())
    assert cli("score", "--db", str(db), "-q").returncode == 0
    with Store(db, create=False, write=False) as store:
        stats = {r["turn_id"]: r for r in store.neighbour_rows(2)}
    distances = sorted(r["distance"] for r in stats.values())
    bound = distances[len(distances) // 2]
    everything = api.select(db, "all")
    far = api.select(db, "far", min_distance=bound)
    assert set(far.turn_ids) == {t for t in everything.turn_ids if stats[t]["distance"] >= bound}
    assert 0 < len(far.turn_ids) < len(everything.turn_ids)
    single = api.select(db, "single", max_repeats=0, embed_run=2)
    assert set(single.turn_ids) == {t for t in everything.turn_ids if stats[t]["repeats"] == 0}
    r = cli("select", "--db", str(db), "--min-distance", str(bound), "--name", "far2")
    assert r.returncode == 0 and f"{len(far.turn_ids)} of {len(far.turn_ids)} eligible" in r.stdout, r.stdout


def test_export_and_report_on_neighbour_statistics(embedded, tmp_path):
    _, source, _ = embedded
    with Store(source, create=False, write=False) as store:
        stats = {r["turn_id"]: r for r in store.neighbour_rows(2)}
        texts = {t[0]: t[1] for t in store.kept_turns()}
    bound = sorted(r["distance"] for r in stats.values())[len(stats) // 2]
    r = cli("export", "--db", str(source), "--out", str(tmp_path / "far"), "--min-distance", str(bound),
            "--max-repeats", "0")
    assert r.returncode == 0, r.stderr
    exported = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "far/data.jsonl").open()]
    wanted = [texts[t] for t, s in sorted(stats.items()) if s["distance"] >= bound and s["repeats"] == 0]
    assert exported == wanted and 0 < len(wanted) < len(stats)
    card = (tmp_path / "far/README.md").read_text()
    assert f"nearest neighbour at least {bound:g} away and at most 0 others within the radius (embedding run 2" in card
    assert "--format dpo pairs K answers" in _error_line(cli("export", "--db", str(source), "--out",
                                                             str(tmp_path / "d"), "--format", "dpo",
                                                             "--max-repeats", "0"))
    assert "--min-distance is a cosine distance" in _error_line(cli("export", "--db", str(source), "--out",
                                                                    str(tmp_path / "d"), "--min-distance", "3"))
    r = cli("report", "--db", str(source), "--out", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    assert "Distance to the nearest neighbour (embedding run 2)" in page and "Others within cosine distance" in page
    some = next(iter(stats.values()))
    assert f"nearest {some['distance']:.3f} away, {some['repeats']} within 0.05" in page


def greedy_by_hand(vectors, weights, k):
    """Facility location's greedy choice on the full similarity matrix, one candidate at a time."""
    sims = np.maximum(vectors.astype(np.float64) @ vectors.T.astype(np.float64), 0)
    np.fill_diagonal(sims, 1.0)
    best, chosen = np.zeros(len(vectors)), []
    for _ in range(k):
        gain, j = min((-(weights * np.maximum(sims[:, j] - best, 0)).sum(), j)
                      for j in range(len(vectors)) if j not in chosen)
        chosen.append(j)
        best = np.maximum(best, sims[:, j])
    return chosen, float((weights * best).sum()), sims


def test_facility_location_is_the_greedy_choice_and_near_the_best_subset():
    from itertools import combinations

    rng = np.random.default_rng(3)
    for _ in range(10):
        vectors = rng.normal(size=(9, 4)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        weights = rng.uniform(0.2, 1.0, 9)
        chosen, value = facility_location(weights, 3, similarity_graph(vectors, 8))
        by_hand, expected, sims = greedy_by_hand(vectors, weights, 3)
        assert chosen == by_hand and abs(value - expected) < 1e-4
        optimum = max((weights * sims[:, list(s)].max(axis=1)).sum() for s in combinations(range(9), 3))
        assert value >= (1 - 1 / np.e) * optimum - 1e-9 and value <= optimum + 1e-6
        sparse, sparse_value = facility_location(weights, 3, similarity_graph(vectors, 2))
        # Similarities outside the graph count as 0: never more than the set's exact objective.
        assert len(set(sparse)) == 3 and sparse_value <= (weights * sims[:, sparse].max(axis=1)).sum() + 1e-6


def test_diverse_selection(embedded, tmp_path):
    _, source, texts = embedded
    db = tmp_path / "d.db"
    db.write_bytes(source.read_bytes())
    assert cli("score", "--db", str(db), "-q").returncode == 0
    r = cli("select", "--db", str(db), "--diverse", "5", "--name", "diverse")
    assert r.returncode == 0 and "5 of 16 eligible" in r.stdout, r.stdout + r.stderr
    with Store(db, create=False, write=False) as store:
        chosen = {t for (t,) in store.conn.execute("SELECT turn_id FROM selections WHERE name = 'diverse'")}
        definition = store.selection_definition("diverse")
        turn_ids, blobs = store.embedding_rows(2)
        ifd = dict(store.conn.execute("SELECT turn_id, ifd FROM scores WHERE run_id = 3"))
    assert definition == {"diverse": 5, "score_run": 3, "embed_run": 2}
    candidates = sorted(ifd, key=lambda t: (-ifd[t], t))
    at = {t: i for i, t in enumerate(turn_ids)}
    vectors = from_blobs([blobs[at[t]] for t in candidates])
    by_hand, _, sims = greedy_by_hand(vectors, np.array([ifd[t] for t in candidates]), 5)
    assert chosen == {candidates[j] for j in by_hand}
    again = api.select(db, "again", diverse=5)
    assert set(again.turn_ids) == chosen
    # Over a filtered subset (the top half by IFD), from the stored graph: still the greedy choice.
    half = api.select(db, "half", top=0.5, diverse=3)
    assert set(half.turn_ids) == {candidates[j] for j in greedy_by_hand(vectors[:8], np.array(
        [ifd[t] for t in candidates[:8]]), 3)[0]}
    done = api.export(db, tmp_path / "out", selection="diverse")
    assert done.conversations == 5
    assert '"diverse": 5' in done.card.read_text()
    # Fewer near copies than the top five by IFD: the mean similarity among the chosen is lower.
    def mean_similarity(picked):
        idx = [candidates.index(t) for t in picked]
        block = sims[np.ix_(idx, idx)]
        return (block.sum() - len(idx)) / (len(idx) * (len(idx) - 1))
    assert mean_similarity(chosen) < mean_similarity(candidates[:5])
    assert "more than the 16 pairs" in _error_line(cli("select", "--db", str(db), "--diverse", "17"))


def test_diverse_reads_the_stored_graph_and_searches_without_one(embedded, tmp_path, monkeypatch):
    """select --diverse does not search when the embedding run stored its graph; on neighbours
    stored before schema 7 (no graph) it searches, to the same choice."""
    import magpie_local.diversity as diversity

    _, source, _ = embedded
    db = tmp_path / "g.db"
    db.write_bytes(source.read_bytes())
    assert cli("score", "--db", str(db), "-q").returncode == 0
    searched = []
    real = diversity.nearest_neighbours
    monkeypatch.setattr(diversity, "nearest_neighbours", lambda *a, **k: searched.append(1) or real(*a, **k))
    stored = api.select(db, "stored", diverse=5)
    assert searched == []
    with Store(db, create=False) as store:
        store.conn.execute("UPDATE neighbours SET similar = NULL, similarity = NULL")
        store.conn.commit()
    assert api.select(db, "searched", diverse=5).turn_ids == stored.turn_ids
    assert searched == [1]


def test_kmeans_finds_separated_groups_and_is_a_lloyd_fixpoint():
    rng = np.random.default_rng(5)
    centres = np.eye(6, dtype=np.float32)[:3]
    truth = np.repeat(np.arange(3), 40)
    vectors = centres[truth] + rng.normal(scale=0.15, size=(120, 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = kmeans(vectors, 3, seed=0, block=7)
    assert (labels == kmeans(vectors, 3, seed=0)).all()  # blocks do not change it; the seed fixes it
    for group in range(3):  # each true group is one cluster
        assert len(set(labels[truth == group].tolist())) == 1
    means = np.stack([vectors[labels == c].mean(axis=0) for c in range(3)])
    assert ((vectors @ means.T).argmax(axis=1) == labels).all()


def test_balanced_takes_equal_shares_in_ifd_order():
    groups = ["a", "a", "b", "a", "c", "b", "a"]
    assert balanced(groups, 5) == [0, 2, 4, 1, 5]  # the best of a, b, c; then the second of a and b
    assert sorted(balanced(groups, 99)) == list(range(7))


def test_cluster_and_balanced_selections(embedded, tmp_path):
    _, source, _ = embedded
    db = tmp_path / "c.db"
    db.write_bytes(source.read_bytes())
    assert cli("score", "--db", str(db), "-q").returncode == 0
    first = api.select(db, "clusters", clusters=4, per_cluster=2, seed=1)
    assert api.select(db, "again", clusters=4, per_cluster=2, seed=1).turn_ids == first.turn_ids
    with Store(db, create=False, write=False) as store:
        ifd = dict(store.conn.execute("SELECT turn_id, ifd FROM scores WHERE run_id = 3"))
        turn_ids, blobs = store.embedding_rows(2)
        assert store.selection_definition("clusters") == {"clusters": 4, "per_cluster": 2, "seed": 1,
                                                          "score_run": 3, "embed_run": 2}
    candidates = sorted(ifd, key=lambda t: (-ifd[t], t))
    at = {t: i for i, t in enumerate(turn_ids)}
    labels = kmeans(from_blobs([blobs[at[t]] for t in candidates]), 4, seed=1)
    expected = {c for label in set(labels.tolist()) for c in [t for t, lab in zip(candidates, labels)
                                                                 if lab == label][:2]}
    assert set(first.turn_ids) == expected and len(expected) <= 8

    assert cli("tag", "--db", str(db), "-q").returncode == 0
    chosen = api.select(db, "balanced", balance="task_category", top_k=6)
    with Store(db, create=False, write=False) as store:
        category = {t: v[0] for t, v in store.tags_by_turn(4).items()}
    shares = {}
    for t in chosen.turn_ids:
        shares[category[t]] = shares.get(category[t], 0) + 1
    available = {}
    for t in candidates:
        available[category[t]] = available.get(category[t], 0) + 1
    assert len(chosen.turn_ids) == 6
    # Equal shares: a category has fewer than the largest share only when it has no more to give.
    assert all(n >= max(shares.values()) - 1 or n == available[c] for c, n in shares.items())
    assert all(c in shares for c in available) or len(available) > 6
    for args, message in ((["--balance", "difficulty"], "needs --top or --top-k"),
                          (["--balance", "colour", "--top-k", "3"], "tag field"),
                          (["--clusters", "3"], "go together"),
                          (["--clusters", "3", "--per-cluster", "1", "--diverse", "2"], "use one of")):
        assert message in _error_line(cli("select", "--db", str(db), *args))


def test_bad_input_is_one_line_exit_2(embedded, tmp_path, sdist_file):
    folder, source, _ = embedded
    db = tmp_path / "b.db"
    assert cli("import", str(folder / "a.json"), "--db", str(db)).returncode == 0
    assert cli("score", "--db", str(db), "-q").returncode == 0
    before = stored(db)
    assert "--text must be one of" in _error_line(cli("embed", "--db", str(db), "--text", "bogus"))
    assert "--radius" in _error_line(cli("embed", "--db", str(db), "--radius", "-1"))
    assert "is a score run, not data" in _error_line(cli("embed", "--db", str(db), "--run", "2"))
    assert "no embeddings yet" in _error_line(cli("select", "--db", str(db), "--min-distance", "0.1"))
    assert "no embeddings yet" in _error_line(cli("select", "--db", str(db), "--diverse", "3"))
    assert "--diverse must be at least 1" in _error_line(cli("select", "--db", str(db), "--diverse", "0"))
    assert "holds no tags yet" in _error_line(cli("select", "--db", str(db), "--balance", "difficulty",
                                                  "--top-k", "3"))
    assert "not an embedding run" in _error_line(cli("select", "--db", str(db), "--max-repeats", "0",
                                                     "--embed-run", "1"))
    assert "--max-repeats must be at least 0" in _error_line(cli("select", "--db", str(source), "--max-repeats",
                                                                 "-1"))
    vocab_only = sdist_file("models/ggml-vocab-llama-spm.gguf")  # a GGUF with a vocabulary and no weights
    assert "could not load" in _error_line(cli("embed", "--db", str(db), "--model", str(vocab_only)))
    assert stored(db) == before


def reference_bert(weights: dict, tokenizer_json: bytes, text: str) -> tuple[np.ndarray, list[int]]:
    """all-MiniLM-L6-v2 as sentence-transformers runs it, written out in NumPy (float64): BERT's
    six post-norm layers, mean pooling over every token, normalised; tokens by `tokenizers`."""
    from math import erf

    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode())
    tok.no_padding()
    tok.no_truncation()
    ids = tok.encode(text).ids
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    n, heads = len(ids), 12

    def norm(x, p):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, p + f"attention.self.{t}").reshape(n, heads, -1).transpose(1, 0, 2)
                   for t in ("query", "key", "value"))
        a = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = norm(x + linear((a @ v).transpose(1, 0, 2).reshape(n, -1), p + "attention.output.dense"),
                 p + "attention.output.LayerNorm")
        f = linear(x, p + "intermediate.dense")
        f = 0.5 * f * (1 + np.vectorize(erf)(f / np.sqrt(2)))
        x = norm(x + linear(f, p + "output.dense"), p + "output.LayerNorm")
    e = x.mean(axis=0)
    return e / np.linalg.norm(e), ids


def test_minilm_conversion_matches_a_reference_bert(tmp_path):
    """The GGUF made from the packaged all-MiniLM-L6-v2 embeds as a NumPy BERT does, token for token."""
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.models import resolve_model
    from magpie_local.sentence_model import minilm_zip, read_safetensors, read_zip

    files = read_zip(minilm_zip())
    weights = read_safetensors(files["model.safetensors"])
    model = resolve_model("minilm")
    assert model.gguf.architecture == "bert" and model.name == "all-MiniLM-L6-v2.F16"
    texts = ["Name three primary colors.", "How do I bake bread at home?", "Übersetze: naïve café résumé!"]
    with LlamaCppBackend(model.path, ctx=64) as backend:
        ours = backend.embed(texts)
        for text, row in zip(texts, ours):
            expected, ids = reference_bert(weights, files["tokenizer.json"], text)
            assert backend.tokenize(text, special=False) == ids
            assert float(expected @ row) > 0.9999


def test_embed_with_minilm(embedded, tmp_path):
    folder, _, texts = embedded
    db = tmp_path / "m.db"
    assert cli("import", str(folder / "a.json"), "--db", str(db)).returncode == 0
    r = cli("embed", "--db", str(db), "--model", "minilm", "-q")
    assert r.returncode == 0, r.stderr
    assert "16 turns (384 dimensions, all-MiniLM-L6-v2.F16)" in r.stdout, r.stdout
    vectors, _ = stored(db)
    v = from_blobs([b for _, _, b in vectors])
    sims = v @ v.T
    # Every paraphrase lies nearer its pair than any unrelated instruction does.
    assert all(sims[2 * k, 2 * k + 1] > np.max(sims[2 * k, 12:]) for k in range(len(PARAPHRASES)))


def test_bad_sentence_model_files_are_one_line_errors(tmp_path):
    import struct
    import zipfile

    from magpie_local.sentence_model import SentenceModelError, bert_to_gguf, read_safetensors, read_zip

    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}).encode()
    for data, message in ((b"abc", "truncated"), (struct.pack("<Q", 99) + b"{}", "runs past"),
                          (struct.pack("<Q", len(header)) + header + bytes(16), "outside the file")):
        with pytest.raises(SentenceModelError, match=message):
            read_safetensors(data)
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(SentenceModelError, match="lacks tokenizer.json, model.safetensors"):
        read_zip(tmp_path / "m.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(SentenceModelError, match="cannot read"):
        read_zip(tmp_path / "bad.zip")
    config = json.dumps({"num_hidden_layers": 1, "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 1})
    tokenizer = json.dumps({"model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "a": 1}}})
    empty = struct.pack("<Q", 2) + b"{}"
    with pytest.raises(SentenceModelError, match="lacks embeddings.word_embeddings.weight"):
        bert_to_gguf({"config.json": config.encode(), "tokenizer.json": tokenizer.encode(),
                      "model.safetensors": empty}, tmp_path / "x.gguf", "x")
