"""The review app: a local web page over a magpie-local database to look at the data and fix it.

A Starlette app (`create_app`) over the functions of api/reviewing.py, with Jinja2 templates and
htmx for the interactions, every asset shipped in this package (nothing from a CDN: it works
offline). Safe by default: it answers only requests for its own host (127.0.0.1 unless told
otherwise), every request carries the session's token (the printed URL sets it as a cookie), every
write also carries it in a header, stored text is escaped and Markdown sanitized (markdown.py), and
the Content-Security-Policy allows no inline script, no style attribute, nothing from elsewhere.
Reads and writes open short-lived connections (no writer lock): `generate` can write to the same
database meanwhile (WAL), and each decision is committed as it is made.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
from dataclasses import dataclass
from html import escape
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from ..errors import MagpieError, UsageError

HERE = Path(str(files(__package__)))
TOKEN_COOKIE = "magpie_review"
TOKEN_HEADER = "X-Magpie-Token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MAX_FORM_BYTES = 16 * 2**20  # an edit of MAX_EDIT_CHARS characters, URL-encoded, fits


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(db: str | Path, *, token: str | None = None, hosts: tuple[str, ...] = LOOPBACK_NAMES):
    """The review app (an ASGI app) for database `db`, which must exist. `token`: the session's secret
    (default: a new random one, as `app.state.token`); `hosts`: the Host names it answers to ("*": any)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from .. import api, tagging
    from ..store import Store
    from . import markdown

    db = Path(db)
    Store(db, create=False, write=False).close()  # checked once (quick_check), and migrated
    token = token or secrets.token_urlsafe(24)
    local = threading.local()

    def connection() -> Store:
        """This thread's connection, opened once without the integrity check (done above)."""
        if getattr(local, "store", None) is None:
            local.store = Store(db, create=False, write=False, check=False)
        return local.store

    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(["html"]))
    env.filters["markdown"] = markdown.render
    env.filters["when"] = lambda stamp: str(stamp or "")[:16].replace("T", " ")  # stored as ISO 8601, UTC
    env.globals.update(urlencode=urlencode, fields=tagging.FIELDS, token=token)

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def failure(request: Request, e: Exception) -> HTMLResponse:
        """A bad request: the page's message area for htmx (the page stays as it was), else a page."""
        if request.headers.get("HX-Request") == "true":
            return HTMLResponse(f'<p class="error">{escape(str(e))}</p>', status_code=400,
                                headers={"HX-Retarget": "#message", "HX-Reswap": "innerHTML"})
        return page("error.html", 400, message=str(e))

    async def form(request: Request) -> dict[str, str]:
        """A URL-encoded form (what htmx sends), each field's first value."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise UsageError("the form is too large")
        try:
            return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
        except UnicodeDecodeError:
            raise UsageError("the form is not UTF-8") from None

    async def guard(request: Request, call_next):
        """The token: from the printed URL once (then a cookie), on every request; in a header on writes."""
        if request.url.path.startswith("/static/"):
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None:
            if not secrets.compare_digest(given, token):
                return PlainTextResponse("wrong token", status_code=403)
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        if not secrets.compare_digest(request.cookies.get(TOKEN_COOKIE, ""), token):
            return PlainTextResponse("open the address magpie-local review printed (it carries the token)",
                                     status_code=403)
        if request.method != "GET" and not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return PlainTextResponse("a change needs the page's token", status_code=403)
        response = await call_next(request)
        return response

    async def headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                                 "Cache-Control": "no-store"})
        return response

    def dashboard(request: Request) -> HTMLResponse:
        return page("dashboard.html", d=api.dashboard(connection()), db=db)

    def table(request: Request) -> HTMLResponse:
        try:
            filters = api.PairFilters.from_query(dict(request.query_params))
            found = api.pairs(connection(), filters)
        except MagpieError as e:
            return failure(request, e)
        fragment = request.headers.get("HX-Request") == "true" and request.headers.get("HX-Target") == "pairs"
        return page("_table.html" if fragment else "pairs.html", found=found, f=filters,
                    choices=api.filter_choices(connection()))

    def neighbours_of(filters, index: int) -> tuple[int | None, int | None]:
        """The pairs before and after row `index` of the table these filters make."""
        first = max(index - 1, 0)
        ids = [row["id"] for row in api.pairs(connection(), filters, size=index + 2 - first, offset=first).rows]
        ids = [None] * (first - index + 1) + ids + [None, None]  # ids[0] is row index - 1
        return ids[0], ids[2]

    def one(request: Request) -> HTMLResponse:
        try:
            turn_id = int(request.path_params["turn_id"])
            found = api.pair(connection(), turn_id)
            query = {k: v for k, v in request.query_params.items() if k != "i"}
            filters = api.PairFilters.from_query(query)
            index = int(request.query_params.get("i", -1))
        except (MagpieError, ValueError) as e:
            return failure(request, e)
        before, after = neighbours_of(filters, index) if index >= 0 else (None, None)
        return page("pair.html", p=found, query=filters.query(page=1), index=index, before=before, after=after)

    # Writes wait for SQLite's lock (generate may hold it for a batch) off the event loop; each is
    # committed before the answer goes back, so a decision the page shows is on disk.
    async def decide(request: Request) -> HTMLResponse:
        try:
            fields = await form(request)
            turn_id = int(request.path_params["turn_id"])

            def write() -> dict:
                api.review(connection(), turn_id, fields.get("state", ""), fields.get("note") or None)
                return api.pair(connection(), turn_id)
            found = await run_in_threadpool(write)
        except MagpieError as e:
            return failure(request, e)
        return page("_review.html", p=found)

    async def edit(request: Request) -> HTMLResponse:
        try:
            fields = await form(request)
            turn_id = int(request.path_params["turn_id"])

            def write() -> dict:
                api.revise(connection(), turn_id, fields.get("instruction", ""), fields.get("response", ""),
                           note=fields.get("note") or None)
                return api.pair(connection(), turn_id)
            found = await run_in_threadpool(write)
        except MagpieError as e:
            return failure(request, e)
        return page("_texts.html", p=found)

    def code_css(request: Request) -> Response:
        return Response(markdown.code_css(), media_type="text/css")

    app = Starlette(routes=[
        Route("/", dashboard), Route("/pairs", table), Route("/pairs/{turn_id:int}", one),
        Route("/pairs/{turn_id:int}/review", decide, methods=["POST"]),
        Route("/pairs/{turn_id:int}/revise", edit, methods=["POST"]),
        Route("/code.css", code_css), Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ], middleware=[Middleware(BaseHTTPMiddleware, dispatch=headers),
                   Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts)),
                   Middleware(BaseHTTPMiddleware, dispatch=guard)])
    app.state.token = token
    return app


@dataclass
class ReviewServer:
    """The review app listening on a bound socket: `url` (with the token) is what a person opens."""

    app: object
    sock: socket.socket
    token: str

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def url(self) -> str:
        return f"{self.address}/?token={self.token}"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C) or, in a thread, until `stop()`."""
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                     lifespan="off"))
        self._server.run(sockets=[self.sock])

    def stop(self) -> None:
        if getattr(self, "_server", None) is not None:
            self._server.should_exit = True


def serve(db: str | Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> ReviewServer:
    """The review app of `db` bound to `host`:`port` (0: a free port), ready to `run()`. Only a
    loopback host answers to its own names alone; any other host answers to every name (the token
    still guards every request)."""
    token = token or secrets.token_urlsafe(24)
    app = create_app(db, token=token, hosts=LOOPBACK_NAMES if loopback(host) else ("*",))
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return ReviewServer(app, sock, token)

