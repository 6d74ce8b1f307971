"""Instruction and response clean-up: edits are listed, drops have reasons."""

import json

import pytest

from magpie_local.cleanup import clean_instruction, clean_response, normalized
from magpie_local.prompts import PromptError, SystemPrompt, language_name, load_system_prompts, pick

CASES = [
    # raw, finish, cleaned text, drop reason, an edit that must be listed
    ("How do I bake bread?", "stop", "How do I bake bread?", None, None),
    ("Task: Sort this list [3, 1, 2].", "stop", "Sort this list [3, 1, 2].", None, "label 'Task:'"),
    ("## Question 2: What is 2+2?", "stop", "What is 2+2?", None, "label"),
    ("**Instruction:** Write a haiku about rain.", "stop", "Write a haiku about rain.", None, "label"),
    ("1. Explain recursion to a child.", "stop", "Explain recursion to a child.", None, "numbering"),
    ("What is the derivative of x^2?\nAnswer: 2x", "stop", "What is the derivative of x^2?", None, "answer marker"),
    ("Solve 3x = 9.\n\n### Step 1\nDivide by 3.", "stop", "Solve 3x = 9.", None, "answer marker"),
    ("Explain entropy.\n**Solution:** It is ...", "stop", "Explain entropy.", None, "answer marker"),
    ("<think>The user might ask about tea.</think>How is green tea made?", "stop", "How is green tea made?", None,
     "reasoning"),
    ("Write a story about a dragon who", "length", None, "truncated instruction", None),
    ("   ", "stop", "", "empty instruction", None),
    ("Answer: 42", "stop", None, "instruction is an answer", None),
    ("Here are three ideas for your party:", "stop", None, "incomplete instruction", None),
    ("Sure! Here is a poem about the sea.", "stop", None, "instruction is an answer", None),
    ("I'd be happy to help with that.", "stop", None, "instruction is an answer", None),
    ("<think>still thinking about what to", "stop", None, "unfinished reasoning", None),
    ("Question: ", "stop", "Question:", "incomplete instruction", None),
]


@pytest.mark.parametrize("raw, finish, text, reason, edit", CASES)
def test_instruction_cleanup(raw, finish, text, reason, edit):
    result = clean_instruction(raw, finish_reason=finish)
    assert result.drop_reason == reason
    if text is not None:
        assert result.text == text
    if edit:
        assert any(edit in e for e in result.edits), result.edits


def test_keep_thinking_keeps_the_block():
    raw = "<think>plan</think>Answer: 4"
    assert clean_response(raw).text == "Answer: 4"
    assert clean_response(raw, keep_thinking=True).text == raw
    assert clean_response("<think>no end").drop_reason == "unfinished reasoning"
    assert clean_response("plan</think>\n\nThe answer is 4.").text == "The answer is 4."  # block opened in the prompt
    assert clean_response("  ").drop_reason == "empty response"


def test_normalized_ignores_case_and_spacing():
    assert normalized("What  is\nPython?") == normalized("what is python?")


def test_system_prompt_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    records = [json.dumps({"name": "math", "text": "Maths.", "weight": 2}), "", json.dumps({"text": "Code."})]
    jsonl.write_text("\n".join(records))
    prompts = load_system_prompts(jsonl)
    assert [(p.name, p.text, p.weight) for p in prompts] == [("math", "Maths.", 2.0), ("prompt-3", "Code.", 1.0)]
    lines = tmp_path / "p.txt"
    lines.write_text("Be brief.\nBe kind.\n")
    assert [p.text for p in load_system_prompts(lines)] == ["Be brief.", "Be kind."]
    bad = tmp_path / "bad.json"
    for content, message in (('[{"text": "x", "weight": -1}]', "weight"), ('[{"txt": "x"}]', "'text'"),
                             ("[1, 2", "not valid JSON"), ("", "no system prompts"),
                             ('{"text": "a"}\n{"text": ', "line 2")):
        bad.write_text(content)
        with pytest.raises(PromptError, match=message):
            load_system_prompts(bad)
    with pytest.raises(PromptError, match="cannot read"):
        load_system_prompts(tmp_path / "absent.txt")


def test_languages_and_pick():
    assert language_name("es") == language_name("spanish") == "Spanish"
    with pytest.raises(PromptError, match="unknown language"):
        language_name("klingon")
    mix = (SystemPrompt("a", "A", 1.0), SystemPrompt("b", "B", 3.0))
    assert pick(mix, 0.1).name == "a" and pick(mix, 0.5).name == "b" and pick((), 0.5) is None
