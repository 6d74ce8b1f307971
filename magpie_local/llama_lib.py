"""Loading llama-cpp-python's low-level bindings once, with llama.cpp's own logging silenced.

Shared by the llama.cpp backend, the GGUF vocabularies (vocab.py) and the converter (convert.py),
so that none of them reaches into another's internals.
"""

from __future__ import annotations

import ctypes
import os

from .errors import MagpieError

_LOG_CALLBACK = None  # keep the ctypes callback alive for the life of the process


class LlamaLibError(MagpieError, RuntimeError):
    """llama-cpp-python is missing."""


def llama_cpp():
    """The llama_cpp module, initialised and quiet."""
    global _LOG_CALLBACK
    # Batch invariance: from 8 rows a decode, ggml multiplies K-quant and i-quant weights (Q2_K..Q6_K,
    # IQ4_XS, ...) with a tiled kernel that sums in another order than its vec_dot kernel below 8,
    # so an item's tokens would depend on how many items share its steps. Off, every row takes
    # vec_dot, and generation was measured no slower (docs/throughput.md, Weight types). It must be
    # set before llama.cpp is loaded; GGML_CPU_TILED_MM=1 in the environment brings the tiled
    # kernel back, and with it data that depends on --parallel.
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    # OpenMP's threads spin 300,000 rounds at a barrier before they sleep. When another program
    # holds a core, the spinning thread burns the time slices its partner needs (17 against 416
    # tok/s idle, with one CPU-bound process beside a 2-thread run); at 10,000 rounds the idle
    # speed was the same within noise, and 1,000 was near the cliff below which it fell (500: 75%).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    try:
        import llama_cpp as lc
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LlamaLibError(f"llama-cpp-python is not installed ({e}); run `make install`") from None
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        lc.llama_backend_init()
    return lc
