"""The server backend against real OpenAI-compatible servers: llama-cpp-python's own
`python -m llama_cpp.server` serving the default model on 127.0.0.1, compared with the local
llama.cpp backend on the same file."""

import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import cli
from .servers import Server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(default_model):
    started = []

    def start(**kw) -> Server:
        started.append(Server(default_model, **kw).start())
        return started[-1]

    yield start
    for server in started:
        server.kill()


def pairs(db) -> dict[int, tuple[str, str]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT c.item_index, t.instruction, t.response FROM turns t "
                        "JOIN conversations c ON c.id = t.conversation_id WHERE c.status = 'kept'").fetchall()
    conn.close()
    return {item: (instruction, response) for item, instruction, response in rows}


def requests_made(db) -> int:
    """Completion requests a run's stored turns took: an instruction each, a response unless skipped."""
    conn = sqlite3.connect(db)
    n = conn.execute("SELECT count(*) + sum(response_finish != 'skipped') FROM turns").fetchone()[0]
    conn.close()
    return n


# No penalties: llama-cpp-python's server counts the prompt's tokens in its repeat penalty window,
# magpie-local's local backends only the generated ones (as llama.cpp's own sampler chain does), so
# item-by-item equality holds for the paper's settings; penalties are the server's own (docs/backends.md).
GEN = ("--response-max-tokens", "48", "--preset", "magpie", "-q")


def test_generation_and_scoring_match_the_local_backend(tmp_path, servers):
    server = servers()
    remote, local = tmp_path / "remote.db", tmp_path / "local.db"
    env = {"MAGPIE_TEST_KEY": "sekret-key-123"}
    # One request in flight: the server's single llama.cpp context then reuses each response
    # prompt's prefix from the instruction just generated, as the local backend does; llama.cpp's
    # numbers for a prefix computed while generating and one computed as a prompt differ by a few
    # hundredths of a nat, enough to flip a near-tie in a greedy answer.
    r = cli("generate", "-n", "4", "--db", str(remote), "--endpoint", server.url, "--api-key-env", "MAGPIE_TEST_KEY",
            "--parallel", "1", *GEN, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{server.url}/v1: {requests_made(remote)} requests" in r.stdout
    r = cli("generate", "-n", "4", "--db", str(local), "--parallel", "1", "--weights", "file", *GEN)  # as served
    assert r.returncode == 0, r.stderr
    assert pairs(remote) == pairs(local)  # seeded instructions and greedy responses, item by item

    for args in (["--endpoint", server.url], ["--backend", "llamacpp", "--weights", "file"]):
        r = cli("score", "--db", str(remote), *args, "-q")
        assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(remote)
    diffs = conn.execute("SELECT abs(a.ifd - b.ifd) FROM scores a JOIN scores b ON a.turn_id = b.turn_id "
                         "WHERE a.run_id < b.run_id AND a.ifd IS NOT NULL").fetchall()
    assert len(diffs) == 4 and max(d for (d,) in diffs) < 1e-3
    runs = {kind: (backend, json.loads(versions)) for kind, backend, versions in
            conn.execute("SELECT kind, backend, versions FROM runs WHERE backend = 'server'")}
    conn.close()
    assert runs["generate"][0] == "server" and runs["score"][0] == "server"
    facts = runs["generate"][1]["endpoints"][0]
    assert facts["url"] == server.url + "/v1" and facts["prompts"] == "text"
    assert facts["served_model"] == str(server.model)
    assert b"sekret-key-123" not in remote.read_bytes()

    # llama-cpp-python's echo log-probabilities are off by one for prompts that do not start with
    # BOS (the Alpaca prompt, on this model): refused with the reason before a run is made.
    r = cli("score", "--db", str(remote), "--endpoint", server.url, "--prompt-format", "alpaca", "-q")
    assert r.returncode == 2 and "shifted by one token" in r.stderr and "Traceback" not in r.stderr
    conn = sqlite3.connect(remote)
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM scores").fetchone()[0] == 8
    conn.close()


def committed(db) -> int:
    try:
        conn = sqlite3.connect(db, timeout=5)
        n = conn.execute("SELECT count(*) FROM conversations WHERE status = 'kept'").fetchone()[0]
        conn.close()
        return n
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_server_killed_mid_run_then_resumed_to_the_exact_count(tmp_path, servers):
    server = servers()
    db = tmp_path / "kill.db"
    args = ["generate", "-n", "10", "--db", str(db), "--endpoint", server.url, "--batch-size", "2",
            "--parallel", "2", "--response-max-tokens", "32", "-q"]
    run = subprocess.Popen([sys.executable, "-m", "magpie_local", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while committed(db) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    server.kill()
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2, stderr
    assert "no endpoint is answering" in stderr and "Traceback" not in stderr
    before = committed(db)
    assert 2 <= before < 10

    server.start()  # the same port
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"continuing with {before}/10" in r.stderr
    conn = sqlite3.connect(db)
    items = [i for (i,) in conn.execute("SELECT item_index FROM conversations ORDER BY item_index")]
    kept = conn.execute("SELECT count(*) FROM conversations WHERE status = 'kept'").fetchone()[0]
    turns = conn.execute("SELECT count(*) FROM turns").fetchone()[0]
    conn.close()
    assert kept == 10 and items == list(range(len(items))) and turns == len(items)  # nothing lost or twice


def test_two_endpoints_share_the_work(tmp_path, servers):
    first, second = servers(threads=1), servers(threads=1)
    db = tmp_path / "two.db"
    r = cli("generate", "-n", "6", "--db", str(db), "--endpoint", first.url, "--endpoint", second.url,
            "--parallel", "2", *GEN)
    assert r.returncode == 0, r.stderr
    served = {line.split("/v1: ")[0].split()[-1]: int(line.split("/v1: ")[1].split()[0])
              for line in r.stdout.splitlines() if "/v1: " in line}
    assert set(served) == {first.url, second.url}
    assert sum(served.values()) == requests_made(db) and min(served.values()) >= 2
    assert len(pairs(db)) == 6


def test_server_backend_errors(tmp_path, default_model):
    port = free_port()  # nothing listens there
    r = cli("generate", "-n", "1", "--db", str(tmp_path / "x.db"), "--endpoint", f"http://127.0.0.1:{port}")
    assert r.returncode == 2 and "does not answer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.db").exists()
    r = cli("generate", "-n", "1", "--db", str(tmp_path / "x.db"), "--backend", "server")
    assert r.returncode == 2 and "needs --endpoint" in r.stderr
    r = cli("generate", "-n", "1", "--db", str(tmp_path / "x.db"), "--tokenizer", str(default_model))
    assert r.returncode == 2 and "--tokenizer is for --backend server" in r.stderr
    r = cli("tag", "--db", str(tmp_path / "x.db"), "--backend", "server")
    assert r.returncode == 2 and "needs --endpoint" in r.stderr


def test_tokenizer_from_a_hugging_face_directory(tmp_path, servers, default_model):
    """--tokenizer DIR: tokenizer.json and tokenizer_config.json alone (no weights), here rebuilt
    from the default model's GGUF vocabulary, give the same data as the GGUF file's vocabulary."""
    from magpie_local.gguf import read_gguf
    from magpie_local.gguf_to_mlx import build_tokenizer, tokenizer_config

    info = read_gguf(default_model)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    build_tokenizer(info).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(info)))
    server = servers()
    for name, tokenizer in (("dir", folder), ("gguf", default_model)):
        r = cli("generate", "-n", "2", "--db", str(tmp_path / f"{name}.db"), "--endpoint", server.url,
                "--tokenizer", str(tokenizer), "--parallel", "1", *GEN)
        assert r.returncode == 0, r.stderr
    assert len(pairs(tmp_path / "gguf.db")) == 2 and pairs(tmp_path / "dir.db") == pairs(tmp_path / "gguf.db")
    r = cli("generate", "-n", "2", "--db", str(tmp_path / "x.db"), "--endpoint", server.url,
            "--tokenizer", str(tmp_path))
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr



def test_judge_on_a_server_matches_the_local_backend(tmp_path, servers):
    """judge reads next-token probabilities; through a server's echoed prompt log-probabilities
    it gives what the local backend gives on the same file. Kept small: llama-cpp-python's server
    takes about 0.1 s per prompt token to echo log-probabilities (docs/backends.md)."""
    server = servers()
    db = tmp_path / "j.db"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"text": "Name a primary color."}) + "\n")
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Question: {instruction}\nAnswer: {response}\nRate the answer from 1 to 5.")
    assert cli("import", str(questions), "--db", str(db)).returncode == 0
    r = cli("respond", "--run", "1", "-k", "2", "--max-tokens", "8", "--weights", "file", "--db", str(db), "-q")
    assert r.returncode == 0, r.stderr
    for args in (["--endpoint", server.url], ["--weights", "file"]):
        r = cli("judge", "--db", str(db), "--run", "2", "--rubric", str(rubric), *args, "-q")
        assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    backends = [b for (b,) in conn.execute("SELECT backend FROM runs WHERE kind = 'judge' ORDER BY id")]
    ratings = conn.execute("SELECT a.score, b.score, a.distribution, b.distribution, a.mass, b.mass FROM ratings a "
                           "JOIN ratings b ON a.turn_id = b.turn_id AND a.run_id < b.run_id").fetchall()
    conn.close()
    assert backends == ["server", "llamacpp"] and len(ratings) == 2
    for remote, local, remote_dist, local_dist, remote_mass, local_mass in ratings:
        assert abs(remote - local) < 1e-3 and abs(remote_mass - local_mass) < 1e-3
        assert np.allclose(json.loads(remote_dist), json.loads(local_dist), atol=1e-3)


def test_embeddings_from_a_server_match_the_local_backend(tmp_path, servers):
    """embed through /v1/embeddings: llama-cpp-python's server returns one vector per token for a chat
    model (no pooling), their mean is llama.cpp's mean pooling, so vectors and neighbours match the
    local backend on the same file. A server that does not serve embeddings is one line, exit 2."""
    texts = ["Name a primary color.", "Name one of the primary colours.", "Write a haiku about the sea.",
             "What is the capital of France?", "Which city is the capital of France?"]
    db = tmp_path / "e.db"
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"instruction": t, "output": "Yes."}) + "\n" for t in texts))
    assert cli("import", str(tmp_path / "q.jsonl"), "--db", str(db)).returncode == 0
    plain = servers()
    r = cli("embed", "--db", str(db), "--endpoint", plain.url)
    assert r.returncode == 2 and "does it serve embeddings" in r.stderr and "Traceback" not in r.stderr, r.stderr
    server = servers(embedding=True)
    for args in (["--endpoint", server.url, "--batch-size", "2"], ["--weights", "file"]):
        r = cli("embed", "--db", str(db), *args, "-q")
        assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    runs = conn.execute("SELECT id, backend FROM runs WHERE kind = 'embed' ORDER BY id").fetchall()
    assert [b for _, b in runs] == ["server", "llamacpp"]
    vectors = [np.stack([np.frombuffer(v, dtype="<f2").astype(np.float64) for (v,) in conn.execute(
        "SELECT vector FROM embeddings WHERE run_id = ? ORDER BY turn_id", (run_id,))]) for run_id, _ in runs]
    nearest = [conn.execute("SELECT turn_id, nearest_turn_id, repeats FROM neighbours WHERE run_id = ? "
                            "ORDER BY turn_id", (run_id,)).fetchall() for run_id, _ in runs]
    conn.close()
    assert vectors[0].shape == vectors[1].shape == (5, 576)
    assert np.min(np.sum(vectors[0] * vectors[1], axis=1)) > 0.999
    assert nearest[0] == nearest[1]
