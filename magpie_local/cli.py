"""The `magpie-local` command line."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .backends.base import Sampling
from .generate import GenerateError, GenerateSettings, Generation, chat_format, run_config
from .gguf import GGUFError
from .models import ModelError, available_models, resolve_model, sha256_file
from .store import Store, StoreError
from .templates import TemplateError

app = typer.Typer(help="Synthesise instruction data with Magpie on a local model, offline.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="List the models magpie-local can use.", no_args_is_help=True)
app.add_typer(models_app, name="models")

out = Console()
err = Console(stderr=True)
if not out.is_terminal:  # piped or logged: do not cut table cells to 80 columns
    out.width = 200
if not err.is_terminal:
    err.width = 200
USER_ERRORS = (ModelError, GGUFError, TemplateError, StoreError, GenerateError)
DB_OPTION = typer.Option(Path("magpie.db"), "--db", help="SQLite database file (created if missing).")


class Fail(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _backend_error():
    from .backends.llamacpp import BackendError

    return BackendError


@app.callback(invoke_without_command=True)
def main_options(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        out.print(f"magpie-local {__version__}")
        raise typer.Exit()


@app.command()
def generate(
    n: int = typer.Option(..., "-n", "--count", help="Number of instruction/response pairs the run should hold."),
    db: Path = DB_OPTION,
    model: str | None = typer.Option(None, "--model", "-m",
                                     help="GGUF file (default: the embedded SmolLM2-135M-Instruct)."),
    seed: int = typer.Option(0, help="Run seed; item i's seeds derive from it, so a run is reproducible."),
    system_prompt: str | None = typer.Option(None, help="System prompt placed before the pre-query template."),
    instruction_temperature: float = typer.Option(1.0, help="Step 1 (instruction) temperature (Magpie: 1.0)."),
    instruction_top_p: float = typer.Option(1.0, help="Step 1 top-p (Magpie: 1.0)."),
    instruction_max_tokens: int = typer.Option(128, help="Step 1 token limit."),
    response_temperature: float = typer.Option(0.0, help="Step 2 (response) temperature; 0 = greedy."),
    response_top_p: float = typer.Option(1.0, help="Step 2 top-p."),
    response_max_tokens: int = typer.Option(512, help="Step 2 token limit."),
    batch_size: int = typer.Option(16, help="Items committed to the DB together (a kill loses at most these)."),
    parallel: int | None = typer.Option(None, help="Sequences decoded together (default: up to 8, as memory allows)."),
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
    if n < 1:
        raise Fail("-n must be at least 1")
    for name, value in (("--batch-size", batch_size), ("--parallel", 1 if parallel is None else parallel),
                        ("--instruction-max-tokens", instruction_max_tokens),
                        ("--response-max-tokens", response_max_tokens)):
        if value < 1:
            raise Fail(f"{name} must be at least 1")
    for name, value in (("--instruction-top-p", instruction_top_p), ("--response-top-p", response_top_p)):
        if not 0.0 < value <= 1.0:
            raise Fail(f"{name} must be in (0, 1]")
    if resume is not None and new:
        raise Fail("--resume and --new cannot be combined")

    settings = GenerateSettings(
        seed=seed, system_prompt=system_prompt,
        instruction=Sampling(temperature=instruction_temperature, top_p=instruction_top_p,
                             max_tokens=instruction_max_tokens),
        response=Sampling(temperature=response_temperature, top_p=response_top_p, max_tokens=response_max_tokens))
    if resume is None:  # check the model and its template before the DB is created or touched
        m = resolve_model(model)
        chat_format(m, settings)
    store = Store(db)
    try:
        run = None
        if resume is not None:
            run = store.get_run(resume)
            if run.kind != "generate":
                raise Fail(f"run {resume} is not a generation run")
            settings = GenerateSettings.from_dict(run.config["settings"])
            m = resolve_model(model or run.config["model_path"])
        sha = store.cached_sha256(m.path, sha256_file)
        fmt = chat_format(m, settings)
        key, config = run_config(m, fmt, settings, sha)
        if run is None and not new:
            run = store.find_run("generate", key)
        if run is not None:
            if run.config["model_sha256"] != sha:
                raise Fail(f"run {run.id} was made with another model file "
                           f"(sha256 {run.config['model_sha256'][:12]}...)")
            # Re-render with the run's own clock, so templates that print today's date stay stable.
            fmt = chat_format(m, settings, datetime.fromisoformat(run.config["template_time"]))
            kept = store.run_counts(run.id)["kept"]
            if kept > n:
                raise Fail(f"run {run.id} already holds {kept} pairs, more than -n {n}")
            if kept == n and run.status == "complete":
                err.print(f"Run {run.id} is already complete with {n} pairs; nothing to do "
                          "(a larger -n extends it, --new starts another run).")
                return

        from .backends.llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(m.path, ctx=ctx, parallel=parallel, threads=threads)
        try:
            if run is None:
                config["model_path"] = str(m.path.resolve())
                run = store.create_run(kind="generate", target=n, config_key=key, config=config,
                                       model={"name": m.name, "path": str(m.path.resolve()), "sha256": sha},
                                       backend=backend.name, versions=backend.describe())
                err.print(f"Run {run.id}: new, {m.name}, seed {settings.seed}")
            else:
                if run.target != n or run.status != "complete":
                    store.set_target(run.id, n)
                    run.target = n
                err.print(f"Run {run.id}: continuing with {kept}/{n} pairs")
            _generate_with_progress(store, run, backend, fmt, settings, batch_size, quiet)
        finally:
            backend.close()
    finally:
        store.close()


def _generate_with_progress(store, run, backend, fmt, settings, batch_size, quiet) -> None:
    start_counts = store.run_counts(run.id)
    tokens = made = 0  # this session's generated tokens and finished kept pairs
    started = time.perf_counter()
    progress = Progress(TextColumn("[bold]Generating"), BarColumn(), MofNCompleteColumn(), TextColumn("pairs"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=err, disable=quiet, transient=False)

    def rates() -> str:
        dt = max(time.perf_counter() - started, 1e-9)
        return f"{made / dt:.2f} pairs/s {tokens / dt:.0f} tok/s"

    with progress:
        task = progress.add_task("generate", total=run.target, completed=start_counts["kept"], rate="")

        def on_tokens(k: int) -> None:
            nonlocal tokens
            tokens += k
            progress.update(task, rate=rates())

        def on_item(kept: bool) -> None:
            nonlocal made
            made += kept
            progress.update(task, advance=int(kept), rate=rates())

        gen = Generation(store, run, backend, fmt, settings, batch_size=batch_size,
                         on_tokens=on_tokens, on_item=on_item)
        try:
            counts = gen.run_until_target()
        except KeyboardInterrupt:
            progress.stop()
            done = store.run_counts(run.id)
            err.print(f"Interrupted: run {run.id} holds {done['kept']}/{run.target} committed pairs. "
                      f"Resume with: magpie-local generate --db {store.path} --resume {run.id} -n {run.target}",
                      soft_wrap=True, highlight=False)
            raise typer.Exit(130) from None
    elapsed = time.perf_counter() - started
    made = counts["kept"] - start_counts["kept"]
    summary = Table(title=f"Run {run.id} complete", show_header=False)
    summary.add_row("pairs in run", f"{counts['kept']} (dropped {counts['dropped']})")
    summary.add_row("this session", f"{made} pairs, {tokens} tokens in {elapsed:.1f}s")
    summary.add_row("throughput", f"{made / elapsed:.2f} pairs/s, {tokens / elapsed:.1f} generated tok/s")
    summary.add_row("database", str(store.path))
    out.print(summary)


@app.command()
def runs(db: Path = DB_OPTION):
    """List the runs in --db with their counts and status."""
    store = Store(db, create=False)
    try:
        table = Table("id", "kind", "status", "pairs", "target", "dropped", "tokens", "tok/s", "model", "created")
        for column in table.columns:
            column.no_wrap = True
        for r in store.list_runs():
            rate = f"{r['tokens'] / r['seconds']:.1f}" if r["seconds"] else "-"
            status = r["status"] if r["status"] == "complete" else "incomplete"
            table.add_row(str(r["id"]), r["kind"], status, str(r["kept"]), str(r["target"]), str(r["dropped"]),
                          str(r["tokens"]), rate, r["model"] or "-", r["created_at"])
        out.print(table)
    finally:
        store.close()


@app.command()
def show(db: Path = DB_OPTION, run: int | None = typer.Option(None, help="Run id (default: the latest)."),
         limit: int = typer.Option(3, help="How many pairs to print.")):
    """Print a few stored instruction/response pairs."""
    store = Store(db, create=False)
    try:
        run_id = run or store.conn.execute("SELECT max(id) FROM runs").fetchone()[0]
        if run_id is None:
            raise Fail(f"{db} holds no runs yet")
        rows = store.conn.execute(
            "SELECT c.item_index, t.instruction, t.response FROM conversations c JOIN turns t "
            "ON t.conversation_id = c.id WHERE c.run_id = ? AND c.status = 'kept' ORDER BY c.item_index LIMIT ?",
            [run_id, limit]).fetchall()
        for item, instruction, response in rows:
            out.rule(f"run {run_id} · item {item}")
            out.print("[bold]Instruction:[/bold] ", instruction, highlight=False, markup=True)
            out.print("[bold]Response:[/bold] ", response, highlight=False)
    finally:
        store.close()


@models_app.command("list")
def models_list(paths: list[str] = typer.Argument(None, help="Extra GGUF paths to describe.")):
    """Show the embedded default model, GGUF files under models/, and any paths given."""
    table = Table("source", "name", "arch", "size", "chat template", "path")
    for source, path, note in available_models(paths):
        if path is None:
            table.add_row(source, "-", "-", "-", "-", note)
            continue
        try:
            m = resolve_model(str(path))
            size = f"{m.size / 2**20:.0f} MiB"
            table.add_row(source, m.name, m.gguf.architecture or "?", size,
                          "yes" if m.gguf.chat_template else "none", str(path))
        except ModelError as e:
            table.add_row(source, path.name, "-", "-", "-", f"unusable: {e}")
    out.print(table)


def main() -> None:
    """Entry point: every user error is one line on stderr and exit code 2, never a traceback."""
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
    except Exception as e:
        if isinstance(e, _backend_error()):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
