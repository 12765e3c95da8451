"""The dashboard's HTTP side: login and logout, the pages, their server-sent event streams, an
instance's live log, and the two static files. The commands are in `actions.py`; what they all
share (the session, the page shell, streams, CSRF checks) in `web.py`.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from voicefleet.control.logs import log_files, tail
from voicefleet.dashboard import actions, web
from voicefleet.dashboard.agent_page import render_agent
from voicefleet.dashboard.autoscaling import render_autoscaling
from voicefleet.dashboard.flags_page import render_flags
from voicefleet.dashboard.html import Html, el, render
from voicefleet.dashboard.instances import (
    TAIL_BYTES,
    log_panel,
    render_instance,
    render_instances,
)
from voicefleet.dashboard.overview import render_overview
from voicefleet.dashboard.session import COOKIE, LIFETIME, Session
from voicefleet.dashboard.sessions import Search, render_sessions, search_form
from voicefleet.errors import AuthError, NotFound
from voicefleet.protocol import tokens

log = logging.getLogger("voicefleet.dashboard")

router = APIRouter(include_in_schema=False)
router.include_router(actions.router)


# -- pages and their streams -------------------------------------------------------------------


@router.get("/")
async def overview(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    body = await _overview_body(request)
    return web.page(
        session, title="Overview", active="overview", body=body, stream="/dashboard/events"
    )


@router.get("/dashboard/events")
async def overview_events(request: Request) -> Response:
    return await web.stream(request, lambda: _overview_body(request))


async def _overview_body(request: Request) -> Html:
    return await render_overview(
        web.control(request),
        web.dispatch(request),
        web.autoscaler(request).decision,
        web.recorder(request),
        web.changes(request),
    )


@router.get("/dashboard")
@router.get("/dashboard/")
def dashboard_root() -> Response:
    return RedirectResponse("/", 303)


@router.get("/dashboard/agents/{name}")
async def agent_page(name: str, request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    body = await _agent_body(request, name, session)
    return web.page(
        session,
        title=name,
        active="",
        body=body,
        stream=f"/dashboard/events/agents/{quote(name, safe='')}",
    )


@router.get("/dashboard/events/agents/{name}")
async def agent_events(name: str, request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.refused()
    return await web.stream(request, lambda: _agent_body(request, name, session))


async def _agent_body(request: Request, name: str, session: Session) -> Html:
    plane = web.control(request)
    agent = await plane.find_agent(name)
    if agent is None:
        return el("p", f"There is no agent '{name}' (any more).", class_="gone")
    return await render_agent(plane, agent, web.autoscaler(request).decision, session.form_token)


@router.get("/dashboard/sessions")
async def sessions_page(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    search = Search.of(dict(request.query_params))
    query = search.query()
    return web.page(
        session,
        title="Sessions",
        active="sessions",
        body=await render_sessions(web.recorder(request), search, web.control(request).paths),
        before=search_form(search),
        stream="/dashboard/events/sessions" + (f"?{query}" if query else ""),
    )


@router.get("/dashboard/events/sessions")
async def sessions_events(request: Request) -> Response:
    search = Search.of(dict(request.query_params))
    return await web.stream(
        request, lambda: render_sessions(web.recorder(request), search, web.control(request).paths)
    )


@router.get("/dashboard/instances")
async def instances_page(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    return web.page(
        session,
        title="Instances",
        active="instances",
        body=await _instances_body(request),
        stream="/dashboard/events/instances",
    )


@router.get("/dashboard/events/instances")
async def instances_events(request: Request) -> Response:
    return await web.stream(request, lambda: _instances_body(request))


async def _instances_body(request: Request) -> Html:
    return await render_instances(
        web.control(request), web.dispatch(request), web.autoscaler(request).decision
    )


@router.get("/dashboard/instances/{name}/{instance}")
async def instance_page(name: str, instance: str, request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    where = f"{quote(name, safe='')}/{quote(instance, safe='')}"
    return web.page(
        session,
        title=f"{name} · {instance}",
        active="instances",
        body=await _instance_body(request, name, instance),
        after=log_panel(quote(name, safe=""), quote(instance, safe="")),
        stream=f"/dashboard/events/instances/{where}",
    )


@router.get("/dashboard/events/instances/{name}/{instance}")
async def instance_events(name: str, instance: str, request: Request) -> Response:
    return await web.stream(request, lambda: _instance_body(request, name, instance))


async def _instance_body(request: Request, name: str, instance: str) -> Html:
    plane = web.control(request)
    agent = await plane.find_agent(name)
    if agent is None:
        return el("p", f"There is no agent '{name}' (any more).", class_="gone")
    return await render_instance(
        plane, web.dispatch(request), agent, instance, web.autoscaler(request).decision
    )


@router.get("/dashboard/events/instances/{name}/{instance}/log")
async def instance_log_events(name: str, instance: str, request: Request) -> Response:
    """The instance's log file as it grows: its last TAIL_BYTES, then each chunk appended
    (`log` events; `reset` first, so a reconnected page starts its text over)."""
    cookie = request.cookies.get(COOKIE)
    if await web.current(request, cookie) is None:
        return web.refused()
    plane, service = web.control(request), web.dispatch(request)
    agent = await plane.find_agent(name)
    try:
        if agent is None:
            raise NotFound(f"no agent '{name}'")
        (path,) = log_files(plane.paths, agent.id, instance)
    except NotFound as e:
        return JSONResponse({"detail": str(e)}, 404)
    start = max(0, path.stat().st_size - TAIL_BYTES)

    async def finished() -> bool:
        return service.closing or await web.current(request, cookie) is None

    async def events() -> AsyncIterator[str]:
        yield "retry: 3000\n\n"
        yield web.event("", "reset")
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        partial_first_line = start > 0
        async for chunk in tail(path, True, finished, start):
            text = decoder.decode(chunk).replace("\r\n", "\n").replace("\r", "\n")
            if partial_first_line:  # it began mid-line: that line is cut, leave it out
                text, partial_first_line = text.partition("\n")[2], False
            if text:
                yield web.event(text, "log")

    return web.event_stream(events())


@router.get("/dashboard/flags")
async def flags_page(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    return web.page(
        session,
        title="Flags",
        active="flags",
        body=await _flags_body(request, session),
        stream="/dashboard/events/flags",
    )


@router.get("/dashboard/events/flags")
async def flags_events(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.refused()
    return await web.stream(request, lambda: _flags_body(request, session))


async def _flags_body(request: Request, session: Session) -> Html:
    return await render_flags(web.control(request), web.flags(request), session.form_token)


@router.get("/dashboard/autoscaling")
async def autoscaling_page(request: Request) -> Response:
    session = await web.session(request)
    if session is None:
        return web.to_login(request)
    return web.page(
        session,
        title="Autoscaling",
        active="autoscaling",
        body=await _autoscaling_body(request),
        stream="/dashboard/events/autoscaling",
    )


@router.get("/dashboard/events/autoscaling")
async def autoscaling_events(request: Request) -> Response:
    return await web.stream(request, lambda: _autoscaling_body(request))


async def _autoscaling_body(request: Request) -> Html:
    return await render_autoscaling(web.control(request), web.autoscaler(request))


# -- login, logout ---------------------------------------------------------------------------


def _login_page(
    error: str = "", api_key: str = "", next_: str = "/", status: int = 200
) -> Response:
    text = render(
        "login.html",
        error=el("p", error, class_="error", role="alert") if error else web.NOTHING,
        api_key=api_key,
        next=web.local(next_),
        version=web.asset_version(),
    )
    return HTMLResponse(text, status, headers=web.HEADERS)


@router.get("/dashboard/login")
def login_form(request: Request) -> Response:
    return _login_page(next_=request.query_params.get("next", "/"))


@router.post("/dashboard/login")
async def login(request: Request) -> Response:
    """The project's key and secret, or a voicefleet API key: its token in the key field
    (`vfk_<id>.<secret>`), or its id there and its secret in the secret field."""
    if not web.same_origin(request):
        return JSONResponse({"detail": "cross-origin login refused"}, 403)
    form = await web.form(request)
    sessions = web.sessions(request)
    key, secret = form.get("api_key", "").strip(), form.get("api_secret", "").strip()
    next_ = web.local(form.get("next", "/"))
    shown = key.partition(".")[0]  # never the secret part of a token typed in the key field
    if tokens.is_key_token(key) or key.startswith(tokens.KEY_PREFIX):
        token = key if tokens.is_key_token(key) else f"{key}.{secret}"
        try:
            principal = await web.keys(request).authenticate(token)
        except AuthError as e:
            log.warning("dashboard login refused for key %r: %s", shown[:40], e)
            return _login_page(f"{e}.", shown, next_, 401)
        if principal.agent_id:
            return _login_page(
                f"Key {principal.key} is limited to agent {principal.agent_name}; the dashboard "
                "shows every agent: log in with a key that is not limited to one.",
                shown,
                next_,
                403,
            )
        who = principal.key
    elif sessions.project_credentials(key, secret):
        who = key
    else:
        log.warning("dashboard login refused for key %r", shown[:40])
        return _login_page(
            "Wrong API key or secret: use a voicefleet API key (vf server keys create), or "
            "the project's own key and secret (vf server prints them).",
            shown,
            next_,
            401,
        )
    response = RedirectResponse(next_, 303, headers=web.HEADERS)
    response.set_cookie(
        COOKIE,
        sessions.issue(who),
        max_age=int(LIFETIME),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("dashboard login with key %s", who)
    return response


@router.post("/dashboard/logout")
async def logout(request: Request) -> Response:
    checked = await web.guarded_post(request)
    if isinstance(checked, Response):
        return checked
    response = RedirectResponse("/dashboard/login", 303, headers=web.HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- static files ------------------------------------------------------------------------------


@router.get("/dashboard/static/{name}")
def static(name: str) -> Response:
    if name not in web.STATIC:
        return Response(status_code=404)
    return Response(
        web.asset(name),
        media_type=web.STATIC[name],
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
