import sqlite3
import threading
from pathlib import Path

import pytest

from magpie_local import api
from magpie_local.store import SCHEMA_VERSION, Store, StoreError

from .conftest import foreign_db


def test_new_database_is_tagged_and_in_wal_mode(tmp_path):
    store = Store(tmp_path / "m.db")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()
    Store(tmp_path / "m.db").close()  # reopening our own DB works


def test_foreign_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "other.db"
    before = foreign_db(path)
    with pytest.raises(StoreError, match="not created by magpie-local"):
        Store(path)
    assert path.read_bytes() == before


def test_non_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text, definitely not a database " * 10)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(path)
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "m.db").close()
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer magpie-local"):
        Store(tmp_path / "m.db")


def test_missing_directory_and_read_only_open(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "no" / "such" / "m.db")
    with pytest.raises(StoreError, match="no database"):
        Store(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def _run(store):
    return store.create_run(kind="generate", target=2, config_key="k", config={"x": 1}, model={"name": "m"},
                            backend="fake", versions={})


def _pair(item):
    conv = dict(item_index=item, status="kept", drop_reason=None, system_prompt=None)
    turn = dict(instruction="q", raw_instruction="q", response="a", instruction_tokens=1, response_tokens=1,
                instruction_prompt_tokens=1, response_prompt_tokens=1, instruction_finish="stop",
                response_finish="stop", instruction_seed=1, response_seed=2, instruction_seconds=0.1,
                response_seconds=0.1)
    return conv, [turn]


BATCH = dict(first_item=0, n_items=2, kept=2, dropped=0, prompt_tokens=2, completion_tokens=2, seconds=0.1)


def test_a_batch_is_all_or_nothing(tmp_path):
    store = Store(tmp_path / "m.db")
    run = _run(store)
    store.commit_batch(run.id, BATCH, [_pair(0), _pair(1)])
    # A batch that repeats an item fails as a whole: nothing of it is stored.
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_batch(run.id, BATCH, [_pair(2), _pair(1)])
    assert store.run_counts(run.id) == {"kept": 2, "dropped": 0, "next_item": 2, "batches": 1, "pending": 0}
    assert store.conn.execute("SELECT count(*) FROM turns").fetchone()[0] == 2


def test_a_batch_waits_for_another_writer_instead_of_failing(tmp_path):
    """The review page writes beside generate. A transaction that reads before it writes must take
    the write lock first: one that upgrades later fails at once ("database is locked", no waiting)
    when another program committed in between (seen in CI)."""
    store = Store(tmp_path / "m.db")
    run = _run(store)
    other = sqlite3.connect(tmp_path / "m.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE runs SET updated_at = updated_at")
    releaser = threading.Timer(0.5, other.execute, ["COMMIT"])
    releaser.start()
    store.commit_batch(run.id, BATCH, [_pair(0), _pair(1)])  # waits for the other writer, then commits
    releaser.join()
    assert store.run_counts(run.id)["kept"] == 2
    other.close()


def test_database_from_schema_1_is_upgraded_in_place(tmp_path):
    """A file written by magpie-local's first schema (tests/data/schema_v1.db) opens and keeps its data."""
    path = tmp_path / "old.db"
    path.write_bytes((Path(__file__).parent / "data" / "schema_v1.db").read_bytes())
    store = Store(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.run_counts(1)["kept"] == 2
    assert store.kept_instruction_keys(1) == {"what is a magpie?", "name a prime number."}
    columns = {r[1] for r in store.conn.execute("PRAGMA table_info(turns)")}
    assert {"instruction_cleanup", "raw_response"} <= columns
    assert {"similar", "similarity"} <= {r[1] for r in store.conn.execute("PRAGMA table_info(neighbours)")}
    # Schema 8's review tables, and full-text search over the turns that were there before it.
    assert {"reviews", "revisions", "turns_fts"} <= {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    assert [r["instruction"] for r in api.pairs(store, api.PairFilters(q="magpie")).rows] == ["What is a magpie?"]
    store.close()
    Store(path).close()  # and opens again as a current database

