"""Eval contamination at scale: `curate --against` on 100k pairs against 10k eval prompts (target:
under a minute), beside `curate` without it, and the flagged pairs against a brute-force search.

The pairs: 100k real Alpaca records (../shared, cycled and numbered past the 3,111), imported. The
eval set: 10k prompts, 20 of them real Alpaca instructions of 13+ words (planted: each recurs in
about 32 pairs), the rest seeded sequences of 10-60 words drawn from the data's own vocabulary (they
cost the search what real prompts do, and share no 13 words with the data). The brute force: for
each planted prompt, every pair whose normalised instruction or answer contains one of its 13-word
sequences as a substring.

    python -m tests.bench.contamination [--n 100000] [--prompts 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from .common import build_info
from .diversity import DATA, alpaca_records

TARGET_S = 60


def main() -> None:
    import magpie_local.api as api
    from magpie_local.contamination import NGRAM, words
    from magpie_local.store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=10_000)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA} (../shared)")
    print(f"Eval contamination, {args.n:,} pairs against {args.prompts:,} eval prompts, on {build_info()}")
    records = alpaca_records(args.n)
    rng = random.Random(0)
    real = [r["instruction"] for r in json.loads(DATA.read_text()) if len(words(r["instruction"])) >= NGRAM]
    planted = rng.sample(real, 20)
    vocabulary = sorted({w for r in records[:3111] for w in words(r["output"])})
    prompts = planted + [" ".join(rng.choices(vocabulary, k=rng.randint(10, 60))) + "?"
                         for _ in range(args.prompts - len(planted))]
    with tempfile.TemporaryDirectory() as tmp:
        source, evals, db = Path(tmp) / "data.json", Path(tmp) / "eval.jsonl", Path(tmp) / "bench.db"
        source.write_text(json.dumps(records))
        evals.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        api.import_file(db, source)
        start = time.perf_counter()
        api.curate(db)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        counts = api.curate(db, against=[evals])
        checked = time.perf_counter() - start
        with Store(db) as store:
            turns = store.turns_to_check(None)
            flagged = {t["id"] for t in turns} - {t for t, in store.conn.execute(
                "SELECT turn_id FROM checks WHERE name = 'contamination' AND passed = 1")}
    grams = [[" ".join(w[i:i + NGRAM]) for i in range(len(w) - NGRAM + 1)] for w in map(words, planted)]
    start = time.perf_counter()
    expected = {t["id"] for t in turns
                if any(g in text for text in (" ".join(words(t["instruction"])), " ".join(words(t["response"])))
                       for prompt in grams for g in prompt)}
    brute = time.perf_counter() - start
    print(f"\n| | seconds | pairs flagged |\n|---|---:|---:|\n"
          f"| curate (length, cut_off, repetition, refusal, disclaimer, pii, secrets, duplicate) | {plain:.1f} | - |\n"
          f"| curate --against (the same, and contamination) | {checked:.1f} | {counts['contamination'][1]:,} |\n"
          f"| contamination's own time (the difference) | {checked - plain:.1f} | |\n"
          f"| brute force, the 20 planted prompts only | {brute:.1f} | {len(expected):,} |")
    print(f"\nFlagged pairs = the brute force's: {flagged == expected} ({len(flagged & expected):,} in both, "
          f"{len(flagged - expected)} only flagged, {len(expected - flagged)} missed). "
          f"Target: under {TARGET_S} s: {'met' if checked < TARGET_S else 'MISSED'}.")


if __name__ == "__main__":
    main()
