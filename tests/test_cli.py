"""The command line as a user runs it, on the real default model."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

from .conftest import REPO, cli, foreign_db
from .gguf_writer import write_gguf

SMALL = ["--instruction-max-tokens", "24", "--response-max-tokens", "24", "--ctx", "256", "-q"]


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
    assert all(0 < it <= 24 and 0 < rt <= 24 for *_, it, rt in rows)
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
    conn.execute("UPDATE turns SET response = 'See [/INST] and [bold]x[/bold].' WHERE id = 1")
    conn.commit()
    conn.close()
    shown = cli("show", "--db", str(db), "--limit", "1")
    assert shown.returncode == 0 and "Instruction:" in shown.stdout
    assert "See [/INST] and [bold]x[/bold]." in shown.stdout  # stored text is printed as is, never as markup


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
    try:
        if not os.access(readonly, os.W_OK):
            assert "not writable" in _error_line(cli("generate", "--db", str(readonly / "m.db"), "-n", "1"))
    finally:
        readonly.chmod(0o700)


def test_sigkill_then_resume_gives_exact_count_and_no_duplicates(tmp_path):
    db = tmp_path / "kill.db"
    proc = _start_and_wait_for_batches(db, 30, 3)
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


def _start_and_wait_for_batches(db, n, batches_wanted):
    args = [sys.executable, "-m", "magpie_local", "generate", "--db", str(db), "-n", str(n), "--batch-size", "2",
            "--parallel", "2", *SMALL]
    # A test runner started in the background ignores SIGINT, and children inherit that: undo it.
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            try:
                conn = sqlite3.connect(db, timeout=1)
                batches = conn.execute("SELECT count(*) FROM batches").fetchone()[0]
                conn.close()
            except sqlite3.OperationalError:
                continue
            if batches >= batches_wanted:
                break
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    db = tmp_path / "int.db"
    proc = _start_and_wait_for_batches(db, 30, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "--resume 1 -n 30" in stderr and "Traceback" not in stderr
    assert 4 <= len(_pairs(db)) < 30
    resumed = cli("generate", "--db", str(db), "--resume", "1", "-n", "30", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert len(_pairs(db)) == 30
