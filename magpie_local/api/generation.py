"""generate: Magpie pairs from one model, or instructions from one model answered by another."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

from ..backends import ServerOptions
from ..errors import UsageError
from ..generate import MAX_DROP_FACTOR, GenerateError, GenerateSettings, Generation, chat_format, run_config
from ..store import Store
from .answers import respond
from .session import Announce, GenerateResult, Lifecycle, ModelSession, Progress, opened_store, quiet
from .settings import at_least, check_sampling, generation_settings, numbers_checked, sampling_for, sampling_preset


@numbers_checked
def generate(db: str | Path | Store, n: int, settings: GenerateSettings | None = None, *, model: str | None = None,
             backend: str = "auto", server: ServerOptions | None = None, tokenizer: str | None = None,
             weights: str = "auto", ctx: int = 1024, parallel: int | None = None, threads: int | None = None,
             batch_size: int = 16, resume: int | None = None, new: bool = False,
             response_model: str | None = None, response_weights: str = "auto",
             progress: Progress | None = None, announce: Announce = quiet) -> GenerateResult:
    """Generate Magpie pairs into `db` until the run holds exactly `n` kept pairs.

    The same call again continues the same run (after a crash or Ctrl-C); a larger `n` extends
    it; `resume=ID` continues run ID with its stored settings; `new=True` starts another run even
    if one with these settings exists. `settings` default to the measured defaults (the `default`
    preset, less what the backend cannot apply). Raises MagpieError subclasses for bad input; a
    KeyboardInterrupt leaves every committed batch in place.

    `response_model` (a local model) answers the instructions instead of `model`: `model` writes
    instructions alone into one run, `response_model` answers them into a respond run linked to it
    (with `settings.response` sampling and the `passing` checks), and more instructions are drawn
    until that run holds `n` kept pairs. The result is the respond run's; `.instructions` is the
    instruction run's.
    """
    options = dict(model=model, backend=backend, server=server, tokenizer=tokenizer, weights=weights, ctx=ctx,
                   parallel=parallel, threads=threads, batch_size=batch_size, resume=resume, new=new,
                   progress=progress, announce=announce)
    if response_model is not None:
        return _generate_then_respond(db, n, settings, response_model, response_weights, options)
    return _generate(db, n, settings, **options)


def _resumed(store: Store, run_id: int, model, backend, server, tokenizer, announce):
    """(run, session, settings, chat format) to continue run `run_id` with its stored settings and
    weights, the chat format rendering at the run's template time (a template may print the date)."""
    run = store.get_run(run_id)
    if run.kind != "generate":
        raise UsageError(f"run {run_id} is not a generation run")
    settings = GenerateSettings.from_dict(run.config["settings"])
    session = ModelSession.choose(model or (None if tokenizer else run.config["model_path"]), tokenizer=tokenizer,
                                  backend=run.backend if backend == "auto" and run.backend else backend, server=server,
                                  announce=announce)
    check_sampling(settings, session.backend)
    session.with_weights(run.config.get("weights", "file"), "step", announce)  # as it was made
    fmt = chat_format(session.model, settings).at(datetime.fromisoformat(run.config["template_time"]))
    return run, session, settings, fmt


def _generate(db, n, settings, *, model, backend, server, tokenizer, weights, ctx, parallel, threads, batch_size,
              resume, new, progress, announce, at_least_n: bool = False) -> GenerateResult:
    """generate() with one model. `at_least_n`: `n` is a floor, and a run that holds more (or was
    set a larger target) is left with its own target."""
    at_least(1, ("-n", n), ("--batch-size", batch_size), ("--parallel", parallel), ("--threads", threads))
    if resume is not None and new:
        raise UsageError("--resume and --new cannot be combined")
    if resume is None:  # check the model, its template and the backend before the DB is created or touched
        session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
        settings, fmt = generation_settings(settings, session.model, session.backend)
        session.with_weights(weights, "step", announce)
    with opened_store(db) as store:
        run = None
        if resume is not None:
            run, session, settings, fmt = _resumed(store, resume, model, backend, server, tokenizer, announce)
        sha = session.sha256(store)
        key, config = run_config(fmt, settings, sha, session.key())
        if run is None and not new:
            run = store.find_run("generate", key)
        kept = 0
        if run is not None:
            if run.config["model_sha256"] != sha:
                raise UsageError(f"run {run.id} was made with another model file "
                                 f"(sha256 {run.config['model_sha256'][:12]}...)")
            fmt = fmt.at(datetime.fromisoformat(run.config["template_time"]))
            done = store.run_counts(run.id)
            kept = done["kept"] + done["pending"]
            if at_least_n:
                n = max(n, run.target, kept)
            if kept > n:
                raise UsageError(f"run {run.id} already holds {kept} pairs, more than -n {n}")
            if kept == n and run.status == "complete":
                return GenerateResult(run, store.run_counts(run.id), status="already-complete")
            if run.backend != session.backend:
                raise UsageError(f"run {run.id} was made with --backend {run.backend}; continue it with that backend")
        with session.open(sha, ctx=ctx, parallel=parallel, threads=threads, announce=announce) as opened:
            if run is None:
                config["model_path"] = str(session.model.path.resolve())
                recorded = {step: opened.request_record(s) for step, s in
                            (("instruction", settings.instruction), ("response", settings.response))}
                if recorded["instruction"] is not None:  # what each step's requests carry, under the servers' names
                    config["server_sampling"] = recorded
            life = Lifecycle(store, progress or Progress())
            run = life.begin("generate", key, config, session, sha, opened, n, run, kept)
            gen = Generation(store, run, opened, fmt, settings, batch_size=batch_size, on_tokens=life.tokens,
                             on_item=life.progress.item)
            with life.going_on(lambda: f"Run {run.id} holds {store.run_counts(run.id)['kept']}/{run.target} "
                                       "committed pairs"):
                counts = gen.run_until_target()
            return GenerateResult(run, counts, made=counts["kept"] + counts["pending"] - kept, tokens=life.generated,
                                  seconds=life.seconds, spread=opened.spread())


def _generate_then_respond(db, n: int, settings: GenerateSettings | None, response_model: str,
                           response_weights: str, options: dict) -> GenerateResult:
    """generate(response_model=...): instructions from one model, answers from another, until the
    respond run holds `n` kept pairs. Each round draws as many more instructions as answers are
    missing, so a run killed in any round and started again stores the same bytes."""
    from ..prompts import language_code
    from ..respond import RespondSettings

    if options["resume"] is not None:
        raise UsageError("--resume continues one run; with --response-model run the same command again")
    if settings is None:
        writer = ModelSession.choose(options["model"], backend=options["backend"], server=options["server"],
                                     tokenizer=options["tokenizer"])
        inst, resp = sampling_preset("default", writer.backend)
        settings = GenerateSettings(instruction=inst, response=resp)
    if settings.turns != 1:
        raise UsageError("--response-model answers first-turn instructions; it takes --turns 1")
    answering = ModelSession.choose(response_model, announce=options["announce"])
    answers = RespondSettings(seed=settings.seed, sampling=sampling_for(settings.response, answering.backend),
                              keep_thinking=settings.keep_thinking, passing=settings.passing,
                              language=language_code(settings.language) if settings.language else None)
    instructions = replace(settings, instructions_only=True, passing=())
    target, new = n, options.pop("new")
    while True:
        made = _generate(db, target, instructions, **options, new=new, at_least_n=True)
        result = respond(db, made.run.id, answers, model=response_model, weights=response_weights,
                         ctx=options["ctx"], parallel=options["parallel"], threads=options["threads"],
                         batch_size=options["batch_size"], new=new, progress=options["progress"],
                         announce=options["announce"])
        result.instructions = made
        counts = result.counts
        if counts["kept"] >= n:
            return result
        if counts["dropped"] > MAX_DROP_FACTOR * n + 100:
            raise GenerateError(f"{counts['dropped']} answers dropped for {counts['kept']} kept; "
                                "check the response model and settings (see `magpie-local runs`)")
        target, new = made.run.target + n - counts["kept"], False
