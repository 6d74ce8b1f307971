"""Faults a laptop user meets: a second process, a full disk, a damaged or locked file,
no network. Each ends with one clear line, a non-zero exit and the stored data intact."""

import resource
import signal
import sqlite3
import subprocess
import sys

from magpie_local.store import Store

from .conftest import REPO, cli
from .test_cli import SMALL, _error_line, _pairs


def _make_db(tmp_path, n=3):
    db = tmp_path / "m.db"
    done = cli("generate", "--db", str(db), "-n", str(n), *SMALL)
    assert done.returncode == 0, done.stderr
    return db


def _integrity(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_a_second_writer_is_refused_and_readers_still_work(tmp_path):
    db = _make_db(tmp_path)
    holder = Store(db)  # this test process is now the writer
    try:
        refused = cli("generate", "--db", str(db), "-n", "5", *SMALL)
        assert refused.returncode == 2
        assert "another magpie-local process" in _error_line(refused) and "is writing to" in _error_line(refused)
        assert cli("runs", "--db", str(db)).returncode == 0  # reading needs no lock
    finally:
        holder.close()
    assert cli("generate", "--db", str(db), "-n", "4", *SMALL).returncode == 0  # the lock went with its holder
    assert len(_pairs(db)) == 4


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_a_clear_error_and_keeps_committed_data(tmp_path):
    db = _make_db(tmp_path)
    before = _pairs(db)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    args = [sys.executable, "-m", "magpie_local", "generate", "--db", str(db), "-n", "60", "--batch-size", "1",
            *SMALL]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(size + 4096))
    assert proc.returncode == 2, proc.stderr
    assert "is the disk full?" in proc.stderr and "run the same command again" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _integrity(db) == "ok"
    after = _pairs(db)
    assert after[: len(before)] == before and len(after) < 60
    # Space is back: the run goes on. How many pairs were committed before the limit bit depends on
    # the machine (page sizes, the text made), so the target is what is stored plus a few.
    target = len(after) + 3
    resumed = cli("generate", "--db", str(db), "-n", str(target), *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert _pairs(db)[: len(after)] == after and len(_pairs(db)) == target


def test_damaged_database_is_refused_untouched(tmp_path):
    db = _make_db(tmp_path)
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    data = bytearray(db.read_bytes())
    for page in range(1, len(data) // 4096):  # garble every page but the header page
        data[page * 4096 + 8: page * 4096 + 200] = b"\xff" * 192
    db.write_bytes(bytes(data))
    for args in (("runs",), ("show",), ("generate", "-n", "5", *SMALL)):
        result = cli(*args, "--db", str(db))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "damaged" in _error_line(result) or "not a usable SQLite database" in _error_line(result)
    assert db.read_bytes() == bytes(data)


def test_database_locked_by_another_program(tmp_path):
    db = _make_db(tmp_path)
    other = sqlite3.connect(db)
    other.execute("BEGIN EXCLUSIVE")  # e.g. a SQLite browser in the middle of an edit
    try:
        result = cli("generate", "--db", str(db), "-n", "5", *SMALL, env={"MAGPIE_LOCAL_BUSY_TIMEOUT": "1"})
        assert result.returncode == 2 and "locked by another program" in _error_line(result), result.stderr
    finally:
        other.rollback()
        other.close()
    assert len(_pairs(db)) == 3


NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from magpie_local.cli import main
sys.argv = ["magpie-local", *sys.argv[1:]]
main()
"""


def test_generation_and_scoring_need_no_network(tmp_path):
    db = tmp_path / "offline.db"
    for args in (("generate", "--db", str(db), "-n", "2", *SMALL), ("score", "--db", str(db), "-q")):
        result = subprocess.run([sys.executable, "-c", NO_NETWORK, *args], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM scores WHERE ifd IS NOT NULL").fetchone()[0] == 2
    conn.close()
