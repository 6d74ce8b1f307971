"""Writing the files a user asks for (exports, reports, converted models), safely: each through a
temporary file beside it and a rename, so a killed command never leaves half a file behind, and
every way writing can fail (no such folder, no permission, a read-only or full disk) is one line."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import MagpieError

REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only", errno.ENOENT: "the folder does not exist",
           errno.ENOTDIR: "a part of the path is not a folder", errno.EFBIG: "the file is too large for this disk",
           errno.EISDIR: "it is a folder"}


class WriteError(MagpieError, OSError):
    """A file the user asked for could not be written; nothing half-written is left."""


def reason(e: OSError) -> str:
    """What an OSError means to the user, in a few words."""
    return REASONS.get(e.errno, e.strerror or str(e))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Any OSError inside becomes a WriteError naming `path` and why."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write {path}: {reason(e)}") from None


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary file beside `path`, then rename it to `path`: the file appears
    whole or not at all."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_bytes(path: str | Path, data: bytes) -> None:
    write_atomically(path, lambda f: f.write(data))


@contextmanager
def temporary_file_beside(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside `path` for a writer that takes a file name (llama.cpp's
    quantizer): renamed to `path` if the block succeeds, removed if it does not."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


@contextmanager
def temporary_folder_beside(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed to `path` (which must not exist) if the block
    succeeds, removed whole if it does not: a converted model's folder appears whole or not at all."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def make_folder(path: str | Path) -> None:
    with writing(path):
        Path(path).mkdir(exist_ok=True)
