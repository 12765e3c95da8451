"""The dashboard's HTTP side: login and logout, the three pages, their server-sent event
streams, the rollout commands, and the two static files.

Every page and stream needs the session cookie (`session.py`); every POST but the login needs
the session's CSRF token too, as a form field or an `X-CSRF-Token` header, and no POST is taken
from another origin. The commands call the same control-plane services as `/api/v1`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from importlib import resources
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.responses import StreamingResponse

from voicefleet.autoscale.loop import Autoscaler
from voicefleet.control.service import DEFAULT_DEPLOYMENT, ControlPlane
from voicefleet.dashboard.agent_page import ACTIONS, CANARY_COMMANDS, render_agent
from voicefleet.dashboard.html import Html, el, join, render
from voicefleet.dashboard.overview import render_overview
from voicefleet.dashboard.session import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    LIFETIME,
    Session,
    Sessions,
)
from voicefleet.dashboard.sessions import Search, render_sessions, search_form
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import InvalidRequest
from voicefleet.store.records import Recorder

log = logging.getLogger("voicefleet.dashboard")

router = APIRouter(include_in_schema=False)

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
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
NOTHING = Html("")
NAV = (("/", "Overview", "overview"), ("/dashboard/sessions", "Sessions", "sessions"))


# -- services and the session ---------------------------------------------------------------


def _dispatch(request: Request) -> DispatchService:
    service: DispatchService = request.app.state.dispatch
    return service


def _control(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def _recorder(request: Request) -> Recorder:
    recorder: Recorder = request.app.state.recorder
    return recorder


def _autoscaler(request: Request) -> Autoscaler:
    scaler: Autoscaler = request.app.state.autoscaler
    return scaler


def _sessions(request: Request) -> Sessions:
    return Sessions(_dispatch(request).project)


def _session(request: Request) -> Session | None:
    return _sessions(request).read(request.cookies.get(COOKIE))


def _same_origin(request: Request) -> bool:
    """No Origin (an old browser, a form from this page with a strict referrer policy) or
    this server's own."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def _to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboard/login?next={quote(here, safe='')}", 303)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the app caps every body at 1 MiB as it streams)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    fields = parse_qs((await request.body()).decode(errors="replace"), max_num_fields=20)
    return {k: v[0] for k, v in fields.items()}


def _local(path: str) -> str:
    """Where to go after logging in: a path on this server only."""
    return path if path.startswith("/") and not path.startswith(("//", "/\\")) else "/"


# -- pages ------------------------------------------------------------------------------------


@cache
def _asset(name: str) -> bytes:
    return resources.files("voicefleet.dashboard").joinpath("static", name).read_bytes()


@cache
def _asset_version() -> str:
    return hashlib.sha256(b"".join(_asset(n) for n in sorted(STATIC))).hexdigest()[:12]


def _page(
    session: Session,
    *,
    title: str,
    active: str,
    body: Html,
    stream: str,
    before: Html = NOTHING,
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
        user=session.api_key,
        body=body,
        before=before,
        stream=stream,
        version=_asset_version(),
    )
    return HTMLResponse(text, headers=HEADERS)


@router.get("/")
async def overview(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    body = await _overview_body(request)
    return _page(
        session, title="Overview", active="overview", body=body, stream="/dashboard/events"
    )


@router.get("/dashboard")
@router.get("/dashboard/")
def dashboard_root() -> Response:
    return RedirectResponse("/", 303)


@router.get("/dashboard/agents/{name}")
async def agent_page(name: str, request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    body = await _agent_body(request, name, session)
    return _page(
        session,
        title=name,
        active="",
        body=body,
        stream=f"/dashboard/events/agents/{quote(name, safe='')}",
    )


@router.get("/dashboard/sessions")
async def sessions_page(request: Request) -> Response:
    session = _session(request)
    if session is None:
        return _to_login(request)
    search = Search.of(dict(request.query_params))
    query = search.query()
    return _page(
        session,
        title="Sessions",
        active="sessions",
        body=await render_sessions(_recorder(request), search),
        before=search_form(search),
        stream="/dashboard/events/sessions" + (f"?{query}" if query else ""),
    )


async def _overview_body(request: Request) -> Html:
    return await render_overview(
        _control(request), _dispatch(request), _autoscaler(request).decision
    )


async def _agent_body(request: Request, name: str, session: Session) -> Html:
    plane = _control(request)
    agent = await plane.find_agent(name)
    if agent is None:
        return el("p", f"There is no agent '{name}' (any more).", class_="gone")
    return await render_agent(plane, agent, _autoscaler(request).decision, session.csrf)


# -- live: server-sent events ------------------------------------------------------------------


def _event(data: str, kind: str = "") -> str:
    head = f"event: {kind}\n" if kind else ""
    return head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


def _stream(request: Request, body: Callable[[], Awaitable[Html]]) -> Response:
    """The page's live part whenever it changes (looked at every TICK), until the browser
    goes, the session expires or the server stops."""
    sessions, cookie = _sessions(request), request.cookies.get(COOKIE)
    if sessions.read(cookie) is None:
        return JSONResponse({"detail": "log in first"}, 401)
    dispatch = _dispatch(request)

    async def events() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        last, quiet = "", 0.0
        while not dispatch.closing:
            if sessions.read(cookie) is None:
                yield _event("/dashboard/login", "expired")
                return
            fragment = await body()
            if fragment != last:
                last, quiet = fragment, 0.0
                yield _event(fragment)
            elif quiet >= KEEP_ALIVE:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(TICK)
            quiet += TICK

    headers = {**HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.get("/dashboard/events")
async def overview_events(request: Request) -> Response:
    return _stream(request, lambda: _overview_body(request))


@router.get("/dashboard/events/agents/{name}")
async def agent_events(name: str, request: Request) -> Response:
    session = _session(request)
    if session is None:
        return JSONResponse({"detail": "log in first"}, 401)
    return _stream(request, lambda: _agent_body(request, name, session))


@router.get("/dashboard/events/sessions")
async def sessions_events(request: Request) -> Response:
    search = Search.of(dict(request.query_params))
    return _stream(request, lambda: render_sessions(_recorder(request), search))


# -- login, logout ---------------------------------------------------------------------------


def _login_page(
    error: str = "", api_key: str = "", next_: str = "/", status: int = 200
) -> Response:
    text = render(
        "login.html",
        error=el("p", error, class_="error", role="alert") if error else NOTHING,
        api_key=api_key,
        next=_local(next_),
        version=_asset_version(),
    )
    return HTMLResponse(text, status, headers=HEADERS)


@router.get("/dashboard/login")
def login_form(request: Request) -> Response:
    return _login_page(next_=request.query_params.get("next", "/"))


@router.post("/dashboard/login")
async def login(request: Request) -> Response:
    if not _same_origin(request):
        return JSONResponse({"detail": "cross-origin login refused"}, 403)
    form = await _form(request)
    sessions = _sessions(request)
    key, secret = form.get("api_key", "").strip(), form.get("api_secret", "")
    next_ = _local(form.get("next", "/"))
    if not sessions.credentials_ok(key, secret):
        log.warning("dashboard login refused for key %r", key[:40])
        return _login_page(
            "Wrong API key or secret: use the project's own (vf server prints them).",
            key,
            next_,
            401,
        )
    response = RedirectResponse(next_, 303, headers=HEADERS)
    response.set_cookie(
        COOKIE,
        sessions.issue(),
        max_age=int(LIFETIME),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("dashboard login with key %s", key)
    return response


async def _guarded_post(request: Request) -> tuple[Session, dict[str, str]] | Response:
    """The session and form of a POST that passed the CSRF checks, or the refusal."""
    session = _session(request)
    if session is None:
        return JSONResponse({"detail": "log in first"}, 401)
    form = await _form(request)
    token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not _same_origin(request) or not _sessions(request).csrf_ok(session, token):
        return JSONResponse({"detail": "missing or wrong CSRF token: reload the page"}, 403)
    return session, form


@router.post("/dashboard/logout")
async def logout(request: Request) -> Response:
    checked = await _guarded_post(request)
    if isinstance(checked, Response):
        return checked
    response = RedirectResponse("/dashboard/login", 303, headers=HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- commands ----------------------------------------------------------------------------------


@router.post("/dashboard/agents/{name}/actions")
async def agent_action(name: str, request: Request) -> Response:
    """promote, pause, resume or abort the running canary; roll back (to the previous version,
    or the one given). The same services `/api/v1` calls; their errors answer as the API's."""
    checked = await _guarded_post(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    plane = _control(request)
    agent = await plane.agent(name)
    action = form.get("command", "")
    deployment = form.get("deployment") or DEFAULT_DEPLOYMENT
    if action not in ACTIONS:
        raise InvalidRequest(f"unknown command '{action}' (one of {', '.join(ACTIONS)})")
    if action in CANARY_COMMANDS:
        rollout = await plane.rollout_command(agent, deployment, action)
        message = f"{action} sent to canary {rollout.to_version} on {deployment}"
    else:
        rollout = await plane.rollback(agent, deployment, form.get("version") or None)
        message = f"rolling {deployment} back to {rollout.to_version} ({rollout.id})"
    log.info("dashboard: %s on %s/%s by %s", action, name, deployment, session.api_key)
    if request.headers.get(CSRF_HEADER):  # the page's script: it shows the message
        return JSONResponse({"message": message, "rollout": rollout.id}, 202)
    return RedirectResponse(f"/dashboard/agents/{quote(name, safe='')}", 303)


# -- static files ------------------------------------------------------------------------------


@router.get("/dashboard/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response(status_code=404)
    return Response(
        _asset(name),
        media_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
