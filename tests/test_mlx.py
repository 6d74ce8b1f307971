"""The MLX backend, against llama.cpp on the same weights.

MLX runs on the CPU here (mlx[cpu] links the reference BLAS: a few tokens/s on the 135M default
model), so the comparisons that need no sensible text (penalties, log-probabilities of closed
answers, tags, embeddings, LoRA training) run on a tiny random-weight llama with the default model's
own vocabulary and template (tests/families.py), and the real model keeps the tests whose meaning
needs real text: it answers, loops, stops, scores, and runs end to end from the CLI.
"""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from magpie_local.backends.base import Request, Sampling, first_loop
from magpie_local.generate import GenerateSettings, chat_format
from magpie_local.gguf import read_gguf
from magpie_local.gguf_to_mlx import ConvertError, convert_to_mlx
from magpie_local.models import resolve_model
from magpie_local.scoring import IFDScorer, Pair

from .conftest import cli

mlx_lm = pytest.importorskip("mlx_lm", reason="the MLX extra is not installed (make install installs it)")

TEXTS = [
    "Hello  world!!  123456 1,000,000.5 ünïcödé 日本語のテキスト \n\n\t tabs   and  spaces ",
    "I'm sure you'LL find WE'VE done it; don't worry.",
    "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "emoji 🙂🚀 end", "   leading spaces", "trailing\n\n\n", "",
]
PAIRS = [Pair("What is the capital of France?", "The capital of France is Paris, which is also its largest city. "
              "It lies on the Seine and is known for the Eiffel Tower, the Louvre and its cafés."),
         Pair("Name three primary colours.", "The three primary colours of paint are red, yellow and blue. Mixing "
              "two of them gives a secondary colour: orange, green or purple."),
         Pair("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'. People say it "
              "until about noon, and then switch to 'buenas tardes' for the afternoon.")]


@pytest.fixture(scope="module")
def mlx_dir(tmp_path_factory, default_model):
    return convert_to_mlx(default_model, tmp_path_factory.mktemp("mlx") / "smollm2")


@pytest.fixture(scope="module")
def mlx_backend(mlx_dir):
    from magpie_local.backends.mlx import MLXBackend

    be = MLXBackend(mlx_dir, ctx=256, parallel=4)
    yield be
    be.close()


@pytest.fixture(scope="module")
def f16_backend(f16_model):
    """llama.cpp on an F16 copy of the default model: the Q4_1 weights dequantized, as MLX uses them."""
    from magpie_local.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(f16_model, ctx=256, parallel=4) as be:
        yield be


@pytest.fixture(scope="module")
def fmt():
    return chat_format(resolve_model(None), GenerateSettings())


@pytest.fixture(scope="module")
def tiny(family):
    """(the tiny llama's GGUF, its MLX directory): the default model's vocabulary and template."""
    return family("smollm")


@pytest.fixture(scope="module")
def tiny_mlx(tiny):
    from magpie_local.backends.mlx import MLXBackend

    with MLXBackend(tiny[1], ctx=256, parallel=4) as be:
        yield be


@pytest.fixture(scope="module")
def tiny_cpp(tiny):
    from magpie_local.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(tiny[0], ctx=256, parallel=4) as be:
        yield be


def test_convert_writes_an_mlx_lm_directory(mlx_dir, default_model):
    config = json.loads((mlx_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True  # SmolLM2 has no separate output matrix
    # Q4_1 layers stay 4-bit; the embedding is Q8_0 in this file, so 8-bit.
    assert config["quantization"] == {"group_size": 32, "bits": 4,
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    tokenizer_config = json.loads((mlx_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == read_gguf(default_model).chat_template
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    with pytest.raises(ConvertError, match="already exists"):
        convert_to_mlx(default_model, mlx_dir)


def test_mlx_lm_loads_the_directory_and_answers(mlx_dir):
    """mlx-lm itself, not our backend: the directory is a plain mlx-lm model."""
    model, tokenizer = mlx_lm.load(str(mlx_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=10)


def test_tokens_match_llamacpp_on_the_default_model(mlx_backend, backend):
    for text in TEXTS:
        for special in (True, False):
            assert mlx_backend.tokenize(text, special=special) == backend.tokenize(text, special=special), text
    assert mlx_backend.detokenize(backend.tokenize(TEXTS[0])) == TEXTS[0]


def test_greedy_answers_equal_llamacpp_on_the_same_weights(mlx_backend, f16_backend, fmt):
    """MLX computes with the Q4_1 weights dequantized exactly; so does llama.cpp on an F16 copy.
    (On the Q4_1 file itself llama.cpp quantizes activations to 8 bits, and a near-tie can flip:
    measured, 1 of these 4 answers then starts with another token.)"""
    questions = [p.instruction for p in PAIRS[:2]]
    requests = [Request(fmt.response_prompt(q), Sampling(temperature=0.0, max_tokens=10), 1, tuple(fmt.stops))
                for q in questions]
    ours, reference = mlx_backend.complete(requests), f16_backend.complete(requests)
    assert [c.text for c in ours] == [c.text for c in reference]
    assert ours[0].text.startswith("The capital of France is Paris")
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in reference]


def test_penalty_processor_has_llamacpp_semantics():
    """The MLX logits processor against llama.cpp's penalty rule written out: only generated tokens
    count, in the last repeat_last_n; a positive logit is divided by the repeat penalty (a negative one
    multiplied), once per distinct token; minus count * frequency + presence; the first token banned."""
    import mlx.core as mx

    from magpie_local.backends.mlx import make_logits_processor

    s = Sampling(repeat_penalty=1.5, repeat_last_n=3, frequency_penalty=0.25, presence_penalty=0.5)
    process = make_logits_processor(s, [0], ctx=64)
    prompt, generated = [7, 7, 7], [2, 3, 2, 4]
    base = np.linspace(-2.0, 2.0, 8, dtype=np.float32)
    first = np.array(process(mx.array(prompt), mx.array(base[None, :]))[0])
    assert first[0] == -np.inf and np.allclose(first[1:], base[1:])  # banned; the prompt's 7s not penalised
    for k in range(1, len(generated) + 1):
        got = np.array(process(mx.array(prompt + generated[:k]), mx.array(base[None, :]))[0])
        want = base.copy()
        window = generated[:k][-3:]
        for t in set(window):
            want[t] = want[t] * 1.5 if want[t] <= 0 else want[t] / 1.5
            want[t] -= window.count(t) * 0.25 + 0.5
        assert np.allclose(got, want), (k, got, want)


def test_penalties_and_bans_match_llamacpp(tiny_mlx, tiny_cpp, fmt):
    """With penalties on, greedy answers on MLX match llama.cpp's on the same weights, and a
    first-token ban acts on MLX as on llama.cpp."""
    sampling = Sampling(temperature=0.0, max_tokens=24, repeat_penalty=1.3, repeat_last_n=16, frequency_penalty=0.2,
                        presence_penalty=0.1)
    questions = [p.instruction for p in PAIRS] + ["Give me a tip for sleeping better."]
    requests = [Request(fmt.response_prompt(q), sampling, 1, tuple(fmt.stops)) for q in questions]
    ours, reference = tiny_mlx.complete(requests), tiny_cpp.complete(requests)
    assert [c.text for c in ours] == [c.text for c in reference]
    plain = tiny_mlx.complete([replace(r, sampling=replace(sampling, repeat_penalty=1.0, frequency_penalty=0.0,
                                                            presence_penalty=0.0)) for r in requests])
    assert [c.text for c in plain] != [c.text for c in ours]  # the processor is applied
    first = tiny_mlx.tokenize(ours[0].text, add_bos=False, special=False)[0]
    banned = Request(requests[0].prompt, replace(sampling, max_tokens=4, ban_first=(tiny_mlx.detokenize([first]),)), 1,
                     tuple(fmt.stops))
    for backend in (tiny_mlx, tiny_cpp):
        [answer] = backend.complete([banned])
        assert backend.tokenize(answer.text, add_bos=False, special=False)[0] != first, answer.text


def test_loop_stop_on_the_real_model(mlx_backend, f16_backend):
    """A counting prompt the default model continues in a loop: MLX stops it as llama.cpp does."""
    greedy = Sampling(temperature=0.0, max_tokens=24)
    counting = "1 2 3 1 2 3 1 2 3 1 2 3"
    plain, stopped = mlx_backend.complete([Request(counting, greedy, 1),
                                           Request(counting, replace(greedy, stop_loops=True), 1)])
    assert first_loop(mlx_backend.tokenize(plain.text, add_bos=False, special=False)) is not None, plain.text
    assert stopped.finish_reason == "loop" and stopped.completion_tokens < 24 and plain.text.startswith(stopped.text)
    [reference_stop] = f16_backend.complete([Request(counting, replace(greedy, stop_loops=True), 1)])
    assert reference_stop.finish_reason == "loop" and reference_stop.text == stopped.text


def test_sampling_follows_the_seed_and_stops(mlx_backend, fmt):
    def request(seed, **kw):
        return Request(fmt.instruction_prompt(), Sampling(temperature=1.0, max_tokens=8), seed, **kw)

    a, b, c = mlx_backend.complete([request(1), request(1), request(2)])
    assert a.text == b.text and a.text != c.text
    assert a.completion_tokens <= 8 and (a.finish_reason == "length") == (a.completion_tokens == 8)
    [stopped] = mlx_backend.complete([Request(fmt.response_prompt("Count from 1 to 9, with commas."),
                                              Sampling(temperature=0.0, max_tokens=12), 1, (",",))])
    assert stopped.finish_reason == "stop" and stopped.stop_sequence == "," and "," not in stopped.text


def test_logprobs_and_ifd_agree_with_llamacpp(mlx_backend, backend, f16_backend, fmt):
    """Against llama.cpp on the same weights (the F16 copy) MLX agrees to fp16 rounding: measured
    0.002 nats per token on average, max 0.013, and IFDs within 0.005. Against the Q4_1 file,
    where llama.cpp quantizes activations to 8 bits for its matmuls, per-token values move more
    (measured mean 0.06-0.11, max 0.52), and so do IFDs: up to 0.012 with an AVX2 build of
    llama.cpp, 0.032 with an AVX-512 one (the file's own IFDs move that much between the two)."""
    scorer = IFDScorer(backend, "chat", fmt)
    sequences = []
    for p in PAIRS[:2]:
        cond, direct, answer, _ = scorer.prepare(p)
        sequences += [(cond + answer, len(cond)), (direct + answer, len(direct))]
    ours = mlx_backend.token_logprobs(sequences)

    def differences(reference):
        assert [len(a) for a in ours] == [len(b) for b in reference]
        return np.concatenate([np.abs(a - b) for a, b in zip(ours, reference)])

    def ifd_differences(reference):  # IFD = mean CE(A | Q) / mean CE(A), as IFDScorer.score computes it
        return [abs(ours[k].mean() / ours[k + 1].mean() - reference[k].mean() / reference[k + 1].mean())
                for k in range(0, len(sequences), 2)]

    f16 = f16_backend.token_logprobs(sequences)
    same_weights = differences(f16)
    assert same_weights.mean() < 0.01 and same_weights.max() < 0.05
    assert max(ifd_differences(f16)) < 0.01
    cpp = backend.token_logprobs(sequences)  # what the llama.cpp backend stores for the default model
    quantized = differences(cpp)
    assert quantized.mean() < 0.15 and quantized.max() < 0.6
    assert max(ifd_differences(cpp)) < 0.05
    # Right padding changes nothing: a sequence alone gives the same values as in the batch.
    [alone] = mlx_backend.token_logprobs(sequences[1:2])
    assert np.abs(alone - ours[1]).max() < 1e-2


def test_magpie_run_end_to_end_on_mlx(tmp_path):
    """generate and score from the CLI on MLX, converting the embedded GGUF into the cache."""
    db, env = tmp_path / "m.db", {"MAGPIE_LOCAL_CACHE": str(tmp_path / "cache")}
    args = ("generate", "-n", "1", "--db", str(db), "--backend", "mlx", "--parallel", "2",
            "--instruction-max-tokens", "48", "--response-max-tokens", "12", "-q")
    made = cli(*args, env=env, timeout=600)
    assert made.returncode == 0, made.stderr
    assert "Converting SmolLM2-135M-Instruct.Q4_1 for MLX" in made.stderr and "on mlx" in made.stderr
    assert "1 kept" in made.stdout
    again = cli(*args, env=env)
    assert again.returncode == 0 and "already complete" in again.stderr and "Converting" not in again.stderr
    scored = cli("score", "--db", str(db), "--backend", "mlx", "-q", env=env, timeout=600)
    assert scored.returncode == 0, scored.stderr
    import sqlite3

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT DISTINCT backend FROM runs").fetchall() == [("mlx",)]
    [(ifd,)] = conn.execute("SELECT ifd FROM scores").fetchall()
    assert 0 < ifd < 2
    versions = json.loads(conn.execute("SELECT versions FROM runs WHERE kind = 'generate'").fetchone()[0])
    assert versions["backend"] == "mlx" and versions["mlx_lm"]


def test_cli_convert_and_backend_errors(tmp_path):
    out = tmp_path / "smol-mlx"
    made = cli("models", "convert", "--to", "mlx", "--out", str(out))
    assert made.returncode == 0 and (out / "model.safetensors").is_file(), made.stderr
    listed = cli("models", "list", str(out))
    assert "llama" in listed.stdout and "smol-mlx" in listed.stdout
    wrong = cli("generate", "-n", "1", "--db", str(tmp_path / "x.db"), "--model", str(out), "--backend", "llamacpp")
    assert wrong.returncode == 2 and "mlx-lm directory" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "x.db").exists()
    again = cli("models", "convert", "--to", "mlx", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    detect = cli("templates", "detect", str(out))
    assert detect.returncode == 0 and "<|im_start|>user\\n" in detect.stdout


def test_exported_messages_train_a_lora_adapter_with_mlx_lm(tiny, tmp_path):
    """The `messages` split loads with mlx-lm's dataset loader, and a 2-iteration LoRA fine-tune of
    a converted model (the tiny llama with the default model's tokenizer and template) runs on it."""
    mlx_dir = tiny[1]
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import load_local_dataset

    records = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
    source, db, out = tmp_path / "pairs.jsonl", tmp_path / "d.db", tmp_path / "data"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli("import", str(source), "--db", str(db)).returncode == 0
    exported = cli("export", "--db", str(db), "--format", "messages", "--split", "0.75", "--out", str(out))
    assert exported.returncode == 0, exported.stderr

    _, tokenizer = mlx_lm.load(str(mlx_dir))
    train, valid, _ = load_local_dataset(out, tokenizer, SimpleNamespace())
    assert (len(train), len(valid)) == (6, 2)
    tokens, offset = train.process(train[0])
    assert tokenizer.decode(tokens).startswith("<|im_start|>") and 0 <= offset < len(tokens)

    adapters = tmp_path / "adapters"
    trained = cli(*"-m mlx_lm lora --train --iters 2 --batch-size 1 --num-layers 2 --max-seq-length 64".split(),
                  "--model", str(mlx_dir), "--data", str(out), "--adapter-path", str(adapters),
                  "--val-batches", "1", "--steps-per-eval", "100", "--steps-per-report", "1", timeout=600,
                  module=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    shown = re.sub(r"\x1b\[[0-9;]*m", "", trained.stdout)  # mlx-lm colours its progress display
    assert re.search(r"\b2/2\b", shown) and (adapters / "adapter_config.json").is_file()
    import mlx.core as mx

    weights = mx.load(str(adapters / "adapters.safetensors"))
    lora_b = [v for k, v in weights.items() if k.endswith("lora_b")]
    assert lora_b and any(mx.abs(v).max().item() > 0 for v in lora_b)  # LoRA's B starts at zero: it trained


def test_an_mlx_model_in_the_hugging_face_cache_is_found_by_repo_id(mlx_dir, tmp_path, monkeypatch):
    """`--model org/name` finds a snapshot in the local HF cache (refs/main); nothing is downloaded."""
    import shutil

    repo = tmp_path / "hub" / "models--mlx-community--SmolLM2-test"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(mlx_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = resolve_model("mlx-community/SmolLM2-test")
    assert model.kind == "mlx" and model.path == snapshot and model.architecture == "llama"
    assert model.eos_token == "<|im_end|>" and "<|im_start|>" in model.chat_template
    with pytest.raises(Exception, match="model not found"):
        resolve_model("mlx-community/not-cached")


def test_closed_answers_read_the_same_probabilities_as_llamacpp(tiny_mlx, tiny_cpp, fmt):
    """What judge and tag --method likelihood read on MLX: the next-token distribution over the choices,
    against llama.cpp on the same weights."""
    mlx_backend, f16_backend = tiny_mlx, tiny_cpp
    from magpie_local import judging, tagging

    asks = tagging.closed_prompts(fmt, "Write a Python function that reverses a list.")
    letters = tagging.letter_ids(mlx_backend)
    judge = judging.judge_tokens(mlx_backend, fmt, judging.RUBRIC, "What is 2+2?", "4")
    items = [(mlx_backend.tokenize(asks[f]), letters[:len(tagging.FIELDS[f])]) for f in tagging.FIELDS]
    items.append((judge, judging.score_token_ids(mlx_backend)))
    for ours, reference in zip(mlx_backend.choice_logprobs(items), f16_backend.choice_logprobs(items)):
        assert np.allclose(ours, reference, atol=0.05), (ours, reference)


def test_tag_runs_on_mlx_by_likelihood(tiny, tmp_path):
    import sqlite3

    import magpie_local.api as api

    source, db = tmp_path / "pairs.json", tmp_path / "t.db"
    source.write_text(json.dumps([{"instruction": "Solve 3x + 5 = 20 for x.", "output": "x = 5"},
                                  {"instruction": "Write a poem about autumn.", "output": "Leaves fall."}]))
    api.import_file(db, source)
    run = api.tag(db, model=str(tiny[1]), backend="mlx")
    assert run.backend == "mlx" and run.config["method"] == "likelihood"
    rows = sqlite3.connect(db).execute("SELECT task_category, input_quality, difficulty, error, raw FROM tags")
    rows = rows.fetchall()
    assert len(rows) == 2 and all(r[3] is None for r in rows)
    for *chosen, _, raw in rows:
        record = json.loads(raw)
        assert record["method"] == "likelihood" and record["calibrated"] == "N/A"
        for value, dist in zip(chosen, record["distributions"].values()):
            assert value == max(dist, key=dist.get) and abs(sum(dist.values()) - 1) < 1e-5


def test_embeddings_match_llamacpp_and_embed_runs_on_mlx(tiny_mlx, tiny_cpp, tiny, tmp_path):
    """MLX embeds as llama.cpp's embedding mode does (mean of the final normed hidden states), texts of
    different lengths padded into one forward pass; `embed --backend mlx` stores a run of them."""
    import sqlite3

    import magpie_local.api as api

    mlx_backend, f16_backend, mlx_dir = tiny_mlx, tiny_cpp, tiny[1]
    texts = [t for t in TEXTS if t] + ["short", "a somewhat longer text about the weather in spring " * 4]
    local = f16_backend.embed(texts, max_tokens=64)
    mine = mlx_backend.embed(texts, max_tokens=64)
    assert mine.shape == local.shape == (len(texts), 64)
    assert np.allclose(np.linalg.norm(mine, axis=1), 1, atol=1e-5)
    assert np.min(np.sum(mine * local, axis=1)) > 0.999
    alone = np.stack([mlx_backend.embed([t], max_tokens=64)[0] for t in texts])
    assert np.allclose(alone, mine, atol=1e-4)  # padding changes nothing pooled
    source, db = tmp_path / "pairs.json", tmp_path / "e.db"
    source.write_text(json.dumps([{"instruction": t, "output": "Yes."} for t in texts[:3]]))
    api.import_file(db, source)
    done = api.embed(db, model=str(mlx_dir), backend="mlx")
    assert done.run.backend == "mlx" and done.embedded == 3 and done.dim == 64
    stored = sqlite3.connect(db).execute("SELECT vector FROM embeddings ORDER BY turn_id").fetchall()
    vectors = np.stack([np.frombuffer(v, dtype="<f2").astype(np.float64) for (v,) in stored])
    assert np.min(np.sum(vectors * f16_backend.embed(texts[:3]), axis=1)) > 0.999
