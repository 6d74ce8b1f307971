"""Choosing and opening a backend for a model: `--backend mlx|llamacpp|auto`."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

from .base import BackendError

BACKENDS = ("auto", "llamacpp", "mlx")


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def pick_backend(choice: str, model) -> str:
    """The backend `choice` means for this model: auto is MLX for an mlx-lm directory, or on
    Apple Silicon with MLX installed; llama.cpp otherwise."""
    if choice not in BACKENDS:
        raise BackendError(f"unknown backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "auto":
        choice = "mlx" if model.kind == "mlx" or (apple_silicon() and mlx_installed()) else "llamacpp"
    if choice == "llamacpp" and model.kind == "mlx":
        raise BackendError(f"{model.path} is an mlx-lm directory; the llama.cpp backend needs a .gguf file "
                           "(use --backend mlx)")
    if choice == "mlx" and not mlx_installed():
        raise BackendError("the MLX backend needs mlx and mlx-lm: run `make install` "
                           "(or pip install 'magpie-local[mlx]')")
    return choice


def backend_key(name: str) -> dict:
    """The backend's part of a run's config key: llama.cpp runs keep the keys they had before
    other backends existed, so they still resume; other backends make runs of their own."""
    return {} if name == "llamacpp" else {"backend": name}


def mlx_cache_dir() -> Path:
    return Path(os.environ.get("MAGPIE_LOCAL_CACHE", Path.home() / ".cache" / "magpie-local")) / "mlx"


def mlx_model_dir(model, sha256: str, announce=None) -> Path:
    """An mlx-lm directory for `model`: itself, or for a GGUF file a converted copy kept in the
    cache (made once, named by the file's hash)."""
    if model.kind == "mlx":
        return model.path
    from ..gguf_to_mlx import convert_to_mlx

    target = mlx_cache_dir() / f"{model.name}-{sha256[:12]}"
    if not (target / "config.json").is_file():
        if announce:
            announce(f"Converting {model.name} for MLX into {target} (once) ...")
        convert_to_mlx(model.path, target)
    return target


def open_backend(name: str, model, sha256: str, *, ctx: int, parallel: int | None, threads: int | None = None,
                 announce=None):
    """Load `model` on backend `name` (from pick_backend)."""
    if name == "mlx":
        from .mlx import MLXBackend

        return MLXBackend(mlx_model_dir(model, sha256, announce), ctx=ctx, parallel=parallel)
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(model.path, ctx=ctx, parallel=parallel, threads=threads)
