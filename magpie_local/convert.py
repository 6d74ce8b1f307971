"""An opt-in local copy of a model in a weight type that runs faster on this machine.

llama.cpp's speed on a CPU depends heavily on the weight type. On the 2-core x86 machines this
project is built on, the default model's Q4_1 processes prompts at ~280 tok/s and an F16 copy
at ~480 tok/s; F16 holds Q4_1's weights exactly, so the copy costs memory, not quality (the
log-probabilities move by ~0.04 nats, from llama.cpp quantizing activations for Q4_1 matmuls).
Q4_0 is as fast but requantizing Q4_1 to it loses each block's offset: ~0.6 nats of drift.
`models convert` writes such a copy with llama.cpp's own quantizer; `make bench` measures both
the speed and the drift.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16"}


class ConvertError(RuntimeError):
    pass


def default_output(source: Path, kind: str, folder: Path) -> Path:
    stem = source.name.removesuffix(".gguf")
    for suffix in (".Q4_1", ".Q4_0", ".Q8_0", ".F16", ".q4_1", ".q4_0", ".q8_0", ".f16"):
        stem = stem.removesuffix(suffix)
    return folder / f"{stem}.{kind.upper()}.gguf"


def convert_gguf(source: Path, output: Path, kind: str, threads: int | None = None) -> None:
    """Write `source` with every tensor in type `kind` at `output`, atomically."""
    from .backends.llamacpp import _import_llama_cpp, _silence_logs

    lc = _import_llama_cpp()
    _silence_logs(lc)
    if kind not in TYPES:
        raise ConvertError(f"unknown type {kind!r}; choose one of {', '.join(TYPES)}")
    if output.resolve() == source.resolve():
        raise ConvertError("the output would overwrite the source model")
    if not output.parent.is_dir():
        raise ConvertError(f"directory {output.parent} does not exist")
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, TYPES[kind])
    params.allow_requantize = True  # the source is usually quantized already
    params.pure = True  # every tensor in the one type asked for
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
