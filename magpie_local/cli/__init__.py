"""The `magpie-local` command line: a thin layer over the Python API (magpie_local.api).

Each module registers its commands on the one `app` (common.py): making (generate, respond,
import), passes (score, tag, judge, embed), curating (runs, show, stats, curate, select, export,
report), reviewing (review), machine (doctor, models, templates). A command only parses options, calls the API and
renders the result."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys

import typer

from .._version import __version__
from ..store import database_error
from . import curating, machine, making, passes, reviewing  # noqa: F401  (each registers its commands on app)
from .common import USER_ERRORS, Fail, app, inert, out, stopped


@app.callback(invoke_without_command=True)
def main_options(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        out.print(f"magpie-local {__version__}")
        raise typer.Exit()


def _stop_on_signals() -> None:
    """SIGINT/SIGTERM: the first stops the command cleanly (the batch in progress is rolled back,
    committed ones stay, and generate/score print how to resume); a second exits at once, which
    is just as safe, because every batch is one SQLite transaction."""

    def first(signum, frame):
        stopped.code = 128 + signum
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, at_once)
        raise KeyboardInterrupt

    def at_once(signum, frame):
        os.write(2, b"\nStopped at once; every committed batch is kept.\n")
        os._exit(128 + signum)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # respect nohup and friends
        signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


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
        print(f"error: {inert(e)}", file=sys.stderr)
        sys.exit(2)
    except sqlite3.Error as e:  # locked, full disk, damaged file...: the transaction was rolled back
        print(f"error: {database_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # commands without their own resume message
        print("Interrupted; every committed batch is kept.", file=sys.stderr)
        sys.exit(stopped.code)
    except UnicodeError as e:  # text that cannot be stored or shown: a lone surrogate from the shell, say
        print(f"error: text that is not valid Unicode ({inert(e)})", file=sys.stderr)
        sys.exit(2)
