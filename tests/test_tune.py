"""`--weights auto` by measurement (tune.py) on the real default model: every candidate run in a
child process, drift checked against the file, crashes survived, the choice cached per CPU and
build; `magpie-local doctor` and the install's build check."""

import json
import os
import subprocess
import sys

import pytest

from magpie_local import tune
from magpie_local.models import resolve_model

from .conftest import REPO, cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGPIE_LOCAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_auto_weights_are_measured_once_and_follow_the_measurement(cache):
    model = resolve_model(None)
    choice = tune.weights_choice(model)
    kinds = [m.kind for m in choice.measured]
    assert kinds == ["file", "f16", "bf16", "q8_0"] and not choice.cached
    for m in choice.measured:  # every candidate ran here, and the copies stay close to the Q4_1 file
        assert m.failure is None and m.prompt_tok_s > 0 and m.step_tok_s > 0, m
        assert m.kind == "file" or 0 < m.drift_mean < tune.DRIFT_MEAN, m
    for work, speed in (("prompt", "prompt_tok_s"), ("step", "step_tok_s")):
        chosen = next(m for m in choice.measured if m.kind == getattr(choice, work))
        fastest = max(getattr(m, speed) for m in choice.measured)
        assert getattr(chosen, speed) * tune.MARGIN >= fastest  # as fast as can be told apart here
        drift = chosen.drift_mean or 0.0  # and no candidate as fast is closer to the file
        tied = [m for m in choice.measured if getattr(m, speed) * tune.MARGIN >= fastest]
        assert all((m.drift_mean or 0.0) >= drift for m in tied)
        assert choice.kind_for(work) == (None if chosen.kind == "file" else chosen.kind)
    kept = sorted(p.parent.name for p in cache.glob("*/*.gguf"))  # only the copies a choice runs on
    assert kept == sorted({choice.prompt, choice.step} - {"file"})
    again = tune.weights_choice(model)  # cached: no child process, the same answer
    assert again.cached and (again.prompt, again.step) == (choice.prompt, choice.step)
    assert json.loads((cache / "weights-choice.json").read_text())


def test_another_build_is_measured_again(cache, monkeypatch):
    model = resolve_model(None)
    first = tune.weights_choice(model, candidates=("file", "f16"))
    real = tune.machine()
    monkeypatch.setattr(tune, "machine", lambda: {**real, "build": real["build"] + " | AMX_INT8 = 1"})
    other = tune.weights_choice(model, candidates=("file", "f16"))
    assert not first.cached and not other.cached and other.machine["build"].endswith("AMX_INT8 = 1")
    assert len(json.loads((cache / "weights-choice.json").read_text())) == 2


def test_two_processes_starting_at_once_measure_once(cache):
    """Two first runs at once (two terminals, or test workers): one measures, the other waits for its
    result instead of timing against it and deleting the copies it measures."""
    code = ("import sys; from magpie_local import tune; from magpie_local.models import resolve_model; "
            "choice = tune.weights_choice(resolve_model(None), candidates=('file',)); "
            "print('cached' if choice.cached else 'measured')")
    env = {**os.environ, "MAGPIE_LOCAL_CACHE": str(cache)}
    both = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in both]
    assert [p.returncode for p in both] == [0, 0], [e for _, e in results]
    assert sorted(out.strip() for out, _ in results) == ["cached", "measured"]
    assert len(json.loads((cache / "weights-choice.json").read_text())) == 1


def test_a_copy_that_drifts_is_never_chosen_however_fast(cache):
    """Requantizing the Q4_1 file to Q4_0 loses each block's offset: faster, and wrong."""
    choice = tune.weights_choice(resolve_model(None), candidates=("file", "q4_0"))
    file, q4_0 = choice.measured
    assert q4_0.drift_mean > tune.DRIFT_MEAN and "drifts" in q4_0.failure
    assert q4_0.prompt_tok_s is not None  # it ran; the drift is what rules it out
    assert (choice.prompt, choice.step) == ("file", "file")


def test_a_crashing_candidate_is_recorded_and_never_chosen(cache, monkeypatch):
    monkeypatch.setenv(tune.CRASH_SWITCH, "f16")  # its probe dies of SIGSEGV, as a bad kernel would
    choice = tune.weights_choice(resolve_model(None), candidates=("file", "f16", "bf16"))
    file, f16, bf16 = choice.measured
    assert f16.failure == "crashed (SIGSEGV)" and f16.prompt_tok_s is None
    assert file.failure is None and bf16.failure is None and bf16.step_tok_s > 0  # the rest went on
    assert "f16" not in (choice.prompt, choice.step)


def test_doctor_prints_the_choice_and_the_build_check_fails_on_a_crash(cache, tmp_path, sdist_file):
    env = {"MAGPIE_LOCAL_CACHE": str(cache)}
    shown = cli("doctor", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"CPU: {tune.cpu_model()}" in shown.stdout
    assert "--weights auto for SmolLM2-135M-Instruct.Q4_1" in shown.stdout
    assert "chosen for prompts" in shown.stdout and "chosen for steps" in shown.stdout
    again = cli("doctor", env=env)
    assert "(cached" in again.stdout and "Measuring" not in again.stderr
    crash = cli("doctor", "--build-check", env={**env, tune.CRASH_SWITCH: "bf16"})
    assert crash.returncode == 3 and "crashed (SIGSEGV)" in crash.stdout
    assert crash.stderr.strip().splitlines()[-1] == \
        "llama.cpp crashed here on bf16: this build is not safe on this CPU"
    assert cli("doctor", "--build-check", env=env).returncode == 0
    missing = cli("doctor", str(tmp_path / "nope.gguf"), env=env)
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "Traceback" not in missing.stderr
    unloadable = cli("doctor", str(sdist_file("models/ggml-vocab-llama-spm.gguf")), env=env)  # no weights
    assert unloadable.returncode == 2 and unloadable.stderr.strip().splitlines()[-1].startswith(
        "error: ggml-vocab-llama-spm does not run here: llama.cpp could not load"), unloadable.stderr


@pytest.mark.parametrize("amx", ["ON", "OFF"])
def test_make_falls_back_to_safer_builds_when_a_weight_type_crashes(cache, amx):
    """The install's fallback, forced: the check fails; an AMX build falls back to the build without
    AMX, that one (crashing again, as the switch is still set) to the portable AVX2 build, each made
    here by an echo, and each checked again."""
    env = {**os.environ, "MAGPIE_LOCAL_CACHE": str(cache), tune.CRASH_SWITCH: "q8_0"}
    made = subprocess.run(["make", "-s", "check-build", f"AMX={amx}", "NO_AMX_BUILD=echo no-AMX build made",
                           "PORTABLE_BUILD=echo portable build made"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert made.returncode != 0
    assert "llama.cpp crashed here on q8_0" in made.stderr
    assert ("falling back to the build without AMX" in made.stdout) == (amx == "ON")
    assert ("no-AMX build made" in made.stdout) == (amx == "ON")
    assert "falling back to the portable build" in made.stdout and "portable build made" in made.stdout
