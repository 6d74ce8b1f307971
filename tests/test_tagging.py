"""Judge tags on the real default model: grammar-constrained answers and calibrated closed questions,
parsing, storage, selection."""

import json
import sqlite3

from hypothesis import given
from hypothesis import strategies as st

from magpie_local.generate import GenerateSettings, chat_format
from magpie_local.models import resolve_model
from magpie_local.tagging import CATEGORIES, DIFFICULTIES, FIELDS, QUALITIES, judge_request, parse

from .conftest import cli

INSTRUCTIONS = ["What is the capital of France?", "Write a Python function that reverses a linked list.",
                "Solve 3x + 5 = 20 for x.", "Write a poem about autumn leaves.", "hi",
                "Plan a 3-day trip to Rome for a family with two kids."]


def test_every_answer_of_the_real_model_parses(backend):
    fmt = chat_format(resolve_model(None), GenerateSettings())
    answers = backend.complete([judge_request(fmt, q) for q in INSTRUCTIONS])
    tags = [parse(a.text) for a in answers]
    assert [t.error for t in tags] == [None] * len(INSTRUCTIONS), [a.text for a in answers]
    assert all(t.task_category in CATEGORIES and t.input_quality in QUALITIES and t.difficulty in DIFFICULTIES
               for t in tags)
    assert all(a.finish_reason == "stop" for a in answers)  # the grammar ends the answer, not the token limit


def test_parse_records_failures_instead_of_raising():
    good = parse('{"task_category": "Math", "input_quality": "good", "difficulty": "easy"}')
    assert (good.task_category, good.input_quality, good.difficulty, good.error) == ("Math", "good", "easy", None)
    assert parse('{"task_category": "Math", "input_quality": "good"').error == "not valid JSON"  # cut off
    assert parse("[1, 2]").error == "not a JSON object"
    bad = parse('{"task_category": "Cooking", "input_quality": "good", "difficulty": "easy"}')
    assert bad.error.startswith("task_category") and bad.raw and bad.task_category is None


@given(st.text(max_size=200) | st.dictionaries(st.sampled_from(list(FIELDS) + ["x"]), st.text(max_size=20)).map(
    json.dumps))
def test_parse_never_raises(text):
    tags = parse(text)
    assert (tags.error is None) == all(getattr(tags, f) in v for f, v in FIELDS.items())


def test_tag_stats_and_select_from_the_cli(tmp_path):
    records = [{"instruction": q, "output": "A short answer that is good enough for the test."} for q in INSTRUCTIONS]
    source, db = tmp_path / "pairs.json", tmp_path / "t.db"
    source.write_text(json.dumps(records))
    assert cli("import", str(source), "--db", str(db)).returncode == 0
    tagged = cli("tag", "--db", str(db), "--batch-size", "4", "-q", "--method", "grammar")
    assert tagged.returncode == 0, tagged.stderr
    assert "Tags, tagging run 2 (by grammar; 0 failed answers)" in tagged.stdout and "task_category" in tagged.stdout
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT task_category, input_quality, difficulty, error FROM tags").fetchall()
    assert len(rows) == len(INSTRUCTIONS) and all(r[3] is None and r[0] in CATEGORIES for r in rows)
    again = cli("tag", "--db", str(db), "-q", "--method", "grammar")  # the same run: nothing left, nothing added
    assert again.returncode == 0 and conn.execute("SELECT count(*) FROM tags").fetchone()[0] == len(INSTRUCTIONS)
    assert "Tags, tagging run" in cli("stats", "--db", str(db)).stdout

    assert cli("score", "--db", str(db), "-q").returncode == 0
    difficulty = rows[0][2]
    chosen = cli("select", "--db", str(db), "--keep-above-1", "--tag", f"difficulty={difficulty}", "--name", "d")
    assert chosen.returncode == 0, chosen.stderr
    expected = sum(r[2] == difficulty for r in rows)
    assert conn.execute("SELECT count(*) FROM selections WHERE name = 'd'").fetchone()[0] == expected
    exported = cli("export", "--db", str(db), "--selection", "d", "--out", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- Difficulty (tagging run 2, judge SmolLM2-135M-Instruct.Q4_1): {difficulty} {expected}" in card
    wrong = cli("select", "--db", str(db), "--tag", "difficulty=impossible")
    assert wrong.returncode == 2 and "unknown difficulty 'impossible'" in wrong.stderr
    mlx_dir = tmp_path / "not-a-gguf"
    mlx_dir.mkdir()
    (mlx_dir / "config.json").write_text("{}")
    (mlx_dir / "model.safetensors").write_bytes(b"")
    refused = cli("tag", "--db", str(db), "--model", str(mlx_dir), "--backend", "llamacpp")
    assert refused.returncode == 2 and "needs a .gguf file" in refused.stderr
    on_mlx = cli("curate", "--near-dup-model", "default", "--db", str(db), "--backend", "mlx")  # MLX embeds too
    assert on_mlx.returncode == 0, on_mlx.stderr
    near = conn.execute("SELECT count(*) FROM checks WHERE name = 'near_duplicate'").fetchone()[0]
    assert near == len(INSTRUCTIONS) and "near_duplicate" in on_mlx.stdout
    grammar_on_mlx = cli("tag", "--db", str(db), "--backend", "mlx", "--method", "grammar")
    assert grammar_on_mlx.returncode == 2 and "use --method likelihood" in grammar_on_mlx.stderr
