"""Generation bookkeeping with a fake backend: exact counts, drops, resume, batch independence."""

import pytest

from magpie_local.generate import GenerateError, GenerateSettings, Generation, item_seed
from magpie_local.prompts import SystemPrompt
from magpie_local.store import Store
from magpie_local.templates import ChatFormat

from .fakes import CHATML, FakeBackend


def _generation(store, backend, target=20, batch_size=3, run=None, **settings):
    run = run or store.create_run(kind="generate", target=target, config_key="k", config={}, model={},
                                  backend="fake", versions={})
    return Generation(store, run, backend, ChatFormat(CHATML), GenerateSettings(seed=7, **settings),
                      batch_size=batch_size)


def _pairs(store, run_id=1):
    return store.conn.execute(
        "SELECT c.item_index, c.status, c.drop_reason, t.instruction, t.response FROM conversations c "
        "JOIN turns t ON t.conversation_id = c.id WHERE c.run_id = ? ORDER BY c.item_index", [run_id]).fetchall()


def test_exactly_n_kept_with_drops_recorded(tmp_path):
    store = Store(tmp_path / "m.db")
    counts = _generation(store, FakeBackend()).run_until_target()
    rows = _pairs(store)
    kept = [r for r in rows if r[1] == "kept"]
    dropped = [r for r in rows if r[1] == "dropped"]
    assert counts["kept"] == len(kept) == 20
    assert all(r[3] and r[4] for r in kept)
    assert dropped and all(r[2] == "empty instruction" for r in dropped)
    assert [r[0] for r in rows] == list(range(len(rows)))  # no gaps, no duplicates
    assert store.get_run(1).status == "complete"


def test_seeds_depend_only_on_run_seed_and_item():
    """A stored run resumes in another process (another PYTHONHASHSEED, so nothing may come from
    hash()) with the same seeds; seeds differ across items, steps and run seeds; 31 bits each."""
    import subprocess
    import sys

    here = [item_seed(7, i, s) for i in range(50) for s in ("instruction", "response")]
    code = ("from magpie_local.generate import item_seed; "
            "print([item_seed(7, i, s) for i in range(50) for s in ('instruction', 'response')])")
    for hash_seed in ("1", "2"):
        elsewhere = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                   env={"PYTHONHASHSEED": hash_seed, "PATH": ""}).stdout
        assert elsewhere.strip() == str(here)
    assert len({item_seed(7, i, s) for i in range(200) for s in ("instruction", "response")}) == 400
    assert len({item_seed(seed, 3, "instruction") for seed in range(100)}) == 100
    assert all(0 <= x < 2**31 for x in here)


def test_batch_size_does_not_change_the_data(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    _generation(a, FakeBackend(), batch_size=2).run_until_target()
    _generation(b, FakeBackend(), batch_size=7).run_until_target()
    assert sum(1 for r in _pairs(a) if r[1] == "kept") == 20
    assert _pairs(a) == _pairs(b)


def test_interrupted_run_resumes_to_the_same_data(tmp_path):
    full, broken = Store(tmp_path / "full.db"), Store(tmp_path / "broken.db")
    _generation(full, FakeBackend()).run_until_target()
    with pytest.raises(KeyboardInterrupt):
        _generation(broken, FakeBackend(fail_at_job=8)).run_until_target()
    partial = broken.run_counts(1)
    assert 0 < partial["kept"] < 20 and partial["batches"] == 2  # two whole batches, nothing of the third
    _generation(broken, FakeBackend(), run=broken.get_run(1)).run_until_target()
    assert sum(1 for r in _pairs(full) if r[1] == "kept") == 20
    assert _pairs(broken) == _pairs(full)


def test_duplicates_are_dropped_the_same_way_whatever_the_finishing_order(tmp_path):
    def planted(seed):  # only 12 distinct instructions
        return f"Question {seed % 12}?"

    results = []
    for window in (1, 5):
        store = Store(tmp_path / f"w{window}.db")
        counts = _generation(store, FakeBackend(instructions=planted, window=window), target=10).run_until_target()
        rows = _pairs(store)
        kept = [r[3] for r in rows if r[1] == "kept"]
        assert counts["kept"] == 10 and len(set(kept)) == 10
        first_seen = {}
        for item, status, reason, instruction, _ in rows:  # the lowest index keeps each instruction
            first_seen.setdefault(instruction, item)
            assert (status == "kept") == (first_seen[instruction] == item)
            assert status == "kept" or reason == "duplicate instruction"
        results.append(rows)
    assert results[0] == results[1]


def test_duplicates_of_committed_items_are_found_after_resume(tmp_path):
    store = Store(tmp_path / "m.db")
    _generation(store, FakeBackend(instructions=lambda s: f"Question {s % 3}?"), target=3).run_until_target()
    run = store.get_run(1)
    store.set_target(1, 4)
    run.target = 4
    with pytest.raises(GenerateError, match="dropped"):  # only 3 distinct instructions exist
        _generation(store, FakeBackend(instructions=lambda s: f"Question {s % 3}?"), run=run).run_until_target()
    assert store.run_counts(1)["kept"] == 3


def test_multi_turn_conversations_carry_their_history(tmp_path):
    store = Store(tmp_path / "m.db")
    backend = FakeBackend()
    _generation(store, backend, target=4, turns=3).run_until_target()
    convs = store.conn.execute("SELECT id, status, drop_reason FROM conversations").fetchall()
    for conv_id, status, reason in convs:
        turns = store.conn.execute("SELECT turn_index, instruction, response FROM turns WHERE conversation_id = ? "
                                   "ORDER BY turn_index", [conv_id]).fetchall()
        if status == "kept":
            assert [t[0] for t in turns] == [0, 1, 2]
            assert [t[2] for t in turns] == ["Answer (1)", "Answer (2)", "Answer (3)"]  # earlier turns in the prompt
        else:
            assert reason.startswith(f"turn {len(turns)}: ")
    later = [p for p in backend.prompts if p.count("<|im_start|>user") == 3 and p.endswith("<|im_start|>user\n")]
    assert later and all("Answer (2)<|im_end|>" in p for p in later)


def test_system_prompt_mixture_is_a_seeded_weighted_draw(tmp_path):
    mixture = (SystemPrompt("a", "You write code."), SystemPrompt("b", "You do maths.", weight=3.0))
    settings = GenerateSettings(seed=1, system_prompts=mixture, language="es")
    names = [settings.system_for(i)[0] for i in range(400)]
    assert names == [settings.system_for(i)[0] for i in range(400)]
    assert 0.65 < names.count("b") / 400 < 0.85
    assert settings.system_for(0)[1].endswith("The user always writes in Spanish, and you always answer in Spanish.")
    store = Store(tmp_path / "m.db")
    backend = FakeBackend()
    _generation(store, backend, target=6, system_prompts=mixture).run_until_target()
    rows = store.conn.execute("SELECT system_name, system_prompt FROM conversations WHERE status = 'kept'").fetchall()
    assert {r[0] for r in rows} <= {"a", "b"} and all(r[1] in ("You write code.", "You do maths.") for r in rows)
    assert all(p.startswith("<|im_start|>system\nYou ") for p in backend.prompts)
