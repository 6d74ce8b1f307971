"""Read the metadata header of a GGUF file, treating the file as untrusted.

Only the key/value section is parsed, and on request the tensor infos after it (shapes and weight
types, never the tensor data), with hard limits on every length, so a corrupt or hostile file fails
fast with `GGUFError` instead of allocating gigabytes or raising something obscure. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import MagpieError

MAGIC = b"GGUF"
MAX_KV = 100_000
MAX_KEY_BYTES = 65_536
MAX_STRING_BYTES = 16 * 1024 * 1024  # a chat template is a few KB; 16 MiB is generous
MAX_ARRAY_ITEMS = 10_000_000
MAX_TENSORS = 1_000_000
MAX_DIMS = 8
KEEP_ARRAY_ITEMS = 4096  # larger arrays are skipped, except the tokenizer's (see KEEP_ARRAYS)
KEEP_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(MagpieError, ValueError):
    """The file is not a readable GGUF file."""


@dataclass(frozen=True)
class Tensor:
    """A tensor's entry in the GGUF header (read_gguf(tensors=True)); its data is not read."""

    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFInfo:
    path: Path
    version: int
    tensor_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[int, int] = field(default_factory=dict)  # ggml type id -> tensors (read_gguf(tensors=True))
    n_params: int = 0  # weights in all tensors (read_gguf(tensors=True))
    tensors: list[Tensor] = field(default_factory=list)  # (read_gguf(tensors=True))
    data_offset: int = 0  # where the tensor data starts in the file (read_gguf(tensors=True))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.get("general.architecture")

    @property
    def name(self) -> str | None:
        return self.get("general.name")

    @property
    def chat_template(self) -> str | None:
        template = self.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template.strip() else None

    def token_text(self, token_id: Any) -> str | None:
        tokens = self.get("tokenizer.ggml.tokens")
        if isinstance(token_id, int) and isinstance(tokens, list) and 0 <= token_id < len(tokens):
            return tokens[token_id]
        return None

    def token_ids(self, texts: list[str]) -> dict[str, int]:
        """The id of each text that is one whole token of the vocabulary (stop strings -> stop ids)."""
        tokens, wanted, found = self.get("tokenizer.ggml.tokens"), set(texts), {}
        for i, token in enumerate(tokens if isinstance(tokens, list) else ()):
            if token in wanted and token not in found:
                found[token] = i
        return found

    @property
    def bos_token(self) -> str:
        return self.token_text(self.get("tokenizer.ggml.bos_token_id")) or ""

    @property
    def eos_token(self) -> str:
        return self.token_text(self.get("tokenizer.ggml.eos_token_id")) or ""


class _Reader:
    def __init__(self, f: BinaryIO):
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("file is truncated")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, limit: int = MAX_STRING_BYTES) -> str:
        n = self.scalar("<Q")
        if n > limit:
            raise GGUFError(f"string of {n} bytes exceeds the {limit}-byte limit")
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError("string is not valid UTF-8") from None

    def skip_string(self) -> None:
        n = self.scalar("<Q")
        if n > MAX_STRING_BYTES:
            raise GGUFError(f"string of {n} bytes exceeds the {MAX_STRING_BYTES}-byte limit")
        self.f.seek(n, 1)

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > MAX_ARRAY_ITEMS:
                raise GGUFError(f"array {key!r} has {count} items (limit {MAX_ARRAY_ITEMS})")
            if itype == _ARRAY:
                raise GGUFError(f"nested array in {key!r} is not supported")
            keep = key in KEEP_ARRAYS or count <= KEEP_ARRAY_ITEMS
            if not keep:  # skip without materialising
                if itype == _STRING:
                    for _ in range(count):
                        self.skip_string()
                elif itype in _SCALARS:
                    self.f.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
                else:
                    raise GGUFError(f"unknown value type {itype} in {key!r}")
                return {"type": itype, "count": count}
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.read(size * count)))
            return [self.value(itype, key) for _ in range(count)]
        raise GGUFError(f"unknown value type {vtype} for key {key!r}")


def _read_tensor_infos(r: _Reader, info: GGUFInfo) -> None:
    if info.tensor_count > MAX_TENSORS:
        raise GGUFError(f"{info.tensor_count} tensors (limit {MAX_TENSORS})")
    for _ in range(info.tensor_count):
        name = r.string(MAX_KEY_BYTES)
        n_dims = r.scalar("<I")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"a tensor of {n_dims} dimensions (limit {MAX_DIMS})")
        shape = tuple(r.scalar("<Q") for _ in range(n_dims))
        ggml_type = r.scalar("<I")
        offset = r.scalar("<Q")
        info.tensors.append(Tensor(name, shape, ggml_type, offset))
        info.tensor_types[ggml_type] = info.tensor_types.get(ggml_type, 0) + 1
        info.n_params += math.prod(shape)
    alignment = info.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= 1 << 20:
        raise GGUFError(f"general.alignment {alignment!r} is not a sane alignment")
    info.data_offset = -(-r.f.tell() // alignment) * alignment


def read_gguf(path: str | Path, tensors: bool = False) -> GGUFInfo:
    """Parse the GGUF header and metadata of `path`, and with `tensors` the tensor infos (the
    weight types and the number of weights). Raises GGUFError on anything unexpected."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (bad magic number)")
            r = _Reader(f)
            version = r.scalar("<I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: unsupported GGUF version {version}")
            tensor_count, kv_count = r.scalar("<Q"), r.scalar("<Q")
            if kv_count > MAX_KV:
                raise GGUFError(f"{path}: {kv_count} metadata entries (limit {MAX_KV})")
            info = GGUFInfo(path=path, version=version, tensor_count=tensor_count)
            for _ in range(kv_count):
                key = r.string(MAX_KEY_BYTES)
                info.metadata[key] = r.value(r.scalar("<I"), key)
            if tensors:
                _read_tensor_infos(r, info)
            return info
    except GGUFError as e:
        if str(path) in str(e):
            raise
        raise GGUFError(f"{path}: {e}") from None
    except struct.error:
        raise GGUFError(f"{path}: corrupt GGUF metadata") from None
    except IsADirectoryError:
        raise GGUFError(f"{path} is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise GGUFError(f"model file not found: {path}") from None
    except PermissionError:
        raise GGUFError(f"cannot read {path}: permission denied") from None
