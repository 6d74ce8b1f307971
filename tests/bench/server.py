"""Benchmark: Magpie generation through the server backend, one and two local endpoints.

Same command, settings and seeds in each configuration (`magpie-local generate`, the default model):
  local       magpie-local's own llama.cpp backend, --parallel 8 (the reference)
  1 endpoint  one `python -m llama_cpp.server` process on all cores, 4 requests in flight
  2 endpoints two such processes sharing the cores (half the threads each), 4 in flight each
  llama-server  llama.cpp's own server (continuous batching, 4 slots), where $LLAMA_SERVER names
                its binary (built from the sdist's vendor/llama.cpp: see the README)
On one machine the servers share its cores, so two endpoints show that the work is spread,
not a speed-up; on separate machines each endpoint brings its own.

    python -m tests.bench.server [--pairs 24]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..servers import LlamaServer, Server
from .common import RESULTS, model_path

SETTINGS = ["--instruction-max-tokens", "64", "--response-max-tokens", "128", "-q"]


def generate(pairs: int, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "magpie_local", "generate", "-n", str(pairs),
                            "--db", str(Path(tmp) / "bench.db"), *SETTINGS, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"generate failed: {r.stderr.strip()}")
    rate = re.search(r"([\d.]+) pairs/s, ([\d.]+) generated tok/s", r.stdout)
    spread = dict(re.findall(r"(http://\S+): (\d+) requests", r.stdout))
    return {"pairs_per_s": float(rate[1]), "tok_per_s": float(rate[2]), "requests": spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=24)
    args = parser.parse_args()
    model, cores = model_path(None), os.cpu_count() or 2
    results = {"local, --parallel 8": generate(args.pairs, "--parallel", "8")}

    servers = [Server(model, threads=cores).start()]
    try:
        results["1 endpoint"] = generate(args.pairs, "--endpoint", servers[0].url, "--parallel", "4")
    finally:
        servers[0].kill()
    servers = [Server(model, threads=max(1, cores // 2)).start() for _ in range(2)]
    try:
        results["2 endpoints"] = generate(args.pairs, *[a for s in servers for a in ("--endpoint", s.url)],
                                          "--parallel", "4")
    finally:
        for s in servers:
            s.kill()
    if os.environ.get("LLAMA_SERVER"):
        server = LlamaServer(os.environ["LLAMA_SERVER"], model, threads=cores).start()
        try:
            results["llama-server, 4 slots"] = generate(args.pairs, "--endpoint", server.url, "--parallel", "4")
        finally:
            server.kill()

    base = results["local, --parallel 8"]["tok_per_s"]
    print(f"\nMagpie generation through the server backend: {args.pairs} pairs, default model, {cores} cores")
    print(f"{'configuration':24} {'pairs/s':>8} {'gen tok/s':>10} {'vs local':>9}  requests per endpoint")
    for name, r in results.items():
        spread = ", ".join(f"{n}" for n in r["requests"].values()) or "-"
        print(f"{name:24} {r['pairs_per_s']:8.2f} {r['tok_per_s']:10.1f} {r['tok_per_s'] / base:8.2f}x  {spread}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "server.json"
    out.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(), "pairs": args.pairs,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
