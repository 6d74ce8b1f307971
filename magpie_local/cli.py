"""The `magpie-local` command line."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import api, registry, tagging
from ._version import __version__
from .backends import ServerOptions, backend_key, open_backend
from .backends.base import BackendError, Sampling
from .backends.llamacpp import SCORE_TOKENS
from .convert import TYPES as WEIGHT_TYPES
from .convert import WEIGHTS, ConvertError, convert_gguf, default_output
from .curate import CHECKS, Bounds, check_turn, duplicate_reasons, near_duplicates
from .errors import MagpieError, UsageError
from .export import (
    FORMATS,
    ExportError,
    dataset_card,
    file_counts,
    plan_export,
    split_train_valid,
    write_atomically,
    write_files,
)
from .generate import GENERATE_CHECKS, GenerateSettings, chat_format
from .gguf_to_mlx import convert_to_mlx
from .importers import RecordError, read_dataset
from .models import ModelError, available_models, models_dir, resolve_model, sha256_file
from .prompts import TASKS, PromptError, SystemPrompt, language_code, language_name, load_system_prompts, task_prompt
from .report import build_report
from .scoring import PROMPT_FORMATS, IFDScorer, Pair
from .store import Store, config_key
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
    preset: str = typer.Option("default", help="Sampling preset for both steps: default (measured on small "
                               "models: penalties, DRY and loop stops on responses; see docs/generation.md) or "
                               "magpie (the paper's: instruction temperature 1, greedy responses, no penalties). "
                               "The options below change single fields of it."),
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
    weights: str = typer.Option("auto", help="llama.cpp: file (generate with the model file as it is), f16 or "
                                "bf16 (with a 16-bit copy, made once in the cache: faster batched steps on x86 CPUs "
                                "for Q4_0/Q4_1 models), or auto (for such models up to 1 GiB as 16-bit, on x86 CPUs "
                                "without GPU offload: bf16 where llama.cpp has AVX512_BF16, else f16)."),
    ctx: int = typer.Option(1024, help="Context tokens per sequence."),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores)."),
    resume: int | None = typer.Option(None, "--resume", help="Continue this run id with its stored settings."),
    new: bool = typer.Option(False, "--new", help="Start a new run even if one with the same settings exists."),
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
    inst, resp = api.sampling_preset(preset)
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
                                  new=new, progress=bar.callbacks(), announce=err.print)
    except KeyboardInterrupt:
        if bar.run is None:
            raise
        with Store(db, create=False, write=False) as store:
            done = store.run_counts(bar.run.id)
        err.print(f"Interrupted: run {bar.run.id} holds {done['kept']}/{bar.run.target} committed pairs. "
                  f"Resume with: magpie-local generate --db {db} --resume {bar.run.id} -n {bar.run.target}",
                  soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    if result.status == "already-complete":
        err.print(f"Run {result.run.id} is already complete with {n} pairs; nothing to do "
                  "(a larger -n extends it, --new starts another run).")
        return
    _print_generated(db, result)


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

    def __init__(self, quiet: bool):
        self.progress = _progress("Generating", quiet)
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
        return f"{self.made / dt:.2f} pairs/s {self.tokens / dt:.0f} tok/s"

    def callbacks(self) -> api.Progress:
        def start(run, kept: int, new: bool) -> None:
            self.run = run
            if new:
                copy = run.config.get("weights")
                err.print(f"Run {run.id}: new, {run.model}{f' ({copy.upper()} copy)' if copy else ''} "
                          f"on {run.backend}, seed {run.config['settings']['seed']}")
            else:
                err.print(f"Run {run.id}: continuing with {kept}/{run.target} pairs")
            self.progress.start()
            self.task = self.progress.add_task("generate", total=run.target, completed=kept, rate="")
            self.started = time.perf_counter()

        def tokens(k: int) -> None:
            self.tokens += k
            self.progress.update(self.task, rate=self.rates())

        def item(gained: int) -> None:
            self.made += gained
            self.progress.update(self.task, advance=gained, rate=self.rates())

        return api.Progress(start=start, tokens=tokens, item=item)


def _print_generated(db: Path, result: api.GenerateResult) -> None:
    run, counts = result.run, result.counts
    turns = run.config["settings"].get("turns", 1)
    summary = Table(title=f"Run {run.id} complete", show_header=False)
    unit = "pairs" if turns == 1 else f"{turns}-turn conversations"
    summary.add_row(f"{unit} in run", f"{counts['kept']} kept, {counts['dropped']} dropped")
    with Store(db, create=False, write=False) as store:
        for reason, count in store.drop_reasons(run.id).items():
            summary.add_row("  dropped", f"{count} {reason}")
        if cut := store.cut_off_count(run.id):
            summary.add_row("  kept, cut off", f"{cut} responses hit --response-max-tokens")
    noun = "pairs" if turns == 1 else "conversations"
    elapsed = max(result.seconds, 1e-9)
    summary.add_row("this session", f"{result.made} {noun}, {result.tokens} tokens in {elapsed:.1f}s")
    summary.add_row("throughput", f"{result.made / elapsed:.2f} {noun}/s, "
                    f"{result.tokens / elapsed:.1f} generated tok/s")
    for url, answered in result.spread.items():
        summary.add_row("  endpoint", f"{url}: {answered} requests")
    summary.add_row("database", str(db))
    out.print(summary)


def _progress(label: str, quiet: bool) -> Progress:
    """A bar on stderr: done/total pairs, a `rate` field the caller fills, elapsed time and ETA."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
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
    file: Path = typer.Argument(..., help="Alpaca, ShareGPT or OpenAI-messages data: a JSON array or JSON Lines."),
    db: Path = DB_OPTION,
    strict: bool = typer.Option(False, "--strict", help="Reject the whole file if any record is malformed."),
    new: bool = typer.Option(False, "--new", help="Import again even if this exact file was imported before."),
):
    """Import an instruction dataset into --db (for scoring, selection and export)."""
    if not file.is_file():
        raise Fail(f"no such file: {file}")
    try:
        records, errors = read_dataset(file)
    except RecordError as e:
        raise Fail(str(e)) from None
    if errors and strict:
        raise Fail(f"{errors[0]} ({len(errors)} malformed records in {file}; nothing imported, --strict)")
    for line in errors[:20]:
        err.print(f"skipped {line}", soft_wrap=True, highlight=False, markup=False)
    if len(errors) > 20:
        err.print(f"... and {len(errors) - 20} more malformed records")
    if not records:
        raise Fail(f"no valid records in {file}")
    sha = sha256_file(file)
    with Store(db) as store:
        existing = None if new else store.find_run("import", sha[:16])
        if existing is not None:
            err.print(f"{file} was already imported as run {existing.id}; nothing to do (--new imports it again).")
            return
        formats = Counter(r.format for r in records)
        rows = [(dict(item_index=i, status="kept", drop_reason=None, system_prompt=r.system_prompt),
                 [dict(t, raw_instruction=None) for t in r.turns]) for i, r in enumerate(records)]
        run = store.import_run(config_key=sha[:16], rows=rows, versions={"magpie_local": __version__},
                               config={"file": file.name, "sha256": sha, "formats": dict(formats),
                                       "malformed": len(errors)})
        turns = sum(len(r.turns) for r in records)
        kinds = ", ".join(f"{n} {f}" for f, n in formats.items())
        out.print(f"Imported run {run.id}: {len(records)} conversations ({kinds}), {turns} turns; "
                  f"{len(errors)} malformed records skipped.", highlight=False)


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
    weights: str = typer.Option("auto", help="llama.cpp: file (score on the model file as it is), f16 or bf16 (on "
                                "a 16-bit copy, made once in the cache: on x86 CPUs Q4_0/Q4_1 models score 1.5-2.7x "
                                "faster), or auto (for such models up to 1 GiB as 16-bit, on x86 CPUs without GPU "
                                "offload: bf16 where llama.cpp has AVX512_BF16, else f16)."),
    prompt_format: str = typer.Option("chat", help="chat (the scorer's template) or alpaca (the Cherry reference)."),
    max_length: int = typer.Option(512, help="Tokens of context + answer scored at most (the reference's 512)."),
    batch_size: int = typer.Option(16, help="Pairs scored and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score stored pairs by IFD (Instruction-Following Difficulty); resumable like generate."""
    if prompt_format not in PROMPT_FORMATS:
        raise Fail(f"--prompt-format must be one of: {', '.join(PROMPT_FORMATS)}")
    if not 16 <= max_length <= SCORE_TOKENS:
        raise Fail(f"--max-length must be between 16 and {SCORE_TOKENS}")
    if batch_size < 1:
        raise Fail("--batch-size must be at least 1")
    if weights not in WEIGHTS:
        raise Fail(f"--weights must be one of: {', '.join(WEIGHTS)}")
    m, backend_name, server = api.model_and_backend(model, tokenizer, backend_choice,
                                                 ServerOptions(tuple(endpoint), api_key_env, served_model))
    copy = api.weights_copy(m, weights, backend_name, "scorer")
    fmt = chat_format(m, GenerateSettings()) if prompt_format == "chat" else None
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, run, "score")
        sha = store.cached_sha256(m.path, sha256_file)
        config = {"scorer_sha256": sha, "scorer": m.name, "prompt_format": prompt_format, "max_length": max_length,
                  "source_runs": sources, **backend_key(backend_name, server.served_model),
                  **({"weights": copy} if copy else {})}
        scorer_model = api.model_copy(m, sha, copy, err.print) if copy else m
        backend = open_backend(backend_name, scorer_model, sha, ctx=64,
                               parallel=parallel if backend_name == "server" else 1, announce=err.print, server=server)
        try:
            scorer = IFDScorer(backend, prompt_format, fmt, max_length)
            backend.check_scoring(scorer.prepare(Pair("Hello", "Hi"))[:2])  # before a run is made
            score_run = _pass_run(store, "score", config, m, sha, backend, total)
            _pass_with_progress(store, score_run.id, sources, "scores", _ifd_fields(scorer), total, batch_size, quiet)
        finally:
            backend.close()
        store.finish_run(score_run.id)
        _print_stats(store, score_run.id)


@app.command()
def tag(
    db: Path = DB_OPTION,
    run: list[int] = typer.Option(None, "--run", help="Tag these runs' pairs (default: every run's)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Judge: a GGUF file (default: the embedded model)."),
    backend_choice: str = BACKEND_OPTION,
    parallel: int | None = typer.Option(None, help="Sequences decoded together (default: up to 32)."),
    batch_size: int = typer.Option(16, help="Pairs tagged and committed together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Tag each stored instruction with task category, input quality and difficulty, the local
    model acting as judge; its answers are constrained to valid JSON. Resumable like score."""
    if batch_size < 1:
        raise Fail("--batch-size must be at least 1")
    m = resolve_model(model)
    name = api.backend_with("grammar", backend_choice, m, "tagging (its grammar sampler keeps the answers valid JSON)")
    fmt = chat_format(m, GenerateSettings())
    with Store(db, create=False) as store:
        sources, total = _data_runs(store, run, "tag")
        sha = store.cached_sha256(m.path, sha256_file)
        config = {"judge_sha256": sha, "judge": m.name, "prompt_sha256": config_key({"prompt": tagging.PROMPT}),
                  "source_runs": sources}
        with open_backend(name, m, sha, ctx=1024, parallel=parallel) as backend:
            tag_run = _pass_run(store, "tag", config, m, sha, backend, total)
            _pass_with_progress(store, tag_run.id, sources, "tags", _tag_fields(backend, fmt), total, batch_size,
                                quiet)
        store.finish_run(tag_run.id)
        _print_tags(store, tag_run.id)


def _print_tags(store: Store, tag_run_id: int) -> None:
    """Distributions of each tag in a tagging run, as bars."""
    failed, by_column = store.tag_counts(tag_run_id, tagging.FIELDS)
    table = Table(title=f"Tags, tagging run {tag_run_id} ({failed} failed answers)", show_header=False)
    for column, values in tagging.FIELDS.items():
        counts = by_column[column]
        top = max(counts.values(), default=1)
        table.add_row(f"[bold]{column}[/bold]", "")
        for value in values:
            n = counts.get(value, 0)
            table.add_row(f"  {escape(value)}", "█" * round(30 * n / top) + f" {n}")
    out.print(table)


def _data_runs(store: Store, run: list[int] | None, verb: str) -> tuple[list[int] | None, int]:
    """(the data runs a score or tag pass covers, None for all; their number of kept turns)."""
    sources = sorted(set(run)) if run else None
    for source in sources or []:
        if (kind := store.get_run(source).kind) in ("score", "tag"):
            raise Fail(f"run {source} is a {kind} run, not data")
    total = store.count_turns(sources)
    if total == 0:
        raise Fail(f"{store.path} holds no pairs to {verb}" + (f" in runs {sources}" if sources else ""))
    return sources, total


def _pass_run(store: Store, kind: str, config: dict, m, sha: str, backend, total: int):
    """The score or tag run with these settings, to resume, or a new one."""
    key = config_key(config)
    found = store.find_run(kind, key)
    if found is not None:
        store.set_target(found.id, total)
        return found
    return store.create_run(kind=kind, target=total, config_key=key, config=config,
                            model={"name": m.name, "path": str(m.path.resolve()), "sha256": sha},
                            backend=backend.name, versions=backend.describe())


def _pass_with_progress(store: Store, run_id: int, sources, table: str, work, total: int, batch_size: int,
                        quiet: bool) -> None:
    """Score or tag every pending kept turn in batches: `work(rows)` gives each row's stored fields,
    and each batch is committed whole, so a killed pass resumes where it stopped."""
    done = store.rows_done(run_id, table)
    started, finished = time.perf_counter(), 0
    progress = _progress("Scoring" if table == "scores" else "Tagging", quiet)
    with progress:
        task = progress.add_task(table, total=total, completed=done, rate="")
        try:
            while rows := store.turns_to_score(run_id, sources, batch_size, table=table):
                store.commit_scores(run_id, [dict(turn_id=r["id"], **fields) for r, fields in zip(rows, work(rows))],
                                    table=table)
                finished += len(rows)
                rate = finished / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=len(rows), rate=f"{rate:.2f} pairs/s")
        except KeyboardInterrupt:
            progress.stop()
            err.print(f"Interrupted: {table} so far are committed; run the same command again to go on.")
            raise typer.Exit(130) from None
        except BackendError as e:
            progress.stop()
            raise Fail(f"{e}. The {table} so far are committed; run the same command again to go on.") from None


def _ifd_fields(scorer: IFDScorer):
    def work(rows: list[dict]) -> list[dict]:
        pairs = [Pair(r["instruction"], r["response"], r["input"] or "", r["history"], r["system_prompt"])
                 for r in rows]
        return [dict(ifd_above_1=s.above_1, **_score_fields(s)) for s in scorer.score(pairs)]
    return work


def _tag_fields(backend, fmt):
    def work(rows: list[dict]) -> list[dict]:
        answers = backend.complete([tagging.judge_request(fmt, r["instruction"]) for r in rows])
        return [asdict(tagging.parse(a.text)) for a in answers]
    return work


def _score_fields(score) -> dict:
    return dict(loss_direct=score.loss_direct, loss_cond=score.loss_cond, answer_tokens=score.answer_tokens,
                context_tokens=score.context_tokens, ifd=score.ifd, ifd_ppl=score.ifd_ppl,
                truncated=score.truncated, skip_reason=score.skip_reason)


def _checks(spec: str, store: Store) -> list[str]:
    """Check names from --passing; `all` is every check `curate` has run on this database."""
    if spec.strip() == "all":
        run = store.check_names()
        names = [c for c in CHECKS if c in run]
        if not names:
            raise Fail("no curation checks in this database yet: run `magpie-local curate` first")
        return names
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in CHECKS]
    if unknown or not names:
        raise Fail(f"unknown check {', '.join(unknown) or spec!r}; known: all, {', '.join(CHECKS)}")
    return names


def _score_run_or_latest(store: Store, score_run: int | None) -> int:
    if score_run is not None:
        if store.get_run(score_run).kind != "score":
            raise Fail(f"run {score_run} is not a scoring run")
        return score_run
    latest = store.latest_run("score")
    if latest is None:
        raise Fail(f"{store.path} holds no scores yet; run `magpie-local score` first")
    return latest.id


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
                                              "instructions with this GGUF model's embeddings ('default': "
                                              "the embedded model)."),
    near_dup_threshold: float = typer.Option(0.95, help="Cosine similarity from which an instruction is a "
                                             "near-duplicate of an earlier one."),
    backend_choice: str = BACKEND_OPTION,
):
    """Run the curation checks (length, cut_off, repetition, refusal, duplicate; language with --language)
    on every kept turn and store each verdict with its reason; `select --passing` and `export --passing`
    then combine them."""
    if not 0 <= max_repetition <= 1:
        raise Fail("--max-repetition must be between 0 and 1")
    try:
        code = language_code(language) if language else None
    except PromptError as e:
        raise Fail(str(e)) from None
    if near_dup_model:
        embedder = resolve_model(None if near_dup_model == "default" else near_dup_model)
        embed_backend = api.backend_with("embeddings", backend_choice, embedder,
                                         "near-duplicate search (llama.cpp's embedding mode)")
    bounds = Bounds(min_chars=min_chars, max_chars=max_chars, max_repetition=max_repetition, language=code)
    settings = json.dumps(dict(asdict(bounds), near_dup_model=near_dup_model,
                               near_dup_threshold=near_dup_threshold if near_dup_model else None), sort_keys=True)
    with Store(db, create=False) as store:
        turns = store.turns_to_check(run or None)
        if not turns:
            raise Fail(f"no kept pairs to check in {db}")
        firsts = [(t["conversation_id"], t["instruction"]) for t in turns if t["turn_index"] == 0]
        duplicates = duplicate_reasons(firsts)
        near = _near_duplicates(firsts, embedder, embed_backend, near_dup_threshold) if near_dup_model else {}
        rows = []
        for t in turns:
            verdicts = check_turn(t, bounds)
            verdicts["duplicate"] = duplicates.get(t["conversation_id"])
            if near_dup_model:
                verdicts["near_duplicate"] = near.get(t["conversation_id"])
            rows += [dict(turn_id=t["id"], name=name, passed=int(reason is None), reason=reason, settings=settings)
                     for name, reason in verdicts.items()]
        store.replace_checks(rows)
        _print_checks(store, f"Curation checks, {len(turns)} turns")


@app.command()
def stats(db: Path = DB_OPTION,
          score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest).")):
    """Print what the database holds: each run's kept and dropped items with the drop reasons, response
    lengths, curation-check counts, the IFD distribution of a scoring run, and the latest tags."""
    with Store(db, create=False, write=False) as store:
        _print_data_stats(store)
        if score_run is not None or store.latest_run("score") is not None:
            _print_stats(store, _score_run_or_latest(store, score_run))
        if (latest_tags := store.latest_run("tag")) is not None:
            _print_tags(store, latest_tags.id)


@app.command()
def report(
    out_file: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    db: Path = DB_OPTION,
    score_run: int | None = typer.Option(None, "--score-run", help="Scoring run (default: the latest, if any)."),
    sample: int = typer.Option(50, help="How many pairs the page shows."),
    seed: int = typer.Option(0, help="Seed of the sample."),
):
    """Write one self-contained HTML page: runs, IFD / length / tag distributions, a sample of pairs."""
    if sample < 0:
        raise Fail("--sample must be at least 0")
    with Store(db, create=False, write=False) as store:
        scored = _score_run_or_latest(store, score_run) if score_run is not None or store.latest_run("score") \
            else None
        tagged = store.latest_run("tag")
        page = build_report(store, scored, tagged.id if tagged else None, sample, seed)
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
    runs = [r for r in store.list_runs() if r["kind"] in ("generate", "import")]
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


def _near_duplicates(firsts: list[tuple[int, str]], m, backend_name: str, threshold: float) -> dict[int, str | None]:
    if not 0 < threshold <= 1:
        raise Fail("--near-dup-threshold must be in (0, 1]")
    chunks = []
    with open_backend(backend_name, m, "", ctx=64, parallel=1) as backend, \
            _progress("Embedding", quiet=False) as progress:
        task = progress.add_task("embed", total=len(firsts), rate="")
        for i in range(0, len(firsts), 64):
            chunks.append(backend.embed([text for _, text in firsts[i:i + 64]]))
            progress.update(task, advance=len(chunks[-1]))
    return near_duplicates([cid for cid, _ in firsts], np.concatenate(chunks), threshold)


def _print_checks(store: Store, title: str) -> None:
    table = Table("check", "passed", "failed", title=title)
    for name, (passed, failed) in store.check_counts().items():
        table.add_row(name, str(passed), str(failed))
    out.print(table)


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
):
    """Mark pairs chosen by IFD, curation checks and tags as a named selection (IFD > 1 is excluded unless asked)."""
    if top is not None and top_k is not None:
        raise Fail("give --top or --top-k, not both")
    fraction = None
    if top is not None:
        try:
            fraction = float(top.rstrip("%")) / (100 if top.endswith("%") else 1)
        except ValueError:
            raise Fail(f"--top takes a share such as 10% or 0.1, not {top!r}") from None
        if not 0 < fraction <= 1:
            raise Fail("--top must be between 0% and 100%")
    if top_k is not None and top_k < 1:
        raise Fail("--top-k must be at least 1")
    with Store(db, create=False) as store:
        run_id = _score_run_or_latest(store, score_run)
        tags, tag_run = [], None
        if tag_filters:
            tag_run = store.latest_run("tag")
            if tag_run is None:
                raise Fail(f"{db} holds no tags yet; run `magpie-local tag` first")
            for spec in tag_filters:
                column, _, values = spec.partition("=")
                column, wanted = column.strip(), [v.strip() for v in values.split(",") if v.strip()]
                if column not in tagging.FIELDS or not wanted:
                    raise Fail(f"--tag takes FIELD=VALUE[,VALUE...] with FIELD one of {', '.join(tagging.FIELDS)}; "
                               f"got {spec!r}")
                unknown = [v for v in wanted if v not in tagging.FIELDS[column]]
                if unknown:
                    raise Fail(f"unknown {column} {unknown[0]!r}; one of: {', '.join(tagging.FIELDS[column])}")
                tags.append((column, wanted))
        rows = store.scored_turns(run_id, keep_above_1=keep_above_1, min_ifd=min_ifd, max_ifd=max_ifd,
                                  passing=_checks(passing, store) if passing else None, tags=tags,
                                  tag_run_id=tag_run.id if tag_run else None)
        eligible = len(rows)
        if fraction is not None:
            rows = rows[: math.ceil(fraction * eligible)]
        if top_k is not None:
            rows = rows[:top_k]
        store.replace_selection(name, [r[0] for r in rows], run_id)
        span = f", IFD {rows[-1][1]:.3f} to {rows[0][1]:.3f}" if rows else ""
        out.print(f"Selection {name!r}: {len(rows)} of {eligible} eligible pairs from scoring run {run_id}{span}.",
                  highlight=False)


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
    force: bool = typer.Option(False, "--force", help="Replace files of an earlier export in --out."),
):
    """Write stored conversations as training files, with a dataset card (README.md) beside them."""
    if split_share is not None and not 0 < split_share < 1:
        raise Fail("--split takes the train share, between 0 and 1 (e.g. 0.95)")
    with Store(db, create=False, write=False) as store:
        try:
            plan = plan_export(store, selection=selection, runs=run or None, include_cut_off=include_cut_off,
                               include_system=not no_system, passing=_checks(passing, store) if passing else None)
            left = ", ".join(f"{n} {why}" for why, n in plan.left_out.items()) or "none"
            if not plan.conversations:
                raise Fail(f"nothing to export (left out: {left})")
            parts = split_train_valid(plan.conversations, split_share, seed)
            counts = file_counts(parts, fmt)
            write_files(out, fmt, parts, dataset_card(store, plan, fmt, counts), force=force)
        except ExportError as e:
            raise Fail(str(e)) from None
    files = ", ".join(f"{name} {n}" for name, n in counts.items())
    err.print(f"Exported {len(plan.conversations)} conversations ({fmt}) to {out}: {files}; left out: {left}. "
              f"Dataset card: {out / 'README.md'}", soft_wrap=True, highlight=False)


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
