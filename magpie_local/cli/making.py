"""Commands that make data: generate, verify, respond, import."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .. import api
from ..backends import ServerOptions
from ..generate import GENERATE_CHECKS, GenerateSettings
from ..prompts import TASKS, PromptError, SystemPrompt, language_name, load_system_prompts, task_prompt
from .common import (
    API_KEY_ENV_OPTION,
    BACKEND_OPTION,
    DB_OPTION,
    ENDPOINT_OPTION,
    MODEL_HELP,
    NEW_DB_OPTION,
    SAMPLING_FIELDS,
    SERVED_MODEL_OPTION,
    TOKENIZER_OPTION,
    Fail,
    _GenerateBar,
    _sampling,
    app,
    err,
    inert,
    out,
    safe,
    stopped,
)


@app.command()
def generate(
    n: int = typer.Option(..., "-n", "--count", help="Number of instruction/response pairs the run should hold."),
    db: Path = NEW_DB_OPTION,
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    seed: int = typer.Option(0, help="Run seed; item i's seeds derive from it, so a run is reproducible."),
    system_prompt: str | None = typer.Option(None, help="System prompt placed before the pre-query template."),
    task: list[str] = typer.Option([], "--task", help=f"Steer toward a task ({', '.join(TASKS)}); "
                                   "repeat for an even mixture."),
    system_prompts: Path | None = typer.Option(None, "--system-prompts", help="A weighted mixture of system "
                                               "prompts: JSONL / JSON of {text, name, weight}, or one per line."),
    language: str | None = typer.Option(None, help="Language of the data, e.g. es or Spanish (via the system prompt)."),
    turns: int = typer.Option(1, help="User/assistant turns per conversation."),
    keep_thinking: bool = typer.Option(False, "--keep-thinking",
                                       help="Thinking models: let them reason and keep the <think> blocks."),
    template: str = typer.Option("auto", help="Chat template: auto, model (the model's own), a family from "
                                 "`templates list`, or a .jinja file."),
    preset: str = typer.Option("default", help="Sampling preset for both steps: default (chosen by measurement, "
                               "docs/generation.md: instruction top-p 0.98; greedy responses with repeat penalty "
                               "1.1, DRY 0.8 where the backend has it, and a loop stop) or magpie (the paper's: "
                               "instruction temperature 1, greedy responses, no penalties). The options below "
                               "change single fields of it."),
    instruction_temperature: float | None = typer.Option(None, help="Step 1 (instruction) temperature."),
    instruction_top_p: float | None = typer.Option(None, help="Step 1 top-p."),
    instruction_max_tokens: int | None = typer.Option(None, help="Step 1 token limit (preset: 128)."),
    response_temperature: float | None = typer.Option(None, help="Step 2 (response) temperature; 0 = greedy."),
    response_top_p: float | None = typer.Option(None, help="Step 2 top-p."),
    response_max_tokens: int | None = typer.Option(None, help="Step 2 token limit (preset: 512)."),
    instruction_set: list[str] = typer.Option([], "--instruction", help="Set a step 1 sampling field, KEY=VALUE "
                                              "(repeatable): " + ", ".join(SAMPLING_FIELDS) + "; lists "
                                              "(dry_breakers, ban_first) as JSON or comma-separated."),
    response_set: list[str] = typer.Option([], "--response", help="Set a step 2 sampling field, KEY=VALUE "
                                           "(repeatable), as --instruction, e.g. --response repeat_penalty=1.1."),
    passing: str | None = typer.Option(None, "--passing", help="Count only pairs that pass these curation "
                                       "checks toward -n: all, or some of " + ", ".join(GENERATE_CHECKS) +
                                       "; failing pairs are stored as dropped, with the check's reason."),
    batch_size: int = typer.Option(16, help="Items committed to the DB together (a kill loses at most these)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together (default: llama.cpp up to 32, "
                                        "as memory allows; MLX 16), or with --backend server requests in "
                                        "flight per endpoint (default 8)."),
    weights: str = typer.Option("auto", help="llama.cpp: file (generate with the model file as it is), f16, bf16 "
                                "or q8_0 (a copy, made once in the cache), or auto: on a CPU, whichever of them "
                                "measured fastest here for batched steps and stays close to the file (`doctor`)."),
    ctx: int = typer.Option(1024, help="Context tokens per sequence."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
    resume: int | None = typer.Option(None, "--resume", help="Continue this run id with its stored settings."),
    new: bool = typer.Option(False, "--new", help="Start a new run even if one with the same settings exists."),
    response_model: str | None = typer.Option(None, "--response-model", help="Answer with this local model "
                                              "instead (a stronger one, say): --model writes the instructions "
                                              "into one run, this model answers them into a respond run (with "
                                              "the --response sampling and --passing), as `respond` would."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Generate instruction/response pairs with Magpie and store them in --db.

    Running the same command again continues the same run (after a crash or Ctrl-C) until it
    holds exactly -n pairs; a larger -n extends it.
    """
    if sum(map(bool, (system_prompt, task, system_prompts))) > 1:
        raise Fail("use one of --system-prompt, --task and --system-prompts")
    try:
        mixture = (load_system_prompts(system_prompts) if system_prompts else [task_prompt(t) for t in task]
                   or ([SystemPrompt("custom", system_prompt)] if system_prompt else []))
        if language:
            language_name(language)
    except PromptError as e:
        raise Fail(str(e)) from None
    inst, resp = api.sampling_preset(preset, api.backend_name(tokenizer or model, backend_choice, tuple(endpoint)))
    inst = _sampling(inst, "--instruction", instruction_set, temperature=instruction_temperature,
                     top_p=instruction_top_p, max_tokens=instruction_max_tokens)
    resp = _sampling(resp, "--response", response_set, temperature=response_temperature, top_p=response_top_p,
                     max_tokens=response_max_tokens)
    settings = GenerateSettings(seed=seed, system_prompts=tuple(mixture), language=language, turns=turns,
                                keep_thinking=keep_thinking, template=template, instruction=inst, response=resp,
                                passing=api.resolve_passing(passing, language))
    bar = _GenerateBar(quiet)
    try:
        with bar:
            result = api.generate(db, n, settings, model=model, backend=backend_choice, tokenizer=tokenizer,
                                  server=ServerOptions(tuple(endpoint), api_key_env, served_model), weights=weights,
                                  ctx=ctx, parallel=parallel, threads=threads, batch_size=batch_size, resume=resume,
                                  new=new, response_model=response_model, response_weights=weights,
                                  progress=bar.callbacks(), announce=err.print)
    except KeyboardInterrupt:
        if bar.run is None:
            raise
        if response_model:
            err.print(f"Interrupted: run {bar.run.id}'s committed {bar.unit} are kept; run the same command again "
                      "to go on.", soft_wrap=True, highlight=False)
            raise typer.Exit(stopped.code) from None
        done = api.run_counts(db, bar.run.id)
        err.print(f"Interrupted: run {bar.run.id} holds {done.kept}/{bar.run.target} committed pairs. "
                  f"Resume with: magpie-local generate --db {db} --resume {bar.run.id} -n {bar.run.target}",
                  soft_wrap=True, highlight=False)
        raise typer.Exit(stopped.code) from None
    if result.status == "already-complete":
        err.print(f"Run {result.run.id} is already complete with {result.counts['kept']} pairs; nothing to do "
                  "(a larger -n extends it, --new starts another run).")
        return
    if result.instructions:
        _print_generated(db, result.instructions, unit="instructions")
    _print_generated(db, result, unit="answers" if response_model else None)


@app.command()
def verify(
    db: Path = DB_OPTION,
    run: int | None = typer.Option(None, "--run", help="Generation run to verify (default: the latest)."),
    sample: int = typer.Option(12, "--sample", "-k", help="How many of its items to make again, chosen at random."),
    seed: int = typer.Option(0, help="Seed of the random choice."),
    model: str | None = typer.Option(None, "--model", "-m", help="The run's model file, where it has moved (its "
                                     "sha256 must match)."),
    ctx: int = typer.Option(1024, help="Context tokens per sequence (as the run was made)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together (any value gives the same bytes)."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
):
    """Make randomly chosen items of a generation run again from their seeds, settings and model,
    and compare them with the stored ones byte for byte (decoding is batch-invariant); the result is
    stored, and the dataset card quotes it. Exit code 1 on a mismatch."""
    result = api.verify(db, run=run, sample=sample, seed=seed, model=model, ctx=ctx, parallel=parallel,
                        threads=threads, announce=err.print)
    if result.skipped:
        err.print(result.skipped, markup=False, highlight=False, soft_wrap=True)
        return 0
    for line in result.mismatches:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    err.print(f"Run {result.run_id}: {result.identical} of {len(result.items)} items replayed identically "
              f"({result.engine})", markup=False, highlight=False, soft_wrap=True)
    return 1 if result.mismatches else 0


def _print_generated(db: Path, result: api.GenerateResult, unit: str | None = None) -> None:
    run, counts = result.run, result.counts
    turns = run.config.get("settings", {}).get("turns", 1)
    summary = Table(title=f"Run {run.id} complete", show_header=False)
    unit = unit or ("pairs" if turns == 1 else f"{turns}-turn conversations")
    held = f"{counts['pending']} awaiting answers" if counts.get("pending") else f"{counts['kept']} kept"
    summary.add_row(f"{unit} in run", f"{held}, {counts['dropped']} dropped")
    stored = api.run_counts(db, run.id)
    for reason, count in stored.drop_reasons.items():
        summary.add_row("  dropped", f"{count} {safe(reason)}")
    if stored.cut_off:
        summary.add_row("  kept, cut off", f"{stored.cut_off} responses hit --response-max-tokens")
    noun = unit if turns == 1 else "conversations"
    elapsed = max(result.seconds, 1e-9)
    summary.add_row("this session", f"{result.made} {noun}, {result.tokens} tokens in {elapsed:.1f}s")
    summary.add_row("throughput", f"{result.made / elapsed:.2f} {noun}/s, "
                    f"{result.tokens / elapsed:.1f} generated tok/s")
    for url, answered in result.spread.items():
        summary.add_row("  endpoint", f"{url}: {answered} requests")
    summary.add_row("database", str(db))
    out.print(summary)


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="Alpaca, ShareGPT or OpenAI-messages data, or instructions alone "
                                "(instruction, prompt or text fields): a JSON array or JSON Lines."),
    db: Path = NEW_DB_OPTION,
    strict: bool = typer.Option(False, "--strict", help="Reject the whole file if any record is malformed."),
    new: bool = typer.Option(False, "--new", help="Import again even if this exact file was imported before."),
):
    """Import an instruction dataset into --db (for scoring, selection and export)."""
    def skipped(errors: list[str]) -> None:
        for line in errors[:20]:
            err.print(f"skipped {inert(line)}", soft_wrap=True, highlight=False, markup=False)
        if len(errors) > 20:
            err.print(f"... and {len(errors) - 20} more malformed records")

    result = api.import_file(db, file, strict=strict, new=new, on_skipped=skipped)
    if result.status == "already-imported":
        err.print(f"{file} was already imported as run {result.run.id}; nothing to do (--new imports it again).")
        return
    kinds = ", ".join(f"{n} {f}" for f, n in result.formats.items())
    out.print(f"Imported run {result.run.id}: {result.records} conversations ({kinds}), {result.turns} turns; "
              f"{len(result.malformed)} malformed records skipped.", highlight=False)
    if pending := result.formats.get("instructions"):
        out.print(f"{pending} instructions await answers: magpie-local respond --db {db} --run {result.run.id}",
                  highlight=False, soft_wrap=True)


@app.command()
def respond(
    source: int = typer.Option(..., "--run", help="The run whose first-turn instructions to answer (generated "
                               "or imported, instructions alone included)."),
    responses: int = typer.Option(1, "--responses", "-k", help="Answers per instruction; 2 or more, rated by "
                                  "`judge`, make preference pairs (`export --format dpo`)."),
    db: Path = DB_OPTION,
    model: str | None = typer.Option(None, "--model", "-m", help="The answering model: " + MODEL_HELP),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    seed: int = typer.Option(0, help="Run seed; answer k to instruction p gets a seed derived from it, p and k."),
    template: str = typer.Option("auto", help="Chat template, as for generate."),
    keep_thinking: bool = typer.Option(False, "--keep-thinking", help="Keep <think> blocks of thinking models."),
    temperature: float | None = typer.Option(None, help="Default: 0 (greedy) for one answer, 0.8 for several."),
    top_p: float | None = typer.Option(None, help="Default: 1.0."),
    max_tokens: int | None = typer.Option(None, help="Token limit of an answer (default 512)."),
    sampling_set: list[str] = typer.Option([], "--set", help="Set a sampling field, KEY=VALUE (repeatable), as "
                                           "generate's --response."),
    passing: str | None = typer.Option(None, "--passing", help="Keep only answers that pass these checks: all, or "
                                       "some of " + ", ".join(GENERATE_CHECKS[:-1]) + "; the others are stored "
                                       "as dropped, with the reason."),
    batch_size: int = typer.Option(16, help="Answers committed to the DB together (a kill loses at most these)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together, as for generate."),
    weights: str = typer.Option("auto", help="llama.cpp weight copy, as for generate."),
    ctx: int = typer.Option(1024, help="Context tokens per sequence."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
    new: bool = typer.Option(False, "--new", help="Start a new run even if one with the same settings exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Answer a stored run's instructions with a model of your choice, K answers each, into a new run
    linked to it. Running the same command again continues it (after a crash or Ctrl-C)."""
    from ..respond import RespondSettings

    backend_name = api.backend_name(tokenizer or model, backend_choice, tuple(endpoint))
    given = temperature, top_p, max_tokens
    sampling = None
    if sampling_set or any(v is not None for v in given):
        sampling = _sampling(api.respond_sampling(max(responses, 1), backend_name), "--set", sampling_set,
                             temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    settings = RespondSettings(responses=responses, seed=seed, sampling=sampling, template=template,
                               keep_thinking=keep_thinking, passing=api.resolve_passing(passing, None))
    bar = _GenerateBar(quiet, "Answering", "answers")
    try:
        with bar:
            result = api.respond(db, source, settings, model=model, backend=backend_choice, tokenizer=tokenizer,
                                 server=ServerOptions(tuple(endpoint), api_key_env, served_model), weights=weights,
                                 ctx=ctx, parallel=parallel, threads=threads, batch_size=batch_size, new=new,
                                 progress=bar.callbacks(), announce=err.print)
    except KeyboardInterrupt:
        if bar.run is None:
            raise
        err.print(f"Interrupted: run {bar.run.id}'s committed answers are kept; run the same command again to go "
                  "on.", soft_wrap=True, highlight=False)
        raise typer.Exit(stopped.code) from None
    if result.status == "already-complete":
        err.print(f"Run {result.run.id} already holds every answer; nothing to do (--new starts another run).")
        return
    _print_generated(db, result, unit="answers")
