"""The models a user already has: where the tools people download models with keep them, and the
names `--model` takes for them. Nothing is ever downloaded; every place is read as it is.

  default     the embedded SmolLM2-135M-Instruct
  models/     GGUF files and mlx-lm folders under models/ (or $MAGPIE_LOCAL_MODELS)
  hf:         the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub):
              hf:ORG/REPO for an mlx-lm repo, hf:ORG/REPO/FILE.gguf for a GGUF in a repo
  lmstudio:   LM Studio's models folder (~/.lmstudio/models, or where ~/.lmstudio-home-pointer points;
              older versions ~/.cache/lm-studio/models): lmstudio:PUBLISHER/REPO/FILE.gguf or
              lmstudio:PUBLISHER/REPO for an mlx-lm folder
  ollama:     Ollama's store ($OLLAMA_MODELS, ~/.ollama/models, /usr/share/ollama/.ollama/models):
              its manifests name a GGUF blob; ollama:qwen2.5:7b, ollama:USER/MODEL:TAG,
              ollama:hf.co/ORG/REPO:TAG (Ollama's chat API hides the raw template Magpie needs, so
              its models are read here, from the blob, with the chat template the GGUF carries)
  gpt4all:    GPT4All's folder (~/.local/share/nomic.ai/GPT4All, ~/Library/Application
              Support/nomic.ai/GPT4All): gpt4all:FILE.gguf
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class Found:
    """A model found on this machine: the name `--model` takes, where it was found, and its path
    (a GGUF file, possibly an Ollama blob without the extension, or an mlx-lm folder)."""

    name: str
    source: str
    path: Path


def home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def hf_hub() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or home() / ".cache" / "huggingface") / "hub"


def lmstudio_roots() -> list[Path]:
    roots = []
    pointer = home() / ".lmstudio-home-pointer"
    try:
        if pointer.is_file() and pointer.stat().st_size < 4096:
            roots.append(Path(pointer.read_text(encoding="utf-8").strip()) / "models")
    except (OSError, UnicodeDecodeError):
        pass
    return roots + [home() / ".lmstudio" / "models", home() / ".cache" / "lm-studio" / "models"]


def ollama_roots() -> list[Path]:
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"])]
    return [home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def gpt4all_roots() -> list[Path]:
    if sys.platform == "darwin":
        return [home() / "Library" / "Application Support" / "nomic.ai" / "GPT4All"]
    if sys.platform == "win32":
        return [Path(os.environ.get("LOCALAPPDATA", home())) / "nomic.ai" / "GPT4All"]
    return [Path(os.environ.get("XDG_DATA_HOME") or home() / ".local" / "share") / "nomic.ai" / "GPT4All"]


def is_mlx_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _ggufs(folder: Path) -> list[Path]:
    """GGUF files under `folder`, leaving out multimodal projectors (mmproj), which are no chat model."""
    try:
        return sorted(p for p in folder.rglob("*.gguf") if p.is_file() and "mmproj" not in p.name.lower())
    except OSError:
        return []


def hf_cache() -> Iterator[Found]:
    hub = hf_hub()
    if not hub.is_dir():
        return
    for repo in sorted(hub.glob("models--*")):
        snapshot = hf_snapshot(repo)
        if snapshot is None:
            continue
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        if is_mlx_folder(snapshot):
            yield Found(f"hf:{repo_id}", "Hugging Face cache", snapshot)
        for file in _ggufs(snapshot):
            yield Found(f"hf:{repo_id}/{file.relative_to(snapshot).as_posix()}", "Hugging Face cache", file)


def hf_snapshot(repo: Path) -> Path | None:
    """The snapshot refs/main names, else the newest one."""
    ref = repo / "refs" / "main"
    try:
        if ref.is_file():
            snapshot = repo / "snapshots" / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return None
    return snapshots[-1] if snapshots else None


def lmstudio() -> Iterator[Found]:
    seen = set()
    for root in lmstudio_roots():
        if not root.is_dir() or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        for file in _ggufs(root):
            yield Found(f"lmstudio:{file.relative_to(root).as_posix()}", "LM Studio", file)
        for config in sorted(root.glob("*/*/config.json")):
            if is_mlx_folder(config.parent):
                yield Found(f"lmstudio:{config.parent.relative_to(root).as_posix()}", "LM Studio", config.parent)


def ollama() -> Iterator[Found]:
    for root in ollama_roots():
        manifests = root / "manifests"
        if not manifests.is_dir():
            continue
        for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
            blob = ollama_blob(root, manifest)
            if blob is not None:
                yield Found(f"ollama:{ollama_name(manifest.relative_to(manifests))}", "Ollama", blob)


def ollama_name(relative: Path) -> str:
    """registry.ollama.ai/library/qwen2.5/7b -> qwen2.5:7b; registry.ollama.ai/USER/M/T -> USER/M:T;
    hf.co/ORG/REPO/T -> hf.co/ORG/REPO:T (the names `ollama run` takes)."""
    *parts, tag = relative.parts
    if parts[:2] == ["registry.ollama.ai", "library"]:
        parts = parts[2:]
    elif parts[:1] == ["registry.ollama.ai"]:
        parts = parts[1:]
    return "/".join(parts) + f":{tag}"


def ollama_blob(root: Path, manifest: Path) -> Path | None:
    """The GGUF blob an Ollama manifest names (its model layer), if it is there."""
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data.get("layers") if isinstance(data, dict) else None
        digest = next(layer.get("digest") for layer in layers if isinstance(layer, dict)
                      and layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, TypeError, StopIteration, AttributeError):
        return None
    if not isinstance(digest, str) or not digest.startswith("sha256:") or not digest[7:].isalnum():
        return None
    blob = root / "blobs" / digest.replace(":", "-")
    return blob if blob.is_file() else None


def gpt4all() -> Iterator[Found]:
    for root in gpt4all_roots():
        if root.is_dir():
            for file in sorted(root.glob("*.gguf")):
                yield Found(f"gpt4all:{file.name}", "GPT4All", file)


SOURCES = {"hf": hf_cache, "lmstudio": lmstudio, "ollama": ollama, "gpt4all": gpt4all}


def discover() -> list[Found]:
    """Every model in the Hugging Face cache, LM Studio, Ollama and GPT4All on this machine."""
    return [found for source in SOURCES.values() for found in source()]


def find(name: str) -> Found | None:
    """The model a prefixed name (`ollama:qwen2.5:7b`, `hf:ORG/REPO`, ...) means, or None when the
    name has no such prefix. `ollama:NAME` without a tag means NAME:latest, as in Ollama."""
    prefix, colon, rest = name.partition(":")
    if not colon or prefix not in SOURCES:
        return None
    wanted = {name, f"{name}:latest"} if prefix == "ollama" and ":" not in rest.rsplit("/", 1)[-1] else {name}
    return next((found for found in SOURCES[prefix]() if found.name in wanted), None)
