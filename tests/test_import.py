"""Importing datasets written by others: formats, malformed records, limits."""

import json

import pytest

from magpie_local.importers import MAX_RECORD_BYTES, RecordError, parse_record, read_dataset

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                              {"from": "gpt", "value": "Goodbye."}]}
MESSAGES = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def test_three_formats():
    a, s, m = (parse_record(r, "x") for r in (ALPACA, SHAREGPT, MESSAGES))
    assert (a.format, a.turns) == ("alpaca", [{"instruction": "Add the numbers.", "input": "2 and 3",
                                               "response": "5"}])
    assert s.format == "sharegpt" and s.system_prompt == "Be brief." and len(s.turns) == 2
    assert s.turns[1] == {"instruction": "Bye", "input": None, "response": "Goodbye."}
    assert m.format == "messages" and m.turns[0]["response"] == "4"


@pytest.mark.parametrize("record,message", [
    ([1, 2], "expected a JSON object"),
    ({"question": "hi"}, "not Alpaca"),
    ({"turns": []}, "non-empty list of strings"),
    ({"instruction": 5, "output": "x"}, "must be a string"),
    ({"instruction": "a\x00b", "output": "x"}, "NUL"),
    ({"instruction": "  ", "output": "x"}, "empty instruction"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "without a user message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "two user messages"),
    ({"messages": [{"role": "wizard", "content": "a"}]}, "unknown role"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no user/assistant exchange"),
])
def test_malformed_records_say_why(record, message):
    with pytest.raises(RecordError, match=message):
        parse_record(record, "line 1")


def test_jsonl_reports_bad_lines_by_number_and_keeps_the_rest(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(ALPACA), "{not json", json.dumps(MESSAGES), "", json.dumps({"x": 1}),
             "[" * 100_000 + "]" * 100_000, json.dumps(SHAREGPT)]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    records, errors = read_dataset(path)
    assert [r.format for r in records] == ["alpaca", "messages", "sharegpt"]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 5", "line 6", "line 8"]
    assert "invalid JSON" in errors[0] and "UTF-8" in errors[3]


def test_json_array_and_huge_lines(tmp_path):
    array = tmp_path / "data.json"
    array.write_text(json.dumps([ALPACA, {"bad": True}, MESSAGES]))
    records, errors = read_dataset(array)
    assert len(records) == 2 and errors == ["record 2: not Alpaca (instruction/output), ShareGPT (conversations), "
                                            "messages, or an instruction (instruction, prompt or text)"]
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(b'{"instruction": "' + b"x" * (MAX_RECORD_BYTES + 10) + b'"}\n' + json.dumps(ALPACA).encode())
    records, errors = read_dataset(huge)
    assert len(records) == 1 and errors[0].startswith("line 1: record is larger")
