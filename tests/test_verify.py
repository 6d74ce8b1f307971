"""verify: a run made at --parallel 8 is made again item by item, on the real default model, and
comes out byte for byte the same; a tampered row fails loudly, and the card quotes the result."""

import json
import shutil

import pytest

import magpie_local.api as api
from magpie_local.errors import UsageError
from magpie_local.generate import replay_difference

from .conftest import cli, sql

GEN = ["generate", "-n", "8", "--seed", "5", "--batch-size", "4", "--weights", "file", "--parallel", "8",
       "--instruction-max-tokens", "32", "--response-max-tokens", "48", "-q"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A generation run made at --parallel 8, and an imported run beside it."""
    folder = tmp_path_factory.mktemp("verify")
    db = folder / "made.db"
    done = cli(*GEN, "--db", str(db))
    assert done.returncode == 0, done.stderr
    (folder / "pairs.json").write_text(json.dumps([{"instruction": "Q", "output": "A"}]))
    api.import_file(db, folder / "pairs.json")
    return db


@pytest.mark.slow
def test_a_run_made_at_parallel_8_replays_identically_and_the_card_says_so(made, tmp_path):
    db = tmp_path / "copy.db"
    shutil.copyfile(made, db)
    items = sql(db, "SELECT count(*) FROM conversations WHERE run_id = 1")[0][0]
    done = cli("verify", "--db", str(db), "--run", "1", "--sample", str(items), "--parallel", "3")
    assert done.returncode == 0, done.stderr
    assert f"Run 1: {items} of {items} items replayed identically (llama.cpp (llama-cpp-python " in done.stderr
    assert "weights file" in done.stderr
    assert sql(db, "SELECT run_id, identical, mismatches FROM verifications") == [(1, items, "[]")]
    api.export(db, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{items} of {items} randomly chosen items made again from their seeds came out byte for byte the same" \
        in card


@pytest.mark.slow
def test_a_tampered_row_fails_loudly_and_the_failure_is_stored(made, tmp_path):
    db = tmp_path / "tampered.db"
    shutil.copyfile(made, db)
    conv, response = sql(db, "SELECT c.id, t.response FROM conversations c JOIN turns t ON t.conversation_id = c.id "
                             "WHERE c.run_id = 1 AND c.status = 'kept' ORDER BY c.item_index LIMIT 1")[0]
    item = sql(db, "SELECT item_index FROM conversations WHERE id = ?", [conv])[0][0]
    tampered = response[:10] + "X" + response[11:]
    sql_write(db, "UPDATE turns SET response = ? WHERE conversation_id = ?", [tampered, conv])
    items = sql(db, "SELECT count(*) FROM conversations WHERE run_id = 1")[0][0]
    done = cli("verify", "--db", str(db), "--sample", str(items))
    assert done.returncode == 1, done.stderr
    # the first differing character, with 40 characters on from it
    assert done.stdout.strip() == f"item {item}: response from character 10: stored {tampered[:50]!r}, made again " \
        f"{response[:50]!r}"
    assert f"Run 1: {items - 1} of {items} items replayed identically" in done.stderr
    assert sql(db, "SELECT identical FROM verifications") == [(items - 1,)]
    api.export(db, tmp_path / "out")
    assert "; 1 did NOT" in (tmp_path / "out" / "README.md").read_text()


def test_what_cannot_be_verified_is_one_clear_line(made, tmp_path):
    db = tmp_path / "copy.db"
    shutil.copyfile(made, db)
    with pytest.raises(UsageError, match="run 2 is not a generation run"):
        api.verify(db, run=2)
    done = cli("verify", "--db", str(db), "--sample", "0")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--sample must be at least 1" in done.stderr
    empty = tmp_path / "imported.db"
    (tmp_path / "pairs.json").write_text(json.dumps([{"instruction": "Q", "output": "A"}]))
    api.import_file(empty, tmp_path / "pairs.json")
    with pytest.raises(UsageError, match="holds no generation run to verify"):
        api.verify(empty)


def test_the_first_difference_is_named():
    conv = dict(system_prompt=None, system_name=None, status="kept", drop_reason=None)
    turn = dict(instruction="Hi", raw_instruction=None, instruction_cleanup=None, response="Hello there",
                raw_response=None, instruction_tokens=2, response_tokens=3, instruction_prompt_tokens=9,
                response_prompt_tokens=12, instruction_finish="stop", response_finish="stop", instruction_seed=1,
                response_seed=2)
    assert replay_difference((conv, [turn]), (dict(conv), [dict(turn)])) is None
    assert replay_difference((conv, [turn]), (dict(conv), [dict(turn, response_tokens=4)])) == \
        "response_tokens differs: stored 3, made again 4"
    assert replay_difference((conv, [turn]), (dict(conv, status="dropped", drop_reason="x"), [turn])) == \
        "status differs: stored 'kept', made again 'dropped'"
    duplicate = dict(conv, status="dropped", drop_reason="duplicate instruction")  # decided by earlier items
    assert replay_difference((duplicate, [turn]), (dict(conv), [turn])) is None


def sql_write(db, query: str, params=()) -> None:
    import sqlite3

    conn = sqlite3.connect(db)
    with conn:
        conn.execute(query, params)
    conn.close()
