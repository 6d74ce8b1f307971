"""respond, judge and preference pairs on the real default model: K answers per instruction, resume
and --parallel giving the same bytes, stored judge distributions, the DPO export, and bad input."""

import hashlib
import json
import shutil
import sqlite3

import numpy as np
import pytest

import magpie_local.api as api
from magpie_local import judging
from magpie_local.backends.base import BackendBase
from magpie_local.errors import UsageError
from magpie_local.store import Store

from .conftest import cli, sigkill_after_a_batch
from .gguf_writer import write_gguf
from .test_cli import _error_line

QUESTIONS = [{"text": "How can I improve my time management skills?"},
             {"prompt": "Name three primary colors."},
             {"instruction": "Translate into French.", "input": "Good morning"},
             {"question_id": 4, "turns": ["What is 12 times 12?", "And 13 times 13?"]},
             {"text": "Write a haiku about the sea."},
             {"text": "What causes rain?"}]
RESPOND = ["respond", "--run", "1", "-k", "2", "--max-tokens", "40", "--batch-size", "2", "-q"]


def answers(db) -> list[tuple]:
    """Every stored answer of the respond run (run 2), kept or dropped, with what decides its bytes."""
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT c.item_index, c.status, c.drop_reason, c.source_id, c.sample_index, t.instruction, "
                        "t.input, t.response, t.response_finish, t.response_seed FROM conversations c "
                        "JOIN turns t ON t.conversation_id = c.id WHERE c.run_id = 2 ORDER BY c.item_index").fetchall()
    conn.close()
    return rows


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    """A database with the questions imported (run 1) and answered twice each at --parallel 1 (run 2)."""
    folder = tmp_path_factory.mktemp("respond")
    source = folder / "questions.jsonl"
    source.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    db = folder / "a.db"
    imported = cli("import", str(source), "--db", str(db))
    assert imported.returncode == 0 and "6 instructions await answers" in imported.stdout, imported.stderr
    done = cli(*RESPOND, "--parallel", "1", "--db", str(db))
    assert done.returncode == 0, done.stderr
    return folder, source, db


def test_import_keeps_instructions_alone_as_pending(answered):
    _, _, db = answered
    with Store(db, create=False, write=False) as store:
        counts = store.run_counts(1)
        pending = store.instructions_to_answer(1)
    assert (counts["kept"], counts["pending"]) == (0, 6)
    assert [p["instruction"] for p in pending][2:4] == ["Translate into French.", "What is 12 times 12?"]
    assert pending[2]["input"] == "Good morning"


def test_two_answers_each_the_same_bytes_at_parallel_4_and_after_sigkill(answered):
    folder, source, db = answered
    first = answers(db)
    assert len(first) == 12 and [r[4] for r in first] == [0, 1] * 6
    assert [r[3] for r in first] == [c for c in range(1, 7) for _ in range(2)]  # each answers its instruction
    assert sum(a[7] != b[7] for a, b in zip(first[::2], first[1::2])) >= 4  # the two answers differ (T 0.8)
    for name, run in (("p4", lambda d: cli(*RESPOND, "--parallel", "4", "--db", str(d))),
                      ("killed", lambda d: sigkill_after_a_batch([*RESPOND, "--parallel", "2"], d,
                                                                 batches_before=1))):
        other = folder / f"{name}.db"
        assert cli("import", str(source), "--db", str(other)).returncode == 0
        run(other)
        if name == "killed":
            assert 0 < len(answers(other)) < 12, "the kill should land mid-run"
            resumed = cli(*RESPOND, "--db", str(other))
            assert resumed.returncode == 0 and "continuing" in resumed.stderr, resumed.stderr
        assert answers(other) == first, name
    again = cli(*RESPOND, "--db", str(db))
    assert again.returncode == 0 and "already holds every answer" in again.stderr


def test_judge_stores_distributions_deterministically(answered, tmp_path):
    _, _, db = answered
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    judged = cli("judge", "--db", str(db), "--run", "2", "-q")
    assert judged.returncode == 0, judged.stderr
    assert "responses rated │ 12" in judged.stdout and "near chance" not in judged.stdout
    assert "barely better than chance" in judged.stderr  # the default judge says what it is worth
    run = api.judge(copy, runs=[2])  # the same judge, through the API, on a copy of the database
    rows = {}
    for path in (db, copy):
        conn = sqlite3.connect(path)
        rows[path] = conn.execute("SELECT turn_id, score, distribution, mass FROM ratings ORDER BY turn_id").fetchall()
        config = json.loads(conn.execute("SELECT config FROM runs WHERE kind = 'judge'").fetchone()[0])
    assert rows[db] == rows[copy] and len(rows[db]) == 12
    assert config["rubric_sha256"] == hashlib.sha256(judging.RUBRIC.encode()).hexdigest()
    with Store(db, create=False, write=False) as store:
        assert config["judge_sha256"] == store.get_run(1 + 2).model_sha256 == run.model_sha256
    for _, score, distribution, mass in rows[db]:
        p = json.loads(distribution)
        assert len(p) == 5 and abs(sum(p) - 1) < 1e-5 and 0 < mass <= 1
        assert abs(score - sum((i + 1) * x for i, x in enumerate(p))) < 1e-5
    assert api.judge(db, runs=[2]).id == 3  # resumed: the same run, nothing added
    assert len(sqlite3.connect(db).execute("SELECT id FROM ratings").fetchall()) == 12


def test_dpo_export_loads_with_datasets(answered, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, db = answered
    if not sqlite3.connect(db).execute("SELECT count(*) FROM ratings").fetchone()[0]:
        assert cli("judge", "--db", str(db), "-q").returncode == 0
    out = tmp_path / "dpo"
    done = cli("export", "--db", str(db), "--format", "dpo", "--min-margin", "0", "--include-cut-off", "--out",
               str(out))
    assert done.returncode == 0, done.stderr
    data = datasets.load_dataset("json", data_files=str(out / "data.jsonl"), split="train")
    assert set(data.column_names) == {"prompt", "chosen", "rejected"} and 1 <= len(data) <= 6
    conn = sqlite3.connect(db)
    score = dict(conn.execute("SELECT t.response, g.score FROM ratings g JOIN turns t ON t.id = g.turn_id"))
    for row in data:
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and score[chosen] >= score[rejected]
    card = (out / "README.md").read_text()
    assert "Synthetic preference data" in card and "rubric sha256" in card and "Margin (chosen - rejected" in card
    none = cli("export", "--db", str(db), "--format", "dpo", "--min-margin", "9", "--out", str(tmp_path / "x"))
    assert none.returncode == 2 and "no preference pairs to export (skipped: " in none.stderr
    assert "margin below 9" in none.stderr and not (tmp_path / "x").exists()
    assert cli("score", "--db", str(db), "--run", "2", "-q").returncode == 0
    high = cli("select", "--db", str(db), "--keep-above-1", "--min-judge", "1", "--name", "j")
    assert high.returncode == 0 and "12 of 12 eligible" in high.stdout, high.stdout + high.stderr
    top = max(score.values())
    best = cli("select", "--db", str(db), "--keep-above-1", "--min-judge", str(top), "--name", "j")
    assert "1 of 1 eligible" in best.stdout, best.stdout


def test_bad_input_is_one_line_exit_2_and_stores_nothing(answered, tmp_path):
    _, _, answered_db = answered
    db = tmp_path / "bad.db"
    shutil.copy(answered_db, db)
    with Store(db) as store:  # a generate run killed before its first batch: no instructions
        empty = store.create_run(kind="generate", target=4, config_key="x", config={}, model={}, backend="llamacpp",
                                 versions={})
    before = sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0]
    assert "holds no instructions to answer" in _error_line(cli("respond", "--db", str(db), "--run", str(empty.id)))
    assert "--responses must be at least 1" in _error_line(cli("respond", "--db", str(db), "--run", "1", "-k", "0"))
    assert "identical answers" in _error_line(cli("respond", "--db", str(db), "--run", "1", "-k", "2",
                                                  "--temperature", "0"))
    assert "is a respond run" in _error_line(cli("respond", "--db", str(db), "--run", "2"))
    bare = write_gguf(tmp_path / "bare.gguf", {"general.architecture": "llama"})
    assert "--template" in _error_line(cli("judge", "--db", str(db), "--model", str(bare)))
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Rate {response} from 1 to 5.")
    assert "{instruction}" in _error_line(cli("judge", "--db", str(db), "--rubric", str(rubric)))
    assert "not a respond run" in _error_line(cli("export", "--db", str(db), "--format", "dpo", "--run", "1",
                                                  "--out", str(tmp_path / "o")))
    assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone()[0] == before


GEN_WITH = ["generate", "-n", "5", "--response-max-tokens", "40", "--batch-size", "2", "-q"]


def runs_of(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT id, kind, model_sha256 FROM runs ORDER BY id").fetchall()
    conn.close()
    return rows


def test_generate_with_a_response_model(tmp_path, default_model, f16_model):
    """generate --response-model: the default model's instructions (the seeds a plain run draws),
    answered by another model file into a respond run of exactly -n kept pairs, the same bytes as
    `respond` on those instructions, and after a SIGKILL and a second start."""
    db = tmp_path / "a.db"
    r = cli(*GEN_WITH, "--response-model", str(f16_model), "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert "instructions in run" in r.stdout and "answers in run" in r.stdout
    (first, kind1, sha1), (second, kind2, sha2) = runs_of(db)
    assert (kind1, kind2) == ("generate", "respond") and sha1 != sha2
    assert sha2 == hashlib.sha256(f16_model.read_bytes()).hexdigest()
    with Store(db, create=False, write=False) as store:
        counts = store.run_counts(second)
        instructions = store.instructions_to_answer(first)
    assert counts["kept"] == 5 and store_pending(db, first) == len(instructions) >= 5
    got = answers(db)
    assert [row[5] for row in got] == [i["instruction"] for i in instructions][:len(got)]
    assert all(row[7] for row in got if row[1] == "kept")

    plain = tmp_path / "plain.db"  # the same seeds give the same instructions, item by item
    assert cli("generate", "-n", "5", "--response-max-tokens", "40", "-q", "--db", str(plain)).returncode == 0
    conn = sqlite3.connect(plain)
    by_item = dict(conn.execute("SELECT c.item_index, t.instruction FROM conversations c JOIN turns t "
                                "ON t.conversation_id = c.id WHERE t.turn_index = 0"))
    conn.close()
    conn = sqlite3.connect(db)
    ours = dict(conn.execute("SELECT c.item_index, t.instruction FROM conversations c JOIN turns t "
                             "ON t.conversation_id = c.id WHERE c.run_id = 1 AND c.status = 'pending'"))
    conn.close()
    shared = set(ours) & set(by_item)
    assert len(shared) >= 3 and all(ours[i] == by_item[i] for i in shared)

    # The respond run it made is `respond` with the same settings: found again, then remade with --new.
    same = ["respond", "--run", "1", "--model", str(f16_model), "--max-tokens", "40", "--db", str(db), "-q"]
    again = cli(*same)
    assert again.returncode == 0 and "already holds every answer" in again.stderr, again.stderr
    assert cli(*same, "--new").returncode == 0
    conn = sqlite3.connect(db)
    remade = conn.execute("SELECT c.item_index, t.response FROM conversations c JOIN turns t ON t.conversation_id "
                          "= c.id WHERE c.run_id = 3 ORDER BY c.item_index").fetchall()
    conn.close()
    assert remade == [(row[0], row[7]) for row in got]

    rerun = cli(*GEN_WITH, "--response-model", str(f16_model), "--db", str(db))
    assert rerun.returncode == 0 and "already" in rerun.stderr, rerun.stderr

    killed = tmp_path / "killed.db"
    sigkill_after_a_batch([*GEN_WITH, "--response-model", str(f16_model)], killed, batches_before=3)
    resumed = cli(*GEN_WITH, "--response-model", str(f16_model), "--db", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert answers(killed) == got

    for extra, message in ((["--turns", "2"], "--turns 1"), (["--resume", "1"], "run the same command again")):
        assert message in _error_line(cli(*GEN_WITH, "--response-model", str(f16_model), *extra,
                                          "--db", str(tmp_path / "x.db")))
    assert not (tmp_path / "x.db").exists()


def store_pending(db, run_id: int) -> int:
    with Store(db, create=False, write=False) as store:
        return store.run_counts(run_id)["pending"]


class _Vocab:
    """A vocabulary that spells every digit as two tokens."""

    def tokenize(self, text, add_bos=False, special=False):
        return [0, 1] if text.isdigit() else [2]


def test_score_tokens_that_are_not_single_tokens_are_refused():
    backend = BackendBase()
    backend.vocab = _Vocab()
    with pytest.raises(UsageError, match="scores 1-5 as single tokens"):
        judging.score_token_ids(backend)


def test_rating_is_the_expected_score_of_the_distribution():
    p = np.array([0.1, 0.2, 0.3, 0.2, 0.2])
    r = judging.rating(np.log(p * 0.5))  # half the probability on the scale
    assert r.distribution == pytest.approx(list(p)) and r.score == pytest.approx(3.2) and r.mass == pytest.approx(0.5)


def test_braces_in_the_pair_stay_text(backend):
    from magpie_local.generate import GenerateSettings, chat_format
    from magpie_local.models import resolve_model

    fmt = chat_format(resolve_model(None), GenerateSettings())
    tokens = judging.judge_tokens(backend, fmt, judging.RUBRIC, "Fill in {x}", "{response} {instruction}")
    assert "Fill in {x}" in backend.detokenize(tokens) and len(tokens) < judging.MAX_PROMPT_TOKENS
    long = judging.judge_tokens(backend, fmt, judging.RUBRIC, "Why?", "word " * 5000)
    assert len(long) <= judging.MAX_PROMPT_TOKENS


def test_one_decode_reads_the_same_probabilities_as_scoring_each_choice(backend):
    """llama.cpp's choice_logprobs (one decode, the last position) against the generic path (one
    scored sequence per choice, token_logprobs) on the real model."""
    prompt = backend.tokenize("<|im_start|>user\nPick a digit.<|im_end|>\n<|im_start|>assistant\n")
    ids = backend.token_ids(list("12345"))
    fast = backend.choice_logprobs([(prompt, ids)])[0]
    slow = BackendBase.choice_logprobs(backend, [(prompt, ids)])[0]
    assert np.allclose(fast, slow, atol=1e-3), (fast, slow)


def test_preference_pairs_choose_skip_and_say_why(tmp_path):
    """The pairing rules on a hand-made respond run (real store, no model)."""
    from magpie_local.preference import preference_pairs

    def turn(text, finish="stop"):
        return dict(instruction="Q", input=None, response=text, response_finish=finish, response_tokens=1,
                    response_prompt_tokens=1, instruction_tokens=None, instruction_prompt_tokens=None)

    with Store(tmp_path / "p.db") as store:
        store.import_run(config_key="s", config={}, versions={}, rows=[
            (dict(item_index=i, status="kept", drop_reason=None, system_prompt=None), [turn("x")]) for i in range(5)])
        run = store.create_run(kind="respond", target=10, config_key="r", config={}, model={}, backend="llamacpp",
                               versions={})
        groups = [["good", "bad"], ["same", "same "], ["close a", "close b"], ["tie a", "tie b"],
                  ["long", "cut"]]
        finishes = {"cut": "length"}
        rows = [(dict(item_index=2 * g + k, status="kept", drop_reason=None, system_prompt=None, source_id=g + 1,
                      sample_index=k), [turn(text, finishes.get(text, "stop"))])
                for g, texts in enumerate(groups) for k, text in enumerate(texts)]
        store.commit_batch(run.id, dict(first_item=0, n_items=10, kept=10, dropped=0, prompt_tokens=0,
                                        completion_tokens=0, seconds=0), rows)
        judge = store.create_run(kind="judge", target=10, config_key="j", config={}, model={}, backend="", versions={})
        scores = [4.0, 2.0, 3.0, 1.0, 3.0, 2.9, 2.0, 2.0, 4.0, 1.0]
        turn_ids = [r[0] for r in store.conn.execute(
            "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id WHERE c.run_id = ? "
            "ORDER BY c.item_index", [run.id])]
        store.commit_scores(judge.id, [dict(turn_id=t, score=s, distribution="[]", mass=1.0)
                                       for t, s in zip(turn_ids, scores)], table="ratings")
        pairs, skipped = preference_pairs(store, run.id, judge.id, min_margin=0.5)
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("good", "bad", 2.0)]
    assert skipped == {"chosen and rejected are the same text": 1, "margin below 0.5": 2,
                       "fewer than 2 kept, rated answers not cut off": 1}
