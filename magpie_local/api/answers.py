"""respond: answers to a stored run's instructions from a model of one's choice, K each."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..backends import ServerOptions
from ..errors import UsageError
from ..generate import GenerateSettings, chat_format, run_config
from ..store import Store, config_key
from .session import Announce, GenerateResult, Lifecycle, ModelSession, Progress, opened_store, quiet
from .settings import at_least, check_sampling, numbers_checked, respond_sampling


@numbers_checked
def respond(db: str | Path | Store, source: int, settings=None, *, model: str | None = None, backend: str = "auto",
            server: ServerOptions | None = None, tokenizer: str | None = None, weights: str = "auto",
            ctx: int = 1024, parallel: int | None = None, threads: int | None = None, batch_size: int = 16,
            new: bool = False, progress: Progress | None = None, announce: Announce = quiet) -> GenerateResult:
    """Answer the first-turn instructions of run `source` (generated or imported) with `model`,
    `settings.responses` answers each (a respond.RespondSettings), into a respond run linked to it
    (see respond.py). The same call again continues that run; `counts` are its kept and dropped
    answers. `progress.item(1)` is called as each answer ends."""
    from ..respond import Responding, RespondSettings

    settings = settings or RespondSettings()
    at_least(1, ("--responses", settings.responses), ("--batch-size", batch_size), ("--parallel", parallel),
             ("--threads", threads))
    session = ModelSession.choose(model, backend=backend, server=server, tokenizer=tokenizer, announce=announce)
    if settings.sampling is None:  # the default for K answers, as this backend can apply it
        settings = replace(settings, sampling=respond_sampling(settings.responses, session.backend))
    if settings.responses > 1 and settings.sampling.temperature == 0:
        raise UsageError(f"--responses {settings.responses} with greedy sampling gives {settings.responses} "
                         "identical answers; set --temperature above 0")
    check_sampling(GenerateSettings(response=settings.sampling), session.backend)
    generate_like = GenerateSettings(template=settings.template, keep_thinking=settings.keep_thinking)
    fmt = chat_format(session.model, generate_like)
    session.with_weights(weights, "step", announce)
    with opened_store(db, create=False) as store:
        run = store.get_run(source)
        if run.kind not in ("generate", "import"):
            raise UsageError(f"run {source} is a {run.kind} run; respond answers a generate or import run")
        sources = store.instructions_to_answer(source)
        if not sources:
            raise UsageError(f"run {source} holds no instructions to answer")
        for system in {s["system_prompt"] for s in sources if s["system_prompt"]}:
            fmt.check_system(system)
        sha = session.sha256(store)
        _, base = run_config(fmt, generate_like, sha, session.key())
        decisive = {"source_run": source, "model_sha256": sha, "chat_template_sha256": base["chat_template_sha256"],
                    "respond": settings.decisive(), **session.key()}
        key = config_key(decisive)
        total = len(sources) * settings.responses
        found = None if new else store.find_run("respond", key)
        done = store.run_counts(found.id) if found else {"next_item": 0, "kept": 0}
        if found and done["next_item"] == total and found.status == "complete":
            return GenerateResult(found, done, status="already-complete")
        with session.open(sha, ctx=ctx, parallel=parallel, threads=threads, announce=announce) as opened:
            config = dict(decisive, model_path=str(session.model.path.resolve()), template_origin=fmt.origin,
                          stops=fmt.stops, magpie_local=base["magpie_local"])
            life = Lifecycle(store, progress or Progress())
            run = life.begin("respond", key, config, session, sha, opened, total, found, done["next_item"])
            loop = Responding(store, run, opened, fmt, settings, sources, batch_size=batch_size,
                              on_tokens=life.tokens, on_item=life.progress.item)
            with life.going_on(lambda: f"Run {run.id} holds {store.run_counts(run.id)['next_item']}/{total} "
                                       "committed answers"):
                counts = loop.run_all()
            return GenerateResult(run, counts, made=counts["kept"] - done["kept"], tokens=life.generated,
                                  seconds=life.seconds, spread=opened.spread())
