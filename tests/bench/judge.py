"""Judge accuracy on a sanity set of real Alpaca data, and judge/respond speed against naive loops.

Sanity set: for each of N Alpaca samples (alpaca_cherry_5pct.json in ../shared), its own answer
against (a) the answer to a *different* instruction and (b) its own answer cut in half. The judge
is right when it scores the own answer higher (a tie counts half). Chance is 50%.

Tags: task category of the 60 Vicuna questions whose category maps onto the Magpie tagger's
(generic -> Advice seeking, knowledge -> Information seeking, roleplay -> Role playing, coding,
math, fermi -> Reasoning or Math, writing -> Creative writing or Editing), by `tag --method grammar`,
by closed questions uncalibrated, and by `tag --method likelihood` (calibrated).

Speed: `judge` (one decode per response, the score read from the next-token distribution) against
the naive loop (llama-cpp-python's create_completion per response: sample a few tokens, parse the
digit), and `respond --responses 2` against create_completion per answer.

    python -m tests.bench.judge [--samples 60] [--kinds file,bf16,f16]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .common import RESULTS, build_info, default_copy, model_path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_cherry_5pct.json"
QUESTIONS = DATA.parent / "vicuna_test_set.jsonl"
MARGINS = (0.0, 0.1, 0.25, 0.5)


def sanity_set(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(instruction, own answer, another instruction's answer, own answer cut in half) for n samples."""
    data = [d for d in json.loads(DATA.read_text()) if 80 <= len(d["output"]) <= 1500 and not d["input"]]
    rng = random.Random(seed)
    picked = rng.sample(data, n + 1)
    out = []
    for i in range(n):
        d, other = picked[i], picked[i + 1]
        words = d["output"].split()
        out.append((d["instruction"], d["output"], other["output"], " ".join(words[:len(words) // 2])))
    return out


def accuracy(good: np.ndarray, bad: np.ndarray, margin: float = 0.0) -> tuple[float, int]:
    """(share of pairs the judge orders right, ties half; pairs) among pairs scored at least `margin` apart."""
    diff = good - bad
    keep = np.abs(diff) >= margin if margin else np.ones(len(diff), bool)
    if not keep.any():
        return float("nan"), 0
    d = diff[keep]
    return float(((d > 0) + 0.5 * (d == 0)).mean()), int(keep.sum())


def rate_all(kind: str, items) -> dict:
    """Ratings of every answer of the sanity set by the default model (kind: file or a weight copy)."""
    from magpie_local import judging
    from magpie_local.api import chat_format
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.generate import GenerateSettings
    from magpie_local.models import resolve_model

    m = resolve_model(str(model_path(None if kind == "file" else kind)))
    fmt = chat_format(m, GenerateSettings())
    with LlamaCppBackend(m.path, ctx=64, parallel=1) as be:
        ids = judging.score_token_ids(be)
        prompts = [judging.judge_tokens(be, fmt, judging.RUBRIC, inst, answer)
                   for inst, *answers in items for answer in answers]
        start = time.perf_counter()
        ratings = [judging.rating(lp) for lp in be.choice_logprobs([(p, ids) for p in prompts])]
        seconds = time.perf_counter() - start
    scores = np.array([r.score for r in ratings]).reshape(len(items), 3)
    mass = np.array([r.mass for r in ratings])
    return {"scores": scores, "seconds": seconds, "ratings": len(ratings), "mass": float(mass.mean()),
            "prompt_tokens": sum(map(len, prompts))}


def naive_judge(items) -> dict:
    """The naive judge: create_completion per response (greedy, up to 4 tokens), the first digit parsed."""
    from magpie_local import judging
    from magpie_local.api import chat_format
    from magpie_local.generate import GenerateSettings
    from magpie_local.llama_lib import llama_cpp
    from magpie_local.models import resolve_model

    m = resolve_model(None)
    fmt = chat_format(m, GenerateSettings())
    llm = llama_cpp().Llama(str(m.path), n_ctx=2048, verbose=False)
    prompts = [fmt.response_prompt(judging.RUBRIC.replace("{instruction}", inst).replace("{response}", answer))
               for inst, *answers in items for answer in answers]
    start = time.perf_counter()
    parsed = 0
    for prompt in prompts:
        text = llm.create_completion(prompt, max_tokens=4, temperature=0.0)["choices"][0]["text"]
        parsed += bool(re.search(r"[1-5]", text))
    return {"seconds": time.perf_counter() - start, "ratings": len(prompts), "parsed": parsed}


def respond_speed(n: int, k: int, max_tokens: int) -> tuple[dict, dict]:
    """(ours, naive): `respond --responses k` on n Vicuna questions against create_completion per answer."""
    import tempfile
    from dataclasses import replace

    import magpie_local.api as api
    from magpie_local.api import chat_format
    from magpie_local.generate import GenerateSettings
    from magpie_local.llama_lib import llama_cpp
    from magpie_local.models import resolve_model
    from magpie_local.respond import RespondSettings, default_sampling

    questions = [json.loads(line)["text"] for line in QUESTIONS.read_text().splitlines()[:n]]
    sampling = replace(default_sampling(k), max_tokens=max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "q.jsonl"
        src.write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
        db = Path(tmp) / "bench.db"
        run = api.import_file(db, src).run
        api.respond(db, run.id, RespondSettings(responses=1, sampling=replace(sampling, max_tokens=1)), new=True)
        start = time.perf_counter()  # the copy is made and the model loaded once, above
        done = api.respond(db, run.id, RespondSettings(responses=k, sampling=sampling))
        ours = {"seconds": time.perf_counter() - start, "answers": n * k, "tokens": done.tokens}
    m = resolve_model(None)
    fmt = chat_format(m, GenerateSettings())
    llm = llama_cpp().Llama(str(model_path(default_copy())), n_ctx=1024, verbose=False)
    start, tokens = time.perf_counter(), 0
    for q in questions:
        for seed in range(k):
            out = llm.create_completion(fmt.response_prompt(q), max_tokens=max_tokens, temperature=sampling.temperature,
                                        top_p=sampling.top_p, repeat_penalty=sampling.repeat_penalty, seed=seed,
                                        stop=list(fmt.stops))
            tokens += out["usage"]["completion_tokens"]
    naive = {"seconds": time.perf_counter() - start, "answers": n * k, "tokens": tokens}
    return ours, naive


GOLD = {"generic": {"Advice seeking"}, "knowledge": {"Information seeking"}, "roleplay": {"Role playing"},
        "coding": {"Coding & Debugging"}, "math": {"Math"}, "fermi": {"Reasoning", "Math"},
        "writing": {"Creative writing", "Editing"}}


def tag_accuracy(kind: str) -> dict[str, tuple[float, float]]:
    """{method: (task-category accuracy on the mapped Vicuna questions, seconds)}."""
    from magpie_local import tagging
    from magpie_local.api import chat_format
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.generate import GenerateSettings
    from magpie_local.models import resolve_model

    questions = [q for q in map(json.loads, QUESTIONS.read_text().splitlines()) if q["category"] in GOLD]
    m = resolve_model(str(model_path(None if kind == "file" else kind)))
    fmt = chat_format(m, GenerateSettings())
    out = {}
    with LlamaCppBackend(m.path, ctx=1024, parallel=8) as be:
        start = time.perf_counter()
        answers = be.complete([tagging.judge_request(fmt, q["text"]) for q in questions])
        grammar = [tagging.parse(a.text).task_category for a in answers]
        out["grammar"] = (grammar, time.perf_counter() - start)
        letters = tagging.letter_ids(be)
        ask = lambda text: (be.tokenize(tagging.closed_prompts(fmt, text)["task_category"]), letters)  # noqa: E731
        start = time.perf_counter()
        lps = be.choice_logprobs([ask(q["text"]) for q in questions] + [ask(tagging.CONTENT_FREE)])
        seconds = time.perf_counter() - start
        *lps, baseline = lps
        out["closed, uncalibrated"] = ([tagging.CATEGORIES[int(np.argmax(lp))] for lp in lps], seconds)
        out["likelihood (calibrated)"] = ([tagging.CATEGORIES[int(np.argmax(lp - baseline))] for lp in lps], seconds)
    return {k: (float(np.mean([p in GOLD[q["category"]] for p, q in zip(pred, questions)])), sec, len(questions))
            for k, (pred, sec) in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--kinds", default="file,bf16,f16")
    p.add_argument("--questions", type=int, default=8)
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"benchmark data not found: {DATA} (the ../shared folder beside the checkout)")
    items = sanity_set(args.samples)
    print(f"\nJudge accuracy, default model as judge, {args.samples} Alpaca samples (alpaca_cherry_5pct.json), "
          f"built-in rubric; {build_info()}")
    print(f"{'weights':<10}{'vs other answer':>17}{'vs half answer':>16}{'score mass':>12}{'ratings/s':>11}"
          f"{'prompt tok/s':>14}")
    rows = {}
    for kind in args.kinds.split(","):
        r = rate_all(kind, items)
        rows[kind] = r
        s = r["scores"]
        print(f"{kind:<10}{accuracy(s[:, 0], s[:, 1])[0]:>16.1%}{accuracy(s[:, 0], s[:, 2])[0]:>16.1%}"
              f"{r['mass']:>12.3f}{r['ratings'] / r['seconds']:>11.2f}{r['prompt_tokens'] / r['seconds']:>14.0f}")
    print("chance: 50.0%. Accuracy among pairs scored at least m apart (vs other answer; vs half answer):")
    for kind, r in rows.items():
        s = r["scores"]
        cells = []
        for m in MARGINS:
            (a1, n1), (a2, n2) = accuracy(s[:, 0], s[:, 1], m), accuracy(s[:, 0], s[:, 2], m)
            cells.append(f"m={m:g}: {a1:.0%} (n={n1}); {a2:.0%} (n={n2})")
        print(f"  {kind:<8}" + " | ".join(cells))
    default = default_copy() or "file"
    print(f"\nTask category accuracy, {default} weights, Vicuna questions with a known category:")
    for method, (acc, seconds, n) in tag_accuracy(default).items():
        print(f"  {method:<26}{acc:>7.1%} of {n}  ({n / seconds:.2f} questions/s for this field)")
    naive = naive_judge(items)
    ours = rows.get(default) or rows[next(iter(rows))]
    print(f"\nJudging speed, {naive['ratings']} ratings: magpie-local judge ({default}) "
          f"{ours['ratings'] / ours['seconds']:.2f} ratings/s; naive create_completion loop (file, 4 tokens, parsed "
          f"{naive['parsed']}/{naive['ratings']}) {naive['ratings'] / naive['seconds']:.2f} ratings/s: "
          f"{naive['seconds'] / ours['seconds']:.2f}x")
    mine, loop = respond_speed(args.questions, 2, 128)
    print(f"Respond speed, {args.questions} Vicuna questions x 2 answers (<= 128 tokens, default sampling for 2): "
          f"magpie-local respond {mine['answers'] / mine['seconds']:.2f} answers/s "
          f"({mine['tokens'] / mine['seconds']:.0f} tok/s); naive create_completion loop "
          f"{loop['answers'] / loop['seconds']:.2f} answers/s ({loop['tokens'] / loop['seconds']:.0f} tok/s): "
          f"{(mine['tokens'] / mine['seconds']) / (loop['tokens'] / loop['seconds']):.2f}x in tok/s")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"judge-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "judge", "when": stamp, "samples": args.samples,
                               "rows": {k: dict(r, scores=r["scores"].tolist()) for k, r in rows.items()},
                               "naive_judge": naive, "respond": mine, "respond_naive": loop}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
