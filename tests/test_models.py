"""The user's own models: where they are found (laid out exactly as each tool lays them out, around
the default model's file), the engine auto takes on a Mac (the platform simulated), and the
first-run check."""

import json
import os
from pathlib import Path

import pytest

import magpie_local.backends as backends
from magpie_local.errors import MagpieError

from .conftest import cli
from .families import SPECS, write
from .test_cli import SMALL, _error_line


def _link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source, target)
    return target


@pytest.fixture
def home(tmp_path, monkeypatch, default_model):
    """A home folder holding the default model where the Hugging Face cache, LM Studio, Ollama and
    GPT4All keep models, and nothing else of the user's (the real cache of measurements kept)."""
    from magpie_local.backends import cache_dir

    monkeypatch.setenv("MAGPIE_LOCAL_CACHE", str(cache_dir()))
    for name in ("HF_HOME", "HF_HUB_CACHE", "OLLAMA_MODELS", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MAGPIE_LOCAL_MODELS", str(tmp_path / "no-models-folder"))
    # Hugging Face: models--ORG--REPO/{blobs,refs/main,snapshots/REV/...}, snapshot files are links into blobs.
    repo = tmp_path / ".cache" / "huggingface" / "hub" / "models--bartowski--SmolLM2-135M-Instruct-GGUF"
    blob = _link(default_model, repo / "blobs" / "3c1b2a")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("9f8e7d")
    _link(blob, repo / "snapshots" / "9f8e7d" / "SmolLM2-135M-Instruct-Q4_1.gguf")
    _link(blob, repo / "snapshots" / "9f8e7d" / "mmproj-SmolLM2.gguf")  # a projector, not a chat model
    # LM Studio: ~/.lmstudio/models/PUBLISHER/REPO/FILE.gguf
    _link(default_model, tmp_path / ".lmstudio" / "models" / "lmstudio-community" / "SmolLM2-135M-Instruct-GGUF"
          / "SmolLM2-135M-Instruct-Q4_1.gguf")
    # Ollama: manifests/registry.ollama.ai/library/NAME/TAG (JSON) naming blobs/sha256-HEX
    ollama = tmp_path / ".ollama" / "models"
    digest = "a" * 64
    _link(default_model, ollama / "blobs" / f"sha256-{digest}")
    manifest = {"schemaVersion": 2, "config": {"digest": "sha256:" + "b" * 64},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                            "size": default_model.stat().st_size},
                           {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "c" * 64}]}
    for path in ("registry.ollama.ai/library/smollm2/135m", "registry.ollama.ai/library/smollm2/latest",
                 "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF/Q4_1"):
        target = ollama / "manifests" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(manifest))
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken").mkdir()
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "tag").write_text("{not json")
    # GPT4All: ~/.local/share/nomic.ai/GPT4All/FILE.gguf
    _link(default_model, tmp_path / ".local" / "share" / "nomic.ai" / "GPT4All" / "smollm2-135m-instruct.Q4_1.gguf")
    return tmp_path


EXPECTED = {"hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf": "Hugging Face cache",
            "lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_1.gguf": "LM Studio",
            "ollama:smollm2:135m": "Ollama", "ollama:smollm2:latest": "Ollama",
            "ollama:hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_1": "Ollama",
            "gpt4all:smollm2-135m-instruct.Q4_1.gguf": "GPT4All"}


def test_every_tool_s_models_are_found_and_named(home, default_model):
    import magpie_local.api as api
    from magpie_local.models import resolve_model

    entries = {e.name: e for e in api.list_models()}
    for name, source in EXPECTED.items():
        entry = entries[name]
        assert entry.source == source and entry.problem is None, (name, entry.problem)
        assert entry.path.resolve() == default_model.resolve()
        assert entry.model.architecture == "llama" and entry.model.quantization == "Q4_1"
        assert entry.engine == "llamacpp" and entry.template_family == "chatml"
    assert not any("mmproj" in name for name in entries) and not any("broken" in name for name in entries)
    model = resolve_model("ollama:smollm2:135m")
    assert model.name == "smollm2-135m" and model.path.name == "sha256-" + "a" * 64
    assert resolve_model("ollama:smollm2").path == model.path  # no tag means :latest, as in Ollama
    with pytest.raises(MagpieError, match="model not found: ollama:llama3:8b"):
        resolve_model("ollama:llama3:8b")


def test_models_list_and_generate_with_a_found_name(home, tmp_path):
    listed = cli("models", "list", env={"HOME": str(home)})
    assert listed.returncode == 0, listed.stderr
    flat = " ".join(listed.stdout.split())
    for name in ("ollama:smollm2:135m", "gpt4all:smollm2-135m-instruct.Q4_1.gguf", "Hugging Face cache", "LM Studio"):
        assert name in flat, name
    assert "Q4_1" in flat and "135M" in flat and "chatml" in flat and "llama.cpp" in flat
    db = tmp_path / "m.db"
    made = cli("generate", "--db", str(db), "-n", "1", "--model", "ollama:smollm2:135m", *SMALL,
               env={"HOME": str(home)})
    assert made.returncode == 0 and "smollm2-135m" in made.stderr, made.stderr
    assert "model not found: ollama:nope" in _error_line(cli("generate", "--db", str(tmp_path / "x.db"), "-n", "1",
                                                             "--model", "ollama:nope", env={"HOME": str(home)}))


@pytest.fixture
def mac(monkeypatch):
    """Apple Silicon with MLX installed, as `make install` leaves a Mac (MLX runs on this CPU here)."""
    monkeypatch.setattr(backends, "apple_silicon", lambda: True)
    monkeypatch.setattr(backends, "mlx_installed", lambda: True)


def _not_for_mlx(vocabulary, tmp_path):
    """A llama whose vocabulary's pre-tokenizer (DeepSeek-LLM's) the MLX conversion does not rebuild:
    llama.cpp runs it, MLX would not tokenize it as llama.cpp does."""
    from .families import Spec

    spec = Spec("llama", "deepseek-llm", "registry:chatml", SPECS["llama3"].layer)
    return write(spec, vocabulary("deepseek-llm"), tmp_path / "deepseek-tiny.gguf")


def test_auto_on_a_mac_takes_mlx_only_where_it_is_exact(mac, family, vocabulary, tmp_path):
    from magpie_local.api.session import ModelSession

    for name in ("llama3", "qwen2", "gemma3", "phi3", "mistral-spm"):
        gguf, _ = family(name)
        said = []
        session = ModelSession.choose(str(gguf), announce=said.append)
        assert session.backend == "mlx" and said == [], (name, said)
    assert ModelSession.choose(None).backend == "mlx"  # the default model converts exactly
    unsupported = _not_for_mlx(vocabulary, tmp_path)
    said = []
    session = ModelSession.choose(str(unsupported), announce=said.append)
    assert session.backend == "llamacpp"
    assert len(said) == 1 and said[0].startswith("llama.cpp runs deepseek-tiny (not MLX: MLX does not run")
    assert "pre-tokenizer 'deepseek-llm' is not supported" in said[0]
    with pytest.raises(MagpieError, match=r"MLX does not run deepseek-tiny.*\(--backend llamacpp runs it\)"):
        ModelSession.choose(str(unsupported), backend="mlx")


def test_auto_prefers_llamacpp_where_the_mlx_copy_would_be_too_large(mac, monkeypatch, gemma3_file):
    """Gemma-3 270M Q4_K_M converts exactly (K-quants dequantized to 16 bits); its MLX copy is small,
    so auto takes MLX. Were the model 30 times larger, the copy would not be worth it."""
    import magpie_local.backends.mlx as mlx_module
    from magpie_local.api.session import ModelSession
    from magpie_local.gguf_to_mlx import copy_bytes
    from magpie_local.models import resolve_model

    model = resolve_model(str(gemma3_file))
    assert model.size < copy_bytes(model.gguf) < 2 << 30
    assert ModelSession.choose(str(gemma3_file)).backend == "mlx"
    monkeypatch.setattr(mlx_module, "AUTO_COPY_MAX_BYTES", copy_bytes(model.gguf) // 30)
    monkeypatch.setattr("magpie_local.gguf_to_mlx.copy_bytes", lambda info: 30 * model.size)
    said = []
    assert ModelSession.choose(str(gemma3_file), announce=said.append).backend == "llamacpp"
    assert "its MLX copy would be" in said[0] and "llama.cpp runs the file as it is" in said[0]


def test_every_command_that_runs_a_model_says_which_engine_and_why(mac, vocabulary, tmp_path):
    """score (and every command: they all choose through ModelSession.choose) says which engine runs
    and why when auto passes MLX over."""
    import magpie_local.api as api

    unsupported = _not_for_mlx(vocabulary, tmp_path)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Blue."}]))
    db, said = tmp_path / "m.db", []
    api.import_file(db, data)
    run = api.score(db, model=str(unsupported), prompt_format="alpaca", announce=said.append)
    assert run.backend == "llamacpp" and any("llama.cpp runs deepseek-tiny (not MLX:" in line for line in said), said


def test_doctor_checks_a_model_on_its_first_run(family, vocabulary, tmp_path):
    good = cli("doctor", "--model", "default", "--samples", "4")
    assert good.returncode == 0, good.stderr
    flat = " ".join(good.stdout.split())
    assert "Template chatml" in flat and "pre-query '<|im_start|>system" in flat and "'<|im_end|>'" in flat
    assert "The template looks right" in flat and "generate -n 1000 would take about" in flat
    assert "runs on llama.cpp" in flat and "CPU:" in flat
    from .families import Spec

    base = write(Spec("llama", "llama-bpe", None, SPECS["llama3"].layer), vocabulary("llama-bpe"), tmp_path / "b.gguf")
    bad = cli("doctor", "--model", str(base))
    assert bad.returncode == 1 and "has no chat template: it looks like a base model" in " ".join(bad.stdout.split())
    gibberish = cli("doctor", "--model", str(family("llama3")[0]), "--samples", "4")  # random weights
    assert gibberish.returncode == 1 and "Problem" in gibberish.stdout, gibberish.stdout
