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

from .backends import ServerOptions, backend_key, cache_dir, capabilities, open_backend, pick_backend
from .backends.base import BackendError, Sampling, single_token_ids
from .convert import WEIGHTS, cached_copy
from .errors import UsageError
from .generate import GENERATE_CHECKS, PRESETS, GenerateSettings, Generation, chat_format, run_config
from .models import Model, resolve_model, sha256_file
from .store import Run, Store, config_key
from .tune import auto_skips, copy_wanted

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


# What turns each control off (Sampling.controls() names).
CONTROLS_OFF = {"repeat_penalty": {"repeat_penalty": 1.0}, "frequency_penalty": {"frequency_penalty": 0.0},
                "presence_penalty": {"presence_penalty": 0.0}, "dry": {"dry_multiplier": 0.0},
                "ban_first": {"ban_first": ()}, "stop_loops": {"stop_loops": False}}


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


def backend_name(model: str | None, choice: str, endpoints: tuple[str, ...] = ()) -> str:
    """The backend `choice` means (see backends.pick_backend), without loading anything."""
    if endpoints or choice == "server":
        return pick_backend(choice, None, endpoints)
    return pick_backend(choice, resolve_model(model))


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


def weights_copy(m: Model, weights: str, backend_name: str, role: str, announce: Announce = _quiet) -> str | None:
    """The weight type of the copy --weights runs `m` on, or None for the file; a copy where there
    can be none is refused. auto: what measured fastest here for a generating model's steps, or
    for the prompts of a scorer, judge or embedder (tune.py)."""
    if weights not in WEIGHTS:
        raise UsageError(f"--weights must be one of: {', '.join(WEIGHTS)}")
    if weights not in ("auto", "file") and (backend_name != "llamacpp" or m.kind != "gguf"):
        raise UsageError(f"--weights {weights} is for a GGUF {role} on the llama.cpp backend")
    if backend_name != "llamacpp":
        return None
    return copy_wanted(m, weights, "step" if role == "model" else "prompt", announce)


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
    instructions: GenerateResult | None = None  # with a response model: the instruction run's own result


@dataclass
class Progress:
    """Callbacks a generate call reports through (all optional): `start(run, kept, new)` once the run
    is known, `tokens(k)` as tokens are generated, `item(gained)` as each item ends (1 if it added
    a kept pair)."""

    start: Callable[[Run, int, bool], None] | None = None
    tokens: Callable[[int], None] | None = None
    item: Callable[[int], None] | None = None


class _TokenCount:
    """Counts the tokens a call generates, passing each report on to `progress.tokens`."""

    def __init__(self, progress: Progress):
        self.n, self.progress = 0, progress

    def __call__(self, k: int) -> None:
        self.n += k
        if self.progress.tokens:
            self.progress.tokens(k)


def generate(db: str | Path, n: int, settings: GenerateSettings | None = None, *, model: str | None = None,
             backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
             weights: str = "auto", ctx: int = 1024, parallel: int | None = None, threads: int | None = None,
             batch_size: int = 16, resume: int | None = None, new: bool = False,
             response_model: str | None = None, response_weights: str = "auto",
             progress: Progress | None = None, announce: Announce = _quiet) -> GenerateResult:
    """Generate Magpie pairs into `db` until the run holds exactly `n` kept pairs.

    The same call again continues the same run (after a crash or Ctrl-C); a larger `n` extends
    it; `resume=ID` continues run ID with its stored settings; `new=True` starts another run even
    if one with these settings exists. `settings` default to the measured defaults (the `default`
    preset, less what the backend cannot apply). Raises MagpieError subclasses for bad input; a KeyboardInterrupt leaves
    every committed batch in place.

    `response_model` (a local model) answers the instructions instead of `model`: `model` writes
    instructions alone into one run, `response_model` answers them into a respond run linked to it
    (with `settings.response` sampling and the `passing` checks), and more instructions are drawn
    until that run holds `n` kept pairs. The result is the respond run's; `.instructions` is the
    instruction run's.
    """
    if response_model is not None:
        return _generate_then_respond(db, n, settings, response_model, response_weights, progress, announce,
                                      dict(model=model, backend=backend, server=server, tokenizer=tokenizer,
                                           weights=weights, ctx=ctx, parallel=parallel, threads=threads,
                                           batch_size=batch_size, resume=resume, new=new))
    return _generate(db, n, settings, model=model, backend=backend, server=server, tokenizer=tokenizer,
                     weights=weights, ctx=ctx, parallel=parallel, threads=threads, batch_size=batch_size,
                     resume=resume, new=new, progress=progress, announce=announce)


def _generate(db, n, settings, *, model, backend, server, tokenizer, weights, ctx, parallel, threads, batch_size,
              resume, new, progress, announce, at_least: bool = False) -> GenerateResult:
    """generate() with one model. `at_least`: `n` is a floor, and a run that holds more (or was
    set a larger target) is left with its own target."""
    server = server or ServerOptions()
    progress = progress or Progress()
    if n < 1:
        raise UsageError("-n must be at least 1")
    for name, value in (("--batch-size", batch_size), ("--parallel", 1 if parallel is None else parallel)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    if resume is not None and new:
        raise UsageError("--resume and --new cannot be combined")
    if settings is not None and not 1 <= settings.turns <= 50:
        raise UsageError("--turns must be between 1 and 50")
    if resume is None:  # check the model, its template and the backend before the DB is created or touched
        m, backend_name, server = model_and_backend(model, tokenizer, backend, server)
        if settings is None:  # the default preset, as this backend can apply it
            inst, resp = sampling_preset("default", backend_name)
            settings = GenerateSettings(instruction=inst, response=resp)
        check_sampling(settings, backend_name)
        settings = with_family_defaults(settings, m, backend_name)
        check_bans(m, settings)
        chat_format(m, settings)
        copy = weights_copy(m, weights, backend_name, "model", announce)
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
            copy = weights_copy(m, run.config.get("weights", "file"), backend_name, "model", announce)  # as made
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
            done = store.run_counts(run.id)
            kept = done["kept"] + done["pending"]
            if at_least:
                n = max(n, run.target, kept)
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
            on_tokens = _TokenCount(progress)

            started = time.perf_counter()
            gen = Generation(store, run, opened, fmt, settings, batch_size=batch_size, on_tokens=on_tokens,
                             on_item=progress.item)
            try:
                counts = gen.run_until_target()
            except BackendError as e:  # a server gone, say: what is committed stays
                done = store.run_counts(run.id)
                raise BackendError(f"{e}. Run {run.id} holds {done['kept']}/{run.target} committed pairs; "
                                   "run the same command again to go on.") from None
            made = counts["kept"] + counts["pending"] - kept
            return GenerateResult(run, counts, made=made, tokens=on_tokens.n,
                                  seconds=time.perf_counter() - started, spread=opened.spread())


def _generate_then_respond(db, n: int, settings: GenerateSettings | None, response_model: str,
                           response_weights: str, progress: Progress | None, announce: Announce,
                           options: dict) -> GenerateResult:
    """generate(response_model=...): instructions from one model, answers from another, until the
    respond run holds `n` kept pairs. Each round draws as many more instructions as answers are
    missing, so a run killed in any round and started again stores the same bytes."""
    from .generate import MAX_DROP_FACTOR, GenerateError
    from .prompts import language_code
    from .respond import RespondSettings

    if options["resume"] is not None:
        raise UsageError("--resume continues one run; with --response-model run the same command again")
    if settings is None:
        name = backend_name(options["tokenizer"] or options["model"], options["backend"],
                            (options["server"] or ServerOptions()).endpoints)
        inst, resp = sampling_preset("default", name)
        settings = GenerateSettings(instruction=inst, response=resp)
    if settings.turns != 1:
        raise UsageError("--response-model answers first-turn instructions; it takes --turns 1")
    answering = backend_name(response_model, "auto")
    answers = RespondSettings(seed=settings.seed, sampling=sampling_for(settings.response, answering),
                              keep_thinking=settings.keep_thinking, passing=settings.passing,
                              language=language_code(settings.language) if settings.language else None)
    instructions = replace(settings, instructions_only=True, passing=())
    target, new = n, options.pop("new")
    while True:
        made = _generate(db, target, instructions, **options, new=new, progress=progress, announce=announce,
                         at_least=True)
        result = respond(db, made.run.id, answers, model=response_model, weights=response_weights,
                         ctx=options["ctx"], parallel=options["parallel"], threads=options["threads"],
                         batch_size=options["batch_size"], new=new, progress=progress, announce=announce)
        result.instructions = made
        counts = result.counts
        if counts["kept"] >= n:
            return result
        if counts["dropped"] > MAX_DROP_FACTOR * n + 100:
            raise GenerateError(f"{counts['dropped']} answers dropped for {counts['kept']} kept; "
                                "check the response model and settings (see `magpie-local runs`)")
        target, new = made.run.target + n - counts["kept"], False


# -- respond -----------------------------------------------------------------------------

def respond_sampling(responses: int, backend: str) -> Sampling:
    """The default sampling for `responses` answers per instruction (respond.default_sampling), less
    the controls `backend` cannot apply."""
    from .respond import default_sampling

    return sampling_for(default_sampling(responses), backend)


def respond(db: str | Path, source: int, settings=None, *, model: str | None = None, backend: str = "auto",
            server: ServerOptions | None = None, tokenizer: str | None = None, weights: str = "auto",
            ctx: int = 1024, parallel: int | None = None, threads: int | None = None, batch_size: int = 16,
            new: bool = False, progress: Progress | None = None, announce: Announce = _quiet) -> GenerateResult:
    """Answer the first-turn instructions of run `source` (generated or imported) with `model`,
    `settings.responses` answers each, into a respond run linked to it (see respond.py). The same
    call again continues that run; `counts` are its kept and dropped answers. `progress.item(1)` is
    called as each answer ends."""
    from .respond import Responding, RespondSettings

    server = server or ServerOptions()
    progress = progress or Progress()
    settings = settings or RespondSettings()
    if settings.responses < 1:
        raise UsageError("--responses must be at least 1")
    for name, value in (("--batch-size", batch_size), ("--parallel", 1 if parallel is None else parallel)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1")
    m, backend_name, server = model_and_backend(model, tokenizer, backend, server)
    if settings.sampling is None:  # the default for K answers, as this backend can apply it
        settings = replace(settings, sampling=respond_sampling(settings.responses, backend_name))
    if settings.responses > 1 and settings.sampling.temperature == 0:
        raise UsageError(f"--responses {settings.responses} with greedy sampling gives {settings.responses} "
                         "identical answers; set --temperature above 0")
    check_sampling(GenerateSettings(response=settings.sampling), backend_name)
    generate_like = GenerateSettings(template=settings.template, keep_thinking=settings.keep_thinking)
    fmt = chat_format(m, generate_like)
    copy = weights_copy(m, weights, backend_name, "model", announce)
    with Store(db, create=False) as store:
        run = store.get_run(source)
        if run.kind not in ("generate", "import"):
            raise UsageError(f"run {source} is a {run.kind} run; respond answers a generate or import run")
        sources = store.instructions_to_answer(source)
        if not sources:
            raise UsageError(f"run {source} holds no instructions to answer")
        for system in {s["system_prompt"] for s in sources if s["system_prompt"]}:
            fmt.check_system(system)
        sha = store.cached_sha256(m.path, sha256_file)
        _, base = run_config(m, fmt, generate_like, sha, backend_name, server.served_model, weights=copy)
        decisive = {"source_run": source, "model_sha256": sha, "chat_template_sha256": base["chat_template_sha256"],
                    "respond": settings.decisive(), **backend_key(backend_name, server.served_model),
                    **({"weights": copy} if copy else {})}
        key = config_key(decisive)
        total = len(sources) * settings.responses
        found = None if new else store.find_run("respond", key)
        done = store.run_counts(found.id) if found else {"next_item": 0, "kept": 0}
        if found and done["next_item"] == total and found.status == "complete":
            return GenerateResult(found, done, status="already-complete")
        opened = open_backend(backend_name, model_copy(m, sha, copy, announce) if copy else m, sha, ctx=ctx,
                              parallel=parallel, threads=threads, announce=announce, server=server)
        with opened:
            if found is None:
                config = dict(decisive, model_path=str(m.path.resolve()), template_origin=fmt.origin,
                              stops=fmt.stops, magpie_local=base["magpie_local"])
                found = store.create_run(kind="respond", target=total, config_key=key, config=config,
                                         model={"name": m.name, "path": str(m.path.resolve()), "sha256": sha},
                                         backend=opened.name, versions=opened.describe())
            elif found.target != total or found.status != "complete":
                store.set_target(found.id, total)
                found.target = total
            if progress.start:
                progress.start(found, done["next_item"], done["next_item"] == 0)
            on_tokens = _TokenCount(progress)

            started = time.perf_counter()
            loop = Responding(store, found, opened, fmt, settings, sources, batch_size=batch_size,
                              on_tokens=on_tokens, on_item=progress.item)
            try:
                counts = loop.run_all()
            except BackendError as e:
                now = store.run_counts(found.id)
                raise BackendError(f"{e}. Run {found.id} holds {now['next_item']}/{total} committed answers; "
                                   "run the same command again to go on.") from None
            return GenerateResult(found, counts, made=counts["kept"] - done["kept"], tokens=on_tokens.n,
                                  seconds=time.perf_counter() - started, spread=opened.spread())


# -- import ------------------------------------------------------------------------------

@dataclass
class ImportResult:
    run: Run
    records: int  # conversations imported
    turns: int
    formats: dict[str, int]  # records per input format (alpaca, sharegpt, messages)
    malformed: list[str]  # one line per record that was skipped, with the reason
    status: str = "imported"  # or already-imported (nothing to do)


def import_file(db: str | Path, file: str | Path, *, strict: bool = False, new: bool = False,
                on_skipped: Callable[[list[str]], None] | None = None) -> ImportResult:
    """Import an Alpaca, ShareGPT or OpenAI-messages dataset, or instructions alone (for `respond`),
    from a JSON array or JSON Lines file into `db` as one run, in one transaction. Malformed records
    are skipped and listed (to `on_skipped` as soon as the file is read; `strict`: refuse the file);
    the same file is not imported twice unless `new`."""
    from collections import Counter

    from ._version import __version__
    from .importers import read_dataset

    file = Path(file)
    if not file.is_file():
        raise UsageError(f"no such file: {file}")
    records, errors = read_dataset(file)
    if errors and strict:
        raise UsageError(f"{errors[0]} ({len(errors)} malformed records in {file}; nothing imported, --strict)")
    if errors and on_skipped:
        on_skipped(errors)
    if not records:
        raise UsageError(f"no valid records in {file}")
    sha = sha256_file(file)
    formats = dict(Counter(r.format for r in records))
    turns = sum(len(r.turns) for r in records)
    with Store(db) as store:
        existing = None if new else store.find_run("import", sha[:16])
        if existing is not None:
            return ImportResult(existing, len(records), turns, formats, errors, status="already-imported")
        rows = [(dict(item_index=i, status="pending" if r.pending else "kept", drop_reason=None,
                      system_prompt=r.system_prompt),
                 [dict(t, raw_instruction=None) for t in r.turns]) for i, r in enumerate(records)]
        run = store.import_run(config_key=sha[:16], rows=rows, versions={"magpie_local": __version__},
                               config={"file": file.name, "sha256": sha, "formats": formats, "malformed": len(errors)})
    return ImportResult(run, len(records), turns, formats, errors)


# -- score and tag: resumable passes over the stored pairs --------------------------------

# Runs that annotate data, by kind, and the table each keeps its rows in (one per turn).
PASS_TABLES = {"score": "scores", "tag": "tags", "judge": "ratings", "embed": "embeddings"}


def _data_runs(store: Store, runs: list[int] | None, verb: str) -> tuple[list[int] | None, int]:
    """(the data runs a score or tag pass covers, None for all; their number of kept turns)."""
    sources = sorted(set(runs)) if runs else None
    for source in sources or []:
        if (kind := store.get_run(source).kind) in PASS_TABLES:
            raise UsageError(f"run {source} is a {kind} run, not data")
    total = store.count_turns(sources)
    if total == 0:
        raise UsageError(f"{store.path} holds no pairs to {verb}" + (f" in runs {sources}" if sources else ""))
    return sources, total


def _pass(store: Store, kind: str, config: dict, m: Model, sha: str, backend, sources, total: int, work,
          batch_size: int, progress: Progress) -> Run:
    """Score or tag every pending kept turn in batches of the run with these settings (found again,
    or new): `work(rows)` gives each row's stored fields, and each batch is committed whole, so a
    killed pass resumes where it stopped."""
    from .store import config_key

    table = PASS_TABLES[kind]
    key = config_key(config)
    run = store.find_run(kind, key)
    is_new = run is None
    if run is not None:
        store.set_target(run.id, total)
    else:
        run = store.create_run(kind=kind, target=total, config_key=key, config=config,
                               model={"name": m.name, "path": str(m.path.resolve()), "sha256": sha},
                               backend=backend.name, versions=backend.describe())
    if progress.start:
        progress.start(run, store.rows_done(run.id, table), is_new)
    try:
        while rows := store.turns_to_score(run.id, sources, batch_size, table=table):
            store.commit_scores(run.id, [dict(turn_id=r["id"], **fields) for r, fields in zip(rows, work(rows))],
                                table=table)
            if progress.item:
                progress.item(len(rows))
    except BackendError as e:
        raise BackendError(f"{e}. The {table} so far are committed; run the same command again to go on.") from None
    store.finish_run(run.id)
    return store.get_run(run.id)


def score(db: str | Path, *, runs: list[int] | None = None, model: str | None = None, backend: str = "auto",
          server: ServerOptions | None = None, tokenizer: str | None = None, parallel: int | None = None,
          weights: str = "auto", prompt_format: str = "chat", max_length: int = 512, batch_size: int = 16,
          progress: Progress | None = None, announce: Announce = _quiet) -> Run:
    """Score the stored pairs (of `runs`, or all) by IFD with `model` (default: the embedded model);
    returns the scoring run. Resumable: the same call again scores only what is missing.
    `progress.item(k)` is called as each batch of k pairs is committed."""
    from .backends import backend_key
    from .backends.llamacpp import SCORE_TOKENS
    from .scoring import PROMPT_FORMATS, IFDScorer, Pair

    progress = progress or Progress()
    if prompt_format not in PROMPT_FORMATS:
        raise UsageError(f"--prompt-format must be one of: {', '.join(PROMPT_FORMATS)}")
    if not 16 <= max_length <= SCORE_TOKENS:
        raise UsageError(f"--max-length must be between 16 and {SCORE_TOKENS}")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    m, backend_name, server = model_and_backend(model, tokenizer, backend, server or ServerOptions())
    copy = weights_copy(m, weights, backend_name, "scorer", announce)
    fmt = chat_format(m, GenerateSettings()) if prompt_format == "chat" else None
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, runs, "score")
        sha = store.cached_sha256(m.path, sha256_file)
        config = {"scorer_sha256": sha, "scorer": m.name, "prompt_format": prompt_format, "max_length": max_length,
                  "source_runs": sources, **backend_key(backend_name, server.served_model),
                  **({"weights": copy} if copy else {})}
        scorer_model = model_copy(m, sha, copy, announce) if copy else m
        with open_backend(backend_name, scorer_model, sha, ctx=64, parallel=parallel if backend_name == "server"
                          else 1, announce=announce, server=server) as opened:
            scorer = IFDScorer(opened, prompt_format, fmt, max_length)
            opened.check_scoring(scorer.prepare(Pair("Hello", "Hi"))[:2])  # before a run is made

            def work(rows: list[dict]) -> list[dict]:
                pairs = [Pair(r["instruction"], r["response"], r["input"] or "", r["history"], r["system_prompt"])
                         for r in rows]
                return [dict(ifd_above_1=s.above_1, loss_direct=s.loss_direct, loss_cond=s.loss_cond,
                             answer_tokens=s.answer_tokens, context_tokens=s.context_tokens, ifd=s.ifd,
                             ifd_ppl=s.ifd_ppl, truncated=s.truncated, skip_reason=s.skip_reason)
                        for s in scorer.score(pairs)]

            return _pass(store, "score", config, m, sha, opened, sources, total, work, batch_size, progress)


TAG_METHODS = ("auto", "grammar", "likelihood")


def tag(db: str | Path, *, runs: list[int] | None = None, model: str | None = None, backend: str = "auto",
        server: ServerOptions | None = None, tokenizer: str | None = None, method: str = "auto",
        parallel: int | None = None, batch_size: int = 16, progress: Progress | None = None) -> Run:
    """Tag each stored instruction with task category, input quality and difficulty, `model` (default:
    the embedded model) acting as judge (tagging.py): by `method` grammar (answers sampled as valid
    JSON) or likelihood (closed questions, read from calibrated next-token probabilities); auto is
    likelihood where the backend scores, else grammar. Returns the tagging run. Resumable like score."""
    from dataclasses import asdict

    from . import tagging

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if method not in TAG_METHODS:
        raise UsageError(f"--method must be one of: {', '.join(TAG_METHODS)}")
    m, name, server = model_and_backend(model, tokenizer, backend, server or ServerOptions())
    caps = capabilities(name)
    if method == "auto":  # likelihood was the more accurate on every backend measured (docs/curation.md)
        method = "likelihood" if caps.scoring else "grammar"
    if method == "grammar" and not caps.grammar:
        raise UsageError(f"--method grammar needs llama.cpp's grammar sampler, which the {name} backend lacks; "
                         "use --method likelihood")
    if method == "likelihood" and not caps.scoring:
        raise UsageError(f"--method likelihood reads next-token probabilities, which the {name} backend does not give")
    fmt = chat_format(m, GenerateSettings())
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, runs, "tag")
        sha = store.cached_sha256(m.path, sha256_file)
        prompt = tagging.PROMPT if method == "grammar" else tagging.CLOSED_PROMPT
        config = {"judge_sha256": sha, "judge": m.name, "prompt_sha256": config_key({"prompt": prompt}),
                  "source_runs": sources, **({"method": method} if method != "grammar" else {}),
                  **backend_key(name, server.served_model)}
        with open_backend(name, m, sha, ctx=1024, parallel=parallel, server=server) as opened:
            if method == "grammar":
                def work(rows: list[dict]) -> list[dict]:
                    answers = opened.complete([tagging.judge_request(fmt, r["instruction"]) for r in rows])
                    return [asdict(tagging.parse(a.text)) for a in answers]
            else:
                letters = tagging.letter_ids(opened)

                def closed(instructions: list[str]) -> list[dict]:
                    """{field: log-probabilities of its option letters} for each instruction."""
                    asks = [tagging.closed_prompts(fmt, text) for text in instructions]
                    lps = iter(opened.choice_logprobs([(opened.tokenize(ask[f]), letters[:len(tagging.FIELDS[f])])
                                                       for ask in asks for f in tagging.FIELDS]))
                    return [{f: next(lps) for f in tagging.FIELDS} for _ in asks]

                baseline = closed([tagging.CONTENT_FREE])[0]

                def work(rows: list[dict]) -> list[dict]:
                    return [asdict(tagging.from_likelihoods(lp, baseline)) for lp in closed([r["instruction"]
                                                                                             for r in rows])]

            return _pass(store, "tag", config, m, sha, opened, sources, total, work, batch_size,
                         progress or Progress())


def judge(db: str | Path, *, runs: list[int] | None = None, model: str | None = None, backend: str = "auto",
          server: ServerOptions | None = None, tokenizer: str | None = None, weights: str = "auto",
          template: str = "auto", rubric: str | None = None, parallel: int | None = None, batch_size: int = 16,
          progress: Progress | None = None, announce: Announce = _quiet) -> Run:
    """Rate every stored response (of `runs`, or all) from 1 to 5 with `model` (default: the embedded
    model) as judge, on `rubric` (default: judging.RUBRIC; text with {instruction} and {response});
    the rating is read from the judge's next-token probabilities (judging.py). Returns the judging
    run; resumable like score. `progress.item(k)` is called as each batch of k ratings is committed."""
    import json

    from . import judging
    from .respond import user_text

    progress = progress or Progress()
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    rubric = judging.load_rubric(rubric)
    m, backend_name, server = model_and_backend(model, tokenizer, backend, server or ServerOptions())
    if not capabilities(backend_name).scoring:
        raise UsageError(f"judging reads next-token probabilities, which the {backend_name} backend does not give")
    copy = weights_copy(m, weights, backend_name, "judge", announce)
    fmt = chat_format(m, GenerateSettings(template=template))
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, runs, "judge")
        sha = store.cached_sha256(m.path, sha256_file)
        config = {"judge_sha256": sha, "judge": m.name, "rubric_sha256": judging.rubric_sha256(rubric),
                  "rubric": rubric, "scale": list(judging.SCALE), "template": template, "source_runs": sources,
                  **backend_key(backend_name, server.served_model), **({"weights": copy} if copy else {})}
        judge_model = model_copy(m, sha, copy, announce) if copy else m
        with open_backend(backend_name, judge_model, sha, ctx=64, parallel=parallel if backend_name == "server"
                          else 1, announce=announce, server=server) as opened:
            scores = judging.score_token_ids(opened)

            def work(rows: list[dict]) -> list[dict]:
                prompts = [judging.judge_tokens(opened, fmt, rubric, user_text(r["instruction"], r["input"]),
                                                r["response"]) for r in rows]
                ratings = [judging.rating(lp) for lp in opened.choice_logprobs([(p, scores) for p in prompts])]
                return [dict(score=r.score, distribution=json.dumps(r.distribution), mass=r.mass) for r in ratings]

            return _pass(store, "judge", config, m, sha, opened, sources, total, work, batch_size, progress)


# -- embed -------------------------------------------------------------------------------

EMBED_TEXTS = ("instruction", "pair")


@dataclass
class EmbedResult:
    """An embedding run and the neighbour statistics over its embeddings (neighbours.py)."""

    run: Run
    embedded: int  # turns the run holds embeddings of
    dim: int
    alone: int  # turns with no neighbour closer than the radius
    repeated: int  # turns with at least one
    radius: float
    median_distance: float | None  # of each turn to its nearest neighbour


def embed(db: str | Path, *, runs: list[int] | None = None, model: str | None = None, backend: str = "auto",
          server: ServerOptions | None = None, tokenizer: str | None = None, text: str = "instruction",
          max_tokens: int = 256, radius: float | None = None, batch_size: int = 64, weights: str = "auto",
          parallel: int | None = None, progress: Progress | None = None, announce: Announce = _quiet) -> EmbedResult:
    """Embed every stored turn (of `runs`, or all) with `model` (default: the embedded model,
    mean-pooled; on a server, whatever its /v1/embeddings gives) and store one normalised float16
    vector per turn in an embedding run; then store each turn's nearest neighbour, its cosine
    distance and the number of turns within `radius` (default neighbours.RADIUS). `text` is the
    user's message ("instruction") or it and the response ("pair"). Resumable like score: the
    same call embeds only what is missing, and the neighbour statistics are recomputed over the
    whole run."""
    import numpy as np

    from .neighbours import RADIUS, to_blob
    from .respond import user_text

    progress = progress or Progress()
    radius = RADIUS if radius is None else radius
    if text not in EMBED_TEXTS:
        raise UsageError(f"--text must be one of: {', '.join(EMBED_TEXTS)}")
    if not 0 <= radius < 2:
        raise UsageError("--radius is a cosine distance, from 0 up to 2")
    if batch_size < 1 or not 8 <= max_tokens <= 8192:
        raise UsageError("--batch-size must be at least 1 and --max-tokens between 8 and 8192")
    m, name, server = model_and_backend(model, tokenizer, backend, server or ServerOptions())
    if not capabilities(name).embeddings:
        raise UsageError(f"the {BACKEND_NAMES[name]} backend cannot embed")
    copy = weights_copy(m, weights, name, "embedder", announce)
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, runs, "embed")
        sha = store.cached_sha256(m.path, sha256_file)
        config = {"embedder_sha256": sha, "embedder": m.name, "text": text, "max_tokens": max_tokens,
                  "pooling": "server" if name == "server" else "mean", "source_runs": sources,
                  **backend_key(name, server.served_model), **({"weights": copy} if copy else {})}
        embedder = model_copy(m, sha, copy, announce) if copy else m
        with open_backend(name, embedder, sha, ctx=64, parallel=parallel if name == "server" else 1,
                          announce=announce, server=server) as opened:
            def work(rows: list[dict]) -> list[dict]:
                texts = [user_text(r["instruction"], r["input"]) + (f"\n\n{r['response']}" if text == "pair" else "")
                         for r in rows]
                return [dict(vector=to_blob(v)) for v in opened.embed(texts, max_tokens=max_tokens)]

            run = _pass(store, "embed", config, m, sha, opened, sources, total, work, batch_size, progress)
        turn_ids, vectors, found = store_neighbours(store, run.id, radius)
        distances = found.distance[~np.isnan(found.distance)]
        return EmbedResult(run, len(turn_ids), vectors.shape[1], alone=int((found.repeats == 0).sum()),
                           repeated=int((found.repeats > 0).sum()), radius=radius,
                           median_distance=float(np.median(distances)) if len(distances) else None)


def store_neighbours(store: Store, embed_run_id: int, radius: float):
    """Search an embedding run's vectors (neighbours.py) and store, replacing the earlier ones,
    each turn's neighbour statistics and its DEGREE most similar turns. Returns (turn ids, vectors,
    neighbours.Neighbours)."""
    import numpy as np

    from .neighbours import cosines_to_blob, from_blobs, ids_to_blob, nearest_neighbours

    turn_ids, blobs = store.embedding_rows(embed_run_id)
    vectors = from_blobs(blobs)
    found = nearest_neighbours(vectors, radius)
    ids = np.append(np.asarray(turn_ids, dtype=np.int64), -1)  # -1 (padding) maps to -1
    similar = ids[found.similar]
    store.replace_neighbours(embed_run_id, (  # a generator: 100k rows are not held at once
        dict(turn_id=t, nearest_turn_id=int(row[0]) if len(row) else None,
             distance=None if np.isnan(d) else round(float(d), 6), repeats=int(k), radius=radius,
             similar=ids_to_blob(row), similarity=cosines_to_blob(cos))
        for t, row, cos, d, k in zip(turn_ids, similar, found.cosine, found.distance, found.repeats)))
    return turn_ids, vectors, found


# -- curate ------------------------------------------------------------------------------

def curate(db: str | Path, *, runs: list[int] | None = None, bounds=None, near_dup_model: str | None = None,
           near_dup_threshold: float = 0.95, backend: str = "auto",
           progress: Progress | None = None) -> dict[str, tuple[int, int]]:
    """Run the curation checks on every kept turn (of `runs`, or all) and store each verdict with its
    reason, replacing earlier ones; `near_dup_model` ('default': the embedded model) adds the
    embedding near-duplicate check. Returns {check: (passed, failed)} over the database.
    `progress.item(k)` is called as k instructions are embedded."""
    import json
    from dataclasses import asdict

    import numpy as np

    from .curate import Bounds, check_turn, duplicate_reasons, near_duplicates

    bounds = bounds or Bounds()
    progress = progress or Progress()
    if not 0 <= bounds.max_repetition <= 1:
        raise UsageError("--max-repetition must be between 0 and 1")
    if near_dup_model:
        if not 0 < near_dup_threshold <= 1:
            raise UsageError("--near-dup-threshold must be in (0, 1]")
        embedder = resolve_model(None if near_dup_model == "default" else near_dup_model)
        embed_backend = backend_with("embeddings", backend, embedder,
                                     "near-duplicate search")
    settings = json.dumps(dict(asdict(bounds), near_dup_model=near_dup_model,
                               near_dup_threshold=near_dup_threshold if near_dup_model else None), sort_keys=True)
    with Store(db, create=False) as store:
        turns = store.turns_to_check(runs or None)
        if not turns:
            raise UsageError(f"no kept pairs to check in {db}")
        # Answers of a respond run repeat their source's instruction on purpose: they take its verdict.
        firsts = [(t["conversation_id"], t["instruction"]) for t in turns if t["turn_index"] == 0
                  and t["source_id"] is None]
        duplicates = duplicate_reasons(firsts)
        near = {}
        if near_dup_model:
            chunks = []
            with open_backend(embed_backend, embedder, "", ctx=64, parallel=1) as opened:
                for i in range(0, len(firsts), 64):
                    chunks.append(opened.embed([text for _, text in firsts[i:i + 64]]))
                    if progress.item:
                        progress.item(len(chunks[-1]))
            near = near_duplicates([cid for cid, _ in firsts], np.concatenate(chunks), near_dup_threshold)
        rows = []
        for t in turns:
            verdicts = check_turn(t, bounds)
            own = t["source_id"] or t["conversation_id"]
            verdicts["duplicate"] = duplicates.get(own)
            if near_dup_model:
                verdicts["near_duplicate"] = near.get(own)
            rows += [dict(turn_id=t["id"], name=name, passed=int(reason is None), reason=reason, settings=settings)
                     for name, reason in verdicts.items()]
        store.replace_checks(rows)
        return store.check_counts()


def curate_checks(spec: str, store: Store) -> list[str]:
    """Check names from --passing for select and export; `all` is every check `curate` has run on
    this database."""
    from .curate import CHECKS

    if spec.strip() == "all":
        found = store.check_names()
        names = [c for c in CHECKS if c in found]
        if not names:
            raise UsageError("no curation checks in this database yet: run `magpie-local curate` first")
        return names
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown or not names:
        raise UsageError(f"unknown check {', '.join(unknown) or spec!r}; known: all, {', '.join(CHECKS)}")
    return names


# -- select ------------------------------------------------------------------------------

@dataclass
class Selection:
    name: str
    score_run: int
    turn_ids: list[int]  # highest IFD first
    eligible: int  # turns that passed the filters, before top / top_k
    ifd_range: tuple[float, float] | None  # (lowest, highest) IFD chosen


# kind -> (what a run of it is called, what it holds, the command that makes it)
PASS_RUNS = {"score": ("a scoring run", "scores", "score"), "judge": ("a judging run", "ratings", "judge"),
             "embed": ("an embedding run", "embeddings", "embed")}


def pass_run_or_latest(store: Store, kind: str, run_id: int | None) -> int:
    """Run `run_id`, which must be of `kind` (score, judge or embed), or the latest such run."""
    name, holds, command = PASS_RUNS[kind]
    if run_id is not None:
        if store.get_run(run_id).kind != kind:
            raise UsageError(f"run {run_id} is not {name}")
        return run_id
    latest = store.latest_run(kind)
    if latest is None:
        raise UsageError(f"{store.path} holds no {holds} yet; run `magpie-local {command}` first")
    return latest.id


def score_run_or_latest(store: Store, score_run: int | None) -> int:
    return pass_run_or_latest(store, "score", score_run)


def _check_spacing(min_distance: float | None, max_repeats: int | None) -> None:
    if min_distance is not None and not 0 <= min_distance <= 2:
        raise UsageError("--min-distance is a cosine distance, from 0 up to 2")
    if max_repeats is not None and max_repeats < 0:
        raise UsageError("--max-repeats must be at least 0")


def select(db: str | Path, name: str = "selected", *, score_run: int | None = None, top: float | None = None,
           top_k: int | None = None, min_ifd: float | None = None, max_ifd: float | None = None,
           keep_above_1: bool = False, passing: list[str] | str | None = None,
           tags: list[tuple[str, list[str]]] | None = None, min_judge: float | None = None,
           judge_run: int | None = None, min_distance: float | None = None, max_repeats: int | None = None,
           embed_run: int | None = None, diverse: int | None = None, neighbours: int | None = None,
           clusters: int | None = None, per_cluster: int | None = None, balance: str | None = None,
           seed: int = 0) -> Selection:
    """Store a named selection (replacing one of that name) of scored pairs: from the scoring run
    (default: the latest), IFD > 1 left out unless `keep_above_1`, within the IFD bounds, passing the
    named curation checks (a list, or 'all'), with one of the given values of each tag (latest
    tagging run), rated at least `min_judge` by the judging run (default: the latest), with the
    nearest neighbour at least `min_distance` away and at most `max_repeats` turns within the radius
    in the embedding run (default: the latest; both members of a close pair are left out: for one
    of each, curate's near_duplicate check); then the highest-IFD share `top` (0-1] or the `top_k`
    best; then, with `diverse=K`, the K of those that cover them best, by IFD-weighted facility
    location over the embedding run's vectors (diversity.py; `neighbours`: its similarity graph's
    degree); or with `clusters=C, per_cluster=N` the N highest-IFD of each of C k-means clusters of
    those vectors (seeded by `seed`); or with `balance=FIELD` (a tag field) the `top`/`top_k` size
    in equal shares per value of that tag. The arguments are stored with the selection
    (store.selection_definition)."""
    definition = {k: v for k, v in locals().items() if k not in ("db", "name") and v not in (None, False, [], ())}
    import math

    from . import tagging

    if top is not None and top_k is not None:
        raise UsageError("give --top or --top-k, not both")
    if top is not None and not 0 < top <= 1:
        raise UsageError("--top must be between 0% and 100%")
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be at least 1")
    _check_spacing(min_distance, max_repeats)
    if diverse is not None and diverse < 1:
        raise UsageError("--diverse must be at least 1")
    if neighbours is not None and neighbours < 1:
        raise UsageError("--neighbours must be at least 1")
    if (clusters is None) != (per_cluster is None):
        raise UsageError("--clusters C and --per-cluster N go together")
    if clusters is not None and (clusters < 1 or per_cluster < 1):
        raise UsageError("--clusters and --per-cluster must be at least 1")
    if sum(x is not None for x in (diverse, clusters, balance)) > 1:
        raise UsageError("use one of --diverse, --clusters/--per-cluster and --balance")
    if balance is not None:
        if balance not in tagging.FIELDS:
            raise UsageError(f"--balance takes a tag field: one of {', '.join(tagging.FIELDS)}")
        if top is None and top_k is None:
            raise UsageError("--balance needs --top or --top-k: the size of the selection")
    for column, wanted in tags or ():
        if column not in tagging.FIELDS or not wanted:
            raise UsageError(f"--tag takes FIELD=VALUE[,VALUE...] with FIELD one of {', '.join(tagging.FIELDS)}; "
                             f"got {column!r} = {wanted!r}")
        unknown = [v for v in wanted if v not in tagging.FIELDS[column]]
        if unknown:
            raise UsageError(f"unknown {column} {unknown[0]!r}; one of: {', '.join(tagging.FIELDS[column])}")
    with Store(db, create=False) as store:
        run_id = score_run_or_latest(store, score_run)
        tag_run = None
        if tags:
            tag_run = store.latest_run("tag")
            if tag_run is None:
                raise UsageError(f"{db} holds no tags yet; run `magpie-local tag` first")
        checks = curate_checks(passing, store) if isinstance(passing, str) else passing
        judged = judge_run_or_latest(store, judge_run) if min_judge is not None else None
        embedded = None
        if min_distance is not None or max_repeats is not None or diverse is not None or clusters is not None:
            embedded = pass_run_or_latest(store, "embed", embed_run)
        if balance is not None and tag_run is None:
            tag_run = store.latest_run("tag")
            if tag_run is None:
                raise UsageError(f"--balance {balance}: {db} holds no tags yet; run `magpie-local tag` first")
        rows = store.scored_turns(run_id, keep_above_1=keep_above_1, min_ifd=min_ifd, max_ifd=max_ifd,
                                  passing=checks or None, tags=tags, tag_run_id=tag_run.id if tag_run else None,
                                  min_judge=min_judge, judge_run_id=judged, min_distance=min_distance,
                                  max_repeats=max_repeats, embed_run_id=embedded)
        eligible = len(rows)
        size = math.ceil(top * eligible) if top is not None else top_k
        if balance is not None:
            from .diversity import balanced

            column = list(tagging.FIELDS).index(balance)
            tagged = store.tags_by_turn(tag_run.id)
            groups = [tagged[t][column] if t in tagged else "(untagged)" for t, _ in rows]
            rows = [rows[i] for i in balanced(groups, size)]
        elif size is not None:
            rows = rows[:size]
        if diverse is not None:
            rows = _diverse(store, rows, diverse, embedded, neighbours)
        if clusters is not None:
            from .diversity import first_per_cluster, kmeans

            labels = kmeans(_candidate_vectors(store, rows, embedded), clusters, seed=seed)
            rows = [rows[i] for i in first_per_cluster(labels, per_cluster)]
        definition.update(score_run=run_id, **({"embed_run": embedded} if embedded else {}))
        store.replace_selection(name, [r[0] for r in rows], run_id, definition)
    return Selection(name, run_id, [r[0] for r in rows], eligible, (rows[-1][1], rows[0][1]) if rows else None)


def _diverse(store: Store, rows: list[tuple[int, float]], k: int, embed_run: int,
             neighbours: int | None) -> list[tuple[int, float]]:
    """The k of the (turn id, IFD) candidates IFD-weighted facility location picks, highest IFD first."""
    import numpy as np

    from .diversity import NEIGHBOURS, candidate_graph, facility_location

    if k > len(rows):
        raise UsageError(f"--diverse {k} is more than the {len(rows)} pairs that pass the other filters")
    neighbours = neighbours or NEIGHBOURS
    vectors = _candidate_vectors(store, rows, embed_run)
    similar, cosine, _ = candidate_graph(vectors, neighbours, *_stored_graph(store, rows, embed_run, neighbours))
    chosen, _ = facility_location(np.array([ifd for _, ifd in rows]), k, (similar, cosine))
    return sorted((rows[j] for j in chosen), key=lambda r: (-r[1], r[0]))


def _stored_graph(store: Store, rows: list[tuple[int, float]], embed_run: int, neighbours: int):
    """(similar, cosine) of the candidates from the embedding run's stored graph, as candidate
    positions (-1: not a candidate); (None, None) when it was stored without one or with fewer than
    `neighbours` per turn (then select searches itself)."""
    import numpy as np

    from .neighbours import graph_from_blobs

    stored = store.neighbour_graph(embed_run)
    if stored is None or any(t not in stored for t, _ in rows):
        return None, None
    similar, cosine = graph_from_blobs(*zip(*(stored[t] for t, _ in rows)))
    if similar.shape[1] < min(neighbours, len(stored) - 1):
        return None, None
    turn_ids = np.array([t for t, _ in rows], dtype=np.int64)
    order = np.argsort(turn_ids)
    at = np.minimum(np.searchsorted(turn_ids[order], similar), len(rows) - 1)
    return np.where(turn_ids[order][at] == similar, order[at], -1), cosine


def _candidate_vectors(store: Store, rows: list[tuple[int, float]], embed_run: int):
    """The embedding run's vectors of the (turn id, IFD) candidates, in their order."""
    from .neighbours import from_blobs

    turn_ids, blobs = store.embedding_rows(embed_run)
    at = {t: i for i, t in enumerate(turn_ids)}
    missing = sum(1 for t, _ in rows if t not in at)
    if missing:
        raise UsageError(f"{missing} of the {len(rows)} candidates have no embedding in run {embed_run}; "
                         "run `magpie-local embed` again to embed them")
    return from_blobs([blobs[at[t]] for t, _ in rows])


# -- export ------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: Path
    conversations: int
    files: dict[str, int]  # file name -> conversations in it
    left_out: dict[str, int]  # reason -> conversations left out
    card: Path  # the dataset card (README.md)


def judge_run_or_latest(store: Store, judge_run: int | None) -> int:
    return pass_run_or_latest(store, "judge", judge_run)


def export(db: str | Path, out: str | Path, *, format: str = "messages", selection: str | None = None,
           runs: list[int] | None = None, split: float | None = None, seed: int = 0, include_cut_off: bool = False,
           include_system: bool = True, passing: list[str] | str | None = None, min_judge: float | None = None,
           judge_run: int | None = None, min_margin: float = 0.5, min_distance: float | None = None,
           max_repeats: int | None = None, embed_run: int | None = None, force: bool = False) -> ExportResult:
    """Write the kept conversations (a selection's, or every data run's) as training files in directory
    `out`, with a dataset card: `format` messages, sharegpt, alpaca or parquet; `split` the train share
    (train.jsonl + valid.jsonl), else data.jsonl. Cut-off responses and duplicates across runs are left
    out unless asked; `passing` keeps only conversations whose every turn passed those curation checks
    (a list, or 'all'); `min_judge` those whose every turn the judging run (default: the latest) rated
    at least that; `min_distance` / `max_repeats` those whose every turn's neighbour statistics in the
    embedding run (default: the latest) meet them (as select). `format="dpo"` writes preference
    pairs from respond runs (`runs`, default all) instead (preference.py), those whose score margin
    is below `min_margin` left out. Existing files are replaced only with `force`."""
    from .export import dataset_card, file_counts, plan_export, split_train_valid, write_files

    if split is not None and not 0 < split < 1:
        raise UsageError("--split takes the train share, between 0 and 1 (e.g. 0.95)")
    out = Path(out)
    _check_spacing(min_distance, max_repeats)
    if format == "dpo":
        if min_distance is not None or max_repeats is not None:
            raise UsageError("--format dpo pairs K answers to one instruction; filter instructions on their "
                             "neighbours with select or the other formats")
        return _export_pairs(db, out, runs=runs, split=split, seed=seed, include_system=include_system,
                             include_cut_off=include_cut_off, passing=passing, judge_run=judge_run,
                             min_margin=min_margin, force=force,
                             selection=selection, min_judge=min_judge)
    with Store(db, create=False, write=False) as store:
        checks = curate_checks(passing, store) if isinstance(passing, str) else passing
        judged = judge_run_or_latest(store, judge_run) if min_judge is not None else None
        spaced = (pass_run_or_latest(store, "embed", embed_run)
                  if min_distance is not None or max_repeats is not None else None)
        plan = plan_export(store, selection=selection, runs=runs or None, include_cut_off=include_cut_off,
                           include_system=include_system, passing=checks or None, min_judge=min_judge,
                           judge_run=judged, min_distance=min_distance, max_repeats=max_repeats, embed_run=spaced)
        if not plan.conversations:
            left = ", ".join(f"{n} {why}" for why, n in plan.left_out.items()) or "none"
            raise UsageError(f"nothing to export (left out: {left})")
        parts = split_train_valid(plan.conversations, split, seed)
        counts = file_counts(parts, format)
        write_files(out, format, parts, dataset_card(store, plan, format, counts), force=force)
    return ExportResult(out, len(plan.conversations), counts, dict(plan.left_out), out / "README.md")


def _export_pairs(db, out: Path, *, runs, split, seed, include_system, include_cut_off, passing, judge_run,
                  min_margin, force, selection, min_judge) -> ExportResult:
    """export(format="dpo"): the preference pairs of respond runs, with their card."""
    from collections import Counter

    from .export import file_counts, preference_card, split_train_valid, write_files
    from .preference import preference_pairs

    if selection is not None or min_judge is not None:
        raise UsageError("--format dpo picks its pairs by the judge's scores; --selection and --min-judge are "
                         "for the other formats (use --min-margin)")
    if min_margin < 0:
        raise UsageError("--min-margin must be at least 0")
    with Store(db, create=False, write=False) as store:
        checks = curate_checks(passing, store) if isinstance(passing, str) else passing
        if runs:
            for run_id in runs:
                if store.get_run(run_id).kind != "respond":
                    raise UsageError(f"run {run_id} is not a respond run; preference pairs come from "
                                     "`magpie-local respond --responses K`")
        else:
            runs = store.run_ids("respond")
            if not runs:
                raise UsageError(f"{db} holds no respond runs; make answers with `magpie-local respond "
                                 "--responses 2` (or more) first")
        judged = judge_run_or_latest(store, judge_run)
        pairs, skipped = [], Counter()
        for run_id in runs:
            got, why = preference_pairs(store, run_id, judged, min_margin=min_margin, passing=checks or None,
                                        include_system=include_system, include_cut_off=include_cut_off)
            pairs += got
            skipped += why
        if not pairs:
            left = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"
            raise UsageError(f"no preference pairs to export (skipped: {left})")
        parts = split_train_valid(pairs, split, seed)
        counts = file_counts(parts, "dpo")
        write_files(out, "dpo", parts, preference_card(store, runs, judged, pairs, skipped, counts, min_margin,
                                                       checks or None), force=force)
    return ExportResult(out, len(pairs), counts, dict(skipped), out / "README.md")


@dataclass
class Diagnosis:
    """What `doctor` found: the machine, and what `--weights auto` runs `model` on here, measured."""
    machine: dict  # CPU, cores, llama.cpp version and build (tune.machine)
    model: Model
    choice: object | None  # tune.WeightsChoice, or None where auto does not measure
    skipped: str | None  # why auto runs the file as it is without measuring

    @property
    def crashed(self) -> list[str]:
        """The weight types whose run killed its process (SIGILL, SIGSEGV): an unsafe build."""
        return [m.kind for m in self.choice.measured if m.crashed] if self.choice else []


def doctor(model: str | None = None, *, remeasure: bool = False, announce: Announce = _quiet) -> Diagnosis:
    """The machine and the measured `--weights auto` choice for `model` (default: the embedded
    model): cached per CPU and llama.cpp build, measured now if there is none or `remeasure`."""
    from .tune import machine, weights_choice

    m = resolve_model(model)
    skipped = auto_skips(m)
    choice = None if skipped else weights_choice(m, remeasure=remeasure, announce=announce)
    if choice is not None and (file := choice.measured[0]).failure and not file.crashed:
        raise UsageError(f"{m.name} does not run here: {file.failure}")
    return Diagnosis(machine=choice.machine if choice else machine(), model=m, choice=choice, skipped=skipped)
