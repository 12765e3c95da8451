"""What every page, stream and command of the dashboard shares: the services it is handed, who
is logged in, the page shell, server-sent events and the checks a POST passes.

Every page and stream needs the session cookie (`session.py`); every POST but the login needs
the session's CSRF token too, as a form field or an `X-CSRF-Token` header, and no POST is taken
from another origin.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from functools import cache
from importlib import resources
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.responses import StreamingResponse

from voicefleet.autoscale.loop import Autoscaler
from voicefleet.control.access import Keys, Principal, project_principal
from voicefleet.control.service import ControlPlane
from voicefleet.dashboard.changes import Changes
from voicefleet.dashboard.html import Html, el, join, render
from voicefleet.dashboard.session import COOKIE, CSRF_FIELD, CSRF_HEADER, Session, Sessions
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import AuthError
from voicefleet.flags.service import FlagService
from voicefleet.store.models import Actor
from voicefleet.store.records import Recorder

TICK = 1.0  # seconds between two looks at a page's data while its stream is open
KEEP_ALIVE = 15.0  # a comment line at least this often, so proxies keep the stream open
HEADERS = {
    # No inline script or style anywhere: the pages need none, so an injected one cannot run.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    # uPlot, the charts' library (scripts/dashboard-assets vendors it; MIT, its LICENSE beside)
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE": "text/plain",
}
NOTHING = Html("")
NAV = (
    ("/", "Overview", "overview"),
    ("/dashboard/instances", "Instances", "instances"),
    ("/dashboard/sessions", "Sessions", "sessions"),
    ("/dashboard/flags", "Flags", "flags"),
    ("/dashboard/autoscaling", "Autoscaling", "autoscaling"),
)


# -- services and the session ---------------------------------------------------------------


def dispatch(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.dispatch
    return service


def control(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def recorder(request: Request) -> Recorder:
    found: Recorder = request.app.state.recorder
    return found


def autoscaler(request: Request) -> Autoscaler:
    scaler: Autoscaler = request.app.state.autoscaler
    return scaler


def changes(request: Request) -> Changes:
    found: Changes = request.app.state.changes
    return found


def flags(request: Request) -> FlagService:
    service: FlagService = request.app.state.flags
    return service


def sessions(request: Request) -> Sessions:
    return Sessions(dispatch(request).project)


def keys(request: Request) -> Keys:
    found: Keys = request.app.state.keys
    return found


async def principal_of(request: Request, api_key: str) -> Principal | None:
    """Who a key is now, for the dashboard: the project's key is an admin; a voicefleet key
    must still be valid (not revoked, not expired) and not limited to one agent."""
    if api_key == dispatch(request).project.api_key:
        return project_principal(api_key)
    try:
        principal = await keys(request).principal(api_key)
    except AuthError:
        return None
    return None if principal.agent_id else principal


async def current(request: Request, cookie: str | None) -> Session | None:
    """The session a cookie carries, with its key's principal; None when either is gone."""
    found = sessions(request).read(cookie)
    if found is None:
        return None
    principal = await principal_of(request, found.api_key)
    return None if principal is None else replace(found, principal=principal)


async def session(request: Request) -> Session | None:
    return await current(request, request.cookies.get(COOKIE))


def actor(request: Request, session: Session) -> Actor:
    """Who gives a command from the dashboard, from where, for the event log."""
    return Actor(
        key=session.api_key, via="dashboard", ip=request.client.host if request.client else ""
    )


def same_origin(request: Request) -> bool:
    """No Origin (an old browser, a form from this page with a strict referrer policy) or
    this server's own."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboard/login?next={quote(here, safe='')}", 303)


def refused() -> Response:
    return JSONResponse({"detail": "log in first"}, 401)


async def form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the app caps every body at 1 MiB as it streams)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    fields = parse_qs(
        (await request.body()).decode(errors="replace"), keep_blank_values=True, max_num_fields=20
    )
    return {k: v[0] for k, v in fields.items()}


def local(path: str) -> str:
    """Where to go after logging in: a path on this server only."""
    return path if path.startswith("/") and not path.startswith(("//", "/\\")) else "/"


async def guarded_post(request: Request) -> tuple[Session, dict[str, str]] | Response:
    """The session and form of a POST that passed the CSRF checks, or the refusal."""
    found = await session(request)
    if found is None:
        return refused()
    fields = await form(request)
    token = request.headers.get(CSRF_HEADER) or fields.get(CSRF_FIELD)
    if not same_origin(request) or not sessions(request).csrf_ok(found, token):
        return JSONResponse({"detail": "missing or wrong CSRF token: reload the page"}, 403)
    return found, fields


def answer(request: Request, message: str, back: str, **extra: object) -> Response:
    """A command's answer: JSON for the page's script (it shows the message), else back to
    the page."""
    if request.headers.get(CSRF_HEADER):
        return JSONResponse({"message": message, **extra}, 202)
    return RedirectResponse(back, 303)


# -- pages ------------------------------------------------------------------------------------


@cache
def asset(name: str) -> bytes:
    return resources.files("voicefleet.dashboard").joinpath("static", name).read_bytes()


@cache
def asset_version() -> str:
    return hashlib.sha256(b"".join(asset(n) for n in sorted(STATIC))).hexdigest()[:12]


def page(
    session: Session,
    *,
    title: str,
    active: str,
    body: Html,
    stream: str,
    before: Html = NOTHING,
    after: Html = NOTHING,
) -> HTMLResponse:
    nav = join(
        el("a", label, href=href, class_="active" if key == active else None)
        for href, label, key in NAV
    )
    text = render(
        "page.html",
        title=title,
        heading=title,
        nav=nav,
        csrf=session.csrf,
        user=f"{session.api_key} ({session.principal.role})"
        if session.principal
        else session.api_key,
        body=body,
        before=before,
        after=after,
        stream=stream,
        version=asset_version(),
    )
    return HTMLResponse(text, headers=HEADERS)


# -- live: server-sent events ------------------------------------------------------------------


def event(data: str, kind: str = "") -> str:
    head = f"event: {kind}\n" if kind else ""
    return head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


async def stream(request: Request, body: Callable[[], Awaitable[Html]]) -> Response:
    """The page's live part whenever it changes (looked at every TICK), until the browser
    goes, the session expires (or its key is revoked) or the server stops."""
    if await session(request) is None:
        return refused()
    cookie = request.cookies.get(COOKIE)
    service = dispatch(request)

    async def events() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        last, quiet = "", 0.0
        while not service.closing:
            if await current(request, cookie) is None:
                yield event("/dashboard/login", "expired")
                return
            fragment = await body()
            if fragment != last:
                last, quiet = fragment, 0.0
                yield event(fragment)
            elif quiet >= KEEP_ALIVE:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(TICK)
            quiet += TICK

    return event_stream(events())


def event_stream(events: AsyncIterator[str]) -> Response:
    headers = {**HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
