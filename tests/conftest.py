import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from magpie_local.models import default_model_path

TEMPLATES = Path(__file__).parent / "data" / "templates"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_model() -> Path:
    path = default_model_path()
    assert path is not None, "the default model is not installed: run `make install`"
    return path


@pytest.fixture(scope="session")
def backend(default_model):
    """One real llama.cpp backend on the default model, shared by the tests that need it."""
    from magpie_local.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(default_model, ctx=512, parallel=4)
    yield be
    be.close()


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m magpie_local` as a user would."""
    return subprocess.run([sys.executable, "-m", "magpie_local", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def foreign_db(path: Path) -> bytes:
    """Make a SQLite database that some other program owns; return its bytes."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    return path.read_bytes()
