"""Benchmark: Magpie generation throughput on the default model.

Compares, in one run and on the same prompts and settings:
  naive      one llama-cpp-python `create_completion` call per item (what a plain script does)
  N          magpie-local's batched backend with --parallel N on the model file (--weights file)
  N:f16      the same on an F16 copy of it (--weights f16)
  N:bf16     the same on a BF16 copy of it (--weights bf16). `generate` runs --parallel up to 32
             and, on x86 CPUs, --weights auto: bf16 where llama.cpp has AVX512_BF16, else f16
  hf32       Magpie's own HF engine: transformers `generate`, fp32, 32 items a batch
             (tests/bench/hf.py; the `bench` extra), on the same model file
Each configuration runs in its own subprocess so that its peak RSS is its own.
64 pairs: two of transformers' batches, and enough for magpie-local's slots to refill.
Prints a table and writes JSON to tests/bench/results/.

  N+busy     the default configuration again, with one CPU-bound process (started by the bench)
             beside it: how much of its idle throughput generate keeps on a busy machine
The default configuration's row also gives the 32-row step rate `doctor` measures on the same
weights in the same process, the end-to-end rate's share of it, and where its time went.

  README     README.md's main command (`generate -n 50`) as a user runs it: its peak RSS

    python -m tests.bench.generation [--pairs 64] [--parallel 32,32:f16,16:bf16,32:bf16] [--no-busy] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from magpie_local.tune import ROWS, step_tok_s

from .common import RESULTS, build_info, default_copy, model_path

INSTRUCTION_MAX, RESPONSE_MAX = 64, 128


def _requests(n: int, kind: str | None = None):
    from magpie_local.backends.base import Request, Sampling
    from magpie_local.generate import GenerateSettings, chat_format, item_seed
    from magpie_local.models import resolve_model

    model = resolve_model(str(model_path(kind)))
    fmt = chat_format(model, GenerateSettings())
    inst = [Request(fmt.instruction_prompt(), Sampling(1.0, 1.0, max_tokens=INSTRUCTION_MAX),
                    item_seed(0, i, "instruction"), tuple(fmt.stops), stop_at_control=True)
            for i in range(n)]
    return model, fmt, inst, lambda q, i: Request(fmt.response_prompt(q), Sampling(0.0, 1.0, max_tokens=RESPONSE_MAX),
                                                 item_seed(0, i, "response"), tuple(fmt.stops))


def run_naive(n: int) -> dict:
    import llama_cpp

    model, fmt, inst, response = _requests(n)
    llm = llama_cpp.Llama(str(model.path), n_ctx=1024, verbose=False)
    tokens = 0
    start = time.perf_counter()
    for i, req in enumerate(inst):
        s = req.sampling
        out = llm.create_completion(req.prompt, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                    top_k=0, min_p=0.0, seed=req.seed, stop=list(req.stop))
        tokens += out["usage"]["completion_tokens"]
        q = out["choices"][0]["text"].strip() or "Hello"
        r = response(q, i)
        out = llm.create_completion(r.prompt, max_tokens=RESPONSE_MAX, temperature=0.0, top_k=0, min_p=0.0,
                                    seed=r.seed, stop=list(r.stop))
        tokens += out["usage"]["completion_tokens"]
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "pairs": n}


def run_ours(n: int, parallel: int, kind: str | None = None) -> dict:
    """What `generate -n N --parallel P` does (the same Magpie jobs, committed to a temporary DB)."""
    import tempfile

    from magpie_local.backends.base import Sampling
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.generate import GenerateSettings, Generation
    from magpie_local.store import Store

    model, fmt, _, _ = _requests(n, kind)
    settings = GenerateSettings(instruction=Sampling(1.0, 1.0, max_tokens=INSTRUCTION_MAX),
                                response=Sampling(0.0, 1.0, max_tokens=RESPONSE_MAX))
    with tempfile.TemporaryDirectory() as tmp, LlamaCppBackend(model.path, ctx=1024, parallel=parallel) as backend:
        store = Store(Path(tmp) / "bench.db")
        run = store.create_run(kind="generate", target=n, config_key="bench", config={}, model={},
                               backend=backend.name, versions={})
        start = time.perf_counter()
        counts = Generation(store, run, backend, fmt, settings, batch_size=16).run_until_target()
        seconds = time.perf_counter() - start
        tokens = store.conn.execute("SELECT sum(completion_tokens) FROM batches").fetchone()[0]
        store.close()
        phases, lanes = dict(backend.seconds), len(backend._lanes)
        step = step_tok_s(backend) if backend.parallel >= ROWS else None  # doctor's figure, in this process
    return {"seconds": seconds, "tokens": tokens, "pairs": counts["kept"], "phases": phases, "lanes": lanes,
            "step_tok_s": step}


# README.md's main command, its peak RSS before the KV cache took memory only where its cells
# are written (patches/ggml-cpu-clear-pages.patch): measured 2026-12-06 on the 2-core Intel Xeon.
README_RSS_BEFORE = "1,154 MiB (2026-12-06, Intel Xeon, llama.cpp clearing the whole cache)"


def readme_command() -> dict:
    """README.md's main command (`generate --db DB -n 50`) as a user runs it, in a child of a fresh
    process so that its peak RSS is its own: seconds, generated tokens, peak RSS."""
    import sqlite3
    import tempfile

    timed = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "magpie.db"
        out = subprocess.run([sys.executable, "-c", timed, sys.executable, "-m", "magpie_local", "generate",
                              "--db", str(db), "-n", "50"], capture_output=True, text=True, check=True)
        seconds, rss_kib = out.stdout.split()
        with sqlite3.connect(db) as conn:
            tokens = conn.execute("SELECT sum(completion_tokens) FROM batches").fetchone()[0]
    return {"seconds": float(seconds), "tokens": tokens, "peak_rss_mib": int(rss_kib) / 1024}


def _hog() -> subprocess.Popen:
    """One CPU-bound process: what a laptop's other work looks like to llama.cpp."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _child(args) -> None:
    parallel, _, kind = args.config.partition(":")
    if args.config == "hf32":
        from .hf import magpie_generate

        _, fmt, _, response = _requests(args.pairs)
        result = magpie_generate(fmt.instruction_prompt(), lambda q: fmt.response_prompt(q), args.pairs, 32,
                                 INSTRUCTION_MAX, RESPONSE_MAX)
    else:
        result = run_naive(args.pairs) if args.config == "naive" else \
            run_ours(args.pairs, int(parallel), kind or None)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--parallel", default="32,32:f16,16:bf16,32:bf16")
    p.add_argument("--busy", action=argparse.BooleanOptionalAction, default=True,
                   help="run the default once more with a CPU-bound process beside it")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True,
                   help="run README.md's main command too, for its peak RSS")
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.config:
        return _child(args)
    configs = ["naive", "hf32", *args.parallel.split(",")]
    for kind in {c.partition(":")[2] for c in configs} - {""}:
        model_path(kind)  # made once, outside the timed runs
    default = f"32:{default_copy('step') or ''}".rstrip(":")  # what `generate` runs here: --parallel 32, --weights auto
    if args.busy:
        configs.append(f"{default}+busy")  # the default again, with a CPU hog started beside it
    rows = []
    for config in configs:
        hog = _hog() if config.endswith("+busy") else None
        try:
            proc = subprocess.run([sys.executable, "-m", "tests.bench.generation", "--pairs", str(args.pairs),
                                   "--config", config.removesuffix("+busy")], capture_output=True, text=True,
                                  check=True)
        finally:
            if hog:
                hog.kill()
                hog.wait()
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        parallel, _, kind = config.removesuffix("+busy").partition(":")
        r["config"] = {"naive": "naive create_completion", "hf32": "HF transformers generate, batch 32"}.get(
            config, f"magpie-local --parallel {parallel}" + (f", {kind.upper()} copy" if kind else ", file")
            + (" (default)" if config == default else "") + (", 1 CPU hog beside" if hog else ""))
        r["key"] = config
        r["tok_s"] = r["tokens"] / r["seconds"]
        r["pairs_s"] = r["pairs"] / r["seconds"]
        rows.append(r)
        print(f"  {r['config']:<28} done", file=sys.stderr)
    base, hf = rows[0]["tok_s"], rows[1]["tok_s"]
    print(f"\nMagpie generation, default model, {args.pairs} pairs "
          f"(instruction <= {INSTRUCTION_MAX}, response <= {RESPONSE_MAX} tokens); {build_info()}")
    print(f"{'configuration':<50}{'pairs/s':>9}{'gen tok/s':>11}{'vs naive':>10}{'vs HF':>8}{'peak RSS':>11}")
    for r in rows:
        print(f"{r['config']:<50}{r['pairs_s']:>9.3f}{r['tok_s']:>11.1f}{r['tok_s'] / base:>9.2f}x"
              f"{r['tok_s'] / hf:>7.2f}x{r['peak_rss_mib']:>8.0f} MiB")
    print("targets (issue #36): at least 5x naive and 3x HF batch 32")
    ours = {r["key"]: r for r in rows}
    if default in ours:
        d = ours[default]
        share = d["tok_s"] / d["step_tok_s"]
        lane_seconds = d["seconds"] * d["lanes"]  # the lanes run side by side, each on its own thread
        other = lane_seconds - sum(d["phases"].values())
        print(f"\ndefault: {d['tok_s']:.1f} generated tok/s end to end = {share:.0%} of the 32-row step rate "
              f"doctor measures on these weights ({d['step_tok_s']:.0f} tok/s; target >= 60%)")
        print(f"  where each of its {d['lanes']} lanes' time went: " + ", ".join(
            f"{name} {seconds / lane_seconds:.0%}"
            for name, seconds in [*d["phases"].items(), ("Python, SQLite, waiting, the rest", other)]))
    if f"{default}+busy" in ours and default in ours:
        busy = ours[f"{default}+busy"]
        print(f"busy machine: {busy['tok_s']:.1f} tok/s with one CPU hog beside it = "
              f"{busy['tok_s'] / ours[default]['tok_s']:.0%} of idle (target >= 40%; fair share 50%)")
    readme = None
    if args.readme:
        readme = readme_command()
        print(f"README command (generate -n 50): {readme['tokens']} tokens in {readme['seconds']:.1f} s, "
              f"{readme['tokens'] / readme['seconds']:.1f} tok/s; peak RSS {readme['peak_rss_mib']:.0f} MiB "
              f"(target <= 800 MiB; before: {README_RSS_BEFORE})")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"generation-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "generation", "when": stamp, "machine": platform.platform(),
                               "pairs": args.pairs, "rows": rows, "readme_command": readme}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
