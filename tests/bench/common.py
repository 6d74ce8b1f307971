"""Shared by the benchmarks: the opt-in fast copy of the default model, made once and cached."""

from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def model_path(kind: str | None) -> Path:
    """The default model (kind None) or its copy in another weight type (`magpie-local models convert`)."""
    from magpie_local.convert import convert_gguf, default_output
    from magpie_local.models import resolve_model

    source = resolve_model(None).path
    if kind is None:
        return source
    folder = RESULTS / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = default_output(source, kind, folder)
    if not path.exists():
        convert_gguf(source, path, kind)
    return path
