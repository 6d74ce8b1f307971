"""Generation bookkeeping with a fake backend: exact counts, drops, resume, batch independence."""

import pytest

from magpie_local.generate import GenerateSettings, Generation, item_seed
from magpie_local.store import Store
from magpie_local.templates import ChatFormat

from .fakes import CHATML, FakeBackend


def _generation(store, backend, target=20, batch_size=3, run=None):
    run = run or store.create_run(kind="generate", target=target, config_key="k", config={}, model={},
                                  backend="fake", versions={})
    return Generation(store, run, backend, ChatFormat(CHATML), GenerateSettings(seed=7), batch_size=batch_size)


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
    assert item_seed(7, 3, "instruction") == item_seed(7, 3, "instruction")
    assert len({item_seed(7, i, s) for i in range(200) for s in ("instruction", "response")}) == 400


def test_batch_size_does_not_change_the_data(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    _generation(a, FakeBackend(), batch_size=2).run_until_target()
    _generation(b, FakeBackend(), batch_size=7).run_until_target()
    assert _pairs(a) == _pairs(b)


def test_interrupted_run_resumes_to_the_same_data(tmp_path):
    full, broken = Store(tmp_path / "full.db"), Store(tmp_path / "broken.db")
    _generation(full, FakeBackend()).run_until_target()
    with pytest.raises(KeyboardInterrupt):
        _generation(broken, FakeBackend(fail_at_job=8)).run_until_target()
    partial = broken.run_counts(1)
    assert 0 < partial["kept"] < 20 and partial["batches"] == 2  # two whole batches, nothing of the third
    _generation(broken, FakeBackend(), run=broken.get_run(1)).run_until_target()
    assert _pairs(broken) == _pairs(full)
