"""Regenerates vocab_markers.json: the ids of marker-like tokens in real vocabularies.

Source: the vocab-only GGUFs in llama-cpp-python's sdist (vendor/llama.cpp/models, MIT).
Usage: python tests/data/extract_vocab_markers.py SDIST_MODELS_DIR
"""

import json
import re
import sys
from pathlib import Path

from magpie_local.gguf import read_gguf

VOCABS = {"llama-bpe": "Llama 3", "llama-spm": "Llama 2 / Vicuna", "qwen2": "Qwen2", "phi-3": "Phi-3"}
MARKERISH = re.compile(r"^(<[^<>\s]{1,60}>|\[/?[A-Z_]{2,24}\])$")

out = {}
for name, models in VOCABS.items():
    info = read_gguf(Path(sys.argv[1]) / f"ggml-vocab-{name}.gguf")
    tokens = info.get("tokenizer.ggml.tokens")
    out[name] = {"models": models, "bos": info.bos_token, "eos": info.eos_token,
                 "tokens": {t: i for i, t in enumerate(tokens)
                            if MARKERISH.match(t) and "reserved" not in t and not t.startswith("<0x")}}
Path(__file__).with_name("vocab_markers.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
