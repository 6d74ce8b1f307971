"""What every command shares: the app, the consoles, common options, progress bars, small renderers."""

from __future__ import annotations

import json
import re
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from .. import api
from ..backends.base import Sampling
from ..curate import CHECKS
from ..errors import MagpieError, UsageError

# The order `--help` lists the commands in: the pipeline's, whichever module registers them.
ORDER = ("generate", "respond", "import", "runs", "show", "stats", "curate", "score", "tag", "judge", "embed",
         "review", "select", "export", "report", "doctor", "models", "templates")


class _InPipelineOrder(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda c: ORDER.index(c) if c in ORDER else len(ORDER))


app = typer.Typer(help="Synthesise instruction data with Magpie on a local model, offline.", cls=_InPipelineOrder,
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="List the models magpie-local can use; convert one to a faster weight type.",
                        no_args_is_help=True)
app.add_typer(models_app, name="models")
templates_app = typer.Typer(help="Chat-template families, and what Magpie derives for a model.", no_args_is_help=True)


app.add_typer(templates_app, name="templates")

class _Stopped:
    """The exit code of a command a signal stopped: 128 + the signal's number (Ctrl-C 130, SIGTERM 143)."""

    code = 130


stopped = _Stopped()

# emoji=False: stored text such as ":smile:" reaches the terminal as written.
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)
# What a terminal would act on instead of showing: C0 controls but newline and tab (ESC starts CSI,
# OSC, DCS sequences: clearing the screen, retitling the window, hyperlinks), DEL, C1 controls
# (single-byte CSI, OSC, DCS), and the bidirectional overrides that reorder what is shown.
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def inert(text) -> str:
    """`text` with every control character written out as an escape (`\x1b`), so it prints inert."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(text))


def safe(text) -> str:
    """Stored or user-given text for a rich markup string: inert, and with markup escaped."""
    return escape(inert(text))
if not out.is_terminal:  # piped or logged: do not cut table cells to 80 columns
    out.width = 200
if not err.is_terminal:
    err.width = 200
USER_ERRORS = (MagpieError,)  # every module's errors derive from it (errors.py)
DB_OPTION = typer.Option(Path("magpie.db"), "--db", help="The magpie-local database (SQLite) to read and add to.")
NEW_DB_OPTION = typer.Option(Path("magpie.db"), "--db", help="The database (SQLite), created if missing.")
BACKEND_OPTION = typer.Option("auto", "--backend", help="llamacpp, mlx, or auto: on Apple Silicon with MLX "
                              "installed MLX where it runs the model as llama.cpp does (it says why where not), "
                              "an mlx-lm directory on MLX, else llama.cpp.")
MODEL_HELP = ("GGUF file, mlx-lm directory, Hugging Face repo id already in the local cache, or a name "
              "`models list` shows (ollama:qwen2.5:7b, lmstudio:..., hf:..., gpt4all:...) "
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




MIN_DISTANCE_OPTION = typer.Option(None, "--min-distance", help="Only pairs whose nearest neighbour is at least "
                                   "this cosine distance away (from `embed`; both of a close pair go: for one of "
                                   "each, curate --near-dup-model).")
MAX_REPEATS_OPTION = typer.Option(None, "--max-repeats", help="Only pairs with at most this many others within the "
                                  "embedding run's radius.")
REVIEWED_OPTION = typer.Option(None, "--reviewed", help="accepted: only pairs a reviewer accepted (magpie-local "
                               "review); not-rejected: all but those a reviewer rejected.")
EMBED_RUN_OPTION = typer.Option(None, "--embed-run", help="Embedding run for --min-distance, --max-repeats and "
                                "--diverse (default: the latest).")




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
                err.print(f"Run {run.id}: new, {safe(run.model)}{f' ({copy.upper()} copy)' if copy else ''} "
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


def _progress(quiet: bool) -> Progress:
    """A bar on stderr: done/total items, a `rate` field the caller fills, elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, disable=quiet)


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
            raise typer.Exit(stopped.code) from None

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


def _histogram(table: Table, values: np.ndarray, bins, label: str = "{lo:5.2f}-{hi:5.2f}") -> None:
    counts, edges = np.histogram(values, bins=bins)
    for count, lo, hi in zip(counts, edges, edges[1:]):
        table.add_row(label.format(lo=lo, hi=hi), "█" * int(40 * count / max(counts.max(), 1)) + f" {count}")


def _print_checks(counts: dict[str, tuple[int, int]], title: str) -> None:
    table = Table("check", "passed", "failed", title=title)
    for name, (passed, failed) in counts.items():
        table.add_row(name, str(passed), str(failed))
    out.print(table)
