"""Export: the files fine-tuning tools read, the split, what is left out, the dataset card."""

import json

import pytest

from magpie_local.export import ExportError, dataset_card, file_counts, plan_export, split_train_valid, write_files
from magpie_local.store import Store

from .conftest import cli


def _turn(instruction, response, finish="stop", input_=""):
    return dict(instruction=instruction, raw_instruction=instruction, input=input_, response=response,
                response_finish=finish, instruction_tokens=5, response_tokens=5, instruction_prompt_tokens=9,
                response_prompt_tokens=9, instruction_finish="stop", instruction_seed=1, response_seed=2,
                instruction_seconds=0.1, response_seconds=0.1)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "m.db")
    run = s.create_run(kind="generate", target=4, config_key="k", config={"settings": {"seed": 0}}, model={},
                       backend="fake", versions={})
    conversations = [
        (dict(item_index=0, status="kept", drop_reason=None, system_prompt="Be brief."),
         [_turn("What is 2+2?", "4."), _turn("And 3+3?", "6.")]),
        (dict(item_index=1, status="kept", drop_reason=None, system_prompt=None),
         [_turn("Translate 'cat'", "'chat'", input_="to French")]),
        (dict(item_index=2, status="kept", drop_reason=None, system_prompt=None),
         [_turn("Write a long poem.", "Roses are red, roses are", finish="length")]),
        (dict(item_index=3, status="dropped", drop_reason="empty response", system_prompt=None),
         [_turn("Hello?", "")]),
        (dict(item_index=4, status="kept", drop_reason=None, system_prompt=None), [_turn("Name a prime.", "7")]),
    ]
    s.commit_batch(run.id, dict(first_item=0, n_items=5, kept=4, dropped=1, prompt_tokens=0, completion_tokens=0,
                                seconds=0.0), conversations)
    other = s.create_run(kind="import", target=1, config_key="i", config={"file": "x.json", "sha256": "ab"},
                         model={}, backend="", versions={})
    s.commit_batch(other.id, dict(first_item=0, n_items=1, kept=1, dropped=0, prompt_tokens=0, completion_tokens=0,
                                  seconds=0.0),
                   [(dict(item_index=0, status="kept", drop_reason=None, system_prompt=None),
                     [dict(instruction="name a  PRIME.", input="", response="2")])])
    yield s
    s.close()


def test_formats(store, tmp_path):
    plan = plan_export(store)
    assert len(plan.conversations) == 3
    assert dict(plan.left_out) == {"response cut off at max tokens": 1, "duplicate instruction": 1}
    for fmt in ("messages", "sharegpt", "alpaca"):
        out = tmp_path / fmt
        parts = {"data": plan.conversations}
        write_files(out, fmt, parts, "card", force=False)
        rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        first, second = rows[0], rows[1]
        if fmt == "messages":
            assert first == {"messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6."}]}
            assert second["messages"][0] == {"role": "user", "content": "Translate 'cat'\n\nto French"}
        elif fmt == "sharegpt":
            assert [m["from"] for m in first["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
        else:
            assert first == {"instruction": "And 3+3?", "input": "", "output": "6.", "system": "Be brief.",
                             "history": [["What is 2+2?", "4."]]}
            assert second == {"instruction": "Translate 'cat'", "input": "to French", "output": "'chat'"}
        assert (out / "README.md").read_text() == "card"


def test_options_change_what_is_exported(store):
    assert len(plan_export(store, include_cut_off=True).conversations) == 4
    assert all(c.system is None for c in plan_export(store, include_system=False).conversations)
    assert len(plan_export(store, runs=[2]).conversations) == 1
    with pytest.raises(ExportError, match="no selection named 'best'"):
        plan_export(store, selection="best")


def test_split_is_seeded_and_complete(store):
    convs = plan_export(store, include_cut_off=True).conversations
    parts = split_train_valid(convs, 0.75, seed=3)
    assert sorted(c.id for p in parts.values() for c in p) == sorted(c.id for c in convs)
    assert len(parts["valid"]) == 1 and len(parts["train"]) == 3
    assert [c.id for c in split_train_valid(convs, 0.75, seed=3)["valid"]] == [c.id for c in parts["valid"]]
    assert file_counts(parts, "messages") == {"train.jsonl": 3, "valid.jsonl": 1}


def test_refuses_to_overwrite_or_write_elsewhere(store, tmp_path):
    parts = {"data": plan_export(store).conversations}
    write_files(tmp_path / "out", "messages", parts, "card")
    with pytest.raises(ExportError, match="already holds data.jsonl"):
        write_files(tmp_path / "out", "messages", parts, "card")
    write_files(tmp_path / "out", "messages", parts, "card 2", force=True)
    assert (tmp_path / "out" / "README.md").read_text() == "card 2"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        write_files(tmp_path / "file", "messages", parts, "card")
    with pytest.raises(ExportError, match="does not exist"):
        write_files(tmp_path / "no" / "such" / "dir", "messages", parts, "card")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "data.jsonl"]  # no temp files


def test_card_names_the_sources(store):
    plan = plan_export(store)
    card = dataset_card(store, plan, "messages", {"data.jsonl": 3})
    assert "| `data.jsonl` | 3 |" in card and "imported from `x.json`" in card
    assert "1 empty response" in card and "Left out at export: 1 (duplicate instruction)" in card


def test_exported_files_load_with_datasets_and_parquet(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only: never ask the Hub
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    plan = plan_export(store)
    parts = split_train_valid(plan.conversations, 0.5, seed=0)
    for fmt in ("messages", "sharegpt", "parquet"):
        out = tmp_path / fmt
        write_files(out, fmt, parts, "card")
        suffix = "parquet" if fmt == "parquet" else "json"
        files = {k: str(out / f"{k}.{'parquet' if fmt == 'parquet' else 'jsonl'}") for k in parts}
        loaded = datasets.load_dataset(suffix, data_files=files, cache_dir=str(tmp_path / "hf-cache"))
        assert {k: len(v) for k, v in loaded.items()} == {k: len(v) for k, v in parts.items()}
        column = "conversations" if fmt == "sharegpt" else "messages"
        assert all(len(row[column]) >= 2 for row in loaded["train"])


def test_generate_score_select_export_on_the_real_model(tmp_path):
    db, out = tmp_path / "m.db", tmp_path / "out"
    small = ["--instruction-max-tokens", "64", "--response-max-tokens", "48", "--ctx", "256", "-q"]
    assert cli("generate", "--db", str(db), "-n", "6", *small).returncode == 0
    assert cli("score", "--db", str(db), "-q").returncode == 0
    assert cli("select", "--db", str(db), "--top-k", "4", "--name", "best").returncode == 0
    done = cli("export", "--db", str(db), "--selection", "best", "--include-cut-off", "--split", "0.75",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    assert len(train) + len(valid) == 4 and len(valid) == 1
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in train + valid)
    card = (out / "README.md").read_text()
    assert "Selection `best`" in card and "SmolLM2-135M-Instruct" in card and "IFD of the exported turns" in card
    again = cli("export", "--db", str(db), "--include-cut-off", "--out", str(out), "--split", "0.75")
    assert again.returncode == 2 and "--force" in again.stderr
