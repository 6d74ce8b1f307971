"""Choosing and opening a backend for a model: `--backend auto|llamacpp|mlx|server`."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .base import BackendError

BACKENDS = ("auto", "llamacpp", "mlx", "server")


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def pick_backend(choice: str, model, endpoints: tuple[str, ...] | list[str] = ()) -> str:
    """The backend `choice` means for this model: auto is the server backend when endpoints are
    given, MLX for an mlx-lm directory or on Apple Silicon with MLX installed, else llama.cpp."""
    if choice not in BACKENDS:
        raise BackendError(f"unknown backend {choice!r}; choose one of {', '.join(BACKENDS)}")
    if endpoints and choice in ("auto", "server"):
        return "server"
    if endpoints:
        raise BackendError(f"--endpoint is for --backend server, not {choice}")
    if choice == "server":
        raise BackendError("--backend server needs --endpoint URL (an OpenAI-compatible server)")
    if choice == "auto":
        choice = "mlx" if model.kind == "mlx" or (apple_silicon() and mlx_installed()) else "llamacpp"
    if choice == "llamacpp" and model.kind == "mlx":
        raise BackendError(f"{model.path} is an mlx-lm directory; the llama.cpp backend needs a .gguf file "
                           "(use --backend mlx)")
    if choice == "mlx" and not mlx_installed():
        raise BackendError("the MLX backend needs mlx and mlx-lm: run `make install` "
                           "(or pip install 'magpie-local[mlx]')")
    return choice


def backend_key(name: str, served_model: str | None = None) -> dict:
    """The backend's part of a run's config key: llama.cpp runs keep the keys they had before
    other backends existed, so they still resume; other backends make runs of their own, and a
    server's runs one per served model."""
    if name == "server":
        return {"backend": name, "served_model": served_model}
    return {} if name == "llamacpp" else {"backend": name}


def cache_dir() -> Path:
    """Where converted copies of models are kept: $MAGPIE_LOCAL_CACHE or ~/.cache/magpie-local."""
    return Path(os.environ.get("MAGPIE_LOCAL_CACHE", Path.home() / ".cache" / "magpie-local"))


def mlx_cache_dir() -> Path:
    return cache_dir() / "mlx"


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


@dataclass(frozen=True)
class ServerOptions:
    """--endpoint, --api-key-env and --served-model: where and what the server backend asks."""

    endpoints: tuple[str, ...] = ()
    api_key_env: str | None = None
    served_model: str | None = None

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise BackendError(f"--api-key-env {self.api_key_env}: that environment variable is not set")
        return key

    def resolved(self) -> ServerOptions:
        """With the served model named: the one given, or the first that the first endpoint to
        answer lists."""
        if self.served_model or not self.endpoints:
            return self
        from .server import served_models

        for endpoint in self.endpoints:
            try:
                listed = served_models(endpoint, self.api_key())
            except BackendError as e:
                error = e
                continue
            if not listed:
                raise BackendError(f"{endpoint} lists no models; name one with --served-model")
            return replace(self, served_model=listed[0])
        raise error


def capabilities(name: str):
    """The Capabilities of backend `name` (from pick_backend), without loading a model."""
    if name == "server":
        from .server import ServerBackend as cls
    elif name == "mlx":
        from .mlx import MLXBackend as cls
    else:
        from .llamacpp import LlamaCppBackend as cls
    return cls.capabilities


def open_backend(name: str, model, sha256: str, *, ctx: int, parallel: int | None, threads: int | None = None,
                 announce=None, server: ServerOptions | None = None):
    """Load `model` on backend `name` (from pick_backend); for the server backend, `model` is
    the served model's tokenizer and chat template."""
    if name == "server":
        from ..vocab import GGUFVocabFile, HFVocab
        from .server import ServerBackend

        server = (server or ServerOptions()).resolved()
        vocab = (GGUFVocabFile(model.path) if model.kind == "gguf"
                 else HFVocab(model.path / "tokenizer.json", model.bos_token))
        try:
            return ServerBackend(server.endpoints, vocab, served_model=server.served_model,
                                 api_key=server.api_key(), parallel=parallel, announce=announce)
        except BaseException:
            vocab.close()
            raise
    if name == "mlx":
        from .mlx import MLXBackend

        return MLXBackend(mlx_model_dir(model, sha256, announce), ctx=ctx, parallel=parallel)
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(model.path, ctx=ctx, parallel=parallel, threads=threads)
