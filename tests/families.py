"""Small random-weight GGUF models of the families people download, built with the `gguf` package
around real vocabularies (the llama.cpp sdist's ggml-vocab-*.gguf, or a real model's) and the
family's real chat template, in llama.cpp's own tensor names and layouts: what its converter would
write for such a model. llama.cpp runs them as the reference; the MLX conversion must agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magpie_local import registry

from .conftest import TEMPLATES

LLAMA = {"attn_norm": "n", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
         "ffn_norm": "n", "ffn_gate": "g", "ffn_up": "u", "ffn_down": "d"}


@dataclass(frozen=True)
class Spec:
    """One family's tiny model: architecture, layer tensors, extra metadata and tensors."""

    arch: str
    vocab: str  # an sdist vocabulary (ggml-vocab-NAME.gguf), "gemma3" (the real Gemma-3 270M's) or "default"
    template: str | None  # tests/data/templates/NAME.jinja, registry:FAMILY, "own" (the vocabulary's); None: base
    layer: dict  # GGUF tensor -> kind: n (norm), q k v o g u d, qkv, gu (fused gate+up), qn kn (head norms), b* bias
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ff: int = 128
    layers: int = 3
    tied: bool = False
    meta: dict = field(default_factory=dict)  # more ARCH.* metadata
    rope_freqs: bool = False  # Llama-3.1's per-dimension RoPE factors
    longrope: bool = False  # Phi-3.5's short/long RoPE factors


SPECS = {
    # The default model's own vocabulary and template on a tiny llama: the MLX backend's tests compare it
    # with llama.cpp at a fraction of the real model's cost (MLX on a Linux CPU runs the reference BLAS).
    "smollm": Spec("llama", "default", "own", LLAMA, heads=4, kv_heads=2, meta={"rope.freq_base": 100000.0}),
    "llama3": Spec("llama", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", LLAMA, rope_freqs=True,
                   meta={"rope.freq_base": 500000.0}),
    "llama2-spm": Spec("llama", "llama-spm", "registry:llama-2", LLAMA),
    "mistral-spm": Spec("llama", "llama-spm", "registry:mistral", LLAMA, meta={"rope.freq_base": 1000000.0}),
    "qwen2": Spec("qwen2", "qwen2", "Qwen-Qwen2.5-7B-Instruct",
                  {**LLAMA, "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv"}, tied=True,
                  meta={"rope.freq_base": 1000000.0}),
    "qwen3": Spec("qwen3", "qwen2", "Qwen-Qwen3-0.6B", {**LLAMA, "attn_q_norm": "qn", "attn_k_norm": "kn"}, tied=True,
                  head_dim=32, meta={"rope.freq_base": 1000000.0}),
    "gemma2": Spec("gemma2", "gemma3", "google-gemma-2-2b-it",
                   {**LLAMA, "post_attention_norm": "n", "post_ffw_norm": "n"}, tied=True, head_dim=32,
                   meta={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                         "attention.sliding_window": 4096}),
    "gemma3": Spec("gemma3", "gemma3", "google-gemma-2-2b-it",
                   {**LLAMA, "post_attention_norm": "n", "post_ffw_norm": "n", "attn_q_norm": "qn",
                    "attn_k_norm": "kn"},
                   tied=True, head_dim=32, layers=7,  # 7 layers: the 6th attends globally, the others in a window
                   meta={"rope.freq_base": 1000000.0, "attention.sliding_window": 512}),
    "phi3": Spec("phi3", "phi-3", "microsoft-Phi-3.5-mini-instruct",
                 {"attn_norm": "n", "attn_qkv": "qkv", "attn_output": "o", "ffn_norm": "n", "ffn_up": "gu",
                  "ffn_down": "d"}, kv_heads=4, longrope=True,
                 meta={"rope.scaling.original_context_length": 4096}),
}


def template_source(spec: Spec, vocab: Path) -> str:
    if spec.template == "own":
        from magpie_local.gguf import read_gguf

        return read_gguf(vocab).chat_template
    if spec.template.startswith("registry:"):
        return registry.get(spec.template.split(":", 1)[1]).template
    return (TEMPLATES / f"{spec.template}.jinja").read_text()


def copy_tokenizer(writer, vocab: Path) -> None:
    """Every tokenizer.* key of a real GGUF vocabulary, in the types llama.cpp's converter writes."""
    from magpie_local.gguf import read_gguf

    arrays = {"tokenizer.ggml.tokens": writer.add_token_list, "tokenizer.ggml.scores": writer.add_token_scores,
              "tokenizer.ggml.token_type": writer.add_token_types, "tokenizer.ggml.merges": writer.add_token_merges}
    for name, value in read_gguf(vocab).metadata.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":
            continue
        if name in arrays:
            arrays[name](value)
        elif isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)


def write(spec: Spec, vocab: Path, path: Path, *, dtype: str = "f32", seed: int = 0) -> Path:
    """A random-weight GGUF of `spec` around the vocabulary in `vocab` (any GGUF holding one)."""
    import gguf

    from magpie_local.gguf import read_gguf

    rng = np.random.default_rng(seed)
    n_vocab = len(read_gguf(vocab).get("tokenizer.ggml.tokens"))
    h, hd, heads, kv, ff = spec.hidden, spec.head_dim, spec.heads, spec.kv_heads, spec.ff
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"tiny-{spec.arch}")
    w.add_context_length(32768)
    w.add_embedding_length(h)
    w.add_block_count(spec.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_file_type(0 if dtype == "f32" else 1)
    for key, value in spec.meta.items():
        name = f"{spec.arch}.{key}"
        if isinstance(value, float):
            w.add_float32(name, value)
        elif isinstance(value, str):
            w.add_string(name, value)
        else:
            w.add_uint32(name, value)
    if spec.longrope:
        w.add_float32(f"{spec.arch}.rope.scaling.attn_factor",
                      math.sqrt(1 + math.log(32768 / 4096) / math.log(4096)))
    copy_tokenizer(w, vocab)
    if spec.template is not None:
        w.add_chat_template(template_source(spec, vocab))

    wdt = np.float32 if dtype == "f32" else np.float16

    def mat(rows, cols, scale):
        return (rng.standard_normal((rows, cols)) * scale).astype(wdt)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, h, 1.0))
    w.add_tensor("output_norm.weight", norm(h))
    if not spec.tied:
        w.add_tensor("output.weight", mat(n_vocab, h, 0.5))
    if spec.rope_freqs:  # Llama-3.1's factors (factor 8, low 1, high 4, original context 8192), as llama.cpp's
        base, dims = spec.meta["rope.freq_base"], hd  # converter computes them
        freqs = base ** (-np.arange(0, dims, 2) / dims)
        wavelen = 2 * math.pi / freqs
        smooth = (8192 / wavelen - 1) / (4 - 1)
        factors = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
        w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    if spec.longrope:
        w.add_tensor("rope_factors_long.weight", (1 + 3 * rng.random(hd // 2)).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", (1 + 0.5 * rng.random(hd // 2)).astype(np.float32))
    shapes = {"q": (heads * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, heads * hd), "g": (ff, h),
              "u": (ff, h), "d": (h, ff), "qkv": ((heads + 2 * kv) * hd, h), "gu": (2 * ff, h)}
    for layer in range(spec.layers):
        for name, kind in spec.layer.items():
            full = f"blk.{layer}.{name}" + ("" if name.endswith(".bias") else ".weight")
            if kind == "n":
                w.add_tensor(full, norm(h))
            elif kind in ("qn", "kn"):
                w.add_tensor(full, norm(hd))
            elif kind.startswith("b"):
                w.add_tensor(full, (0.1 * rng.standard_normal(shapes[kind[1:]][0])).astype(np.float32))
            else:
                rows, cols = shapes[kind]
                w.add_tensor(full, mat(rows, cols, 1.0 / math.sqrt(cols)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
