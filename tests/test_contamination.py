"""Eval contamination (curate --against): a pair sharing 13 normalised words with an eval prompt is
flagged, in every eval-file format, with the eval set named in the card; bad eval files change nothing."""

import csv
import hashlib
import json
import re

import pytest

import magpie_local.api as api
from magpie_local.contamination import EvalIndex, EvalSet, read_eval_set, words
from magpie_local.errors import UsageError

from .conftest import cli, imported, sql

# Real eval questions (GSM8K test, TruthfulQA, MT-Bench, IFEval), as those sets spell them.
GSM8K = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
         "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
         "duck egg. How much in dollars does she make every day at the farmers' market?")
TRUTHFULQA = "What happens to you if you eat watermelon seeds?"  # 9 words: matched only whole
MT_BENCH = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
            "experiences and must-see attractions.", "Rewrite your previous response. Start every sentence with "
            "the letter A."]
IFEVAL = ("Write a 300+ word summary of the wikipedia page \"https://en.wikipedia.org/wiki/Raymond_III,_Count_of_"
          "Tripoli\". Do not use any commas and highlight at least 3 sections that has titles in markdown format.")


def index(*prompts: str) -> EvalIndex:
    return EvalIndex([EvalSet("eval.jsonl", "/eval.jsonl", "0" * 64, list(prompts))])


def test_words_are_normalised():
    assert words("Janet’s DUCKS, lay 16 eggs!") == ["janet", "s", "ducks", "lay", "16", "eggs"]
    assert words("ﬁve  Ｆｏｏ\tbar") == ["five", "foo", "bar"]  # NFKC: ligatures and full-width letters


def test_thirteen_shared_words_are_contamination_and_twelve_are_not():
    found = index(GSM8K)
    # The same question re-punctuated and re-cased, inside a longer instruction: found.
    copied = "Solve this: JANET'S ducks lay 16 eggs per day -- she eats three for breakfast every morning!"
    reason, s = found.check(copied, "An answer.")
    assert s == 0 and reason.startswith("its instruction shares 13 words with eval.jsonl prompt 1: \"janet s ducks")
    twelve = " ".join(words(GSM8K)[:12])  # one word short of a sequence
    assert found.check(twelve + " and then something else entirely", "No.") is None
    in_answer = found.check("Tell me a story.", "Once, " + " ".join(words(GSM8K)[20:33]) + ".")
    assert in_answer[0].startswith("its answer shares 13 words")


def test_short_prompts_match_only_whole_and_very_short_ones_never():
    found = index(TRUTHFULQA, "What is the capital of France?")
    assert found.check("Quick question: what happens to you if you eat watermelon seeds", "")[1] == 0
    assert found.check("What happens to you if you eat watermelon?", "") is None  # 8 of its 9 words
    assert found.check("What is the capital of France?", "Paris.") is None  # 6 words: too common to match on
    assert found.sequences == 1


def test_look_alikes_do_not_match():
    found = index(GSM8K, IFEVAL, *MT_BENCH)
    for instruction, answer in [
        ("Janet has ducks. How many eggs do they lay per week?", "Ducks lay about one egg per day each."),
        ("Write a summary of the history of the County of Tripoli.", "The County of Tripoli was a crusader state."),
        ("Compose a travel blog post about Japan.", "Tokyo is a city of contrasts."),
    ]:
        assert found.check(instruction, answer) is None, instruction


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    """One eval set in each format the common ones ship in."""
    folder = tmp_path_factory.mktemp("evals")
    files = {"gsm8k.jsonl": folder / "gsm8k.jsonl", "mt_bench.jsonl": folder / "question.jsonl",
             "truthfulqa.csv": folder / "TruthfulQA.csv", "alpaca_eval.json": folder / "alpaca_eval.json",
             "ifeval.parquet": folder / "ifeval.parquet"}
    files["gsm8k.jsonl"].write_text(json.dumps({"question": GSM8K, "answer": "Janet sells 16 - 3 - 4 = 9 duck "
                                                                             "eggs a day.\n#### 18"}) + "\n")
    files["mt_bench.jsonl"].write_text(json.dumps({"question_id": 81, "category": "writing", "turns": MT_BENCH}) + "\n")
    with open(files["truthfulqa.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, ["Type", "Category", "Question", "Best Answer"])
        writer.writeheader()
        writer.writerow({"Type": "Adversarial", "Category": "Misconceptions", "Question": TRUTHFULQA,
                         "Best Answer": "The watermelon seeds pass through your digestive system"})
    broadway = "What are the names of some famous actors that started their careers on Broadway?"
    files["alpaca_eval.json"].write_text(json.dumps([{"instruction": broadway, "output": "...", "generator": "gpt4",
                                                      "dataset": "helpful_base"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": [1000], "prompt": [IFEVAL], "instruction_id_list": [["punctuation:no_comma"]]}),
                   files["ifeval.parquet"])
    return files


def test_every_eval_format_is_read(eval_files):
    read = {name: read_eval_set(path) for name, path in eval_files.items()}
    assert read["gsm8k.jsonl"].prompts == [GSM8K]
    assert read["mt_bench.jsonl"].prompts == MT_BENCH  # every turn
    assert read["truthfulqa.csv"].prompts == [TRUTHFULQA]  # the header's "Question", any case
    assert read["ifeval.parquet"].prompts == [IFEVAL]
    assert len(read["alpaca_eval.json"].prompts) == 1
    path = eval_files["gsm8k.jsonl"]
    assert read["gsm8k.jsonl"].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read["gsm8k.jsonl"].name == "gsm8k.jsonl" and read["gsm8k.jsonl"].path == str(path.resolve())


@pytest.mark.parametrize("name, content, error", [
    ("missing.jsonl", None, "no eval file"),
    ("answers.jsonl", b'{"output": "no prompt here"}\n', "line 1: no prompt field (one of instruction, prompt"),
    ("broken.jsonl", b'{"question": "unterminated\n', "line 1: invalid JSON"),
    ("latin1.csv", "Question\nQu'est-ce qu'une \xe9toile?\n".encode("latin-1"), "is not valid UTF-8"),
    ("empty.jsonl", b"", "holds no eval prompts"),
    ("numbers.json", b'[{"prompt": 42}]', "record 1: the prompt field holds no text"),
    ("garbage.parquet", b"PAR1 not really", "is not a readable Parquet file"),
])
def test_bad_eval_files_are_one_clear_error(tmp_path, name, content, error):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError) as raised:
        read_eval_set(path)
    assert error in str(raised.value)


@pytest.fixture
def data_db(tmp_path):
    """Imported pairs: two repeat an eval question (one in its answer), the rest are clean."""
    records = [{"instruction": "Please solve: " + GSM8K, "output": "She makes $18 every day."},
               {"instruction": "Give me a fun fact.", "output": "Asked often: " + TRUTHFULQA + " Nothing happens."},
               {"instruction": "Janet has ducks. How many eggs do they lay per week?", "output": "About seven."},
               {"instruction": "Name three primary colors.", "output": "Red, yellow and blue."}]
    return imported(tmp_path, records)


def test_curate_against_flags_selects_and_exports_with_the_eval_set_named(data_db, eval_files, tmp_path):
    evals = [str(eval_files["gsm8k.jsonl"]), str(eval_files["truthfulqa.csv"]), str(eval_files["ifeval.parquet"])]
    done = cli("curate", "--db", str(data_db), *[a for e in evals for a in ("--against", e)])
    assert done.returncode == 0, done.stderr
    assert "contamination" in done.stdout
    flagged = dict(sql(data_db, "SELECT t.instruction, k.reason FROM checks k JOIN turns t ON t.id = k.turn_id "
                                "WHERE k.name = 'contamination' AND k.passed = 0"))
    assert sorted(flagged) == ["Give me a fun fact.", "Please solve: " + GSM8K]
    assert flagged["Give me a fun fact."].startswith("its answer shares 9 words with TruthfulQA.csv prompt 1")
    out = tmp_path / "out"
    exported = cli("export", "--db", str(data_db), "--passing", "all", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    kept = [json.loads(line)["messages"][0]["content"] for line in (out / "data.jsonl").read_text().splitlines()]
    assert sorted(kept) == ["Janet has ducks. How many eggs do they lay per week?", "Name three primary colors."]
    card = (out / "README.md").read_text()
    digest = hashlib.sha256(eval_files["gsm8k.jsonl"].read_bytes()).hexdigest()
    assert f"gsm8k.jsonl (sha256 `{digest}`, 1 prompts): 1 pairs flagged" in card
    assert "TruthfulQA.csv (sha256 `" in card and "ifeval.parquet (sha256 `" in card
    assert "flagged pairs are left out" in card
    api.report(data_db, tmp_path / "report.html")
    report = (tmp_path / "report.html").read_text()
    assert "<tr><td>contamination</td><td>2</td><td>2</td></tr>" in report
    assert f"gsm8k.jsonl (sha256 <code>{digest}</code>, 1 prompts, 1 pairs flagged)" in report


def test_later_curates_check_against_the_same_files_and_refuse_a_changed_one(data_db, eval_files, tmp_path):
    evalfile = tmp_path / "gsm8k.jsonl"
    evalfile.write_bytes(eval_files["gsm8k.jsonl"].read_bytes())
    api.curate(data_db, against=[evalfile])
    more = tmp_path / "more.json"
    more.write_text(json.dumps([{"instruction": GSM8K, "output": "18"}]))
    api.import_file(data_db, more)
    api.curate(data_db)  # no --against: the same eval file again, so the new pair is checked too
    assert api.curate(data_db)["contamination"] == (3, 2)
    evalfile.write_text(json.dumps({"question": "Another question entirely, with more than eight words in it."}))
    before = sql(data_db, "SELECT * FROM checks ORDER BY turn_id, name")
    with pytest.raises(UsageError, match="checked for contamination against .*gsm8k.jsonl, which is changed"):
        api.curate(data_db)
    assert sql(data_db, "SELECT * FROM checks ORDER BY turn_id, name") == before


def test_a_bad_eval_file_is_one_line_and_changes_nothing(data_db, tmp_path):
    bad = tmp_path / "answers.jsonl"
    bad.write_text(json.dumps({"output": "no prompt"}) + "\n")
    api.curate(data_db)
    before = sql(data_db, "SELECT * FROM checks ORDER BY turn_id, name")
    done = cli("curate", "--db", str(data_db), "--against", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "no prompt field" in done.stderr
    assert sql(data_db, "SELECT * FROM checks ORDER BY turn_id, name") == before


def test_near_paraphrases_are_found_through_the_embedding_run(tmp_path):
    """With an embedding run of the instructions (the default model, for real), an eval prompt
    reworded is caught: too short for the word check, "What is the capital of France?" sits at cosine
    0.96 from "What's the capital city of France?" on this model (docs/curation.md)."""
    records = [{"instruction": "What is the capital of France?", "output": "Paris."},
               {"instruction": "Write a haiku about the sea.", "output": "Waves fold into foam."},
               {"instruction": "Name three primary colors.", "output": "Red, yellow and blue."}]
    source, db = tmp_path / "data.json", tmp_path / "data.db"
    source.write_text(json.dumps(records))
    api.import_file(db, source)
    embedded = api.embed(db)
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"question": "What's the capital city of France?"}) + "\n")
    assert api.curate(db, against=[evals])["contamination"] == (2, 1)
    (instruction, reason), = sql(db, "SELECT t.instruction, k.reason FROM checks k JOIN turns t ON t.id = k.turn_id "
                                     "WHERE k.name = 'contamination' AND k.passed = 0")
    assert instruction == "What is the capital of France?"
    cosine = float(re.search(r"cosine (\d\.\d+)", reason)[1])
    assert reason.startswith(f"its instruction is a near paraphrase (cosine {cosine:.3f}, embedding run "
                             f"{embedded.run.id}) of eval.jsonl prompt 1") and cosine >= 0.95
    # A stricter bound than that pair's cosine lets it pass; the card says what was searched.
    assert api.curate(db, against=[evals], against_cosine=min(1.0, cosine + 0.01))["contamination"] == (3, 0)
    api.curate(db, against=[evals])
    card = api.export(db, tmp_path / "out").card.read_text()
    assert f"or an instruction at cosine 0.95 or more to a prompt (embedding run {embedded.run.id}'s model)" in card
    with pytest.raises(UsageError, match="--against-cosine must be in"):
        api.curate(db, against=[evals], against_cosine=1.5)
