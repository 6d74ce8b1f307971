"""Curation checks: verdicts with reasons, stored per turn, combined by select and export."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from magpie_local.curate import Bounds, check_turn, duplicate_reasons, near_duplicates, repetition

from .conftest import cli
from .test_export import store  # noqa: F401  (the fixture: a database with known conversations)

DATA = Path(__file__).parent / "data"


def test_repetition_measures_loops():
    assert repetition("The cat sat on the mat.") == 0.0
    loop = "I'm glad to hear that you're not just a friend. " * 8
    assert repetition(loop) > 0.8
    assert repetition("short") == 0.0


# The usual phrasings of chat-model families, and look-alikes from real answers (Alpaca) that must pass.
@pytest.mark.parametrize("response, refused, disclaimed", [
    ("I'm sorry, but I can't help with that request.", True, False),  # Llama, Qwen
    ("I can't assist with that.", True, False),
    ("I cannot fulfill this request. Creating malware is illegal.", True, False),
    ("I must respectfully decline to write that.", True, False),
    ("As an AI language model, I do not have opinions.", False, True),  # GPT-3.5-era
    ("As an AI language model, I cannot browse the internet.", True, True),
    ("I'm sorry for the confusion, but as a text-based AI, I'm unable to provide recipes.", True, True),  # SmolLM2
    ("I'm just an AI, I don't have personal feelings, but I can help you think it through.", False, True),
    ("My knowledge cutoff is 2023, so here is what I knew then: the team won.", False, True),
    ("As a chatbot, I don't have the capability to run code. However, here is an example:\n```python\nprint(1)\n```",
     False, True),  # it declines, then does the work
    ("Sorry to hear about your loss. Here are some ways to cope: ...", False, False),
    ("You can't divide by zero, because no number times zero gives a non-zero result.", False, False),
    ("Errant stars in the night sky,\nReaching out I cannot touch them.", False, False),
    ("A symbolic AI system is designed as a subset of symbolic AI methods.", False, False),
    ("As a manager, it's essential to support your team. Such as a chatbot for FAQs.", False, False),
    ("Person A: Yeah, I can't believe the day's almost over.", False, False),
])
def test_refusals_and_disclaimers(response, refused, disclaimed):
    verdict = check_turn({"instruction": "Q?", "response": response, "response_finish": "stop"}, Bounds())
    assert (verdict["refusal"] is not None, verdict["disclaimer"] is not None) == (refused, disclaimed)


def test_refusal_and_disclaimer_rules_on_hand_labelled_answers():
    """250 real answers of the default model (two generate runs, 2026-12-06), each labelled by reading
    it: the rules' recall and precision (the issue's floors: 0.9 and 0.95; docs/curation.md has the table)."""
    rows = [json.loads(line) for line in (DATA / "refusal_labels.jsonl").read_text().splitlines()]
    assert len(rows) >= 200
    for check in ("refusal", "disclaimer"):
        found = [check_turn({"instruction": r["instruction"], "response": r["response"], "response_finish": "stop"},
                            Bounds())[check] is not None for r in rows]
        true_positives = sum(f and r[check] for f, r in zip(found, rows))
        recall, precision = true_positives / sum(r[check] for r in rows), true_positives / sum(found)
        assert recall >= 0.9 and precision >= 0.95, (check, recall, precision)


def test_verdicts_say_why():
    turn = {"instruction": "Hi", "response": "word " * 40, "response_finish": "length"}
    verdict = check_turn(turn, Bounds(min_chars=3, max_repetition=0.5))
    assert verdict["length"] == "instruction 2 chars"
    assert verdict["cut_off"] == "response hit max tokens"
    assert verdict["repetition"].startswith("repetition 0.9") and verdict["refusal"] is None
    assert duplicate_reasons([(1, "What is X?"), (2, "what is  x?"), (3, "Other")]) == \
        {1: None, 2: "same instruction as conversation 1", 3: None}


def test_curate_then_export_and_select_passing(store, tmp_path):  # noqa: F811
    db = store.path
    store.close()
    done = cli("curate", "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert "Curation checks, 6 turns" in done.stdout
    conn = sqlite3.connect(db)
    failed = dict(conn.execute("SELECT name, count(*) FROM checks WHERE passed = 0 GROUP BY name").fetchall())
    conn.close()
    assert failed == {"cut_off": 1, "duplicate": 1}  # the cut-off poem; the import repeating "Name a prime."
    out = tmp_path / "out"
    exported = cli("export", "--db", str(db), "--passing", "all", "--include-cut-off", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    card = (out / "README.md").read_text()
    assert "passed the curation checks length, cut_off, repetition, refusal, disclaimer, pii, secrets, duplicate" \
        in card
    assert "unknown check" in cli("export", "--db", str(db), "--passing", "nope", "--out", str(out)).stderr
    again = cli("curate", "--db", str(db), "--max-repetition", "0")  # re-checking replaces the verdicts
    assert again.returncode == 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM checks").fetchone()[0] == 6 * 8
    conn.close()


def test_language_check():
    turn = {"instruction": "¿Cómo puedo hornear pan en casa?", "response": "Mezcla harina, agua, sal y levadura.",
            "response_finish": "stop"}
    assert check_turn(turn, Bounds(language="es"))["language"] is None
    assert check_turn(turn, Bounds(language="en"))["language"] == "language es, not en"
    assert "language" not in check_turn(turn, Bounds())


def test_passing_all_means_the_checks_that_were_run(store, tmp_path):  # noqa: F811
    db = store.path
    store.close()
    out = tmp_path / "o"
    assert "run `magpie-local curate` first" in cli("export", "--db", str(db), "--passing", "all",
                                                     "--out", str(out)).stderr
    assert cli("curate", "--db", str(db), "--language", "English").returncode == 0
    conn = sqlite3.connect(db)
    names = {r[0] for r in conn.execute("SELECT DISTINCT name FROM checks")}
    conn.close()
    assert "language" in names
    assert cli("export", "--db", str(db), "--passing", "all", "--include-cut-off", "--out", str(out)).returncode == 0


def test_near_duplicates_search_is_exact_across_blocks():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 16)).astype(np.float32)
    e[5] = e[1] + 0.01 * rng.normal(size=16)  # a near copy of an earlier item, in a later block
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    ids = [10, 11, 12, 13, 14, 15, 16]
    for block in (2, 3, 1024):
        found = near_duplicates(ids, e, threshold=0.95, block=block)
        assert {k: v for k, v in found.items() if v} == {15: found[15]} and "to conversation 11" in found[15]


PLANTED = ["What is the capital of France?", "Write a poem about the sea.", "What's the capital city of France?",
           "How do I bake sourdough bread at home?",
           "I'm planning to launch a new sustainable clothing startup. What steps should I take?",
           "I'm planning to start a sustainable clothing business. What steps should I take?"]


def test_planted_near_duplicates_are_found_with_the_real_model(tmp_path):
    from magpie_local.store import Store

    db = Store(tmp_path / "m.db")
    run = db.create_run(kind="import", target=6, config_key="p", config={}, model={}, backend="", versions={})
    db.commit_batch(run.id, dict(first_item=0, n_items=6, kept=6, dropped=0, prompt_tokens=0,
                                    completion_tokens=0, seconds=0.0),
                       [(dict(item_index=i, status="kept", drop_reason=None, system_prompt=None),
                         [dict(instruction=q, input="", response="An answer.")]) for i, q in enumerate(PLANTED)])
    db.close()
    done = cli("curate", "--db", str(tmp_path / "m.db"), "--near-dup-model", "default")
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(tmp_path / "m.db")
    flagged = conn.execute("SELECT c.item_index, k.reason FROM checks k JOIN turns t ON t.id = k.turn_id "
                           "JOIN conversations c ON c.id = t.conversation_id "
                           "WHERE k.name = 'near_duplicate' AND k.passed = 0 ORDER BY c.item_index").fetchall()
    conn.close()
    assert [item for item, _ in flagged] == [2, 5]  # the paraphrases; their originals and the rest stay
    assert "to conversation 1 " in flagged[0][1] + " " and "to conversation 5" in flagged[1][1]
