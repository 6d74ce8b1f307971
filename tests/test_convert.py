"""16-bit copies: llama.cpp's own converter, a usable model, a small measured drift."""

import numpy as np
import pytest

from magpie_local.backends.llamacpp import LlamaCppBackend
from magpie_local.convert import default_output
from magpie_local.scoring import IFDScorer, Pair

from .conftest import cli

TEXT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "The capital of France is Paris, a city known for the Eiffel Tower and the Louvre.")


# F16 holds Q4_1's weights exactly; what moves is llama.cpp quantizing activations for Q4_1
# matmuls: 0.04 nats per token on average, 0.27 at most (measured here). BF16 rounds the weights
# and activations to 8 significant bits: about as far again.
@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_16_bit_copy_runs_and_stays_close(kind, tmp_path, default_model):
    out = tmp_path / f"copy.{kind.upper()}.gguf"
    done = cli("models", "convert", "--to", kind, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 2 * default_model.stat().st_size  # 16 bits a weight instead of ~5
    again = cli("models", "convert", "--to", kind, "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr

    logprobs, ifds = [], []
    for path in (default_model, out):
        with LlamaCppBackend(path, ctx=256, parallel=1) as backend:
            tokens = backend.tokenize(TEXT)
            logprobs.append(backend.token_logprobs([(tokens, 20)])[0])
            scorer = IFDScorer(backend, "alpaca", None, 256)
            ifds.append(scorer.score([Pair("Name the capital of France.", "The capital of France is Paris.")])[0].ifd)
    drift = np.abs(logprobs[0] - logprobs[1])
    assert drift.mean() < 0.1 and drift.max() < 0.5, drift
    assert abs(ifds[0] - ifds[1]) < 0.02
    bad = cli("models", "convert", "--to", "q3_weird", "--out", str(tmp_path / "x.gguf"))
    assert bad.returncode == 2 and "unknown type" in bad.stderr


def test_default_output_name():
    from pathlib import Path

    assert default_output(Path("x/SmolLM2-135M-Instruct.Q4_1.gguf"), "f16", Path("models")) == \
        Path("models/SmolLM2-135M-Instruct.F16.gguf")
