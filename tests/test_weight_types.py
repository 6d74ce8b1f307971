"""Batch invariance on the weight types people download: copies of the default model made here
with llama.cpp's own quantizer from its F16 copy (the K-quant mixes as `llama-quantize` makes them,
with its fallbacks for the model's 576-wide rows), no download.

For each type: a sequence's logits are the same bits alone, with batch-mates next to it or far
from it, in steps of 2 to 32 rows, and with its prompt split differently; a run's data is the same
at --parallel 1, 3 and 8, and a run killed with SIGKILL resumes to the uninterrupted run's data.
"""

import platform

import numpy as np
import pytest

from magpie_local.backends.llamacpp import LlamaCppBackend, repack_is_invariant
from magpie_local.convert import convert_gguf
from magpie_local.gguf import read_gguf
from magpie_local.llama_lib import llama_cpp

from .conftest import cli, run_rows, sigkill_after_a_batch
from .layouts import slot_logits

KINDS = ["q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "q8_0", "q4_0", "q4_1", "f16", "bf16"]
# (the slots that step, tokens of slot 0's prompt prefilled first): alone; next to two mates; with
# its prompt split as if 250 tokens were cached; among mates with idle slots between them; too far
# from its mate to share a decode; in full steps of 8 rows, first, and of 32 rows, last.
LAYOUTS = [([0], 0), ([0, 1, 2], 0), ([0, 1], 250), ([2, 0, 4], 0), ([6, 0], 0), (list(range(8)), 0),
           (list(range(31, -1, -1)), 0)]


@pytest.fixture(scope="module")
def weight_type(f16_model, tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("weight-types"), {"f16": f16_model}

    def copy(kind):
        if kind not in made:
            made[kind] = folder / f"smol.{kind.upper()}.gguf"
            convert_gguf(f16_model, made[kind], kind)
        return made[kind]

    return copy


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_the_same_bits_in_every_batch_layout(kind, weight_type):
    with LlamaCppBackend(weight_type(kind), ctx=1024, parallel=32) as be:
        alone, *others = (slot_logits(be, *layout) for layout in LAYOUTS)
    assert np.isfinite(alone).all()
    for layout, other in zip(LAYOUTS[1:], others):
        assert np.array_equal(alone, other), f"{kind}: {layout} moved logits by {np.abs(alone - other).max()}"


GEN = ["generate", "-n", "6", "--seed", "11", "--batch-size", "2", "--weights", "file",
       "--instruction-max-tokens", "32", "--response-max-tokens", "48", "-q"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_run_data_is_the_same_at_any_parallel_and_after_sigkill(kind, weight_type, tmp_path):
    """The uninterrupted runs through the Python API (what `generate` calls), the killed one from
    the command line, as a user's would be."""
    from dataclasses import replace

    import magpie_local as ml

    args = [*GEN, "--model", str(weight_type(kind))]
    inst, resp = ml.PRESETS["default"]
    settings = ml.GenerateSettings(seed=11, instruction=replace(inst, max_tokens=32),
                                   response=replace(resp, max_tokens=48))
    runs = {}  # (--parallel 3 is the killed run's, below)
    for parallel in (1, 8):
        db = tmp_path / f"p{parallel}.db"
        ml.generate(db, 6, settings, model=str(weight_type(kind)), weights="file", parallel=parallel, batch_size=2)
        runs[parallel] = run_rows(db)
    assert runs[1] == runs[8]
    assert len({row[3] for row in runs[1]}) > 1  # different seeds, different instructions

    killed = tmp_path / "killed.db"
    sigkill_after_a_batch([*args, "--parallel", "3"], killed)
    assert len(run_rows(killed)) < len(runs[1])  # killed before the end
    r = cli(*args, "--parallel", "8", "--db", str(killed))
    assert r.returncode == 0, r.stderr
    assert run_rows(killed) == runs[1]


@pytest.mark.slow
def test_repacking_is_kept_only_where_it_stays_invariant(weight_type):
    """llama.cpp's repacked Q4_K weights go through a gemm kernel in groups of 4 rows and a gemv
    kernel for the rest, which sum differently: repacked, a Q4_K_M sequence's logits move with
    the number of rows in its steps, so a Q4_K_M file loads without repacking. Q4_0's repacked
    kernels agree (the matrix above holds with them on x86)."""
    q4_k_m = weight_type("q4_k_m")
    assert 12 in read_gguf(q4_k_m, tensors=True).tensor_types  # it holds Q4_K tensors
    assert not repack_is_invariant(q4_k_m)
    assert repack_is_invariant(weight_type("f16"))  # nothing to repack
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert repack_is_invariant(weight_type("q4_0")) == on_x86
    # With ggml's AMX kernels in the build the AMX buffer takes the Q4_K tensors before the repack
    # does, and its kernels measured invariant (the matrix above passes with repacking on too).
    amx = b"AMX_INT8 = 1" in llama_cpp().llama_print_system_info()
    if on_x86 and not amx:
        with LlamaCppBackend(q4_k_m, ctx=1024, parallel=8, repack=True) as be:
            alone, in_a_crowd = (slot_logits(be, *layout) for layout in (LAYOUTS[0], LAYOUTS[5]))
        assert not np.array_equal(alone, in_a_crowd)  # what loading it unrepacked avoids



def test_weights_auto_measures_each_type_against_its_own_copies(weight_type, tmp_path, monkeypatch):
    """auto runs a K-quant file or a 16-bit file on whatever measured fastest here among the file
    and its copies (never a copy in the file's own type), each copy checked against the file."""
    from magpie_local.models import resolve_model
    from magpie_local.tune import DRIFT_MEAN, weights_choice

    monkeypatch.setenv("MAGPIE_LOCAL_CACHE", str(tmp_path))
    for kind, candidates in (("q4_k_m", ["file", "f16", "bf16", "q8_0"]), ("f16", ["file", "bf16", "q8_0"])):
        choice = weights_choice(resolve_model(str(weight_type(kind))))
        assert [m.kind for m in choice.measured] == candidates
        assert all(m.kind == "file" or m.drift_mean is not None for m in choice.measured)  # each one checked
        for chosen in {choice.prompt, choice.step}:
            m = next(m for m in choice.measured if m.kind == chosen)
            assert m.failure is None and (m.kind == "file" or m.drift_mean < DRIFT_MEAN)
