"""Turn a GGUF file into an mlx-lm model directory, offline, for the model families mlx-lm runs
the way llama.cpp runs the file.

A family says which mlx-lm model class takes a GGUF architecture, how llama.cpp's tensor names map
onto its modules, and what llama.cpp's converter changed on the way in that must be undone (Gemma's
norms are stored as 1 + w; mlx-lm adds the 1 itself). Weights are read with the `gguf` package:
Q4_0, Q4_1 and Q8_0 tensors are repacked into MLX's affine 4- and 8-bit format (the same numbers,
group size 32); F32, F16 and BF16 are kept; any other type (the K-quants, Q5_0, IQ4_NL...) is
dequantized to F16. The tokenizer is rebuilt from the GGUF vocabulary as a Hugging Face
`tokenizer.json`: byte-level BPE (Llama-3, Qwen2/3, SmolLM, Phi-4) or SentencePiece (Llama-2,
Mistral, Phi-3, Gemma), token for token llama.cpp's.

`refusal(info)` says why a file cannot be converted exactly (an architecture, tokenizer or RoPE
scaling mlx-lm does not run as llama.cpp does); `--backend auto` then runs it on llama.cpp. The
proof per family is in tests/test_families.py: token ids equal to llama.cpp's on its own test
vectors, logits within tolerance and identical greedy text on random weights, and a real model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConvertError
from .files import temporary_folder_beside
from .gguf import GGUFInfo, read_gguf

GROUP_SIZE = 32  # the block size of GGUF's Q4_0/Q4_1/Q8_0, kept as MLX's quantization group size

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
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # SentencePiece's visible space

# GGUF tensor names -> mlx-lm names, outside the layers and (by family) inside them.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_LAYER = {**LLAMA_LAYER, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
PHI3_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
              "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
# Precomputed RoPE factors: read into the config, never weights.
ROPE_TENSORS = ("rope_freqs", "rope_factors_long", "rope_factors_short")


@dataclass(frozen=True)
class Family:
    """A GGUF architecture that an mlx-lm model class runs as llama.cpp does."""

    model_type: str  # mlx-lm's
    layer: dict[str, str]  # GGUF tensor in a block -> mlx-lm module in a layer
    rope_traditional: bool  # llama.cpp's NORM rope (llama: q/k stored interleaved) vs NEOX (the others)
    norm_shift: float = 0.0  # GGUF holds norm weights as w + this; mlx-lm adds it back itself
    extra: Callable[[GGUFInfo, dict], dict] = field(default=lambda info, tensors: {})
    # Longest sequence mlx-lm runs this family as llama.cpp does (a sliding window it lacks), from the file.
    max_context: Callable[[GGUFInfo], int | None] = field(default=lambda info: None)


def _get(info: GGUFInfo, key: str, default=None):
    return info.get(f"{info.architecture}.{key}", default)


def _int(info: GGUFInfo, key: str) -> int:
    value = _get(info, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConvertError(f"{info.path.name}: metadata {info.architecture}.{key} is missing or not a positive integer")
    return value


def _head_dim(info: GGUFInfo) -> int:
    return _get(info, "attention.key_length") or _int(info, "embedding_length") // _int(info, "attention.head_count")


def _linear_scaling(info: GGUFInfo) -> dict:
    """A linear RoPE scaling (Gemma-3 4B+), the one llama.cpp scaling that means the same in mlx-lm."""
    kind = _get(info, "rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind == "linear" and isinstance(_get(info, "rope.scaling.factor"), float):
        return {"rope_scaling": {"rope_type": "linear", "factor": _get(info, "rope.scaling.factor")}}
    raise ConvertError(f"{info.path.name}: RoPE scaling {kind!r} is not converted for MLX")


def llama3_scaling(freq_factors: np.ndarray, base: float, dims: int) -> dict:
    """mlx-lm's `llama3` rope_scaling reproducing llama.cpp's per-dimension RoPE factors (the GGUF's
    rope_freqs tensor, computed by its converter from Llama-3.1's own rope_scaling): factor 1 for
    the high frequencies, `factor` for the low ones, and between them 1 / ((1 - s) / factor + s)
    with s linear in the frequency. Only s's slope and offset matter, so they are solved for from
    the smoothed dimensions (or Llama-3.1's published values where there are too few), and the
    result is checked against every factor."""
    ff = np.asarray(freq_factors, dtype=np.float64)
    factor = float(ff.max())
    inv = base ** (-np.arange(0, dims, 2) / dims)  # llama.cpp's theta_i
    candidates = [{"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}]
    medium = np.flatnonzero((ff > 1 + 1e-6) & (ff < factor * (1 - 1e-6)))
    if len(medium) >= 2 and factor > 1:
        s = (1 / ff[medium] - 1 / factor) / (1 - 1 / factor)
        slope, offset = np.polyfit(inv[medium] / (2 * math.pi), s, 1)  # s = L*f/(2pi*(hi-lo)) - lo/(hi-lo)
        low = -offset  # with hi - lo = 1
        candidates.append({"factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(low + 1),
                           "original_max_position_embeddings": float(slope)})
    for c in candidates:
        wavelen = 2 * math.pi / inv
        low_wl = c["original_max_position_embeddings"] / c["low_freq_factor"]
        high_wl = c["original_max_position_embeddings"] / c["high_freq_factor"]
        smooth = (c["original_max_position_embeddings"] / wavelen - c["low_freq_factor"]) / \
            (c["high_freq_factor"] - c["low_freq_factor"])
        expected = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor,
                                                             1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(expected, ff, rtol=1e-4, atol=1e-6):
            return {"rope_scaling": {"rope_type": "llama3", **c}}
    raise ConvertError("the file's RoPE factors (rope_freqs) are not Llama-3's scaling; not converted for MLX")


def _llama_extra(info: GGUFInfo, tensors: dict) -> dict:
    out = _linear_scaling(info)
    if "rope_freqs" in tensors:
        if out:
            raise ConvertError(f"{info.path.name}: both RoPE factors and RoPE scaling; not converted for MLX")
        out = llama3_scaling(tensors["rope_freqs"], float(_get(info, "rope.freq_base", 10000.0)), _head_dim(info))
    return {**out, "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}


def _qwen2_extra(info: GGUFInfo, tensors: dict) -> dict:
    return _linear_scaling(info)


def _gemma_scalar(info: GGUFInfo, layers_27b: int) -> int:
    """query_pre_attn_scalar as llama.cpp sets it: hidden / heads for the 27B model (told apart by its
    number of layers), else the head size (gemma2.cpp, gemma3.cpp)."""
    if _int(info, "block_count") == layers_27b:
        return _int(info, "embedding_length") // _int(info, "attention.head_count")
    return _head_dim(info)


def _gemma2_extra(info: GGUFInfo, tensors: dict) -> dict:
    if _linear_scaling(info):
        _refuse(info, "RoPE scaling on Gemma-2")
    return {"query_pre_attn_scalar": _gemma_scalar(info, 46),
            "attn_logit_softcapping": float(_get(info, "attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(_get(info, "final_logit_softcapping", 30.0))}


def _gemma3_extra(info: GGUFInfo, tensors: dict) -> dict:
    if _get(info, "final_logit_softcapping"):
        _refuse(info, "final logit softcapping on Gemma-3")
    window = _get(info, "attention.sliding_window")
    if not window or isinstance(_get(info, "attention.sliding_window_pattern"), (list, dict)):
        _refuse(info, "a Gemma-3 without the usual sliding-window pattern")
    return {**_linear_scaling(info), "query_pre_attn_scalar": _gemma_scalar(info, 62), "sliding_window": window,
            "sliding_window_pattern": int(_get(info, "attention.sliding_window_pattern", 6)),
            "rope_local_base_freq": float(_get(info, "rope.freq_base_swa", 10000.0))}


def _phi3_extra(info: GGUFInfo, tensors: dict) -> dict:
    heads, hidden = _int(info, "attention.head_count"), _int(info, "embedding_length")
    rope_dims = _get(info, "rope.dimension_count", hidden // heads)
    out = {"partial_rotary_factor": rope_dims / (hidden // heads),
           "original_max_position_embeddings": int(_get(info, "rope.scaling.original_context_length", 4096))}
    if "rope_factors_short" in tensors:
        # llama.cpp uses the short factors for any context up to the original one (ours always are), and
        # its attention factor; mlx-lm's SuScaledRoPE uses `long_factor` and the same attention factor,
        # sqrt(1 + ln(max / original) / ln(original)), so it is given the short factors.
        original, longest = out["original_max_position_embeddings"], _int(info, "context_length")
        expected = math.sqrt(1 + math.log(longest / original) / math.log(original)) if longest > original else 1.0
        if abs(float(_get(info, "rope.scaling.attn_factor", 1.0)) - expected) > 1e-4:
            _refuse(info, "a Phi-3 RoPE attention factor mlx-lm does not compute")
        short = [float(x) for x in np.asarray(tensors["rope_factors_short"]).reshape(-1)]
        out["rope_scaling"] = {"type": "longrope", "short_factor": short, "long_factor": short}
    return out


def _refuse(info: GGUFInfo, what: str):
    raise ConvertError(f"{info.path.name}: {what} is not converted for MLX")


def _gemma2_window(info: GGUFInfo) -> int:
    return int(_get(info, "attention.sliding_window", 4096))  # mlx-lm's Gemma-2 attends to the whole context


def _phi3_context(info: GGUFInfo) -> int | None:
    # Beyond the original context llama.cpp switches to the long RoPE factors; the converted model has the short ones.
    return int(_get(info, "rope.scaling.original_context_length", 4096)) if _get(info, "rope.scaling.attn_factor") \
        else None


FAMILIES = {
    "llama": Family("llama", LLAMA_LAYER, rope_traditional=True, extra=_llama_extra),
    "qwen2": Family("qwen2", LLAMA_LAYER, rope_traditional=False, extra=_qwen2_extra),
    "qwen3": Family("qwen3", {**LLAMA_LAYER, **QK_NORMS}, rope_traditional=False, extra=_qwen2_extra),
    "gemma2": Family("gemma2", GEMMA_LAYER, rope_traditional=False, norm_shift=1.0, extra=_gemma2_extra,
                     max_context=_gemma2_window),
    "gemma3": Family("gemma3_text", {**GEMMA_LAYER, **QK_NORMS}, rope_traditional=False, norm_shift=1.0,
                     extra=_gemma3_extra),
    "phi3": Family("phi3", PHI3_LAYER, rope_traditional=False, extra=_phi3_extra, max_context=_phi3_context),
}
ARCHITECTURES = tuple(FAMILIES)


def model_config(info: GGUFInfo, tensors: dict | None = None) -> dict:
    """mlx-lm config.json fields from GGUF metadata (without the quantization part); `tensors`:
    the file's small tensors by name (RoPE factors), where the family reads them."""
    arch = info.architecture
    if arch not in FAMILIES:
        raise ConvertError(f"{info.path.name}: architecture {arch!r} is not supported for MLX conversion "
                           f"(supported: {', '.join(FAMILIES)})")
    family = FAMILIES[arch]
    heads = _int(info, "attention.head_count")
    kv_heads = _get(info, "attention.head_count_kv", heads)
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool):
        raise ConvertError(f"{info.path.name}: per-layer head counts are not converted for MLX")
    hidden = _int(info, "embedding_length")
    tokens = info.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConvertError(f"{info.path.name}: the GGUF file has no vocabulary")
    config = {
        "model_type": family.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _int(info, "block_count"),
        "intermediate_size": _int(info, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _head_dim(info),
        "rms_norm_eps": float(_get(info, "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_get(info, "rope.freq_base", 10000.0)),
        "rope_traditional": family.rope_traditional,
        "max_position_embeddings": _int(info, "context_length"),
        "vocab_size": len(tokens),
        "bos_token_id": info.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": info.get("tokenizer.ggml.eos_token_id"),
    }
    config.update(family.extra(info, tensors or {}))
    if (longest := family.max_context(info)) is not None:
        config["magpie_local"] = {"max_context": longest}
    return config


def refusal(info: GGUFInfo) -> str | None:
    """Why the file cannot be converted for MLX exactly (None: it can), read from its metadata and
    tensor list without loading weights: the family, its RoPE scaling, the vocabulary, and every
    tensor against the parameters of mlx-lm's model class (which loads strictly)."""
    try:
        if not info.tensors:
            info = read_gguf(info.path, tensors=True)
        config = model_config(info, _small_tensors(info) if info.architecture in FAMILIES else None)
        vocabulary_problem = tokenizer_refusal(info)
        tensors_problem = _unmatched(info, config)
    except ConvertError as e:
        return str(e).removeprefix(f"{info.path.name}: ")
    return vocabulary_problem or tensors_problem


def _unmatched(info: GGUFInfo, config: dict) -> str | None:
    """What in the file mlx-lm's model class has no parameter for, or the reverse."""
    family = FAMILIES[info.architecture]
    ours = {hf_name(t.name, family) for t in info.tensors if t.name.removesuffix(".weight") not in ROPE_TENSORS}
    try:
        from mlx.utils import tree_flatten
        from mlx_lm.utils import _get_classes
    except ImportError:  # without MLX nothing is converted anyway
        return None
    config = dict(config, tie_word_embeddings="lm_head.weight" not in ours)
    model_class, args_class = _get_classes(config)
    theirs = {name for name, _ in tree_flatten(model_class(args_class.from_dict(config)).parameters())}
    missing, extra = theirs - ours - {"lm_head.weight"}, ours - theirs
    if missing or extra:
        return (f"its tensors do not match mlx-lm's {family.model_type} model (missing "
                f"{', '.join(sorted(missing)[:3]) or 'none'}; extra {', '.join(sorted(extra)[:3]) or 'none'})")
    return None


MLX_NATIVE = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34 / 32, "Q4_1": 20 / 32, "Q4_0": 18 / 32}  # bytes per weight


def copy_bytes(info: GGUFInfo) -> int:
    """About how large the MLX copy of a GGUF file is: its Q4_0, Q4_1, Q8_0 and 16/32-bit tensors as
    they are, any other type dequantized to 16 bits."""
    from gguf.constants import GGMLQuantizationType

    if not info.tensors:
        info = read_gguf(info.path, tensors=True)
    total = 0
    for t in info.tensors:
        try:
            name = GGMLQuantizationType(t.ggml_type).name
        except ValueError:
            name = ""
        total += math.prod(t.shape) * MLX_NATIVE.get(name, 2)
    return int(total)


def hf_name(gguf_name: str, family: Family) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in family.layer:
        return f"model.layers.{parts[1]}.{family.layer[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise ConvertError(f"unexpected tensor {gguf_name!r} for the {family.model_type} architecture")


# -- weights --------------------------------------------------------------------------

def tensor_data(info: GGUFInfo):
    """(name, ggml type name, raw data) of each tensor of a GGUF read with tensors=True, memory-mapped:
    float types as typed arrays in numpy's (rows, columns) order, block types as (rows, bytes per row)
    of uint8. Sizes and offsets are checked against the file (it is untrusted)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ConvertError("MLX conversion needs the `gguf` package: pip install 'magpie-local[mlx]'") from None
    size = info.path.stat().st_size
    raw = np.memmap(info.path, dtype=np.uint8, mode="r")
    for t in info.tensors:
        try:
            kind = GGMLQuantizationType(t.ggml_type)
        except ValueError:
            raise ConvertError(f"{info.path.name}: tensor {t.name} has an unknown type {t.ggml_type}") from None
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if not t.shape or t.shape[0] % block:
            raise ConvertError(f"{info.path.name}: tensor {t.name} rows do not fill whole {kind.name} blocks")
        rows = math.prod(t.shape[1:])
        row_bytes = t.shape[0] // block * block_bytes
        start = info.data_offset + t.offset
        if start + rows * row_bytes > size:
            raise ConvertError(f"{info.path.name}: tensor {t.name} runs past the end of the file")
        data = raw[start:start + rows * row_bytes].reshape(rows, row_bytes)
        numpy_shape = tuple(reversed(t.shape))
        if kind.name in ("F32", "F16", "BF16"):
            dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind.name]
            data = data.view(dtype).reshape(numpy_shape)
        yield t.name, kind, data


def _small_tensors(info: GGUFInfo) -> dict:
    """The file's RoPE factor tensors (a few KB; never a weight), by name."""
    return {name.removesuffix(".weight"): np.array(data, dtype=np.float32) for name, kind, data in tensor_data(info)
            if name.removesuffix(".weight") in ROPE_TENSORS and kind.name == "F32"}


def pack_affine(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit integers (rows, n) packed MLX's way: into uint32 words, lowest bits first."""
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    return np.bitwise_or.reduce(q << (np.arange(per_word, dtype=np.uint32) * bits), axis=2)


def repack(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(packed weights, scales, biases, bits) in MLX's affine format (value = scale * q + bias, per
    group of 32) of GGUF Q4_0, Q4_1 or Q8_0 blocks (rows, blocks per row, block bytes): the very same
    numbers, so MLX multiplies the file's weights."""
    rows = blocks.shape[0]
    d = blocks[..., :2].copy().view(np.float16)[..., 0]  # per block; times a power of two stays exact in F16
    if kind == "Q8_0":
        q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128  # value = d * (q - 128)
        return pack_affine(q.reshape(rows, -1), 8), d, d * np.float16(-128), 8
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        nibbles, bias = blocks[..., 4:20], m  # value = d * q + m
    else:  # Q4_0: value = d * (q - 8)
        nibbles, bias = blocks[..., 2:18], d * np.float16(-8)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # GGUF: low nibbles are values 0-15, high 16-31
    return pack_affine(q.reshape(rows, -1), 4), d, bias, 4


def read_weights(info: GGUFInfo) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(GGUF-named arrays, bits of each quantized module) of a GGUF file read with tensors=True:
    quantized tensors as `name.weight` (packed), `name.scales`, `name.biases`; others as float
    arrays (BF16 as its raw bits, marked in `bits`); RoPE factors left out."""
    from gguf.quants import dequantize

    out, bits = {}, {}
    for name, kind, data in tensor_data(info):
        stem = name.removesuffix(".weight").removesuffix(".bias")
        if stem in ROPE_TENSORS:
            continue
        shape = tuple(reversed(next(t.shape for t in info.tensors if t.name == name)))
        if kind.name in ("Q4_0", "Q4_1", "Q8_0") and name.endswith(".weight") and len(shape) == 2:
            block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind.name]
            packed, scales, biases, width = repack(kind.name, data.reshape(data.shape[0], -1, block_bytes))
            out[name], out[f"{stem}.scales"], out[f"{stem}.biases"] = packed, scales, biases
            bits[stem] = width
        elif kind.name in ("F32", "F16"):
            out[name] = np.asarray(data)
        elif kind.name == "BF16":
            out[name] = np.asarray(data)  # kept as bfloat16 bits (to_mlx)
            bits[f"{name}:bf16"] = 16
        else:
            out[name] = dequantize(np.asarray(data), kind).astype(np.float16).reshape(shape)
    return out, bits


def to_mlx(name: str, value: np.ndarray, bits: dict):
    import mlx.core as mx

    if f"{name}:bf16" in bits:
        return mx.array(value).view(mx.bfloat16)
    return mx.array(value)


def convert_weights(info: GGUFInfo, family: Family) -> tuple[dict, dict]:
    """(mlx-lm weights, quantization config) of a GGUF file (read with tensors=True) for `family`."""
    raw, bits = read_weights(info)
    weights, quantized = {}, {}
    for name, value in raw.items():
        if family.norm_shift and name.endswith("norm.weight"):
            value = value.astype(np.float32) - family.norm_shift
        target = hf_name(name, family)
        weights[target] = to_mlx(name, value, bits)
        stem = name.rsplit(".", 1)[0]
        if stem in bits:
            quantized[target.rsplit(".", 1)[0]] = bits[stem]
    if not quantized:
        return weights, {}
    common = max(set(quantized.values()), key=list(quantized.values()).count)
    config: dict = {"group_size": GROUP_SIZE, "bits": common}
    for name, value in weights.items():
        if name.endswith(".weight") and value.ndim == 2:
            module = name.removesuffix(".weight")
            if module not in quantized:
                config[module] = False  # a plain layer
            elif quantized[module] != common:
                config[module] = {"group_size": GROUP_SIZE, "bits": quantized[module]}
    return weights, config


# -- tokenizer ------------------------------------------------------------------------

def tokenizer_refusal(info: GGUFInfo) -> str | None:
    kind, pre = info.get("tokenizer.ggml.model"), info.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2":
        if pre not in PRE_TOKENIZERS:
            return f"pre-tokenizer {pre!r} is not supported for MLX conversion (supported: {', '.join(PRE_TOKENIZERS)})"
        return None
    if kind == "llama":
        scored = isinstance(info.get("tokenizer.ggml.scores"), list)
        return None if scored else "a SentencePiece vocabulary without scores"
    return (f"tokenizer model {kind!r} is not supported for MLX conversion (supported: byte-level BPE 'gpt2', "
            "SentencePiece 'llama')")


def build_tokenizer(info: GGUFInfo):
    """A `tokenizers.Tokenizer` equal to llama.cpp's for the GGUF vocabulary."""
    if (problem := tokenizer_refusal(info)) is not None:
        raise ConvertError(f"{info.path.name}: {problem}")
    from tokenizers import AddedToken, processors

    from .vocab import GGUFVocabFile

    tokenizer = _bpe_tokenizer(info) if info.get("tokenizer.ggml.model") == "gpt2" else _spm_tokenizer(info)
    tokens = info.get("tokenizer.ggml.tokens")
    types = info.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    llama = GGUFVocabFile(info.path)  # what llama.cpp itself decided for this vocabulary
    try:
        special = [(i, t, *llama.strips(i)) for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        adds_bos = llama.add_bos
    finally:
        llama.close()
    tokenizer.add_tokens([AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False, lstrip=left,
                                     rstrip=right) for i, t, left, right in special])
    bos = info.get("tokenizer.ggml.bos_token_id")
    if adds_bos and isinstance(bos, int) and 0 <= bos < len(tokens):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)])
    return tokenizer


def _bpe_tokenizer(info: GGUFInfo):
    """Byte-level BPE: llama.cpp's pre-tokenizer split, then merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = info.get("tokenizer.ggml.pre", "default")
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
    return tokenizer


def spm_merges(tokens: list[str], scores: list[float], usable: list[bool]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's (and llama.cpp's) merging by score: every split of a
    vocabulary piece into two pieces of the vocabulary, the highest-scoring result first (Hugging Face's
    SentencePieceExtractor does the same to convert Llama's tokenizer)."""
    index = {t: i for i, t in enumerate(tokens) if usable[i]}
    found = []
    for merged, i in index.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in index and right in index:
                found.append((-scores[i], i, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _spm_tokenizer(info: GGUFInfo):
    """SentencePiece (BPE by piece score, byte fallback): spaces become '▁', and llama.cpp puts one in
    front of the text (and of each text after a special token) where the vocabulary asks for it."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = info.get("tokenizer.ggml.tokens"), info.get("tokenizer.ggml.scores")
    types = info.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise ConvertError(f"{info.path.name}: the GGUF vocabulary's scores or token types do not match its tokens")
    usable = [t in (TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_BYTE) for t in types]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk = info.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, usable), byte_fallback=True,
                                     unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
                                     fuse_unk=True))
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    prefix = info.get("tokenizer.ggml.add_space_prefix", True)
    if prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # No Strip of the prefixed space: llama.cpp's text of generated tokens keeps a first token's space.
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def adds_bos(path: Path) -> bool:
    """Whether llama.cpp puts BOS in front of this vocabulary's text: the file's own key where it has
    one, else llama.cpp's default for its kind of vocabulary (so asked of llama.cpp itself)."""
    from .vocab import GGUFVocabFile

    vocab = GGUFVocabFile(path)
    try:
        return vocab.add_bos
    finally:
        vocab.close()


def tokenizer_config(info: GGUFInfo) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": info.bos_token or None,
        "eos_token": info.eos_token or None,
        "add_bos_token": adds_bos(info.path),
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
    info = read_gguf(source, tensors=True)
    config = model_config(info, _small_tensors(info) if info.architecture in FAMILIES else None)
    tokenizer = build_tokenizer(info)
    weights, quantization = convert_weights(info, FAMILIES[info.architecture])
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    if quantization:
        config["quantization"] = quantization
    with temporary_folder_beside(output) as tmp:  # the directory appears whole or not at all
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(info), indent=2) + "\n")
    return output
