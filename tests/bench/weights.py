"""Benchmark: the weight-type table (docs/throughput.md, "Weight types").

Each weight type is made here from an F16 copy of the default model with llama.cpp's own quantizer
(the K-quant mixes as `llama-quantize` makes them) and measured in its own process, twice:
  ours    as magpie-local runs it: ggml's tiled K-quant matmul off (llama_lib.py) and weights
          repacked at load only where that stays batch-invariant (backends/llamacpp.py)
  ggml    with llama.cpp's own choices: the tiled K-quant matmul from 8 rows, every repack (only
          for the types where that changes kernels; the others run the same kernels either way)
Per type: file size; scoring speed (IFD of the first N Alpaca samples of ../shared, tokens of
context + 2 x answer a second, best of three); one generation step of 32 rows (tok/s); the log-probability drift
of the answers' tokens and the IFD drift against F16; and whether a sequence's logits stay the same
bits alone, in steps of 5 and 8 rows, and with its prompt split differently (invariant).
Then `--weights auto`'s question for K-quant files: the file against its BF16 copy, both against
the file's exact weights in fp32 (an F32 copy).

    python -m tests.bench.weights [--samples 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np

from ..layouts import TEXT, slot_logits
from .common import RESULTS, build_info, model_path

KINDS = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_nl", "q4_1", "q4_0"]
GGML_DIFFERS = ["q6_k", "q5_k_m", "q4_k_m", "iq4_nl"]  # types with tiled or repacked tensors: ggml's own choices differ
AUTO_QUESTION = ["q4_k_m", "q5_k_m", "q6_k"]  # K-quant files: the file, its BF16 copy, its F32 copy
MAX_LENGTH = 512
LAYOUTS = [(1, [0], 0), (5, [0, 1, 2, 3, 4], 0), (8, list(range(8)), 0), (3, [0, 1], 250)]


def weights(kind: str, source: str = "f16"):
    """The default model in `kind`, made from its `source` copy (cached in tests/bench/results/models)."""
    from magpie_local.convert import convert_gguf

    src = model_path("f16") if source == "f16" else weights(source)
    if kind == source:
        return src
    path = src.parent / f"{src.name.removesuffix('.gguf')}.{kind.upper()}.gguf"
    if not path.exists():
        convert_gguf(src, path, kind)
    return path


def run_config(kind: str, mode: str, source: str, samples: int) -> dict:
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.llama_lib import llama_cpp
    from magpie_local.scoring import IFDScorer

    from .scoring import _pairs

    path = weights(kind, source)
    llama_cpp()
    assert os.environ["GGML_CPU_TILED_MM"] == ("1" if mode == "ggml" else "0")
    repack = True if mode == "ggml" else None
    with LlamaCppBackend(path, ctx=512, parallel=32, repack=repack) as be:
        step = be.step_rate(be.tokenize(TEXT), 32, 20)
        layouts = [slot_logits(be, slot_ids, cached, steps=4) for _, slot_ids, cached in LAYOUTS]
    with LlamaCppBackend(path, ctx=64, repack=repack) as be:
        scorer = IFDScorer(be, "alpaca", max_length=MAX_LENGTH)
        prepared = [scorer.prepare(p) for p in _pairs(samples)]
        todo = [(c, d, a) for c, d, a, s in prepared if s.skip_reason is None]
        seconds = float("inf")
        for _ in range(3):  # best of three: this shared 2-core machine varies from run to run
            start = time.perf_counter()
            cond = be.token_logprobs([(c + a, len(c)) for c, d, a in todo])
            direct = be.token_logprobs([(d + a, len(d)) for c, d, a in todo])
            seconds = min(seconds, time.perf_counter() - start)
    tokens = sum(len(c) + 2 * len(a) for c, d, a in todo)
    return {"kind": kind, "mode": mode, "source": source, "size_mib": path.stat().st_size / 2**20,
            "score_tok_s": tokens / seconds, "step_tok_s": step,
            "invariant": all(np.array_equal(layouts[0], other) for other in layouts[1:]),
            "logprobs": [lp.tolist() for lp in cond],
            "ifd": [float(np.mean(c) / np.mean(d)) for c, d in zip(cond, direct)]}


def _drift(a: dict, b: dict) -> tuple[float, float, float, float]:
    lp = np.abs(np.concatenate([np.subtract(x, y) for x, y in zip(a["logprobs"], b["logprobs"])]))
    ifd = np.abs(np.subtract(a["ifd"], b["ifd"]))
    return float(lp.mean()), float(lp.max()), float(ifd.mean()), float(ifd.max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        kind, mode, source = args.config.split(":")
        print(json.dumps(run_config(kind, mode, source, args.samples)))
        return
    from .scoring import DATA

    if not DATA.exists():
        sys.exit(f"benchmark data not found: {DATA} (the ../shared folder beside the checkout)")
    configs = [(kind, mode, "f16") for kind in KINDS for mode in ("ours", "ggml")
               if mode == "ours" or kind in GGML_DIFFERS]
    configs += [(kind, "ours", src) for src in AUTO_QUESTION for kind in (src, "bf16", "f32") if kind != src]
    for kind, _, source in configs:
        weights(source)
        weights(kind, source)  # made once, outside the timed runs
    rows = {}
    for kind, mode, source in configs:
        env = {**os.environ, "GGML_CPU_TILED_MM": "1" if mode == "ggml" else "0"}  # read as llama.cpp loads
        proc = subprocess.run([sys.executable, "-m", "tests.bench.weights", "--samples", str(args.samples),
                               "--config", f"{kind}:{mode}:{source}"], capture_output=True, text=True, check=True,
                              env=env)
        rows[(kind, mode, source)] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"\nWeight types of the default model (made from its F16 copy), {args.samples} Alpaca samples; "
          f"{build_info()}")
    print(f"{'type':<8}{'size':>9}  {'score tok/s':>17}  {'32-row step tok/s':>17}  {'log-prob drift':>15}  "
          f"{'IFD drift':>13}  {'invariant':>11}")
    print(f"{'':<8}{'MiB':>9}  {'ours / ggml':>17}  {'ours / ggml':>17}  {'vs F16 mean/max':>15}  "
          f"{'mean/max':>13}  {'ours / ggml':>11}")
    f16 = rows[("f16", "ours", "f16")]
    yes = lambda r: "yes" if r["invariant"] else "NO"  # noqa: E731
    for kind in KINDS:
        ours = rows[(kind, "ours", "f16")]
        ggml = rows.get((kind, "ggml", "f16"), ours)  # the same kernels where nothing is tiled or repacked
        d = _drift(ours, f16)
        print(f"{kind.upper():<8}{ours['size_mib']:>9.1f}  {ours['score_tok_s']:>8.0f} / {ggml['score_tok_s']:<6.0f}"
              f"  {ours['step_tok_s']:>8.0f} / {ggml['step_tok_s']:<6.0f}  {d[0]:>7.3f} / {d[1]:<5.2f}"
              f"  {d[2]:>6.4f}/{d[3]:<6.4f}  {yes(ours):>5} / {yes(ggml):<4}")
    print("\n--weights auto for K-quant files: the file or its BF16 copy (drift against the file's exact weights "
          "in fp32, an F32 copy)")
    print(f"{'file':<8}{'run on':<8}{'score tok/s':>12}{'step tok/s':>12}{'log-prob drift':>16}{'IFD drift':>12}")
    for src in AUTO_QUESTION:
        exact = rows[("f32", "ours", src)]
        for kind, label in ((src, "file"), ("bf16", "BF16")):
            r = rows[(kind, "ours", src) if kind != src else (src, "ours", "f16")]
            d = _drift(r, exact)
            print(f"{src.upper():<8}{label:<8}{r['score_tok_s']:>12.0f}{r['step_tok_s']:>12.0f}"
                  f"{d[0]:>9.3f}/{d[1]:<6.2f}{d[2]:>7.4f}/{d[3]:<6.4f}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"weights-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "weights", "when": stamp, "build": build_info(),
                               "rows": [{k: v for k, v in r.items() if k != "logprobs"} for r in rows.values()]},
                              indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
