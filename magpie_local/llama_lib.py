"""Loading llama-cpp-python's low-level bindings once, with llama.cpp's own logging silenced.

Shared by the llama.cpp backend, the GGUF vocabularies (vocab.py) and the converter (convert.py),
so that none of them reaches into another's internals.
"""

from __future__ import annotations

import ctypes
import os

from .errors import MagpieError

_LOG_CALLBACK = None  # keep the ctypes callback alive for the life of the process


def default_threads() -> int:
    """llama.cpp's threads when not told: one per physical core this process may run on (its CPU
    affinity: a container's, or `taskset`'s, share of the machine), as llama.cpp itself counts them;
    a second hardware thread of a core only waits for the first in these compute-bound loops."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows: no affinity; every logical CPU
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


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
    try:
        import llama_cpp as lc
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LlamaLibError(f"llama-cpp-python is not installed ({e}); run `make install`") from None
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        lc.llama_backend_init()
    return lc
