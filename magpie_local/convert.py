"""Local copies of a model in a weight type that runs faster on this machine: made on request by
`models convert`, and by `generate` and `score` (`--weights`: a 16-bit copy, by default on x86 CPUs).

llama.cpp's speed on a CPU depends heavily on the weight type. On the 2-core x86 machines this
project is built on (AVX-512 with BF16), scoring the default model's Q4_1 runs at ~290 prompt
tok/s, an F16 copy at ~460 and a BF16 copy at ~790 (its GEMM multiplies bfloat16 pairs in one
instruction); batched generation steps go from ~260 to ~370 and ~560 tok/s. F16 holds Q4_1's
weights exactly; BF16 rounds them to 8 significant bits (llama.cpp's Q4_1 kernels round the
activations to 8 bits anyway): IFDs move by ~0.003 (`make bench` measures speed and drift).
Q4_0 is as fast but requantizing Q4_1 to it loses each block's offset: ~0.6 nats of drift.
"""

from __future__ import annotations

import ctypes
import os
import platform
import tempfile
from pathlib import Path

from .errors import ConvertError
from .gguf import read_gguf
from .llama_lib import llama_cpp

TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16",
         "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "f32": "LLAMA_FTYPE_ALL_F32"}
# The mixes model hubs publish (GGUF-my-repo's default is Q4_K_M): llama.cpp picks each tensor's
# type itself, as `llama-quantize` does (rows too short for a K-quant fall back to Q5_0, Q8_0, ...).
MIXES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
         "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
KINDS = {**TYPES, **MIXES}  # what `models convert --to` makes
COPY_TYPES = ("f16", "bf16")  # what `--weights` runs on besides the file
WEIGHTS = ("auto", "file", *COPY_TYPES)  # `generate --weights`, `score --weights`
# general.file_type of the files `--weights auto` runs on a 16-bit copy: Q4_0, Q4_1 and the K-quant mixes
# (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q2_K_S). Q8_0 and IQ4_NL files step faster as they are.
AUTO_COPY_FILE_TYPES = (2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 18, 21)
AUTO_COPY_MAX_BYTES = 1 << 30  # auto makes 16-bit copies up to this size (the default model's: 258 MiB)


def copy_wanted(model, weights: str) -> str | None:
    """The weight type of the copy `--weights` runs `model` on ("f16", "bf16"), or None for the file.

    auto: for a Q4_0, Q4_1 or K-quant GGUF file on an x86 CPU with llama.cpp computing there, whose
    copy stays under AUTO_COPY_MAX_BYTES: BF16 where llama.cpp was built with AVX512_BF16 (`make
    install` builds for the CPU's own AVX-512 extensions), else F16. There 16-bit rows take
    llama.cpp's GEMM path: prompts score faster, and the copy's log-probabilities stay about 5x
    closer to the file's own weights in fp32 than the file's quantized-activation kernels do
    (measured on the default model; docs/throughput.md, "Weight types"; `make bench`)."""
    if weights == "file" or model.kind != "gguf":
        return None
    if weights in COPY_TYPES:
        return weights
    lc = llama_cpp()
    if (model.gguf.get("general.file_type") in AUTO_COPY_FILE_TYPES
            and platform.machine().lower() in ("x86_64", "amd64")
            and not lc.llama_supports_gpu_offload()
            and 2 * read_gguf(model.path, tensors=True).n_params <= AUTO_COPY_MAX_BYTES):
        return "bf16" if b"AVX512_BF16 = 1" in lc.llama_print_system_info() else "f16"
    return None


def cached_copy(model, sha256: str, kind: str, folder: Path, announce=None) -> Path:
    """A copy of GGUF `model` in weight type `kind`, made once in `folder` (named by its hash)."""
    path = folder / f"{model.name}-{sha256[:12]}.{kind.upper()}.gguf"
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
    params.nthread = threads or os.cpu_count() or 1
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    try:
        rc = lc.llama_model_quantize(str(source).encode(), tmp.encode(), ctypes.byref(params))
        if rc != 0:
            raise ConvertError(f"llama.cpp could not convert {source.name} to {kind} (code {rc})")
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
