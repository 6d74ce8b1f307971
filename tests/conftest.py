import os
import signal
import sqlite3
import subprocess
import sys
import time
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


def _copy(default_model, tmp_path_factory, kind: str) -> Path:
    from magpie_local.convert import convert_gguf

    path = tmp_path_factory.mktemp(kind) / f"smol.{kind.upper()}.gguf"
    convert_gguf(default_model, path, kind)
    return path


@pytest.fixture(scope="session")
def f16_model(default_model, tmp_path_factory) -> Path:
    """An F16 copy of the default model (what `--weights auto` runs on x86 CPUs without
    AVX512_BF16): its Q4_1 weights dequantized exactly, computed by llama.cpp's F16 GEMM kernels."""
    return _copy(default_model, tmp_path_factory, "f16")


@pytest.fixture(scope="session")
def bf16_model(default_model, tmp_path_factory) -> Path:
    """A BF16 copy of the default model (what `--weights auto` runs on x86 CPUs with AVX512_BF16)."""
    return _copy(default_model, tmp_path_factory, "bf16")


@pytest.fixture(scope="session")
def backend(default_model):
    """One real llama.cpp backend on the default model, shared by the tests that need it."""
    from magpie_local.backends.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(default_model, ctx=512, parallel=4)
    yield be
    be.close()


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def cli(*args: str, timeout: float = 300, env: dict | None = None, module: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m magpie_local` as a user would (module=False: `python ARGS`, for another tool)."""
    command = [sys.executable, "-m", "magpie_local", *args] if module else [sys.executable, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def run_rows(db: Path) -> list[tuple]:
    """Every stored item of a generate run, kept or dropped, with its texts and why it ended."""
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT c.item_index, c.status, c.drop_reason, t.instruction, t.response, "
                        "t.response_finish FROM conversations c JOIN turns t ON t.conversation_id = c.id "
                        "ORDER BY c.item_index").fetchall()
    conn.close()
    return rows


def sigkill_after_a_batch(args: list[str], db: Path, batches_before: int = 0) -> None:
    """Start `magpie-local ARGS --db DB` and SIGKILL it once a batch is committed (beyond `batches_before`)."""
    proc = subprocess.Popen([sys.executable, "-m", "magpie_local", *args, "--db", str(db)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                conn = sqlite3.connect(db)
                batches = conn.execute("SELECT count(*) FROM batches").fetchone()[0]
                conn.close()
            except sqlite3.Error:
                batches = 0
            if batches >= batches_before + 1:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def foreign_db(path: Path) -> bytes:
    """Make a SQLite database that some other program owns; return its bytes."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    return path.read_bytes()


SDIST = Path(os.environ.get("MAGPIE_LOCAL_SDIST",
                            Path.home() / ".cache/magpie-local/sdist/llama_cpp_python-0.3.36.tar.gz"))


@pytest.fixture(scope="session")
def sdist_file(tmp_path_factory):
    """Extract a file of llama.cpp's source tree (vendor/llama.cpp/...) from the sdist `make install` keeps."""
    import tarfile

    if not SDIST.is_file():
        pytest.skip(f"the llama-cpp-python sdist is not at {SDIST} (`make install` downloads it)")
    folder = tmp_path_factory.mktemp("sdist")

    def extract(relative: str) -> Path:
        target = folder / Path(relative).name
        if not target.exists():
            with tarfile.open(SDIST) as tar:
                member = tar.getmember(f"{SDIST.name.removesuffix('.tar.gz')}/vendor/llama.cpp/{relative}")
                target.write_bytes(tar.extractfile(member).read())
        return target

    return extract
