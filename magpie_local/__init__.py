"""magpie-local: Magpie instruction data synthesis, IFD scoring and curation on a local model."""

__version__ = "0.1.0"
