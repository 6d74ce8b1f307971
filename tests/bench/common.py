"""Shared by the benchmarks: the opt-in fast copy of the default model, made once and cached."""

import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def model_path(kind: str | None) -> Path:
    """The default model (kind None) or its copy in another weight type (`magpie-local models convert`)."""
    from magpie_local.convert import convert_gguf, default_output
    from magpie_local.models import resolve_model

    source = resolve_model(None).path
    if kind is None:
        return source
    folder = RESULTS / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = default_output(source, kind, folder)
    if not path.exists():
        convert_gguf(source, path, kind)
    return path


def default_copy(work: str = "prompt") -> str | None:
    """The weight type of the copy `--weights auto` runs the default model on here for `work`
    ("prompt": score, judge, embed; "step": generate), if any: measured once (tune.py)."""
    from magpie_local.models import resolve_model
    from magpie_local.tune import copy_wanted

    return copy_wanted(resolve_model(None), "auto", work)


def build_info() -> str:
    """The CPU, and llama.cpp's build in short: the instruction sets it was compiled for."""
    from magpie_local.llama_lib import llama_cpp
    from magpie_local.tune import build_features, cpu_model

    features = build_features(llama_cpp().llama_print_system_info().decode())
    return f"{cpu_model()} ({os.cpu_count()} cores); llama.cpp for " + " ".join(features)


def two_pass_ifd(prepared, mean_ce) -> dict:
    """Timed IFD of each prepared sample by a reference's `mean_ce(tokens, start)`, one pass per context."""
    start = time.perf_counter()
    ifd, answer_tokens = [], 0
    for cond, direct, answer, score in prepared:
        if score.skip_reason:
            ifd.append(None)
            continue
        answer_tokens += len(answer)
        ifd.append(mean_ce(cond + answer, len(cond)) / mean_ce(direct + answer, len(direct)))
    return {"seconds": time.perf_counter() - start, "samples": len(prepared), "answer_tokens": answer_tokens,
            "ifd": ifd}
