"""magpie-local: Magpie instruction data synthesis, IFD scoring and curation on a local model.

The Python API (docs/python-api.md); every CLI command is a thin layer over it:

    import magpie_local as ml

    result = ml.generate("magpie.db", 20)          # 20 pairs on the embedded default model
    print(result.counts["kept"], result.made)
"""

from ._version import __version__
from .api import GenerateResult, Progress, generate
from .backends import ServerOptions
from .backends.base import Sampling
from .errors import MagpieError, UsageError
from .generate import PRESETS, GenerateSettings
from .store import Run, Store

__all__ = ["GenerateResult", "GenerateSettings", "MagpieError", "PRESETS", "Progress", "Run", "Sampling",
           "ServerOptions", "Store", "UsageError", "__version__", "generate"]
