"""import -> score -> select -> stats, as a user runs them, on the real default model."""

import json
import sqlite3

from .conftest import cli
from .test_cli import _error_line

ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Add the numbers.", "input": "5 and 7", "output": "5 + 7 = 12."},
    {"instruction": "Give a synonym for happy.", "output": "Joyful."},
    {"instruction": "What colour is the sky?", "output": "Bananas grow in bunches."},
    {"conversations": [{"from": "human", "value": "Hi, who are you?"}, {"from": "gpt", "value": "An assistant."},
                       {"from": "human", "value": "What can you do?"}, {"from": "gpt", "value": "Answer questions."}]},
]


def _dataset(tmp_path, bad_line=True):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    if bad_line:
        lines.insert(2, '{"instruction": "unterminated')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_score_select_stats(tmp_path):
    db, data = tmp_path / "m.db", _dataset(tmp_path)
    assert "line 3: invalid JSON" in _error_line(cli("import", str(data), "--db", str(db),
                                                                      "--strict"))
    imported = cli("import", str(data), "--db", str(db))
    assert imported.returncode == 0, imported.stderr
    assert "skipped line 3: invalid JSON" in imported.stderr
    assert "5 conversations (4 alpaca, 1 sharegpt), 6 turns; 1 malformed" in imported.stdout
    assert "already imported" in cli("import", str(data), "--db", str(db)).stderr

    scored = cli("score", "--db", str(db), "--max-length", "128", "-q")
    assert scored.returncode == 0, scored.stderr
    assert "pairs scored │ 6" in scored.stdout and "IFD > 1" in scored.stdout
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT turn_id, ifd, ifd_ppl, loss_cond, loss_direct, skip_reason FROM scores").fetchall()
    assert len(rows) == 6 and all(r[1] is not None and r[1] == r[1] and r[1] > 0 for r in rows)  # no NaN
    assert all(abs(r[1] - r[3] / r[4]) < 1e-9 for r in rows)

    again = cli("score", "--db", str(db), "--max-length", "128", "-q")  # resumes: nothing left to score
    assert again.returncode == 0 and conn.execute("SELECT count(*) FROM scores").fetchone()[0] == 6

    picked = cli("select", "--db", str(db), "--top", "50%", "--name", "half")
    assert picked.returncode == 0, picked.stderr
    eligible = conn.execute("SELECT count(*) FROM scores WHERE ifd <= 1").fetchone()[0]
    chosen = conn.execute("SELECT s.ifd FROM selections x JOIN scores s ON s.turn_id = x.turn_id "
                          "WHERE x.name = 'half' ORDER BY s.ifd DESC").fetchall()
    assert len(chosen) == -(-eligible // 2) and all(ifd <= 1 for (ifd,) in chosen)
    best = conn.execute("SELECT max(ifd) FROM scores WHERE ifd <= 1").fetchone()[0]
    assert chosen[0][0] == best
    assert cli("select", "--db", str(db), "--top-k", "2", "--keep-above-1", "--name", "half").returncode == 0
    assert conn.execute("SELECT count(*) FROM selections WHERE name = 'half'").fetchone()[0] == 2
    conn.close()
    assert "share such as 10%" in _error_line(cli("select", "--db", str(db), "--top", "lots"))
    stats = cli("stats", "--db", str(db))
    assert stats.returncode == 0 and "median" in stats.stdout and "Data" in stats.stdout


def test_scoring_errors_are_one_line(tmp_path):
    db = tmp_path / "empty.db"
    assert "no database" in _error_line(cli("score", "--db", str(db)))
    assert cli("import", str(_dataset(tmp_path, bad_line=False)), "--db", str(db)).returncode == 0
    assert "--prompt-format must be one of" in _error_line(cli("score", "--db", str(db), "--prompt-format", "x"))
    assert "no scores yet" in _error_line(cli("select", "--db", str(db), "--top", "10%"))
    unscored = cli("stats", "--db", str(db))  # data, no IFD yet: the data tables only
    assert unscored.returncode == 0 and "Response length" in unscored.stdout and "IFD" not in unscored.stdout
    assert "not a scoring run" in _error_line(cli("stats", "--db", str(db), "--score-run", "1"))
    assert "no such file" in _error_line(cli("import", str(tmp_path / "nope.jsonl"), "--db", str(db)))
    assert "no run 99" in _error_line(cli("score", "--db", str(db), "--run", "99"))


def test_score_on_16_bit_copies(tmp_path, monkeypatch):
    """--weights f16 / bf16 score on an F16 / BF16 copy of the Q4_1 model, made once in the cache
    (what `auto` may take, by measurement: tune.py); --weights file on the file itself. F16 holds
    the same weights, BF16 rounds them to 8 significant bits: the IFDs agree closely (not exactly:
    llama.cpp rounds activations to 8 bits for Q4_1 matmuls, and to bfloat16 for BF16 ones)."""
    from magpie_local.models import resolve_model
    from magpie_local.tune import copy_wanted

    db, env = tmp_path / "m.db", {"MAGPIE_LOCAL_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("MAGPIE_LOCAL_CACHE", str(tmp_path / "cache"))
    assert cli("import", str(_dataset(tmp_path, bad_line=False)), "--db", str(db)).returncode == 0
    for kind in ("f16", "bf16"):
        made = cli("score", "--db", str(db), "--weights", kind, "-q", env=env)
        assert made.returncode == 0 and f"in {kind.upper()}" in made.stderr, made.stderr
        assert len(list((tmp_path / "cache" / kind).glob(f"*.{kind.upper()}.gguf"))) == 1
    auto_kind = copy_wanted(resolve_model(None), "auto", "prompt")  # measured here, read by the command
    auto = cli("score", "--db", str(db), "-q", env=env)  # f16 or bf16: that run again; the file or q8_0: a new one
    assert auto.returncode == 0 and "Making" not in auto.stderr and "Measuring" not in auto.stderr, auto.stderr
    plain = cli("score", "--db", str(db), "--weights", "file", "-q", env=env)
    assert plain.returncode == 0, plain.stderr
    conn = sqlite3.connect(db)
    configs = [json.loads(c) for (c,) in conn.execute("SELECT config FROM runs WHERE kind = 'score' ORDER BY id")]
    own_run = [auto_kind] if auto_kind == "q8_0" else []
    assert [c.get("weights") for c in configs] == ["f16", "bf16", *own_run, None]
    file_run = 5 if auto_kind == "q8_0" else 4
    ifds = {r: dict(conn.execute("SELECT turn_id, ifd FROM scores WHERE run_id = ?", (r,))) for r in (2, 3, file_run)}
    conn.close()
    for copy in (2, 3):
        diffs = [abs(ifds[copy][t] - ifd) for t, ifd in ifds[file_run].items()]
        assert len(diffs) == 6 and 0 < max(diffs) < 0.05
    assert "--weights must be one of" in _error_line(cli("score", "--db", str(db), "--weights", "q8"))
    assert "is for a GGUF scorer on the llama.cpp backend" in _error_line(
        cli("score", "--db", str(db), "--weights", "bf16", "--backend", "mlx"))
