"""Benchmark: how much of what `generate` makes is worth training on, per decoding configuration.

Each configuration generates --pairs kept pairs from the default model into a fresh database
(through the Python API, with the default --weights auto and --parallel) and is measured by:
  attempted   items started (kept + dropped at generation)
  usable      kept pairs that pass every `curate` check (length, cut_off, repetition, refusal,
              duplicate), as a share of attempted items, and per minute of wall time
  distinct-2  distinct word bigrams / all bigrams over the kept instructions (diversity)
  near-dup    share of kept instructions within cosine 0.95 of an earlier one (the embedding
              check of `curate --near-dup-model default`)
  IFD         median and share > 1 over the usable pairs (chat format, the default model)
`magpie` is the paper's settings (the default before the sweep); `default` is today's default.
The table goes to stdout and JSON to tests/bench/results/.

    python -m tests.bench.quality [--pairs 40] [--configs magpie,default,...] [--no-ifd]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .common import RESULTS, build_info


def configs():
    """name -> (instruction Sampling, response Sampling, passing): the sweep."""
    from magpie_local.generate import PRESETS

    inst, resp = PRESETS["magpie"]
    rep = replace(resp, repeat_penalty=1.1)
    dry = replace(resp, dry_multiplier=0.8)
    both = replace(resp, repeat_penalty=1.1, dry_multiplier=0.8)
    loops = replace(both, stop_loops=True)
    return {
        "magpie": (inst, resp, ()),
        "rep1.1": (inst, rep, ()),
        "rep1.2": (inst, replace(resp, repeat_penalty=1.2), ()),
        "dry0.8": (inst, dry, ()),
        "rep+dry": (inst, both, ()),
        "rep+dry+loops": (inst, loops, ()),
        "rep+dry+loops/384": (inst, replace(loops, max_tokens=384), ()),
        "minp-inst+rep+dry+loops": (replace(inst, min_p=0.05), loops, ()),
        "minp.02-inst+rep+dry+loops": (replace(inst, min_p=0.02), loops, ()),
        "topp.98-inst+rep+dry+loops": (replace(inst, top_p=0.98), loops, ()),
        "t0.9-inst+rep+dry+loops": (replace(inst, temperature=0.9), loops, ()),
        "inst192+rep+dry+loops": (replace(inst, max_tokens=192), loops, ()),
        "inst-loops+rep+dry+loops": (replace(inst, stop_loops=True), loops, ()),
        "t0.7-resp+rep+dry+loops": (inst, replace(loops, temperature=0.7, min_p=0.05), ()),
        "default": (*PRESETS["default"], ()),  # = topp.98-inst+rep+dry+loops
        "default+passing": (*PRESETS["default"], ("length", "cut_off", "repetition", "refusal")),
    }


def distinct_2(texts: list[str]) -> float:
    grams = [tuple(w[i:i + 2]) for w in (t.lower().split() for t in texts) for i in range(len(w) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def measure(name: str, inst, resp, passing, pairs: int, ifd: bool) -> dict:
    import magpie_local as ml
    from magpie_local.curate import Bounds, check_turn, duplicate_reasons

    settings = ml.GenerateSettings(instruction=inst, response=resp, passing=tuple(passing))
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "q.db"
        started = time.perf_counter()
        result = ml.generate(db, pairs, settings)
        seconds = time.perf_counter() - started
        with ml.Store(db, create=False, write=False) as store:
            turns = store.turns_to_check(None)
            drops = store.drop_reasons(result.run.id)
    firsts = [(t["conversation_id"], t["instruction"]) for t in turns if t["turn_index"] == 0]
    dup = duplicate_reasons(firsts)
    usable = [t for t in turns if not any(check_turn(t, Bounds()).values()) and not dup[t["conversation_id"]]]
    attempted = result.counts["kept"] + result.counts["dropped"]
    instructions = [t["instruction"] for t in turns]
    row = dict(config=name, attempted=attempted, kept=len(turns), usable=len(usable),
               usable_share=len(usable) / attempted, seconds=seconds, usable_per_min=60 * len(usable) / seconds,
               tokens=result.tokens, distinct_2=distinct_2(instructions), near_dup=near_dup_share(instructions),
               cut_off=sum(t["response_finish"] == "length" for t in turns),
               repetition_failed=sum(bool(check_turn(t, Bounds())["repetition"]) for t in turns),
               drops=drops)
    if ifd and usable:
        values = ifd_values(usable)
        row.update(ifd_median=float(np.median(values)), ifd_above_1=float(np.mean(values > 1)))
    row["sample"] = [{"instruction": t["instruction"], "response": t["response"]} for t in usable[:3]]
    return row


def near_dup_share(texts: list[str]) -> float:
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.curate import near_duplicates
    from magpie_local.models import resolve_model

    with LlamaCppBackend(resolve_model(None).path, ctx=64, parallel=1) as backend:
        emb = backend.embed(texts)
    flagged = near_duplicates(list(range(len(texts))), emb, 0.95)
    return sum(v is not None for v in flagged.values()) / max(len(texts), 1)


def ifd_values(turns: list[dict]) -> np.ndarray:
    from magpie_local.backends import open_backend
    from magpie_local.generate import GenerateSettings, chat_format
    from magpie_local.models import resolve_model
    from magpie_local.scoring import IFDScorer, Pair

    m = resolve_model(None)
    with open_backend("llamacpp", m, "", ctx=64, parallel=1) as backend:
        scorer = IFDScorer(backend, "chat", chat_format(m, GenerateSettings()), 512)
        scores = scorer.score([Pair(t["instruction"], t["response"]) for t in turns])
    return np.array([s.ifd for s in scores if s.ifd is not None])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--configs", default=",".join(configs()))
    parser.add_argument("--no-ifd", action="store_true")
    args = parser.parse_args()
    print(f"Generation quality, default model, {args.pairs} kept pairs a configuration; {build_info()}",
          flush=True)
    table = configs()
    rows = []
    header = (f"{'config':<26}{'attempted':>10}{'kept':>6}{'usable':>8}{'usable%':>9}{'usable/min':>11}"
              f"{'distinct-2':>11}{'near-dup':>9}{'IFD med':>8}{'IFD>1':>7}{'cut':>5}{'rep':>5}{'s':>7}")
    print(header, flush=True)
    for name in args.configs.split(","):
        inst, resp, passing = table[name]
        row = measure(name, inst, resp, passing, args.pairs, not args.no_ifd)
        rows.append(row)
        print(f"{name:<26}{row['attempted']:>10}{row['kept']:>6}{row['usable']:>8}{row['usable_share']:>9.0%}"
              f"{row['usable_per_min']:>11.1f}{row['distinct_2']:>11.3f}{row['near_dup']:>9.0%}"
              f"{row.get('ifd_median', float('nan')):>8.3f}{row.get('ifd_above_1', float('nan')):>7.0%}"
              f"{row['cut_off']:>5}{row['repetition_failed']:>5}{row['seconds']:>7.0f}", flush=True)
    by = {r["config"]: r for r in rows}
    if "magpie" in by and "default" in by:
        base, new = by["magpie"], by["default"]
        print(f"default against magpie (the old default): usable {new['usable_share']:.0%} vs "
              f"{base['usable_share']:.0%} of attempted (target >= 70%), usable/min "
              f"{new['usable_per_min'] / base['usable_per_min']:.2f}x (target >= 2.5x), distinct-2 "
              f"{new['distinct_2'] / base['distinct_2'] - 1:+.1%} (target >= -5%)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quality-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps({"build": build_info(), "pairs": args.pairs, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
