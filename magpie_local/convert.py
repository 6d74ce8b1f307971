"""Local copies of a model in another weight type: made on request by `models convert`, and by the
commands that run a model (`--weights`: a copy in F16, BF16 or Q8_0, by default where it measured
faster on this machine: tune.py).

llama.cpp's speed on a CPU depends heavily on the weight type and on the CPU: the default model's
Q4_1 multiplies slowly on x86, and which copy is fastest differs from one CPU family to the next
(docs/throughput.md). F16 holds Q4_1's weights exactly; BF16 rounds them to 8 significant bits
(llama.cpp's Q4_1 kernels round the activations to 8 bits anyway): IFDs move by ~0.003. Q4_0 is
fast but requantizing Q4_1 to it loses each block's offset: ~0.6 nats of drift.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from .cpu import default_threads
from .errors import ConvertError
from .files import temporary_file_beside
from .llama_lib import llama_cpp

TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16",
         "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "f32": "LLAMA_FTYPE_ALL_F32"}
# The mixes model hubs publish (GGUF-my-repo's default is Q4_K_M): llama.cpp picks each tensor's
# type itself, as `llama-quantize` does (rows too short for a K-quant fall back to Q5_0, Q8_0, ...).
MIXES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
         "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
KINDS = {**TYPES, **MIXES}  # what `models convert --to` makes
COPY_TYPES = ("f16", "bf16", "q8_0")  # what `--weights` runs on besides the file
WEIGHTS = ("auto", "file", *COPY_TYPES)  # `generate --weights`, `score --weights`, ...


def copy_path(model, sha256: str, kind: str, folder: Path) -> Path:
    """Where cached_copy keeps `model`'s copy in weight type `kind` (named by the model's hash)."""
    return folder / f"{model.name}-{sha256[:12]}.{kind.upper()}.gguf"


def cached_copy(model, sha256: str, kind: str, folder: Path, announce=None) -> Path:
    """A copy of GGUF `model` in weight type `kind`, made once in `folder`."""
    path = copy_path(model, sha256, kind, folder)
    if not path.is_file():
        if announce:
            announce(f"Making a copy of {model.name} in {kind.upper()} in {folder} (once; --weights file "
                     "skips it) ...")
        folder.mkdir(parents=True, exist_ok=True)
        convert_gguf(model.path, path, kind)
    return path


def default_output(source: Path, kind: str, folder: Path) -> Path:
    stem = source.name.removesuffix(".gguf")
    for kind_in_name in KINDS:  # the source's own weight type, in either case
        stem = stem.removesuffix(f".{kind_in_name.upper()}").removesuffix(f".{kind_in_name}")
    return folder / f"{stem}.{kind.upper()}.gguf"


def convert_gguf(source: Path, output: Path, kind: str, threads: int | None = None) -> None:
    """Write `source` with every tensor in type `kind` (a mix: in llama.cpp's choice of types) at
    `output`, atomically."""
    lc = llama_cpp()
    if kind not in KINDS:
        raise ConvertError(f"unknown type {kind!r}; choose one of {', '.join(KINDS)}")
    if output.resolve() == source.resolve():
        raise ConvertError("the output would overwrite the source model")
    if not output.parent.is_dir():
        raise ConvertError(f"directory {output.parent} does not exist")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, KINDS[kind])
    params.allow_requantize = True  # the source is usually quantized already
    params.pure = kind in TYPES  # every tensor in the one type asked for
    params.nthread = threads or default_threads()
    with temporary_file_beside(output) as tmp:
        rc = lc.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ConvertError(f"llama.cpp could not convert {source.name} to {kind} (code {rc}; "
                               "is the disk full?)")
