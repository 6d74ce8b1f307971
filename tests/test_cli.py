"""The command line as a user runs it, on the real default model."""

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from .conftest import REPO, as_unprivileged_root, cli, cli_as, foreign_db
from .gguf_writer import write_gguf

SMALL = ["--instruction-max-tokens", "64", "--response-max-tokens", "16", "--ctx", "256", "-q"]


def _pairs(db):
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT c.item_index, t.instruction, t.response, t.instruction_tokens, t.response_tokens "
        "FROM conversations c JOIN turns t ON t.conversation_id = c.id "
        "WHERE c.status = 'kept' ORDER BY c.item_index").fetchall()
    conn.close()
    return rows


def test_generate_stores_pairs_reproducibly(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    first = cli("generate", "--db", str(a), "-n", "4", "--seed", "3", *SMALL)
    assert first.returncode == 0, first.stderr
    assert "Run 1 complete" in first.stdout
    rows = _pairs(a)
    assert len(rows) == 4
    assert all(instruction.strip() and response.strip() for _, instruction, response, _, _ in rows)
    assert all(0 < it <= 64 and 0 < rt <= 16 for *_, it, rt in rows)
    assert cli("generate", "--db", str(b), "-n", "4", "--seed", "3", "--parallel", "1", *SMALL).returncode == 0
    assert _pairs(b) == rows  # same model, seed and settings: same data, whatever --parallel


def test_same_command_again_continues_the_run(tmp_path):
    db = tmp_path / "m.db"
    assert cli("generate", "--db", str(db), "-n", "2", *SMALL).returncode == 0
    again = cli("generate", "--db", str(db), "-n", "3", *SMALL)
    assert again.returncode == 0, again.stderr
    assert "Run 1: continuing with 2/3 pairs" in again.stderr
    assert len(_pairs(db)) == 3
    done = cli("generate", "--db", str(db), "-n", "3", *SMALL)
    assert done.returncode == 0 and "already complete" in done.stderr
    listing = cli("runs", "--db", str(db))
    assert listing.returncode == 0 and "complete" in listing.stdout
    conn = sqlite3.connect(db)
    conn.execute("UPDATE turns SET response = 'See [/INST] and [bold]x[/bold].' WHERE conversation_id = "
                     "(SELECT min(id) FROM conversations WHERE status = 'kept')")
    conn.commit()
    conn.close()
    shown = cli("show", "--db", str(db), "--limit", "1")
    assert shown.returncode == 0 and "User:" in shown.stdout
    assert "See [/INST] and [bold]x[/bold]." in shown.stdout  # stored text is printed as is, never as markup


def test_generate_weights_file_copies_and_auto(tmp_path, monkeypatch):
    """--weights f16 generates with an F16 copy made once in the cache, --weights file with the
    model file; they are runs of their own (other kernels, other text). auto is what measured
    fastest here for generation steps (tune.py): a copy, or the file."""
    from magpie_local.models import resolve_model
    from magpie_local.tune import copy_wanted

    db, env = tmp_path / "m.db", {"MAGPIE_LOCAL_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("MAGPIE_LOCAL_CACHE", str(tmp_path / "cache"))  # the commands read this measurement
    f16 = cli("generate", "--db", str(db), "-n", "2", "--weights", "f16", *SMALL, env=env)
    assert f16.returncode == 0 and "in F16" in f16.stderr and "(F16 copy)" in f16.stderr, f16.stderr
    assert len(list((tmp_path / "cache" / "f16").glob("*.F16.gguf"))) == 1
    plain = cli("generate", "--db", str(db), "-n", "2", "--weights", "file", *SMALL, env=env)
    assert plain.returncode == 0 and "Run 2: new" in plain.stderr and "F16" not in plain.stderr, plain.stderr
    auto_kind = copy_wanted(resolve_model(None), "auto", "step")
    auto = cli("generate", "--db", str(db), "-n", "3", *SMALL, env=env)
    assert auto.returncode == 0, auto.stderr
    if auto_kind not in (None, "f16"):
        assert "Run 3: new" in auto.stderr and f"({auto_kind.upper()} copy)" in auto.stderr, auto.stderr
        assert len(list((tmp_path / "cache" / auto_kind).glob(f"*.{auto_kind.upper()}.gguf"))) == 1
    else:
        assert "Making" not in auto.stderr, auto.stderr
        assert f"Run {1 if auto_kind == 'f16' else 2}: continuing with 2/3 pairs" in auto.stderr
    resumed = cli("generate", "--db", str(db), "-n", "4", "--resume", "2", *SMALL, env=env)  # keeps its weights
    assert resumed.returncode == 0 and "Run 2: continuing" in resumed.stderr, resumed.stderr
    conn = sqlite3.connect(db)
    configs = [json.loads(c) for (c,) in conn.execute("SELECT config FROM runs ORDER BY id")]
    first = conn.execute("SELECT run_id, t.response FROM conversations c JOIN turns t ON t.conversation_id = c.id "
                         "WHERE c.status = 'kept' GROUP BY run_id HAVING c.item_index = min(c.item_index) "
                         "ORDER BY run_id").fetchall()  # each run's first kept pair
    conn.close()
    own_run = [auto_kind] if auto_kind not in (None, "f16") else []
    assert [c.get("weights") for c in configs] == ["f16", None] + own_run
    assert [r for r, _ in first] == list(range(1, len(configs) + 1)) and all(text for _, text in first)
    assert "--weights must be one of" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--weights", "q8"))
    other = tmp_path / "other.db"
    assert "is for a GGUF model on the llama.cpp backend" in _error_line(
        cli("generate", "--db", str(other), "-n", "1", "--weights", "bf16", "--backend", "mlx"))
    assert not other.exists()


def test_python_dash_m_and_help():
    for args in (["--help"], ["generate", "--help"], ["runs", "--help"], ["models", "list", "--help"]):
        result = cli(*args)
        assert result.returncode == 0 and "Usage" in result.stdout
    assert "SmolLM2-135M-Instruct" in cli("models", "list").stdout


def _error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_inputs_fail_with_one_line_and_leave_the_db_alone(tmp_path):
    db = tmp_path / "m.db"
    assert "at least 1" in _error_line(cli("generate", "--db", str(db), "-n", "0"))
    assert "not found" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--model", "nope.gguf"))
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    assert "not a GGUF file" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--model", str(text)))
    bare = write_gguf(tmp_path / "bare.gguf", {"general.architecture": "llama"})
    assert "no chat template" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--model", str(bare)))
    assert not db.exists()  # none of these created the database
    assert "does not exist" in _error_line(cli("generate", "--db", str(tmp_path / "x" / "m.db"), "-n", "1"))

    foreign = tmp_path / "foreign.db"
    before = foreign_db(foreign)
    assert "not created by magpie-local" in _error_line(cli("generate", "--db", str(foreign), "-n", "1", *SMALL))
    assert foreign.read_bytes() == before
    assert "no database" in _error_line(cli("runs", "--db", str(tmp_path / "absent.db")))
    assert "Invalid value" in _error_line(cli("generate", "--db", str(db), "-n", "many"))


def test_unwritable_db_paths(tmp_path):
    target = tmp_path / "dir.db"
    target.mkdir()
    assert "is a directory" in _error_line(cli("generate", "--db", str(target), "-n", "1", *SMALL))
    # /proc refuses new files even to root; a read-only directory stops other users earlier.
    assert "cannot" in _error_line(cli("generate", "--db", "/proc/magpie-test.db", "-n", "1", *SMALL))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:  # as root too: without the capability that overrides file permissions
        assert "not writable" in _error_line(cli_as(as_unprivileged_root(), "generate", "--db", str(readonly / "m.db"),
                                                    "-n", "1"))
    finally:
        readonly.chmod(0o700)


def test_sigkill_then_resume_gives_exact_count_and_no_duplicates(tmp_path):
    db = tmp_path / "kill.db"
    proc = _start_and_wait_for_pairs(db, 30, 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 4 <= len(_pairs(db)) < 30

    resumed = cli("generate", "--db", str(db), "-n", "30", "--batch-size", "2", "--parallel", "2", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    rows = _pairs(db)
    assert len(rows) == 30
    conn = sqlite3.connect(db)
    items = [r[0] for r in conn.execute("SELECT item_index FROM conversations ORDER BY item_index")]
    turns_per_conv = {r[0] for r in conn.execute("SELECT count(*) FROM turns GROUP BY conversation_id")}
    orphans = conn.execute("SELECT count(*) FROM conversations c WHERE NOT EXISTS "
                           "(SELECT 1 FROM turns t WHERE t.conversation_id = c.id)").fetchone()[0]
    conn.close()
    assert items == list(range(len(items)))
    assert turns_per_conv == {1} and orphans == 0

    # The resumed run holds exactly what an uninterrupted run makes.
    clean = tmp_path / "clean.db"
    assert cli("generate", "--db", str(clean), "-n", "30", "--batch-size", "7", *SMALL).returncode == 0
    assert _pairs(clean) == rows


def _start_and_wait_for_pairs(db, n, pairs_wanted):
    # Two threads: two lanes (backends/llamacpp.py), each stopped between its own decodes.
    args = [sys.executable, "-m", "magpie_local", "generate", "--db", str(db), "-n", str(n), "--batch-size", "2",
            "--parallel", "2", "--threads", "2", *SMALL]
    # A test runner started in the background ignores SIGINT, and children inherit that: undo it.
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            try:
                conn = sqlite3.connect(db, timeout=1)
                pairs = conn.execute("SELECT count(*) FROM conversations WHERE status = 'kept'").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                continue
            if pairs >= pairs_wanted:
                break
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, sig):
    db = tmp_path / "int.db"
    proc = _start_and_wait_for_pairs(db, 30, 4)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
    assert "Interrupted" in stderr and "--resume 1 -n 30" in stderr and "Traceback" not in stderr
    assert 4 <= len(_pairs(db)) < 30
    resumed = cli("generate", "--db", str(db), "--resume", "1", "-n", "30", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert len(_pairs(db)) == 30


def test_multi_turn_task_run_on_the_real_model(tmp_path):
    """A two-turn, task-steered run: every kept conversation has both turns, the task's system prompt
    is stored, and the second user turn was written after the first exchange."""
    db = tmp_path / "mt.db"
    done = cli("generate", "--db", str(db), "-n", "2", "--turns", "2", "--task", "code", *SMALL)
    assert done.returncode == 0, done.stderr
    assert "2-turn conversations in run" in done.stdout
    conn = sqlite3.connect(db)
    kept = conn.execute("SELECT id, system_name, system_prompt FROM conversations WHERE status = 'kept'").fetchall()
    assert len(kept) == 2
    for conv_id, name, system in kept:
        assert name == "code" and system.startswith("You are an AI assistant designed to provide helpful, "
                                                    "step-by-step guidance on coding problems.")
        turns = conn.execute("SELECT turn_index, instruction, response FROM turns WHERE conversation_id = ? "
                             "ORDER BY turn_index", [conv_id]).fetchall()
        assert [t[0] for t in turns] == [0, 1] and all(t[1] and t[2] for t in turns)
    reasons = dict(conn.execute("SELECT drop_reason, count(*) FROM conversations WHERE status = 'dropped' "
                                "GROUP BY drop_reason").fetchall())
    conn.close()
    for reason, count in reasons.items():
        assert f"{count} {reason}" in done.stdout  # the summary counts every drop reason
    shown = cli("show", "--db", str(db), "--limit", "1")
    assert shown.returncode == 0 and "System (code):" in shown.stdout and shown.stdout.count("User:") == 2


def test_generation_controls_reject_bad_values(tmp_path):
    db = tmp_path / "m.db"
    assert "unknown task" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--task", "poetry-slam"))
    assert "unknown language" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--language", "xx"))
    assert "--turns" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--turns", "0"))
    assert "one of" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--task", "math",
                                       "--system-prompt", "Hi"))
    assert "unknown template family" in _error_line(cli("generate", "--db", str(db), "-n", "1", "--template", "zz"))
    assert not db.exists()


def test_templates_commands(tmp_path):
    detected = cli("templates", "detect")
    assert detected.returncode == 0, detected.stderr
    assert "chatml" in detected.stdout and "'<|im_end|>'=2" in detected.stdout
    listed = cli("templates", "list")
    assert listed.returncode == 0 and "llama-3" in listed.stdout and "deepseek-r1" in listed.stdout
    shown = cli("templates", "show", "llama-2")
    assert shown.returncode == 0 and "<<SYS>>" in shown.stdout and "'<BOS>[INST] '" in shown.stdout
    assert "unknown template family" in _error_line(cli("templates", "show", "nope"))
