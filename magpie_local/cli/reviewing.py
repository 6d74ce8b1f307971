"""review: the local review app in the browser (magpie_local.review)."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import typer

from ..review import loopback, serve
from .common import DB_OPTION, app, err, out, safe


@app.command()
def review(
    db: Path = DB_OPTION,
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback lets other machines "
                             "reach the page (it still needs the printed token)."),
    port: int = typer.Option(0, help="Port (0: a free one)."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the address; do not open a browser."),
):
    """Look at the data and fix it in the browser: filter and sort the pairs by what was measured,
    read one with its scores and neighbours, accept, reject, flag or edit it (keys a, r, f, e).
    `select` and `export --reviewed` honour the decisions."""
    if not 0 <= port <= 65535:
        raise typer.BadParameter("--port must be between 0 and 65535")
    server = serve(db, host=host, port=port)
    if not loopback(host):
        err.print(f"[bold yellow]Warning:[/] listening on {safe(host)}, not on this machine only: anyone who can "
                  "reach it and has the address below (it holds the token) can read and change the data.",
                  highlight=False)
    out.print(f"Reviewing {safe(db)} at [bold]{safe(server.url)}[/]", highlight=False, soft_wrap=True)
    out.print("Keys: j/k move, Enter opens, a accept, r reject, f flag, e edit, n/p next/previous. "
              "Every decision is saved as it is made. Ctrl-C stops.", highlight=False)
    if not no_browser:
        webbrowser.open(server.url)  # the socket already listens: the browser's request waits for run()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C or SIGTERM, then passes the signal on
        pass
    err.print("Stopped; every decision is saved.", highlight=False)
