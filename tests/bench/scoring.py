"""Benchmark: IFD scoring throughput on the default model, against the naive reference way.

  naive   one sample at a time, two full passes (conditional and direct) with logits for every
          position over the full vocabulary, log-softmax in numpy: how the Cherry LLM reference
          computes IFD, here on llama-cpp-python's high-level API
  ours    magpie-local's scorer (logits only where an answer token is predicted) on the Q4_1 file
          itself (`score --weights file`)
  f16     the same on an F16 copy of it (`--weights f16`), with its IFD drift
  bf16    the same on a BF16 copy (`--weights bf16`), with its IFD drift. `score --weights auto`
          takes bf16 on x86 CPUs where llama.cpp has AVX512_BF16, else f16
  hf     the Cherry LLM reference algorithm in HF transformers, fp32 (tests/bench/hf.py; the
         `bench` extra), on the same model file and token spans

Both use the Alpaca prompt format, max length 512, the same samples: the first N of
../shared/data/alpaca_cherry_5pct.json. Each runs in its own process (peak RSS is its own).

    python -m tests.bench.scoring [--samples 60]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .common import RESULTS, build_info, default_copy, model_path, two_pass_ifd

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca_cherry_5pct.json"
MAX_LENGTH = 512


def _pairs(n: int):
    from magpie_local.scoring import Pair

    return [Pair(r["instruction"], r["output"], r.get("input", "")) for r in json.loads(DATA.read_text())[:n]]


def run_ours(n: int, kind: str | None = None) -> dict:
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.scoring import IFDScorer

    pairs = _pairs(n)
    with LlamaCppBackend(model_path(kind), ctx=64) as backend:
        scorer = IFDScorer(backend, "alpaca", max_length=MAX_LENGTH)
        start = time.perf_counter()
        scores = scorer.score(pairs)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": n, "answer_tokens": sum(s.answer_tokens for s in scores),
            "ifd": [s.ifd for s in scores]}


def _prepared(n: int):
    """Each sample's token spans as magpie-local's scorer makes them, so every configuration's IFDs compare."""
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.models import resolve_model
    from magpie_local.scoring import IFDScorer

    with LlamaCppBackend(resolve_model(None).path, ctx=64) as tok:
        return [IFDScorer(tok, "alpaca", max_length=MAX_LENGTH).prepare(p) for p in _pairs(n)]


def run_naive(n: int) -> dict:
    import llama_cpp
    import numpy as np

    from magpie_local.models import resolve_model

    path = resolve_model(None).path
    prepared = _prepared(n)
    llm = llama_cpp.Llama(str(path), n_ctx=MAX_LENGTH + 8, logits_all=True, verbose=False, flash_attn=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def mean_ce(tokens, start):
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        return -np.mean([logp[p - 1, tokens[p]] for p in range(start, len(tokens))])

    return two_pass_ifd(prepared, mean_ce)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        if args.config == "hf":
            from .hf import ifd_cherry

            result = ifd_cherry(_prepared(args.samples))
        else:
            result = run_naive(args.samples) if args.config == "naive" else \
                run_ours(args.samples, None if args.config == "ours" else args.config)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if not DATA.exists():
        sys.exit(f"benchmark data not found: {DATA} (the ../shared folder beside the checkout)")
    rows = {}
    copies = ("f16", "bf16")
    for kind in copies:
        model_path(kind)  # made once, outside the timed runs
    default = default_copy() or "ours"
    for config in ("hf", "naive", "ours", *copies):
        proc = subprocess.run([sys.executable, "-m", "tests.bench.scoring", "--samples", str(args.samples),
                               "--config", config], capture_output=True, text=True, check=True)
        rows[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    hf, naive, ours = rows["hf"], rows["naive"], rows["ours"]
    agree = [abs(a - b) / abs(b) for a, b in zip(ours["ifd"], naive["ifd"]) if a is not None and b is not None]
    top = max(1, len(agree) // 10)
    rank = lambda r: set(sorted((i for i, v in enumerate(r["ifd"]) if v is not None and v <= 1),  # noqa: E731
                                key=lambda i: -r["ifd"][i])[:top])
    print(f"\nIFD scoring, default model, first {args.samples} samples of alpaca_cherry_5pct.json "
          f"(alpaca prompt, max length {MAX_LENGTH}); {build_info()}")
    print(f"{'configuration':<46}{'samples/s':>10}{'answer tok/s':>14}{'vs naive':>10}{'vs HF':>8}{'peak RSS':>11}")
    names = {"hf": "Cherry reference: HF transformers fp32", "naive": "naive: 2 full passes, full-vocab logits",
             "ours": "magpie-local score --weights file", "f16": "magpie-local score, F16 copy",
             "bf16": "magpie-local score, BF16 copy"}
    for config, r in rows.items():
        name = names[config] + (" (default)" if config == default else "")
        print(f"{name:<46}{r['samples'] / r['seconds']:>10.3f}{r['answer_tokens'] / r['seconds']:>14.1f}"
              f"{naive['seconds'] / r['seconds']:>9.2f}x{hf['seconds'] / r['seconds']:>7.2f}x"
              f"{r['peak_rss_mib']:>8.0f} MiB")
    print("target (issue #36): at least 2x HF for magpie-local score as it runs by default (--weights auto; "
          "issue #9 asked 1.5x)")
    print(f"IFD agreement, file vs naive: max relative difference {max(agree):.2e}; "
          f"top 10% ({top} samples) identical: {rank(ours) == rank(naive)}")
    print("top 10% vs the HF reference: " + ", ".join(f"{config} {len(rank(rows[config]) & rank(hf))}/{top}"
                                                      for config in ("ours", *copies)))
    for kind in copies:
        for base, label in (("ours", "the shipped Q4_1"), ("hf", "HF fp32")):
            drift = [abs(a - b) for a, b in zip(rows[kind]["ifd"], rows[base]["ifd"])
                     if a is not None and b is not None]
            print(f"{kind.upper()} copy vs {label}: IFD mean abs difference {sum(drift) / len(drift):.4f}, "
                  f"max {max(drift):.4f}; top 10% overlap {len(rank(rows[kind]) & rank(rows[base]))}/{top}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"scoring-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "scoring", "when": stamp, "samples": args.samples, **rows}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
