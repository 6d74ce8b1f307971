"""The `magpie-local` command line."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import api, registry, tagging
from ._version import __version__
from .backends import ServerOptions
from .backends.base import Sampling
from .convert import KINDS as WEIGHT_TYPES
from .convert import ConvertError, convert_gguf, default_output
from .curate import CHECKS, Bounds
from .errors import MagpieError, UsageError
from .export import (
    FORMATS,
    write_atomically,
)
from .generate import GENERATE_CHECKS, GenerateSettings
from .gguf_to_mlx import convert_to_mlx
from .models import ModelError, available_models, models_dir, resolve_model
from .prompts import TASKS, PromptError, SystemPrompt, language_code, language_name, load_system_prompts, task_prompt
from .report import build_report
from .store import Store
from .templates import chat_format_for

app = typer.Typer(help="Synthesise instruction data with Magpie on a local model, offline.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="List the models magpie-local can use; convert one to a faster weight type.",
                        no_args_is_help=True)
app.add_typer(models_app, name="models")
templates_app = typer.Typer(help="Chat-template families, and what Magpie derives for a model.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")

out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # piped or logged: do not cut table cells to 80 columns
    out.width = 200
if not err.is_terminal:
    err.width = 200
USER_ERRORS = (MagpieError,)  # every module's errors derive from it (errors.py)
DB_OPTION = typer.Option(Path("magpie.db"), "--db", help="SQLite database file (created if missing).")
BACKEND_OPTION = typer.Option("auto", "--backend", help="llamacpp, mlx, or auto: MLX for an mlx-lm directory "
                              "or on Apple Silicon with MLX installed, else llama.cpp.")
MODEL_HELP = ("GGUF file, mlx-lm directory, or Hugging Face repo id already in the local cache "
              "(default: the embedded SmolLM2-135M-Instruct).")
ENDPOINT_OPTION = typer.Option([], "--endpoint", help="URL of an OpenAI-compatible server (vLLM, SGLang, llama-server, "
                               "...) to run on instead of a local model; repeat to spread the work over several. "
                               "Means --backend server.")
API_KEY_ENV_OPTION = typer.Option(None, "--api-key-env", help="--backend server: the environment variable that holds "
                                  "the servers' API key (the key itself is never stored).")
SERVED_MODEL_OPTION = typer.Option(None, "--served-model", help="--backend server: the model name to ask the "
                                   "servers for (default: the first one they list).")
TOKENIZER_OPTION = typer.Option(None, "--tokenizer", help="--backend server: the served model's tokenizer and chat "
                                "template, a GGUF file or a Hugging Face model directory (default: --model).")
PASSING_OPTION = typer.Option(None, "--passing", help="Only turns that passed these `curate` checks: "
                              "all, or a comma-separated list of " + ", ".join(CHECKS) + ".")


Fail = UsageError  # a user-facing error: printed as one line, exit code 2
SAMPLING_FIELDS = [f.name for f in fields(Sampling)]
BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@app.callback(invoke_without_command=True)
def main_options(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        out.print(f"magpie-local {__version__}")
        raise typer.Exit()


@app.command()
def generate(
    n: int = typer.Option(..., "-n", "--count", help="Number of instruction/response pairs the run should hold."),
    db: Path = DB_OPTION,
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
            raise typer.Exit(130) from None
        with Store(db, create=False, write=False) as store:
            done = store.run_counts(bar.run.id)
        err.print(f"Interrupted: run {bar.run.id} holds {done['kept']}/{bar.run.target} committed pairs. "
                  f"Resume with: magpie-local generate --db {db} --resume {bar.run.id} -n {bar.run.target}",
                  soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    if result.status == "already-complete":
        err.print(f"Run {result.run.id} is already complete with {result.counts['kept']} pairs; nothing to do "
                  "(a larger -n extends it, --new starts another run).")
        return
    if result.instructions:
        _print_generated(db, result.instructions, unit="instructions")
    _print_generated(db, result, unit="answers" if response_model else None)


def _sampling(base: Sampling, flag: str, assignments: list[str], **named) -> Sampling:
    """`base` with the named flags that were given and each KEY=VALUE of `assignments` applied."""
    changes = {k: v for k, v in named.items() if v is not None}
    types = {f.name: str(f.type) for f in fields(Sampling)}
    for spec in assignments:
        key, eq, value = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise Fail(f"{flag} takes KEY=VALUE with KEY one of {', '.join(SAMPLING_FIELDS)}; got {spec!r}")
        kind, value = types[key], value.strip()
        try:
            if "tuple" in kind:
                items = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
                if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                    raise ValueError
                changes[key] = tuple(items)
            elif kind == "bool":
                if value.lower() not in BOOLEANS:
                    raise ValueError
                changes[key] = BOOLEANS[value.lower()]
            else:
                changes[key] = int(value) if kind == "int" else float(value)
        except ValueError:
            raise Fail(f"{flag} {key}: {value!r} is not a valid {kind}") from None
    return replace(base, **changes)


class _GenerateBar:
    """The generation progress bar and the run's announcement, as api.generate's callbacks."""

    def __init__(self, quiet: bool, label: str = "Generating", unit: str = "pairs"):
        self.progress = _progress(quiet)
        self.label, self.unit = label, unit
        self.run = None
        self.task = None
        self.tokens = self.made = 0
        self.started = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def rates(self) -> str:
        dt = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.made / dt:.2f} {self.unit}/s {self.tokens / dt:.0f} tok/s"

    def callbacks(self) -> api.Progress:
        def start(run, kept: int, new: bool) -> None:
            self.run = run
            if run.kind == "respond":
                self.label, self.unit = "Answering", "answers"
            elif run.config.get("settings", {}).get("instructions_only"):
                self.label, self.unit = "Instructing", "instructions"
            self.tokens = self.made = 0
            if new:
                copy = run.config.get("weights")
                settings = run.config.get("settings") or run.config["respond"]
                err.print(f"Run {run.id}: new, {run.model}{f' ({copy.upper()} copy)' if copy else ''} "
                          f"on {run.backend}, seed {settings['seed']}")
            else:
                err.print(f"Run {run.id}: continuing with {kept}/{run.target} {self.unit}")
            self.progress.start()
            if self.task is not None:  # a second run (generate --response-model): its own bar
                self.progress.update(self.task, visible=False)
            self.task = self.progress.add_task(self.label, total=run.target, completed=kept, rate="", unit=self.unit)
            self.started = time.perf_counter()

        def tokens(k: int) -> None:
            self.tokens += k
            self.progress.update(self.task, rate=self.rates())

        def item(gained: int) -> None:
            self.made += gained
            self.progress.update(self.task, advance=gained, rate=self.rates())

        return api.Progress(start=start, tokens=tokens, item=item)


def _print_generated(db: Path, result: api.GenerateResult, unit: str | None = None) -> None:
    run, counts = result.run, result.counts
    turns = run.config.get("settings", {}).get("turns", 1)
    summary = Table(title=f"Run {run.id} complete", show_header=False)
    unit = unit or ("pairs" if turns == 1 else f"{turns}-turn conversations")
    held = f"{counts['pending']} awaiting answers" if counts.get("pending") else f"{counts['kept']} kept"
    summary.add_row(f"{unit} in run", f"{held}, {counts['dropped']} dropped")
    with Store(db, create=False, write=False) as store:
        for reason, count in store.drop_reasons(run.id).items():
            summary.add_row("  dropped", f"{count} {reason}")
        if cut := store.cut_off_count(run.id):
            summary.add_row("  kept, cut off", f"{cut} responses hit --response-max-tokens")
    noun = unit if turns == 1 else "conversations"
    elapsed = max(result.seconds, 1e-9)
    summary.add_row("this session", f"{result.made} {noun}, {result.tokens} tokens in {elapsed:.1f}s")
    summary.add_row("throughput", f"{result.made / elapsed:.2f} {noun}/s, "
                    f"{result.tokens / elapsed:.1f} generated tok/s")
    for url, answered in result.spread.items():
        summary.add_row("  endpoint", f"{url}: {answered} requests")
    summary.add_row("database", str(db))
    out.print(summary)


def _progress(quiet: bool) -> Progress:
    """A bar on stderr: done/total items, a `rate` field the caller fills, elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, disable=quiet)


@app.command()
def runs(db: Path = DB_OPTION):
    """List the runs in --db with their counts and status (for scoring runs: pairs scored)."""
    with Store(db, create=False, write=False) as store:
        table = Table("id", "kind", "status", "pairs", "target", "dropped", "tokens", "tok/s", "model", "backend",
                      "created")
        for column in table.columns:
            column.no_wrap = True
        for r in store.list_runs():
            rate = f"{r['tokens'] / r['seconds']:.1f}" if r["seconds"] else "-"
            status = r["status"] if r["status"] == "complete" else "incomplete"
            table.add_row(str(r["id"]), r["kind"], status, str(r["kept"]), str(r["target"]), str(r["dropped"]),
                          str(r["tokens"]), rate, r["model"] or "-", r["backend"] or "-", r["created_at"])
        out.print(table)


@app.command()
def show(db: Path = DB_OPTION, run: int | None = typer.Option(None, help="Run id (default: the latest)."),
         limit: int = typer.Option(3, help="How many conversations to print."),
         dropped: bool = typer.Option(False, "--dropped", help="Show dropped items, with their reasons.")):
    """Print a few stored conversations (system prompt, then each turn)."""
    with Store(db, create=False, write=False) as store:
        run_id = run or store.last_run_id()
        if run_id is None:
            raise Fail(f"{db} holds no runs yet")
        conversations = store.conversations(run_id, "dropped" if dropped else "kept", limit)
        for conv in conversations:
            reason = conv["drop_reason"]
            out.rule(f"run {run_id} · item {conv['item_index']}" + (f" · dropped: {reason}" if reason else ""))
            # Generated text is data: escape it, or "[/INST]" in a response would be read as markup.
            if conv["system_prompt"]:
                out.print(f"[bold]System ({escape(conv['system_name'] or 'custom')}):[/bold] ",
                          escape(conv["system_prompt"]), highlight=False)
            for t in conv["turns"]:
                instruction = t["instruction"] if t["instruction"] or not dropped else t["raw_instruction"] or ""
                out.print("[bold]User:[/bold] ", escape(instruction), highlight=False)
                if t["instruction_cleanup"]:
                    out.print(f"[dim]  (clean-up: {escape(t['instruction_cleanup'])})[/dim]", highlight=False)
                if t["response"]:
                    out.print("[bold]Assistant:[/bold] ", escape(t["response"]), highlight=False)
        if not conversations:
            err.print(f"run {run_id} has no {'dropped' if dropped else 'kept'} items")


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="Alpaca, ShareGPT or OpenAI-messages data, or instructions alone "
                                "(instruction, prompt or text fields): a JSON array or JSON Lines."),
    db: Path = DB_OPTION,
    strict: bool = typer.Option(False, "--strict", help="Reject the whole file if any record is malformed."),
    new: bool = typer.Option(False, "--new", help="Import again even if this exact file was imported before."),
):
    """Import an instruction dataset into --db (for scoring, selection and export)."""
    def skipped(errors: list[str]) -> None:
        for line in errors[:20]:
            err.print(f"skipped {line}", soft_wrap=True, highlight=False, markup=False)
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
    from .respond import RespondSettings

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
        raise typer.Exit(130) from None
    if result.status == "already-complete":
        err.print(f"Run {result.run.id} already holds every answer; nothing to do (--new starts another run).")
        return
    _print_generated(db, result, unit="answers")


@app.command()
def judge(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Rate these runs' responses (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="The judge: " + MODEL_HELP + " A judge is only "
                                     "worth its accuracy: the default 135M model is near chance (docs/curation.md)."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    template: str = typer.Option("auto", help="The judge's chat template, as for generate (for models without one)."),
    rubric: Path | None = typer.Option(None, help="A rubric text file holding {instruction} and {response}, asking "
                                       "for a score from 1 to 5 (default: helpfulness, correctness, instruction "
                                       "following)."),
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    weights: str = typer.Option("auto", help="llama.cpp weight copy, as for score."),
    batch_size: int = typer.Option(16, help="Responses rated and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Rate every stored response from 1 to 5 with a local model as judge, read from its next-token
    probabilities over the scores (expected score and distribution). Resumable like score."""
    try:
        text = rubric.read_text(encoding="utf-8") if rubric else None
    except (OSError, UnicodeDecodeError) as e:
        raise Fail(f"cannot read the rubric {rubric}: {getattr(e, 'strerror', None) or e}") from None
    with _PassBar("Judging", "ratings", quiet) as bar:
        judged = api.judge(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                           server=ServerOptions(tuple(endpoint), api_key_env, served_model), weights=weights,
                           template=template, rubric=text, parallel=parallel, batch_size=batch_size,
                           progress=bar.callbacks(), announce=err.print)
    with Store(db, create=False, write=False) as store:
        _print_ratings(store, judged.id)
    if model is None:
        err.print("Note: the default 135M judge ranks a right answer above a wrong one barely better than chance "
                  "(docs/curation.md, Judge accuracy); judge with a stronger --model before filtering on its "
                  "scores.", soft_wrap=True, highlight=False)


def _print_ratings(store: Store, judge_run_id: int) -> None:
    scores = np.array(store.rating_scores(judge_run_id), dtype=float)
    run = store.get_run(judge_run_id)
    table = Table(title=f"Judge scores, judging run {judge_run_id} ({run.model})", show_header=False)
    table.add_row("responses rated", str(len(scores)))
    if len(scores):
        table.add_row("mean ± sd", f"{scores.mean():.2f} ± {scores.std():.2f}")
        _histogram(table, scores, bins=np.linspace(1, 5, 9))
    out.print(table)


@app.command()
def score(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Score these runs' pairs (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Scorer: " + MODEL_HELP + " "
                                     "A small scorer for a big generator's data is Superfiltering."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    weights: str = typer.Option("auto", help="llama.cpp: file (score on the model file as it is), f16, bf16 or "
                                "q8_0 (a copy, made once in the cache), or auto: on a CPU, whichever of them "
                                "measured fastest here for prompts and stays close to the file (`doctor`)."),
    prompt_format: str = typer.Option("chat", help="chat (the scorer's template) or alpaca (the Cherry reference)."),
    max_length: int = typer.Option(512, help="Tokens of context + answer scored at most (the reference's 512)."),
    batch_size: int = typer.Option(16, help="Pairs scored and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score stored pairs by IFD (Instruction-Following Difficulty); resumable like generate."""
    with _PassBar("Scoring", "scores", quiet) as bar:
        scored = api.score(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                           server=ServerOptions(tuple(endpoint), api_key_env, served_model), parallel=parallel,
                           weights=weights, prompt_format=prompt_format, max_length=max_length,
                           batch_size=batch_size, progress=bar.callbacks(), announce=err.print)
    with Store(db, create=False, write=False) as store:
        _print_stats(store, scored.id)


@app.command()
def embed(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Embed these runs' turns (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Embedding model: 'minilm' (all-MiniLM-L6-v2, "
                                     "a sentence-embedding model: the `minilm` extra; use --radius 0.25 with it) or "
                                     + MODEL_HELP + " Mean-pooled final hidden states (llama.cpp's embedding mode; "
                                     "MLX the same)."),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    parallel: int | None = typer.Option(None, help="--backend server: requests in flight per endpoint (default 8)."),
    text: str = typer.Option("instruction", help="instruction (the user's message) or pair (it and the response: "
                             "for respond runs, whose K answers share one instruction)."),
    max_tokens: int = typer.Option(256, help="Tokens of each text embedded at most."),
    radius: float | None = typer.Option(None, help="Cosine distance within which another turn counts as a repeat "
                                        "(default 0.05: cosine 0.95, the near-duplicate check's bound)."),
    batch_size: int = typer.Option(64, help="Turns embedded and committed together."),
    weights: str = typer.Option("auto", help="llama.cpp weight copy, as for score."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Store an embedding of every stored turn, then each turn's nearest neighbour, its distance and
    the turns within --radius (select --min-distance / --max-repeats), and its 32 most similar turns
    (select --diverse); resumable like score."""
    with _PassBar("Embedding", "embeddings", quiet) as bar:
        done = api.embed(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                         server=ServerOptions(tuple(endpoint), api_key_env, served_model), text=text,
                         max_tokens=max_tokens, radius=radius, batch_size=batch_size, weights=weights,
                         parallel=parallel, progress=bar.callbacks(), announce=err.print)
    median = f"{done.median_distance:.3f}" if done.median_distance is not None else "-"
    out.print(f"Embedding run {done.run.id}: {done.embedded} turns ({done.dim} dimensions, {done.run.model}); "
              f"{done.repeated} have another within cosine distance {done.radius:g}, {done.alone} do not; "
              f"median distance to the nearest: {median}.", highlight=False)


@app.command()
def tag(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Tag these runs' pairs (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Judge: " + MODEL_HELP),
    backend_choice: str = BACKEND_OPTION,
    endpoint: list[str] = ENDPOINT_OPTION,
    api_key_env: str | None = API_KEY_ENV_OPTION,
    served_model: str | None = SERVED_MODEL_OPTION,
    tokenizer: str | None = TOKENIZER_OPTION,
    method: str = typer.Option("auto", help="grammar (answers sampled as JSON under llama.cpp's grammar sampler), "
                               "likelihood (closed questions read from next-token probabilities: any backend that "
                               "scores), or auto: likelihood, the more accurate where measured (docs/curation.md)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together (default: up to 32)."),
    batch_size: int = typer.Option(16, help="Pairs tagged and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Tag each stored instruction with task category, input quality and difficulty, the local
    model acting as judge. Resumable like score."""
    with _PassBar("Tagging", "tags", quiet) as bar:
        tagged = api.tag(db, runs=run or None, model=model, backend=backend_choice, tokenizer=tokenizer,
                         server=ServerOptions(tuple(endpoint), api_key_env, served_model), method=method,
                         parallel=parallel, batch_size=batch_size, progress=bar.callbacks())
    with Store(db, create=False, write=False) as store:
        _print_tags(store, tagged.id)


class _PassBar:
    """The progress bar of a score or tag pass, as the API's callbacks; a Ctrl-C says what is kept."""

    def __init__(self, label: str, table: str, quiet: bool):
        self.progress, self.label, self.table, self.task = _progress(quiet), label, table, None
        self.started, self.finished = time.perf_counter(), 0

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.progress.stop()
        if kind is KeyboardInterrupt:
            err.print(f"Interrupted: {self.table} so far are committed; run the same command again to go on.")
            raise typer.Exit(130) from None

    def callbacks(self) -> api.Progress:
        def start(run, done: int, new: bool) -> None:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=run.target, completed=done, rate="", unit="pairs")
            self.started = time.perf_counter()

        def item(k: int) -> None:
            self.finished += k
            rate = self.finished / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, advance=k, rate=f"{rate:.2f} pairs/s")

        return api.Progress(start=start, item=item)


def _print_tags(store: Store, tag_run_id: int) -> None:
    """Distributions of each tag in a tagging run, as bars."""
    failed, by_column = store.tag_counts(tag_run_id, tagging.FIELDS)
    method = store.get_run(tag_run_id).config.get("method", "grammar")
    table = Table(title=f"Tags, tagging run {tag_run_id} (by {method}; {failed} failed answers)", show_header=False)
    for column, values in tagging.FIELDS.items():
        counts = by_column[column]
        top = max(counts.values(), default=1)
        table.add_row(f"[bold]{column}[/bold]", "")
        for value in values:
            n = counts.get(value, 0)
            table.add_row(f"  {escape(value)}", "█" * round(30 * n / top) + f" {n}")
    out.print(table)


def _print_stats(store: Store, score_run_id: int) -> None:
    rows = store.score_rows(score_run_id)
    ifd = np.array([r["ifd"] for r in rows if r["ifd"] is not None], dtype=float)
    skipped = Counter(r["skip_reason"] for r in rows if r["skip_reason"])
    table = Table(title=f"IFD, scoring run {score_run_id}", show_header=False)
    table.add_row("pairs scored", f"{len(ifd)} (truncated {sum(r['truncated'] for r in rows)}, "
                  f"skipped {sum(skipped.values())})")
    for reason, count in skipped.most_common():
        table.add_row("  skipped", f"{count}: {reason}")
    if len(ifd):
        q = np.quantile(ifd, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1])
        table.add_row("mean ± sd", f"{ifd.mean():.3f} ± {ifd.std():.3f}")
        table.add_row("min p10 p25", f"{q[0]:.3f}  {q[1]:.3f}  {q[2]:.3f}")
        table.add_row("median", f"{q[3]:.3f}")
        table.add_row("p75 p90 max", f"{q[4]:.3f}  {q[5]:.3f}  {q[6]:.3f}")
        table.add_row("IFD > 1", f"{(ifd > 1).sum()} ({(ifd > 1).mean():.1%}): the instruction does not help")
        _histogram(table, ifd, bins=10)
    out.print(table)


@app.command()
def curate(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Check these runs' pairs (default: every run's)."),
    min_chars: int = typer.Option(1, help="Shortest instruction or response that passes `length`."),
    max_chars: int = typer.Option(20_000, help="Longest instruction or response that passes `length`."),
    max_repetition: float = typer.Option(0.3, help="Largest share of repeated word 4-grams in a response."),
    language: str | None = typer.Option(None, help="Also check that each pair is in this language (e.g. en)."),
    near_dup_model: str | None = typer.Option(None, "--near-dup-model", help="Also find near-duplicate "
                                              "instructions with this model's embeddings ('default': "
                                              "the embedded model; 'minilm': a sentence-embedding model, "
                                              "with --near-dup-threshold 0.75)."),
    near_dup_threshold: float = typer.Option(0.95, help="Cosine similarity from which an instruction is a "
                                             "near-duplicate of an earlier one."),
    backend_choice: str = BACKEND_OPTION,
):
    """Run the curation checks (length, cut_off, repetition, refusal, duplicate; language with --language)
    on every kept turn and store each verdict with its reason; `select --passing` and `export --passing`
    then combine them."""
    try:
        code = language_code(language) if language else None
    except PromptError as e:
        raise Fail(str(e)) from None
    bounds = Bounds(min_chars=min_chars, max_chars=max_chars, max_repetition=max_repetition, language=code)
    bar, task = _progress(quiet=False), None

    def embedded(k: int) -> None:  # near-duplicate search only
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("Embedding", total=None, rate="", unit="pairs")
        bar.update(task, advance=k)

    try:
        api.curate(db, runs=run or None, bounds=bounds, near_dup_model=near_dup_model,
                   near_dup_threshold=near_dup_threshold, backend=backend_choice, progress=api.Progress(item=embedded))
    finally:
        bar.stop()
    with Store(db, create=False, write=False) as store:
        _print_checks(store, f"Curation checks, {store.count_turns(run or None)} turns")


@app.command()
def stats(db: Path = DB_OPTION,
          score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest).")):
    """Print what the database holds: each run's kept and dropped items with the drop reasons, response
    lengths, curation-check counts, the IFD distribution of a scoring run, and the latest tags."""
    with Store(db, create=False, write=False) as store:
        _print_data_stats(store)
        if score_run is not None or store.latest_run("score") is not None:
            _print_stats(store, api.score_run_or_latest(store, score_run))
        if (latest_tags := store.latest_run("tag")) is not None:
            _print_tags(store, latest_tags.id)
        if (latest_judge := store.latest_run("judge")) is not None:
            _print_ratings(store, latest_judge.id)


@app.command()
def report(
    out_file: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    db: Path = DB_OPTION,
    score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest, if any)."),
    sample: int = typer.Option(50, help="How many pairs the page shows."),
    seed: int = typer.Option(0, help="Seed of the sample."),
):
    """Write one self-contained HTML page: runs, IFD / judge / neighbour / length / tag distributions, a
    sample of pairs."""
    if sample < 0:
        raise Fail("--sample must be at least 0")
    with Store(db, create=False, write=False) as store:
        scored = api.score_run_or_latest(store, score_run) if score_run is not None or store.latest_run("score") \
            else None
        tagged, judged, embedded = store.latest_run("tag"), store.latest_run("judge"), store.latest_run("embed")
        page = build_report(store, scored, tagged.id if tagged else None, sample, seed,
                            judged.id if judged else None, embedded.id if embedded else None)
    try:
        write_atomically(out_file, lambda f: f.write(page.encode("utf-8")))
    except OSError as e:
        raise Fail(f"cannot write {out_file}: {e.strerror or e}") from None
    err.print(f"Wrote {out_file} ({len(page) // 1024} KiB); open it in a browser.", highlight=False)


def _histogram(table: Table, values: np.ndarray, bins, label: str = "{lo:5.2f}-{hi:5.2f}") -> None:
    counts, edges = np.histogram(values, bins=bins)
    for count, lo, hi in zip(counts, edges, edges[1:]):
        table.add_row(label.format(lo=lo, hi=hi), "█" * int(40 * count / max(counts.max(), 1)) + f" {count}")


def _print_data_stats(store: Store) -> None:
    runs = [r for r in store.list_runs() if r["kind"] in ("generate", "import", "respond")]
    if not runs:
        raise Fail(f"{store.path} holds no generated or imported data yet")
    table = Table("run", "kind", "model", "kept", "dropped", "drop reasons", title="Data")
    for r in runs:
        reasons = ", ".join(f"{n} {why}" for why, n in store.drop_reasons(r["id"]).items()) or "-"
        table.add_row(str(r["id"]), r["kind"], r["model"] or "-", str(r["kept"]), str(r["dropped"]), reasons)
    out.print(table)
    lengths = np.array(store.kept_response_lengths(), dtype=float)
    cut = store.cut_off_count()
    table = Table(title="Response length (characters), kept turns", show_header=False)
    q = np.quantile(lengths, [0.1, 0.5, 0.9])
    table.add_row("turns", f"{len(lengths)} ({cut} cut off at max tokens)")
    table.add_row("p10 median p90", f"{q[0]:.0f}  {q[1]:.0f}  {q[2]:.0f}")
    _histogram(table, lengths, bins=np.unique(np.geomspace(max(lengths.min(), 1), max(lengths.max(), 2), 9).round()),
               label="{lo:6.0f}-{hi:<6.0f}")
    out.print(table)
    if store.check_counts():
        _print_checks(store, "Curation checks")


def _print_checks(store: Store, title: str) -> None:
    table = Table("check", "passed", "failed", title=title)
    for name, (passed, failed) in store.check_counts().items():
        table.add_row(name, str(passed), str(failed))
    out.print(table)


MIN_DISTANCE_OPTION = typer.Option(None, "--min-distance", help="Only pairs whose nearest neighbour is at least "
                                   "this cosine distance away (from `embed`; both of a close pair go: for one of "
                                   "each, curate --near-dup-model).")
MAX_REPEATS_OPTION = typer.Option(None, "--max-repeats", help="Only pairs with at most this many others within the "
                                  "embedding run's radius.")
EMBED_RUN_OPTION = typer.Option(None, "--embed-run", help="Embedding run for --min-distance, --max-repeats and "
                                "--diverse (default: the latest).")


@app.command("select")
def select_(
    db: Path = DB_OPTION,
    name: str = typer.Option("selected", help="Name of the selection (replaced if it exists)."),
    score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest)."),
    top: str | None = typer.Option(None, help="Keep the highest-IFD share, e.g. 10%."),
    top_k: int | None = typer.Option(None, help="Keep the K highest-IFD pairs."),
    min_ifd: float | None = typer.Option(None, help="Keep pairs with IFD at least this."),
    max_ifd: float | None = typer.Option(None, help="Keep pairs with IFD at most this."),
    keep_above_1: bool = typer.Option(False, "--keep-above-1", help="Do not exclude IFD > 1 (misaligned pairs)."),
    passing: str | None = PASSING_OPTION,
    tag_filters: list[str] = typer.Option([], "--tag", help="Only pairs whose tag has one of these values, e.g. "
                                          "'difficulty=hard,very hard' or 'task_category=Math' (repeatable; "
                                          "from the latest tagging run)."),
    min_judge: float | None = typer.Option(None, "--min-judge", help="Only pairs the judge rated at least this "
                                           "(1-5; the latest judging run, or --judge-run)."),
    judge_run: int | None = typer.Option(None, "--judge-run", help="Judging run for --min-judge."),
    min_distance: float | None = MIN_DISTANCE_OPTION,
    max_repeats: int | None = MAX_REPEATS_OPTION,
    embed_run: int | None = EMBED_RUN_OPTION,
    diverse: int | None = typer.Option(None, "--diverse", help="Then keep the K pairs that best cover the rest: "
                                       "IFD-weighted facility location over the embeddings (docs/curation.md)."),
    neighbours: int | None = typer.Option(None, "--neighbours", help="--diverse: similarities kept per pair "
                                          "(default 32; more is slower and nearer the exact objective)."),
    clusters: int | None = typer.Option(None, "--clusters", help="With --per-cluster: k-means the candidates' "
                                        "embeddings into C clusters (Cherry's recipe) ..."),
    per_cluster: int | None = typer.Option(None, "--per-cluster", help="... and keep the N highest-IFD of each."),
    balance: str | None = typer.Option(None, "--balance", help="A tag field (task_category, input_quality, "
                                       "difficulty): the --top/--top-k size in equal shares per value."),
    seed: int = typer.Option(0, help="Seed of the k-means start (--clusters)."),
):
    """Mark pairs chosen by IFD, curation checks and tags as a named selection (IFD > 1 is excluded unless asked)."""
    fraction = None
    if top is not None:
        try:
            fraction = float(top.rstrip("%")) / (100 if top.endswith("%") else 1)
        except ValueError:
            raise Fail(f"--top takes a share such as 10% or 0.1, not {top!r}") from None
    tags = [(column.strip(), [v.strip() for v in values.split(",") if v.strip()])
            for column, _, values in (spec.partition("=") for spec in tag_filters)]
    chosen = api.select(db, name, score_run=score_run, top=fraction, top_k=top_k, min_ifd=min_ifd, max_ifd=max_ifd,
                        keep_above_1=keep_above_1, passing=passing, tags=tags, min_judge=min_judge,
                        judge_run=judge_run, min_distance=min_distance, max_repeats=max_repeats, embed_run=embed_run,
                        diverse=diverse, neighbours=neighbours, clusters=clusters, per_cluster=per_cluster,
                        balance=balance, seed=seed)
    span = f", IFD {chosen.ifd_range[0]:.3f} to {chosen.ifd_range[1]:.3f}" if chosen.ifd_range else ""
    out.print(f"Selection {name!r}: {len(chosen.turn_ids)} of {chosen.eligible} eligible pairs from scoring run "
              f"{chosen.score_run}{span}.", highlight=False)


@app.command()
def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing)."),
    db: Path = DB_OPTION,
    fmt: str = typer.Option("messages", "--format", "-f", help=f"One of: {', '.join(FORMATS)}."),
    selection: str | None = typer.Option(None, help="Export this selection (default: every kept conversation)."),
    run: list[int] = typer.Option(None, "--run", help="Only these runs."),
    split_share: float | None = typer.Option(None, "--split", help="Train share, e.g. 0.95: writes train and valid "
                                             "files (the names mlx-lm expects)."),
    seed: int = typer.Option(0, help="Seed of the train/valid shuffle."),
    include_cut_off: bool = typer.Option(False, "--include-cut-off",
                                         help="Also export conversations whose response hit max tokens."),
    no_system: bool = typer.Option(False, "--no-system", help="Leave the system prompts out."),
    passing: str | None = PASSING_OPTION,
    min_judge: float | None = typer.Option(None, "--min-judge", help="Only conversations whose every turn the "
                                           "judge rated at least this (1-5)."),
    judge_run: int | None = typer.Option(None, "--judge-run", help="Judging run for --min-judge and --format dpo "
                                         "(default: the latest)."),
    min_margin: float = typer.Option(0.5, "--min-margin", help="--format dpo: skip pairs whose chosen and rejected "
                                     "scores differ by less."),
    min_distance: float | None = MIN_DISTANCE_OPTION,
    max_repeats: int | None = MAX_REPEATS_OPTION,
    embed_run: int | None = EMBED_RUN_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace files of an earlier export in --out."),
):
    """Write stored conversations as training files, with a dataset card (README.md) beside them;
    --format dpo writes preference pairs from `respond --responses K` runs rated by `judge`."""
    done = api.export(db, out, format=fmt, selection=selection, runs=run or None, split=split_share, seed=seed,
                      include_cut_off=include_cut_off, include_system=not no_system, passing=passing,
                      min_judge=min_judge, judge_run=judge_run, min_margin=min_margin, min_distance=min_distance,
                      max_repeats=max_repeats, embed_run=embed_run, force=force)
    left = ", ".join(f"{n} {why}" for why, n in done.left_out.items()) or "none"
    files = ", ".join(f"{name} {n}" for name, n in done.files.items())
    unit = "preference pairs" if fmt == "dpo" else "conversations"
    err.print(f"Exported {done.conversations} {unit} ({fmt}) to {out}: {files}; "
              f"{'skipped' if fmt == 'dpo' else 'left out'}: {left}. Dataset card: {done.card}",
              soft_wrap=True, highlight=False)


@models_app.command("list")
def models_list(paths: list[str] = typer.Argument(None, help="Extra model paths to describe.")):
    """Show the embedded default model, GGUF files and mlx-lm directories under models/, and any paths given."""
    table = Table("source", "name", "arch", "size", "chat template", "path")
    for source, path, note in available_models(paths):
        if path is None:
            table.add_row(source, "-", "-", "-", "-", note)
            continue
        try:
            m = resolve_model(str(path))
            size = f"{m.size / 2**20:.0f} MiB"
            table.add_row(source, m.name, m.architecture or "?", size,
                          "yes" if m.chat_template else "none", str(path))
        except ModelError as e:
            table.add_row(source, path.name, "-", "-", "-", f"unusable: {e}")
    out.print(table)


@models_app.command("convert")
def models_convert(
    model: str | None = typer.Argument(None, help="GGUF file (default: the embedded model)."),
    to: str = typer.Option(..., "--to", help=f"mlx (an mlx-lm model directory), or a GGUF weight type: "
                           f"{', '.join(WEIGHT_TYPES)}."),
    output: Path | None = typer.Option(None, "--out", help="Output path (default: models/NAME.TYPE.gguf, "
                                       "or models/NAME-mlx for --to mlx)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file (GGUF types)."),
):
    """Write a local copy of a model: an mlx-lm directory, or another GGUF weight type.

    --to mlx makes an mlx-lm model directory offline (llama architecture, byte-level BPE
    tokenizers; Q4_0/Q4_1/Q8_0 stay quantized). On x86 CPUs an F16 or BF16 GGUF copy of a Q4_1
    model scores 1.5-2.7x faster; `make bench` measures the speed and the drift."""
    m = resolve_model(model)
    if m.kind != "gguf":
        raise Fail(f"{m.path} is not a GGUF file; models convert reads GGUF files")
    folder = models_dir()
    if to == "mlx":
        target = output or folder / f"{m.name}-mlx"
        err.print(f"Converting {m.name} to an mlx-lm directory ...")
        convert_to_mlx(m.path, target)
        out.print(f"Wrote {target}. Use it with: --model {target} --backend mlx", highlight=False, soft_wrap=True)
        return
    target = output or default_output(m.path, to, folder)
    if output is None:
        folder.mkdir(exist_ok=True)
    if target.exists() and not force:
        raise Fail(f"{target} exists; use --force to replace it")
    err.print(f"Converting {m.name} to {to} ...")
    try:
        convert_gguf(m.path, target, to)
    except ConvertError as e:
        raise Fail(str(e)) from None
    out.print(f"Wrote {target} ({target.stat().st_size / 2**20:.0f} MiB). Use it with: --model {target}",
              highlight=False, soft_wrap=True)


@app.command()
def doctor(
    model: str | None = typer.Argument(None, help="GGUF file or model name (default: the embedded model)."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Measure again instead of reading the cache."),
    build_check: bool = typer.Option(False, "--build-check", help="Measure afresh and exit 3 if llama.cpp crashed "
                                     "on any weight type (`make install` runs this after building)."),
):
    """Print this machine's CPU and llama.cpp build, and what `--weights auto` runs a model on here:
    the file and each copy measured (prompt and generation-step speed, drift from the file), and why
    each was or was not chosen."""
    from .tune import DRIFT_MAX, DRIFT_MEAN, MARGIN, ROWS, build_features

    diagnosis = api.doctor(model, remeasure=remeasure or build_check, announce=err.print)
    here, choice = diagnosis.machine, diagnosis.choice
    out.print(f"CPU: {here['cpu']}, {here['cores']} cores", highlight=False)
    out.print(f"llama.cpp {here['llama_cpp']}, built for: {' '.join(build_features(here['build'])) or 'no extensions'}",
              highlight=False)
    if choice is None:
        out.print(f"--weights auto runs {diagnosis.model.name} as it is: {diagnosis.skipped}", highlight=False)
        return
    when = "cached" if choice.cached else "measured now"
    table = Table("weights", "size", "prompt tok/s", f"{ROWS}-row step tok/s", "drift mean / max", "verdict",
                  title=f"--weights auto for {diagnosis.model.name} ({when}, {choice.seconds:.1f} s)")
    for m in choice.measured:
        verdict = m.failure or ", ".join(f"chosen for {w}" for w, k in (("prompts", choice.prompt),
                                                                         ("steps", choice.step)) if k == m.kind) or "ok"
        drift = "-" if m.drift_mean is None else f"{m.drift_mean:.3f} / {m.drift_max:.2f}"
        speed = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        table.add_row(m.kind, f"{m.size / 2**20:.0f} MiB", speed(m.prompt_tok_s), speed(m.step_tok_s), drift, verdict)
    out.print(table)
    out.print(f"auto takes, of those that ran and drift at most {DRIFT_MEAN} / {DRIFT_MAX} nats per token from the "
              f"file, the one with the least drift within {MARGIN:.2f}x of the fastest (the file first). Prompts "
              f"(score, judge, tag, embed): {choice.prompt}; steps (generate, respond): {choice.step}.",
              highlight=False)
    if build_check and diagnosis.crashed:
        err.print(f"llama.cpp crashed here on {', '.join(diagnosis.crashed)}: this build is not safe on this CPU",
                  highlight=False)
        raise typer.Exit(3)


@templates_app.command("list")
def templates_list():
    """The families the registry knows; everything else is derived from the model's own template."""
    table = Table("family", "description", "canonical template", "models")
    for f in registry.FAMILIES:
        canonical = ("used instead of the model's" if f.prefer_registry_template else "for files without one") \
            if f.template else "-"
        table.add_row(f.name, f.description, canonical, ", ".join(f.examples))
    out.print(table)


@templates_app.command("show")
def templates_show(family: str = typer.Argument(..., help="A family from `templates list`.")):
    """Print a family's canonical chat template and what Magpie derives from it."""
    try:
        f = registry.get(family)
    except KeyError as e:
        raise Fail(str(e.args[0])) from None
    out.print(f"[bold]{f.name}[/bold]: {escape(f.description)}", highlight=False)
    if f.prefer_registry_template:
        out.print(f"Used instead of the model's own template: {escape(f.prefer_registry_template)}", highlight=False)
    if f.template is None:
        out.print("No canonical template: models of this family carry their own; "
                  "`templates detect MODEL` shows what is derived from it.")
        return
    out.print("[bold]Template[/bold]")
    out.print(escape(f.template), highlight=False, soft_wrap=True)
    _print_format(chat_format_for(None, template=f.name, bos_token="<BOS>", eos_token="<EOS>"), vocab=None)


@templates_app.command("detect")
def templates_detect(
    model: str | None = typer.Argument(None, help="GGUF file or mlx-lm directory (default: the embedded model)."),
    template: str = typer.Option("auto", help="As for generate: auto, model, a family, or a .jinja file."),
    system_prompt: str | None = typer.Option(None, help="Show the pre-query template with this system prompt."),
    task: str | None = typer.Option(None, help="Show the pre-query template with this task's system prompt."),
):
    """Show the pre-query template, stop strings and ids, and the multi-turn template for a model."""
    m = resolve_model(model)
    fmt = chat_format_for(m.chat_template, template=template, bos_token=m.bos_token, eos_token=m.eos_token)
    out.print(f"[bold]model[/bold]       {escape(m.name)} ({escape(str(m.path))})", highlight=False)
    _print_format(fmt, vocab=m.gguf)
    system = task_prompt(task).text if task else system_prompt
    if system:
        fmt.check_system(system)
        out.print(f"[bold]with system[/bold] {escape(repr(fmt.instruction_prompt(system)))}", highlight=False,
                  soft_wrap=True)


def _stop_source(fmt, stop: str) -> str:
    if stop in registry.markers(fmt.user_end + fmt.assistant_end):
        return "template"
    if stop in (fmt.bos_token, fmt.eos_token):
        return "BOS" if stop == fmt.bos_token else "EOS"
    return f"registry:{fmt.family.name}" if fmt.family and stop in fmt.family.extra_stops else "template"


def _print_format(fmt, vocab) -> None:
    fam = fmt.family
    rows = [("family", f"{fam.name} ({fam.description})" if fam else "unknown (derived from the template alone)"),
            ("template", fmt.origin + (" (tokenizer.chat_template of the GGUF file)" if fmt.origin == "model" else "")),
            ("pre-query", repr(fmt.pre_query))]
    if vocab is not None and vocab.get("tokenizer.ggml.add_bos_token") and fmt.bos_token \
            and not fmt.pre_query.startswith(fmt.bos_token):
        rows.append(("", f"the tokenizer adds {fmt.bos_token!r} in front"))
    ids = vocab.token_ids(fmt.stops) if vocab is not None else {}
    rows += [("next user", repr(fmt.user_header) + "  (appended after an assistant turn)"),
             ("assistant", repr(fmt.generation_prompt) + "  (opens the response)"),
             ("stops", ", ".join(f"{s!r}" + (f"={ids[s]}" if s in ids else "") + f" ({_stop_source(fmt, s)})"
                                 for s in fmt.stops)),
             ("thinking", "yes: <think> blocks are removed unless --keep-thinking" if fam and fam.thinking else "no")]
    for name, value in rows:
        out.print(f"[bold]{name:<11}[/bold] {escape(value)}", highlight=False, soft_wrap=True)


def _stop_on_signals() -> None:
    """SIGINT/SIGTERM: the first stops the command cleanly (the batch in progress is rolled back,
    committed ones stay, and generate/score print how to resume); a second exits at once, which
    is just as safe, because every batch is one SQLite transaction."""

    def first(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, at_once)
        raise KeyboardInterrupt

    def at_once(signum, frame):
        os.write(2, b"\nStopped at once; every committed batch is kept.\n")
        os._exit(130)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # respect nohup and friends
        signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


def _database_error(e: sqlite3.Error) -> str:
    text = str(e)
    if "full" in text or "disk I/O" in text:
        return (f"database error: {text} (is the disk full?); the batch in progress was rolled back: "
                "free some space and run the same command again to resume")
    if "locked" in text or "busy" in text:
        return "database error: the database is locked by another program; try again when it is done"
    if "malformed" in text or "not a database" in text:
        return f"database error: the file is damaged ({text}); restore it from a copy"
    if "readonly" in text:
        return "database error: the database file is read-only"
    return f"database error: {text}"


def main() -> None:
    """Entry point: every user error is one line on stderr and exit code 2, never a traceback."""
    _stop_on_signals()
    try:
        result = app(standalone_mode=False)
        sys.exit(result if isinstance(result, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: bad option values, unknown commands
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except (Fail, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except sqlite3.Error as e:  # locked, full disk, damaged file...: the transaction was rolled back
        print(f"error: {_database_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # commands without their own resume message
        print("Interrupted; every committed batch is kept.", file=sys.stderr)
        sys.exit(130)
