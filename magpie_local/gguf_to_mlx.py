"""Turn a GGUF file into an mlx-lm model directory, offline.

The weights come through `mx.load`, which keeps Q4_0/Q4_1/Q8_0 tensors quantized (affine,
group size 32) and dequantizes other types; each tensor's bit width is read back from its
shapes, so mixed files get a per-layer quantization config. llama.cpp's converter stores a
llama model's q/k rows interleaved for its RoPE kernel, which is mlx-lm's `rope_traditional`
layout, so they need no un-permuting. The tokenizer is rebuilt from the GGUF vocabulary as a
Hugging Face `tokenizer.json` (byte-level BPE) with the chat template in
`tokenizer_config.json`; its token ids are checked against llama.cpp's in the tests.

Supported: the llama architecture (SmolLM, Llama-3.0 and the like) with a byte-level BPE
tokenizer. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConvertError
from .gguf import GGUFInfo, read_gguf

ARCHITECTURES = ("llama",)
GROUP_SIZE = 32  # the block size of GGUF's Q4_0/Q4_1/Q8_0, which mx.load keeps as the group size

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as in the models' own tokenizer.json files
# (llama.cpp's llama-vocab.cpp carries the same expressions).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # pre -> (split on single digits first, split expression)
    "gpt2": (False, GPT2_SPLIT), "gpt-2": (False, GPT2_SPLIT), "default": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT), "starcoder": (True, GPT2_SPLIT), "refact": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT), "llama3": (False, LLAMA3_SPLIT),
    "qwen2": (False, QWEN2_SPLIT),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# GGUF tensor names -> Hugging Face / mlx-lm names (llama layout).
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _int(info: GGUFInfo, key: str) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConvertError(f"{info.path.name}: metadata {key!r} is missing or not a positive integer")
    return value


def model_config(info: GGUFInfo) -> dict:
    """mlx-lm config.json fields from GGUF metadata (without the quantization part)."""
    arch = info.architecture
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{info.path.name}: architecture {arch!r} is not supported for MLX conversion "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    if any(k.startswith(f"{arch}.rope.scaling") for k in info.metadata):
        raise ConvertError(f"{info.path.name}: RoPE scaling is not supported for MLX conversion")
    heads = _int(info, f"{arch}.attention.head_count")
    hidden = _int(info, f"{arch}.embedding_length")
    eps = info.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    theta = info.get(f"{arch}.rope.freq_base", 10000.0)
    tokens = info.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConvertError(f"{info.path.name}: the GGUF file has no vocabulary")
    head_dim = info.get(f"{arch}.attention.key_length", hidden // heads)
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _int(info, f"{arch}.block_count"),
        "intermediate_size": _int(info, f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": info.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(eps),
        "rope_theta": float(theta),
        "rope_traditional": True,  # GGUF's interleaved q/k layout
        "max_position_embeddings": _int(info, f"{arch}.context_length"),
        "vocab_size": len(tokens),
        "bos_token_id": info.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": info.get("tokenizer.ggml.eos_token_id"),
    }


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise ConvertError(f"unexpected tensor {gguf_name!r} for the llama architecture")


def convert_weights(path: Path) -> tuple[dict, dict]:
    """(mlx-lm weights, quantization config) of a GGUF file."""
    import mlx.core as mx

    try:
        raw = mx.load(str(path))
    except (ValueError, RuntimeError) as e:
        raise ConvertError(f"MLX cannot read the tensors of {path.name}: {e}") from None
    weights = {hf_name(name): value for name, value in raw.items() if not name.startswith("rope_freqs")}
    quantization: dict = {"group_size": GROUP_SIZE, "bits": 4}
    widths = {}
    for name, value in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            packed = weights[f"{module}.weight"]
            widths[module] = packed.shape[-1] * 32 // (value.shape[-1] * GROUP_SIZE)
    if not widths:
        return weights, {}
    quantization["bits"] = max(set(widths.values()), key=list(widths.values()).count)
    for name in weights:
        if name.endswith(".weight") and weights[name].ndim == 2:
            module = name.removesuffix(".weight")
            if module not in widths:
                quantization[module] = False  # dequantized by mx.load: a plain layer
            elif widths[module] != quantization["bits"]:
                quantization[module] = {"group_size": GROUP_SIZE, "bits": widths[module]}
    return weights, quantization


def build_tokenizer(info: GGUFInfo):
    """A `tokenizers.Tokenizer` equal to llama.cpp's for a byte-level BPE GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = info.get("tokenizer.ggml.model"), info.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConvertError(f"{info.path.name}: tokenizer model {kind!r} is not supported for MLX conversion "
                           "(supported: byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{info.path.name}: pre-tokenizer {pre!r} is not supported for MLX conversion "
                           f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, merges = info.get("tokenizer.ggml.tokens"), info.get("tokenizer.ggml.merges")
    types = info.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if not isinstance(merges, list) or len(types) != len(tokens):
        raise ConvertError(f"{info.path.name}: the GGUF vocabulary has no merges or inconsistent token types")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges if m.count(" ") == 1]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tokenizer.add_tokens(special)
    return tokenizer


def tokenizer_config(info: GGUFInfo) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": info.bos_token or None,
        "eos_token": info.eos_token or None,
        "add_bos_token": bool(info.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": info.get(f"{info.architecture}.context_length"),
    }
    pad = info.token_text(info.get("tokenizer.ggml.padding_token_id"))
    if pad:
        config["pad_token"] = pad
    if info.chat_template:
        config["chat_template"] = info.chat_template
    return config


def convert_to_mlx(source: Path, output: Path) -> Path:
    """Write an mlx-lm model directory for `source` at `output` (which must not exist yet)."""
    import mlx.core as mx

    if output.exists():
        raise ConvertError(f"{output} already exists; remove it or choose another --out")
    info = read_gguf(source)
    config = model_config(info)
    tokenizer = build_tokenizer(info)
    weights, quantization = convert_weights(source)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    if quantization:
        config["quantization"] = quantization
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(info), indent=2) + "\n")
        os.replace(tmp, output)  # the directory appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
