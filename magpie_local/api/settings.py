"""A command's settings, checked once, in one place, before anything is opened or written:
numbers in range, sampling against the backend's declared capabilities, the chat format built
once (which checks the system prompts), the template family's defaults, ban lists against the
model's vocabulary."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import replace

from ..backends import capabilities
from ..backends.base import BackendError, Sampling, single_token_ids
from ..errors import UsageError
from ..generate import GENERATE_CHECKS, PRESETS, GenerateSettings, chat_format
from ..models import Model
from ..templates import ChatFormat

# What turns each control off (Sampling.controls() names).
CONTROLS_OFF = {"repeat_penalty": {"repeat_penalty": 1.0}, "frequency_penalty": {"frequency_penalty": 0.0},
                "presence_penalty": {"presence_penalty": 0.0}, "dry": {"dry_multiplier": 0.0},
                "ban_first": {"ban_first": ()}, "stop_loops": {"stop_loops": False}}


INT64 = 2**63  # SQLite stores integers in 64 bits
# Parameter names whose command-line flag is not --name-with-dashes.
FLAGS = {"n": "-n", "source": "--run", "runs": "--run", "run": "--run", "responses": "--responses"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_number(name: str, value) -> None:
    """Refuse an integer SQLite cannot store and a float that is not a finite number (NaN,
    infinity), in `value`, a list of them, or the fields of a settings dataclass."""
    if isinstance(value, Sampling):
        return  # Sampling.problems() words these per step (check_sampling)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_number(f.name, getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_number(name, v)
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise UsageError(f"{flag(name)} {value} is out of range (at most {INT64 - 1})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag(name)} must be a finite number, not {value}")


def numbers_checked(func):
    """One layer for every API function's numbers: before `func` runs, each argument that is a
    number, a list of numbers or a settings dataclass passes check_number."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def checked(*args, **kwargs):
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            check_number(name, value)
        return func(*args, **kwargs)

    return checked


def at_least(low: int, *options: tuple[str, int | None]) -> None:
    """Refuse any of the (option, value) pairs whose value is below `low` (None: not given)."""
    for name, value in options:
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low}")


def resolve_passing(spec: str | None, language: str | None) -> tuple[str, ...]:
    """--passing for generate: `all` (every check generation can apply; `language` when a language
    is asked for), or a comma-separated list of GENERATE_CHECKS; `duplicate` is always applied."""
    if not spec or spec.strip() == "none":
        return ()
    if spec.strip() == "all":
        return tuple(c for c in GENERATE_CHECKS if c != "language" or language)
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in (*GENERATE_CHECKS, "duplicate")]
    if unknown or not names:
        raise UsageError(f"generate --passing takes all or some of {', '.join(GENERATE_CHECKS)}, duplicate; "
                         f"not {', '.join(unknown) or spec!r} (near_duplicate needs `curate --near-dup-model`)")
    if "language" in names and not language:
        raise UsageError("--passing language needs --language")
    return tuple(c for c in GENERATE_CHECKS if c in names)  # duplicate: generation drops those anyway


def sampling_for(sampling: Sampling, backend: str) -> Sampling:
    """`sampling` without the default controls `backend` cannot apply (see sampling_preset)."""
    caps = capabilities(backend)
    return replace(sampling, **{k: v for c in caps.unsupported(sampling) for k, v in CONTROLS_OFF[c].items()})


def sampling_preset(name: str, backend: str | None = None) -> tuple[Sampling, Sampling]:
    """(instruction, response) sampling of a named preset (see generate.PRESETS); for a `backend`,
    without the preset's controls it cannot apply (MLX has no DRY), so a preset works everywhere.
    A control given explicitly that a backend lacks is refused instead (check_sampling)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; one of: {', '.join(PRESETS)}")
    if backend is None:
        return PRESETS[name]
    return tuple(sampling_for(s, backend) for s in PRESETS[name])


def respond_sampling(responses: int, backend: str) -> Sampling:
    """The default sampling for `responses` answers per instruction (respond.default_sampling), less
    the controls `backend` cannot apply."""
    from ..respond import default_sampling

    return sampling_for(default_sampling(responses), backend)


def check_sampling(settings: GenerateSettings, backend: str) -> None:
    """Refuse sampling settings that are out of range or that the backend cannot apply (by its
    declared capabilities)."""
    caps = capabilities(backend)
    for step, s in (("instruction", settings.instruction), ("response", settings.response)):
        for problem in s.problems():
            raise UsageError(f"{step} {problem}")
        for control in caps.unsupported(s):
            raise UsageError(f"{step} {control.replace('_', '-')} is not available on the {backend} backend")


def check_bans(m: Model, settings: GenerateSettings) -> None:
    """Refuse ban lists that name anything but single tokens of the model's vocabulary (read
    without the weights)."""
    bans = settings.instruction.ban_first + settings.response.ban_first
    if not bans:
        return
    from ..vocab import GGUFVocabFile, HFVocab

    vocab = GGUFVocabFile(m.path) if m.kind == "gguf" else HFVocab(m.path / "tokenizer.json", m.bos_token)
    try:
        single_token_ids(vocab, bans)
    except BackendError as e:
        raise UsageError(f"ban_first: {e}") from None
    finally:
        vocab.close()


def generation_settings(settings: GenerateSettings | None, model: Model,
                        backend: str) -> tuple[GenerateSettings, ChatFormat]:
    """A generate call's settings, checked against the model and its backend, and the chat format
    they run with: the measured default preset (less what the backend cannot apply) where none
    are given; the template family's first-token ban (Llama-3.1: markdown headers, as the Magpie
    reference does) where none is given and the backend applies one."""
    if settings is None:
        inst, resp = sampling_preset("default", backend)
        settings = GenerateSettings(instruction=inst, response=resp)
    if not 1 <= settings.turns <= 50:
        raise UsageError("--turns must be between 1 and 50")
    check_sampling(settings, backend)
    fmt = chat_format(model, settings)
    if not settings.instruction.ban_first and "ban_first" in capabilities(backend).sampling_controls:
        bans = fmt.family.default_bans(model.chat_template) if fmt.family else ()
        if bans:
            settings = replace(settings, instruction=replace(settings.instruction, ban_first=bans))
    check_bans(model, settings)
    return settings, fmt


def backend_name(model: str | None, choice: str, endpoints: tuple[str, ...] = ()) -> str:
    """The backend `choice` means for `model` (see backends.choose_backend), without loading anything
    or asking a server."""
    from ..backends import choose_backend, remote
    from ..models import resolve_model

    if remote(choice, endpoints):
        return choose_backend(choice, None, endpoints).name
    return choose_backend(choice, resolve_model(model)).name


def backend_title(name: str) -> str:
    """How users know backend `name`: llama.cpp, MLX, server."""
    from ..backends import title

    return title(name)
