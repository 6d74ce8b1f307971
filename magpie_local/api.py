"""The Python API: what each command does, as functions that take Python values and return them.

The CLI is a thin layer over these: it parses options, calls a function here, and renders the
result. Errors are MagpieError subclasses with one-line messages (see errors.py).

    import magpie_local as ml

    result = ml.generate("magpie.db", 20)
    print(result.counts)  # {'kept': 20, 'dropped': 3, ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from .backends import ServerOptions, cache_dir, capabilities, open_backend, pick_backend
from .backends.base import BackendError, Sampling, single_token_ids
from .convert import WEIGHTS, cached_copy, copy_wanted
from .errors import UsageError
from .generate import GENERATE_CHECKS, PRESETS, GenerateSettings, Generation, chat_format, run_config
from .models import Model, resolve_model, sha256_file
from .store import Run, Store

Announce = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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


def sampling_preset(name: str) -> tuple[Sampling, Sampling]:
    """(instruction, response) sampling of a named preset (see generate.PRESETS)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_sampling(settings: GenerateSettings, backend_name: str) -> None:
    """Refuse, before any run is made, sampling settings that are out of range or that the
    backend cannot apply (by its declared capabilities)."""
    caps = capabilities(backend_name)
    for step, s in (("instruction", settings.instruction), ("response", settings.response)):
        for problem in s.problems():
            raise UsageError(f"{step} {problem}")
        for control in caps.unsupported(s):
            raise UsageError(f"{step} {control.replace('_', '-')} is not available on the {backend_name} backend")


def check_bans(m: Model, settings: GenerateSettings) -> None:
    """Refuse ban lists that name anything but single tokens of the model's vocabulary (read
    without the weights), before a database is touched."""
    bans = settings.instruction.ban_first + settings.response.ban_first
    if not bans:
        return
    from .vocab import GGUFVocabFile, HFVocab

    vocab = GGUFVocabFile(m.path) if m.kind == "gguf" else HFVocab(m.path / "tokenizer.json", m.bos_token)
    try:
        single_token_ids(vocab, bans)
    except BackendError as e:
        raise UsageError(f"ban_first: {e}") from None
    finally:
        vocab.close()


def with_family_defaults(settings: GenerateSettings, model: Model, backend_name: str) -> GenerateSettings:
    """The settings with the template family's first-token ban (Llama-3.1: markdown headers, as the
    Magpie reference does) where none is given and the backend can apply one."""
    if settings.instruction.ban_first or "ban_first" not in capabilities(backend_name).sampling_controls:
        return settings
    fmt = chat_format(model, settings)
    bans = fmt.family.default_bans(model.chat_template) if fmt.family else ()
    return replace(settings, instruction=replace(settings.instruction, ban_first=bans)) if bans else settings


BACKEND_NAMES = {"llamacpp": "llama.cpp", "mlx": "MLX", "server": "server"}


def backend_with(capability: str, choice: str, model: Model, work: str) -> str:
    """The backend `choice` means for work that needs `capability` (a Capabilities flag): auto is the
    first local backend that has it; a backend without it is refused with the reason."""
    able = [b for b in BACKEND_NAMES if getattr(capabilities(b), capability)]
    if choice == "auto":
        choice = next(b for b in able if b != "server")
    if choice not in able:
        names = " or ".join(f"the {BACKEND_NAMES[b]} backend" for b in able)
        raise UsageError(f"{work} needs {names}; use --backend {able[0]}")
    return pick_backend(choice, model)


def weights_copy(m: Model, weights: str, backend_name: str, role: str) -> str | None:
    """The weight type of the copy --weights runs `m` on, or None for the file; a copy where there
    can be none is refused."""
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of: {', '.join(WEIGHTS)}")
    if weights not in ("auto", "file") and (backend_name != "llamacpp" or m.kind != "gguf"):
        raise UsageError(f"--weights {weights} is for a GGUF {role} on the llama.cpp backend")
    return copy_wanted(m, weights) if backend_name == "llamacpp" else None


def model_copy(m: Model, sha: str, kind: str, announce: Announce = _quiet) -> Model:
    """The `kind` copy of GGUF model `m`, made once in the cache."""
    return resolve_model(str(cached_copy(m, sha, kind, cache_dir() / kind, announce)))


def model_and_backend(model: str | None, tokenizer: str | None, choice: str,
                      server: ServerOptions) -> tuple[Model, str, ServerOptions]:
    """(the model, the backend that runs it, the server options with the served model named).
    For the server backend the model is the served model's local tokenizer and chat template."""
    if server.endpoints or choice == "server":
        name = pick_backend(choice, None, server.endpoints)
        if tokenizer and model:
            raise UsageError("--tokenizer and --model name the same thing with --backend server; give one")
        return resolve_model(tokenizer or model, weights=False), name, server.resolved()
    if tokenizer:
        raise UsageError("--tokenizer is for --backend server; a local backend tokenizes with --model")
    for flag, value in (("--api-key-env", server.api_key_env), ("--served-model", server.served_model)):
        if value:
            raise UsageError(f"{flag} is for --backend server (with --endpoint URL)")
    m = resolve_model(model)
    return m, pick_backend(choice, m), server


@dataclass
class GenerateResult:
    """What a generate call did: the run, its counts after it, and this call's own work."""

    run: Run
    counts: dict[str, int]  # the run's kept, dropped and next_item, as stored
    made: int = 0  # kept pairs this call added
    tokens: int = 0  # tokens this call generated
    seconds: float = 0.0
    status: str = "complete"  # complete, or already-complete (nothing to do)
    spread: dict[str, int] = field(default_factory=dict)  # requests per endpoint (server backend)


@dataclass
class Progress:
    """Callbacks a generate call reports through (all optional): `start(run, kept, new)` once the run
    is known, `tokens(k)` as tokens are generated, `item(gained)` as each item ends (1 if it added
    a kept pair)."""

    start: Callable[[Run, int, bool], None] | None = None
    tokens: Callable[[int], None] | None = None
    item: Callable[[int], None] | None = None


def generate(db: str | Path, n: int, settings: GenerateSettings | None = None, *, model: str | None = None,
             backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
             weights: str = "auto", ctx: int = 1024, parallel: int | None = None, threads: int | None = None,
             batch_size: int = 16, resume: int | None = None, new: bool = False,
             progress: Progress | None = None, announce: Announce = _quiet) -> GenerateResult:
    """Generate Magpie pairs into `db` until the run holds exactly `n` kept pairs.

    The same call again continues the same run (after a crash or Ctrl-C); a larger `n` extends
    it; `resume=ID` continues run ID with its stored settings; `new=True` starts another run even
    if one with these settings exists. `settings` default to the measured defaults
    (GenerateSettings()). Raises MagpieError subclasses for bad input; a KeyboardInterrupt leaves
    every committed batch in place.
    """
    settings = settings or GenerateSettings()
    server = server or ServerOptions()
    progress = progress or Progress()
    if n < 1:
        raise UsageError("-n must be at least 1")
    for name, value in (("--batch-size", batch_size), ("--parallel", 1 if parallel is None else parallel)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if resume is not None and new:
        raise UsageError("--resume and --new cannot be combined")
    if not 1 <= settings.turns <= 50:
        raise UsageError("--turns must be between 1 and 50")
    if resume is None:  # check the model, its template and the backend before the DB is created or touched
        m, backend_name, server = model_and_backend(model, tokenizer, backend, server)
        check_sampling(settings, backend_name)
        settings = with_family_defaults(settings, m, backend_name)
        check_bans(m, settings)
        chat_format(m, settings)
        copy = weights_copy(m, weights, backend_name, "model")
    with Store(db) as store:
        run = None
        if resume is not None:
            run = store.get_run(resume)
            if run.kind != "generate":
                raise UsageError(f"run {resume} is not a generation run")
            settings = GenerateSettings.from_dict(run.config["settings"])
            choice = run.backend if backend == "auto" and run.backend else backend
            m, backend_name, server = model_and_backend(model or (None if tokenizer else run.config["model_path"]),
                                                        tokenizer, choice, server)
            check_sampling(settings, backend_name)
            copy = weights_copy(m, run.config.get("weights", "file"), backend_name, "model")  # as made
        sha = store.cached_sha256(m.path, sha256_file)
        fmt = chat_format(m, settings)
        key, config = run_config(m, fmt, settings, sha, backend_name, server.served_model, weights=copy)
        if run is None and not new:
            run = store.find_run("generate", key)
        kept = 0
        if run is not None:
            if run.config["model_sha256"] != sha:
                raise UsageError(f"run {run.id} was made with another model file "
                                 f"(sha256 {run.config['model_sha256'][:12]}...)")
            # Re-render with the run's own clock, so templates that print today's date stay stable.
            fmt = chat_format(m, settings, datetime.fromisoformat(run.config["template_time"]))
            kept = store.run_counts(run.id)["kept"]
            if kept > n:
                raise UsageError(f"run {run.id} already holds {kept} pairs, more than -n {n}")
            if kept == n and run.status == "complete":
                return GenerateResult(run, store.run_counts(run.id), status="already-complete")
            if run.backend != backend_name:
                raise UsageError(f"run {run.id} was made with --backend {run.backend}; continue it with that backend")
        opened = open_backend(backend_name, model_copy(m, sha, copy, announce) if copy else m, sha, ctx=ctx,
                              parallel=parallel, threads=threads, announce=announce, server=server)
        with opened:
            is_new = run is None
            if is_new:
                config["model_path"] = str(m.path.resolve())
                if backend_name == "server":  # what each step's requests carry, under the servers' names
                    from .backends.server import sampling_payload

                    config["server_sampling"] = {"instruction": sampling_payload(settings.instruction),
                                                 "response": sampling_payload(settings.response)}
                run = store.create_run(kind="generate", target=n, config_key=key, config=config,
                                       model={"name": m.name, "path": str(m.path.resolve()), "sha256": sha},
                                       backend=opened.name, versions=opened.describe())
            elif run.target != n or run.status != "complete":
                store.set_target(run.id, n)
                run.target = n
            if progress.start:
                progress.start(run, kept, is_new)
            tokens = 0

            def on_tokens(k: int) -> None:
                nonlocal tokens
                tokens += k
                if progress.tokens:
                    progress.tokens(k)

            started = time.perf_counter()
            gen = Generation(store, run, opened, fmt, settings, batch_size=batch_size, on_tokens=on_tokens,
                             on_item=progress.item)
            try:
                counts = gen.run_until_target()
            except BackendError as e:  # a server gone, say: what is committed stays
                done = store.run_counts(run.id)
                raise BackendError(f"{e}. Run {run.id} holds {done['kept']}/{run.target} committed pairs; "
                                   "run the same command again to go on.") from None
            return GenerateResult(run, counts, made=counts["kept"] - kept, tokens=tokens,
                                  seconds=time.perf_counter() - started, spread=opened.spread())
