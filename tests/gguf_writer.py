"""Write small metadata-only GGUF files for tests (no tensors)."""

import struct
from pathlib import Path


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, metadata: dict, *, version: int = 3) -> Path:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, 0, len(metadata)))
    for key, value in metadata.items():
        out += _string(key)
        if isinstance(value, bool):
            out += struct.pack("<I?", 7, value)
        elif isinstance(value, int):
            out += struct.pack("<Iq", 11, value)
        elif isinstance(value, float):
            out += struct.pack("<Id", 12, value)
        elif isinstance(value, str):
            out += struct.pack("<I", 8) + _string(value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_string(v) for v in value)
        else:
            raise TypeError(type(value))
    path.write_bytes(bytes(out))
    return path
