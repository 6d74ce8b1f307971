"""The backend registry: which engines exist, what each can do, and choosing one for a model
(`--backend auto|llamacpp|mlx|server`).

Every backend declares its Capabilities and, read without loading anything, which models it
refuses and why (`refuses`). Callers ask for a backend by what they need and check capabilities;
no module outside this package names a backend. A new backend is a class in this package (on
BackendBase) and one entry in BACKENDS.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from .base import BackendError, Capabilities
from .options import ServerOptions

# name (the --backend value) -> the module and class that implement it, in the order `auto`
# tries local backends off Apple Silicon (on it, MLX comes first: mlx_preferred).
BACKENDS = {"llamacpp": ".llamacpp:LlamaCppBackend", "mlx": ".mlx:MLXBackend", "server": ".server:ServerBackend"}
CHOICES = ("auto", *BACKENDS)


def backend_class(name: str) -> type:
    """The class of backend `name`, imported on first use (MLX and httpx load only where used)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module, __name__), cls)


def capabilities(name: str) -> Capabilities:
    """The Capabilities of backend `name`, without loading a model."""
    return backend_class(name).capabilities


def title(name: str) -> str:
    """How users know backend `name`: llama.cpp, MLX, server."""
    return backend_class(name).title


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def local_order() -> list[str]:
    """Local backends in the order `auto` tries them: MLX first on Apple Silicon with MLX installed."""
    local = [n for n in BACKENDS if capabilities(n).local]
    if apple_silicon() and mlx_installed():
        local.sort(key=lambda n: n != "mlx")
    return local


@dataclass(frozen=True)
class Choice:
    """The backend that runs a model, and why auto took it (None when it was asked for by name)."""

    name: str
    why: str | None = None


def remote(choice: str, endpoints: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether `choice` with these endpoints means a backend that runs somewhere else (a server)."""
    return bool(endpoints) or (choice in BACKENDS and not capabilities(choice).local)


def choose_backend(choice: str, model, endpoints: tuple[str, ...] | list[str] = (), *,
                   needs: str | None = None) -> Choice:
    """The backend `choice` means for `model`: auto is the server backend when endpoints are given,
    else the first local backend (local_order) that has the capability `needs` and does not refuse
    the model, with the reasons the ones before it were passed over. A backend named explicitly
    that refuses the model, or lacks `needs`, is an error that says why and what to use instead."""
    if choice not in CHOICES:
        raise BackendError(f"unknown backend {choice!r}; choose one of {', '.join(CHOICES)}")
    remote = [n for n in BACKENDS if not capabilities(n).local]
    if endpoints:
        if choice != "auto" and choice not in remote:
            raise BackendError(f"--endpoint is for --backend {remote[0]}, not {choice}")
        return Choice(remote[0] if choice == "auto" else choice)
    if choice in remote:
        raise BackendError(f"--backend {choice} needs --endpoint URL (an OpenAI-compatible server)")
    able = [n for n in local_order() if needs is None or getattr(capabilities(n), needs)]
    if choice == "auto":
        passed, why = [], f"no local backend can do {needs}"
        for name in able:
            why = backend_class(name).refuses(model)
            if why is None and (name == able[-1] or (why := backend_class(name).avoids(model)) is None):
                return Choice(name, "; ".join(passed) or None)
            passed.append(f"not {title(name)}: {why}")
        raise BackendError(why)  # the last one tried: the engine made for this kind of model
    if needs is not None and choice not in able:
        names = " or ".join(f"the {title(n)} backend" for n in able)
        raise BackendError(f"--backend {choice} cannot do {needs.replace('_', ' ')}; that needs {names} "
                           f"(--backend {able[0]})")
    why = backend_class(choice).refuses(model)
    if why is not None:
        others = [n for n in able if n != choice and backend_class(n).refuses(model) is None]
        raise BackendError(why + (f" (--backend {others[0]} runs it)" if others else ""))
    return Choice(choice)


def pick_backend(choice: str, model, endpoints: tuple[str, ...] | list[str] = ()) -> str:
    """The name of the backend `choice` means for this model (see choose_backend)."""
    return choose_backend(choice, model, endpoints).name


def backend_key(name: str, served_model: str | None = None) -> dict:
    """The backend's part of a run's config key: llama.cpp runs keep the keys they had before
    other backends existed, so they still resume; other backends make runs of their own, and a
    server's runs one per served model."""
    if not capabilities(name).local:
        return {"backend": name, "served_model": served_model}
    return {} if name == next(iter(BACKENDS)) else {"backend": name}


def cache_dir() -> Path:
    """Where converted copies of models are kept: $MAGPIE_LOCAL_CACHE or ~/.cache/magpie-local."""
    return Path(os.environ.get("MAGPIE_LOCAL_CACHE", Path.home() / ".cache" / "magpie-local"))


def open_backend(name: str, model, sha256: str, *, ctx: int, parallel: int | None, threads: int | None = None,
                 announce=None, server: ServerOptions | None = None):
    """Load `model` on backend `name` (from choose_backend); for a remote backend, `model` is the
    served model's tokenizer and chat template."""
    return backend_class(name).open(model, sha256, ctx=ctx, parallel=parallel, threads=threads, announce=announce,
                                    server=server)
