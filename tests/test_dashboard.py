"""The web dashboard in a real browser: Debian's Chromium (/usr/bin/chromium) driven by
Playwright, against a real `vf server` whose agent is deployed by the `vf` CLI and runs as real
livekit-agents workers (tests/agents/deployable).

Every page is saved as a screenshot in one folder; its path is printed at the start.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, Server, admin_token, started
from tests.test_deploy import AGENT_SRC, vf, vf_env

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run does)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is a test dependency: scripts/setup installs it"
)
expect = sync_api.expect
# What the page shows after a command waits for the server's answer: seconds on a loaded machine.
expect.set_options(timeout=15_000)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
LIVE = 60_000  # ms the page may take to show a change by itself (builds, instance starts)


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The dashboard tests' own server: their agent and its rollouts are theirs alone."""
    srv = Server(tmp_path_factory.mktemp("dash-server"), "--keep-warm", "1").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"dashboard screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Pages, each in a context of its own (its own cookies), closed after the test."""
    contexts: list[Any] = []

    def make(viewport: dict[str, int] = DESKTOP, **options: Any) -> Any:
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    yield make
    for context in contexts:
        context.close()


def log_in(page: Any, server: Server, secret: str = DEV_SECRET, then: str = "/") -> Any:
    """Log in through the login page the dashboard sends a stranger to; the page's response."""
    page.goto(server.url + then)
    expect(page).to_have_url(f"{server.url}/dashboard/login?next={quote(then, safe='')}")
    page.get_by_label("API key").fill(DEV_KEY)
    page.get_by_label("API secret").fill(secret)
    with page.expect_response(lambda r: r.url.endswith("/dashboard/login")) as answer:
        page.get_by_role("button", name="Log in").click()
    return answer.value


def painted(canvas: Any) -> bool:
    """Whether anything was drawn on the canvas (a pixel not left transparent)."""
    return bool(
        canvas.evaluate(
            "c => c.width > 0 && c.height > 0 && c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)"
        )
    )


def no_reload_since(page: Any) -> Callable[[], bool]:
    """Mark the document; the returned check says whether it is still the same one."""
    page.evaluate("window.__sameDocument = true")
    return lambda: bool(page.evaluate("window.__sameDocument === true"))


def test_a_wrong_secret_is_refused_with_a_clear_message_and_nothing_shows(
    dash: Server, new_page: Callable[..., Any], shots: Path
) -> None:
    page = new_page()
    answer = log_in(page, dash, secret="not-the-secret")
    assert answer.status == 401
    expect(page.get_by_role("alert")).to_contain_text("Wrong API key or secret")
    # The key typed stays; the secret does not.
    expect(page.get_by_label("API key")).to_have_value(DEV_KEY)
    expect(page.get_by_label("API secret")).to_have_value("")
    page.screenshot(path=shots / "login-refused.png", full_page=True)
    assert page.context.cookies() == []
    # Nothing shows without the session: pages send to the login, streams and commands refuse.
    for path in ("/", "/dashboard/sessions", "/dashboard/agents/x"):
        page.goto(dash.url + path)
        assert page.url.startswith(dash.url + "/dashboard/login?next="), path
    anonymous = httpx.Client(base_url=dash.url, timeout=10)
    assert anonymous.get("/dashboard/events").status_code == 401
    assert (
        anonymous.post("/dashboard/agents/x/actions", data={"command": "abort"}).status_code == 401
    )
    # A forged cookie is no session either.
    anonymous.cookies.set("vf_session", "eyJrIjoiZGV2a2V5In0.forged")
    assert anonymous.get("/").status_code == 303


def test_login_sets_a_strict_httponly_expiring_cookie_and_the_dashboard_is_not_the_api(
    dash: Server, new_page: Callable[..., Any], shots: Path
) -> None:
    page = new_page()
    answer = log_in(page, dash)
    assert answer.status == 303
    expect(page).to_have_url(dash.url + "/")
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("#conn")).to_have_text("live")
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "vf_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert time.time() + 3600 < cookie["expires"] < time.time() + 13 * 3600
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
    # The dashboard is no part of the API: not in its OpenAPI document, and its cookie opens
    # no /api/v1 route.
    spec = httpx.get(dash.url + "/openapi.json", timeout=10).json()
    assert not [p for p in spec["paths"] if p == "/" or p.startswith("/dashboard")]
    with_cookie = httpx.Client(cookies={cookie["name"]: cookie["value"]}, timeout=10)
    assert with_cookie.get(dash.url + "/api/v1/agents").status_code == 401
    page.screenshot(path=shots / "overview-empty.png", full_page=True)


def test_a_post_without_the_csrf_token_is_refused(
    dash: Server, new_page: Callable[..., Any]
) -> None:
    page = new_page()
    log_in(page, dash)
    name = "csrf-check"
    headers = {"Authorization": f"Bearer {admin_token()}"}
    httpx.post(f"{dash.url}/api/v1/agents", json={"name": name}, headers=headers).raise_for_status()
    events_before = httpx.get(f"{dash.url}/api/v1/agents/{name}/events", headers=headers).json()
    post = """async ([url, token]) => {
        const headers = {"Content-Type": "application/x-www-form-urlencoded"};
        if (token !== null) headers["X-CSRF-Token"] = token;
        const r = await fetch(url, {method: "POST", headers, credentials: "same-origin",
                                    body: "command=rollback&deployment=production"});
        return [r.status, await r.text()];
    }"""
    url = f"/dashboard/agents/{name}/actions"
    # From the dashboard's own page, with its session cookie: no token, a wrong one.
    status, body = page.evaluate(post, [url, None])
    assert status == 403 and "CSRF" in body
    status, body = page.evaluate(post, [url, "not-the-token"])
    assert status == 403 and "CSRF" in body
    # The page's own token passes the check (and the control plane answers: nothing to roll
    # back to), so it is the token that was missing above.
    token = page.locator('meta[name="csrf"]').get_attribute("content")
    status, body = page.evaluate(post, [url, token])
    assert status == 400 and "no earlier version" in body, body
    # From another site (localhost is not 127.0.0.1) with the stolen token: SameSite=Strict
    # keeps the cookie home, so the server sees no session at all.
    other = dash.url.replace("127.0.0.1", "localhost")
    page.goto(other + "/healthz")
    page.evaluate(
        """([action, token]) => {
            const form = document.createElement("form");
            form.method = "POST"; form.action = action;
            for (const [k, v] of [["command", "rollback"], ["csrf", token]]) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = k; input.value = v; form.appendChild(input);
            }
            document.body.appendChild(form); form.submit();
        }""",
        [dash.url + url, token],
    )
    page.wait_for_url(dash.url + url)
    assert "log in first" in page.content()
    events_after = httpx.get(f"{dash.url}/api/v1/agents/{name}/events", headers=headers).json()
    assert events_after == events_before  # no command reached the control plane


def test_the_overview_is_usable_on_a_phone(
    dash: Server, new_page: Callable[..., Any], shots: Path
) -> None:
    headers = {"Authorization": f"Bearer {admin_token()}"}
    httpx.post(f"{dash.url}/api/v1/agents", json={"name": "phone-agent"}, headers=headers)
    page = new_page(PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    log_in(page, dash)
    expect(page.locator("#agents")).to_contain_text("phone-agent")
    # Nothing wider than the screen: no sideways scrolling; table rows become labelled cards.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate("getComputedStyle(document.querySelector('#agents thead')).display") == (
        "none"
    )
    cell = page.locator("#agents td[data-label='deployment']").first
    assert page.evaluate("e => getComputedStyle(e, '::before').content", cell.element_handle()) == (
        '"deployment"'
    )
    page.screenshot(path=shots / "overview-phone.png", full_page=True)
    page.get_by_role("link", name="Sessions").tap()
    expect(page.locator("h1")).to_have_text("Sessions")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=shots / "sessions-phone.png", full_page=True)


async def _one_session(url: str, room: str, agent_name: str = "my-agent") -> str:
    lk = api.LiveKitAPI(url, DEV_KEY, DEV_SECRET)
    try:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(
                agent_name=agent_name, room=room, metadata=json.dumps({"hold": 0})
            )
        )
    finally:
        await lk.aclose()
    return str(d.state.jobs[0].id)


def _deploy(server: Server, folder: Path, *args: str) -> subprocess.Popen[str]:
    """`vf agent deploy` in the background: the test watches the browser meanwhile."""
    return subprocess.Popen(
        [sys.executable, "-m", "voicefleet", "agent", "deploy", *args],
        cwd=folder,
        env=vf_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.timeout(600)
def test_a_deploy_from_the_cli_and_a_canary_show_up_live_and_the_canary_is_aborted_from_the_page(
    dash: Server, new_page: Callable[..., Any], shots: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "VERSION").write_text("one")
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(dash, folder, "create")
    vf(dash, folder, "secrets", "set", f"MARKER_DIR={markers}")

    page = new_page()
    log_in(page, dash, then="/dashboard/agents/my-agent")
    expect(page.locator("#versions")).to_contain_text("none yet")
    same_document = no_reload_since(page)
    deploy = _deploy(dash, folder)
    try:
        # The version appears while it builds, then is ready; its rollout completes.
        expect(page.locator("#versions")).to_contain_text("v1", timeout=LIVE)
        expect(page.locator("#versions .badge.ready")).to_be_visible(timeout=4 * LIVE)
        expect(page.locator("#rollouts")).to_contain_text("complete", timeout=2 * LIVE)
        expect(page.locator("#deployment-production")).to_contain_text("serving v1")
        expect(page.locator("#deployment-production")).to_contain_text("v1 100%")
        expect(page.locator("#instances")).to_contain_text("ready")
        assert deploy.wait(120) == 0, deploy.stdout.read() if deploy.stdout else ""
    finally:
        if deploy.poll() is None:
            deploy.kill()
    assert same_document(), "the page was reloaded"
    page.screenshot(path=shots / "agent-v1.png", full_page=True)

    # Sessions: one dispatched now appears in the search's results by itself.
    sessions = new_page()
    log_in(sessions, dash, then="/dashboard/sessions?agent=my-agent")
    expect(sessions.locator("#live")).to_contain_text("0 session(s)")
    same_sessions = no_reload_since(sessions)
    # Playwright's sync API keeps an event loop on this thread: the client runs on another.
    with ThreadPoolExecutor(1) as thread:
        job = thread.submit(asyncio.run, _one_session(dash.url, "dash-room-1")).result(60)
    expect(sessions.locator("#jobs")).to_contain_text(job, timeout=LIVE)
    expect(sessions.locator("#jobs")).to_contain_text("dash-room-1")
    # Ended as its worker reported it (see tests.support.ran_to_its_end for why either).
    state = sessions.locator("#jobs tr", has_text=job).locator(".badge")
    expect(state).to_have_text(re.compile(r"^(succeeded|failed)$"), timeout=LIVE)
    assert same_sessions()
    sessions.screenshot(path=shots / "sessions.png", full_page=True)
    # ...and a search that matches nothing shows nothing.
    sessions.get_by_label("room").fill("no-such-room")
    sessions.get_by_role("button", name="Search").click()
    expect(sessions.locator("#live")).to_contain_text("0 session(s)")

    overview = new_page()
    log_in(overview, dash)
    row = overview.locator("#agents tr", has_text="my-agent")
    expect(row).to_contain_text("v1")
    expect(row).to_contain_text("1 ready")
    expect(row).to_contain_text("complete")
    overview.screenshot(path=shots / "overview.png", full_page=True)

    # A canary: the page shows it beside stable with its commands, without a reload.
    (folder / "VERSION").write_text("two")
    canary = _deploy(dash, folder, "--canary", "10")
    try:
        card = page.locator("#deployment-production")
        expect(page.locator("#canary-production")).to_contain_text(
            "Canary v2 vs stable v1", timeout=4 * LIVE
        )
        expect(card).to_contain_text("v1 90% · v2 10%", timeout=LIVE)
        expect(card.get_by_role("button", name="abort")).to_be_visible()
        expect(card.get_by_role("button", name="resume")).to_have_count(0)  # it is not paused
        # Canary against stable over the step, with the limits drawn: two charts on canvases.
        charts = page.locator("#canary-charts-production")
        expect(charts.locator(".plot canvas")).to_have_count(2, timeout=LIVE)
        assert painted(charts.locator(".plot canvas").first), "the canary chart is blank"
        expect(charts.locator(".plot").first).to_have_attribute(
            "data-chart", re.compile(r'"label":"canary v2".*"label":"stable v1".*"label":"limit')
        )
        page.screenshot(path=shots / "agent-canary.png", full_page=True)
        # Declining the confirmation sends nothing.
        page.once("dialog", lambda dialog: dialog.dismiss())
        card.get_by_role("button", name="pause").click()
        expect(page.locator("#flash")).to_be_hidden()
        questions: list[str] = []

        def accept(dialog: Any) -> None:
            questions.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        card.get_by_role("button", name="abort").click()
        expect(page.locator("#flash")).to_have_text("abort sent to canary v2 on production")
        assert questions and "Abort canary v2 on production" in questions[0]
        expect(page.locator("#rollouts tbody tr").first).to_contain_text("aborted", timeout=LIVE)
        expect(page.locator("#problems, .problems")).to_contain_text("aborted")
        expect(card).to_contain_text("v1 100%")
        assert same_document(), "the page was reloaded"
        page.screenshot(path=shots / "agent-canary-aborted.png", full_page=True)
    finally:
        if canary.poll() is None:
            canary.kill()
            canary.wait()
    # The overview puts the agent's problem first.
    expect(overview.locator("#problems")).to_contain_text("my-agent", timeout=LIVE)
    expect(overview.locator("#problems")).to_contain_text("aborted")
    overview.screenshot(path=shots / "overview-problem.png", full_page=True)


# -- instances, flags, autoscaling, who did it ---------------------------------------------------

FLAGGED = "flag-agent"  # tests/agents/deployable, which reads its "greeting" flag per session


def session_of(server: Server, room: str, agent_name: str = FLAGGED) -> str:
    """One session dispatched now (Playwright's sync API keeps an event loop on this thread:
    the client runs on another)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, _one_session(server.url, room, agent_name)).result(60)


def greeting_of(markers: Path, job: str) -> object:
    """The greeting flag the agent read in that session, once the session has started (the
    agent writes its marker file: there is nothing else to wait on)."""
    deadline = time.monotonic() + 60
    while (found := started(markers, job)) is None:
        assert time.monotonic() < deadline, f"session {job} did not start within 60 s"
        time.sleep(0.1)
    return found["greeting"]


def api_events(server: Server, agent: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {admin_token()}"}
    r = httpx.get(f"{server.url}/api/v1/agents/{agent}/events", headers=headers, timeout=10)
    r.raise_for_status()
    events: list[dict[str, Any]] = r.json()
    return events


def confirm_and_submit(page: Any, button: Any) -> str:
    """Click a command's button, accept its confirmation; the question it asked."""
    asked: list[str] = []

    def accept(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    button.click()
    expect(page.locator("#flash")).to_be_visible()
    assert asked, "no confirmation was asked"
    return asked[0]


@pytest.fixture(scope="module")
def flagged(dash: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flag-agent deployed (one instance) on the dashboard's server: its markers folder."""
    root = tmp_path_factory.mktemp("flagged")
    folder = root / FLAGGED
    shutil.copytree(AGENT_SRC, folder)
    markers = root / "markers"
    markers.mkdir()
    vf(dash, folder, "create")
    vf(dash, folder, "secrets", "set", f"MARKER_DIR={markers}")
    vf(dash, folder, "deploy")
    return markers


@pytest.mark.timeout(600)
def test_a_flag_flipped_in_the_page_reaches_the_running_agents_next_session_and_says_who(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    page = new_page()
    log_in(page, dash, then="/dashboard/flags")
    section = page.locator(f"#flags-{FLAGGED}")
    expect(section).to_contain_text("none yet")
    same_document = no_reload_since(page)

    # A new flag, from the page's own form (it asks first).
    new = section.locator("form.flag-new")
    new.get_by_label("key").fill("greeting")
    new.get_by_label("type").select_option("string")
    new.get_by_label("value").fill("hello")
    question = confirm_and_submit(page, new.get_by_role("button", name="Add flag"))
    assert f"Add this flag to {FLAGGED}" in question
    expect(page.locator("#flash")).to_have_text(f"flag greeting added to {FLAGGED}")
    expect(section.locator("tbody").first).to_contain_text("greeting", timeout=LIVE)
    assert greeting_of(flagged, session_of(dash, "flag-room-1")) == "hello"

    # Flipped in the page: the running agent's next session sees it (no deploy, no restart).
    section.locator("summary", has_text="edit").click()
    editor = section.locator("form.flag-edit")
    editor.get_by_label("default value").fill("bonjour")
    question = confirm_and_submit(page, editor.get_by_role("button", name="Save"))
    assert "next session" in question
    expect(page.locator("#flash")).to_have_text(f"flag greeting of {FLAGGED} set")
    expect(section.locator("tbody").first).to_contain_text('"bonjour"', timeout=LIVE)
    assert greeting_of(flagged, session_of(dash, "flag-room-2")) == "bonjour"

    # The kill switch: every session gets the flag's off value.
    question = confirm_and_submit(page, section.get_by_role("button", name="kill"))
    assert "Kill flag greeting" in question
    expect(section.locator(".badge.killed")).to_be_visible(timeout=LIVE)
    assert greeting_of(flagged, session_of(dash, "flag-room-3")) == ""

    # Who did it: the page's history, and the event log through the API.
    history = section.locator("table").nth(1)
    expect(history).to_contain_text("killed")
    expect(history.locator("tr", has_text="created")).to_contain_text(f"{DEV_KEY} via dashboard")
    flag_events = [e for e in api_events(dash, FLAGGED) if e["kind"].startswith("flag_")]
    assert [(e["kind"], e["actor"], e["via"]) for e in flag_events] == [
        ("flag_killed", DEV_KEY, "dashboard"),
        ("flag_changed", DEV_KEY, "dashboard"),
        ("flag_created", DEV_KEY, "dashboard"),
    ]
    assert same_document(), "the page was reloaded"
    page.screenshot(path=shots / "flags.png", full_page=True)


@pytest.mark.timeout(600)
def test_an_actions_event_shows_who_did_it_from_the_dashboard_and_from_the_api(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    page = new_page()
    log_in(page, dash, then=f"/dashboard/agents/{FLAGGED}")
    card = page.locator("#deployment-production")
    expect(card).to_contain_text("serving v1", timeout=LIVE)
    # Scale from the page: the question names the number typed.
    card.get_by_label("instances of production").fill("1")
    question = confirm_and_submit(page, card.get_by_role("button", name="scale"))
    assert question.startswith("Run 1 instance(s) of production"), question
    expect(page.locator("#flash")).to_have_text("production scaled to 1 instance(s)")
    events = page.locator("#events")
    scaled = events.locator("tbody tr", has_text="scaled").first
    expect(scaled).to_contain_text(f"{DEV_KEY} via dashboard", timeout=LIVE)
    # The same through the API (as `vf agent scale` does): the event says so.
    headers = {"Authorization": f"Bearer {admin_token()}"}
    httpx.post(
        f"{dash.url}/api/v1/agents/{FLAGGED}/scale",
        json={"deployment": "production", "replicas": 1},
        headers=headers,
        timeout=30,
    ).raise_for_status()
    expect(events.locator("tbody tr").first).to_contain_text(f"{DEV_KEY} via api", timeout=LIVE)
    # The deploy the CLI made says who too; what the platform did on its own says nobody.
    deployed = events.locator("tr", has_text="deploy_started")
    expect(deployed).to_contain_text(f"{DEV_KEY} via api")
    by = {(e["kind"], e["via"]) for e in api_events(dash, FLAGGED)}
    assert {("scaled", "dashboard"), ("scaled", "api"), ("deploy_started", "api"),
            ("version_uploaded", "api"), ("version_built", "")} <= by  # fmt: skip
    page.screenshot(path=shots / "agent-events.png", full_page=True)


@pytest.mark.timeout(600)
def test_a_button_pressed_while_a_change_waits_still_runs_its_command(
    dash: Server, flagged: Path, new_page: Callable[..., Any]
) -> None:
    """A change that arrives while someone types waits; the press of the form's button (focus
    leaves the field) must not swap the page between the button going down and coming up."""
    page = new_page()
    log_in(page, dash, then=f"/dashboard/agents/{FLAGGED}")
    card = page.locator("#deployment-production")
    expect(card).to_contain_text("serving v1", timeout=LIVE)
    field = card.get_by_label("instances of production")
    field.fill("1")
    # A change made elsewhere (an event row for the page) waits while the field has focus.
    httpx.post(
        f"{dash.url}/api/v1/agents/{FLAGGED}/scale",
        json={"deployment": "production", "replicas": 1},
        headers={"Authorization": f"Bearer {admin_token()}"},
        timeout=30,
    ).raise_for_status()
    expect(page.locator("body")).to_have_attribute("data-pending", "1", timeout=LIVE)
    # Pressed as a person does: down, a moment, up.
    box = card.get_by_role("button", name="scale").bounding_box()
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.wait_for_timeout(200)
    page.mouse.up()
    expect(page.locator("#flash")).to_have_text("production scaled to 1 instance(s)")
    assert asked and asked[0].startswith("Run 1 instance(s) of production"), asked
    # And the change that waited is shown after the press.
    expect(page.locator("body")).not_to_have_attribute("data-pending", "1")


@pytest.mark.timeout(600)
def test_the_instances_page_shows_each_instance_and_its_log_as_lines_are_written(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    page = new_page()
    log_in(page, dash, then="/dashboard/instances")
    row = page.locator("#instances tbody tr", has_text=FLAGGED).filter(has_text="ready").first
    expect(row).to_contain_text("healthy", timeout=LIVE)
    expect(row).to_contain_text("worker connected")
    expect(row.locator("td[data-label='load']")).to_have_text(re.compile(r"^\d+\.\d\d$"))
    page.screenshot(path=shots / "instances.png", full_page=True)

    row.locator("td[data-label='instance'] a").click()
    expect(page.locator("h1")).to_contain_text(FLAGGED)
    log = page.locator("#log")
    expect(log).not_to_be_empty(timeout=LIVE)  # the end of what it logged so far
    same_document = no_reload_since(page)
    # A session: the worker writes about it, and the line shows up in the open page.
    job = session_of(dash, "log-room-1")
    expect(log).to_contain_text(job, timeout=LIVE)
    assert same_document(), "the page was reloaded"
    page.screenshot(path=shots / "instance-log.png", full_page=True)


@pytest.mark.timeout(600)
def test_a_sessions_timeline_shows_its_steps_from_dispatch_to_end(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    job = session_of(dash, "timeline-room-1")
    page = new_page()
    log_in(page, dash, then=f"/dashboard/sessions?agent={FLAGGED}")
    page.locator("#jobs").get_by_role("link", name=job).click()
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text(job)
    for step in ("dispatched", "assigned", "running", "ended"):
        expect(timeline.locator(f".step.{step}")).to_be_visible(timeout=LIVE)
    expect(timeline.locator(".step.ended .badge")).to_have_text(re.compile("succeeded|failed"))
    # Its log lines: those of its instance's log that name it (its worker logs a line on it).
    lines = page.locator("#session-log pre.log")
    expect(lines).to_contain_text(job, timeout=LIVE)
    text = lines.inner_text()
    assert all(job in line for line in text.splitlines() if line), text
    expect(page.locator("#session-log")).to_contain_text("line(s) of instance")
    page.screenshot(path=shots / "session-timeline.png", full_page=True)


@pytest.mark.timeout(600)
def test_the_autoscaling_page_charts_instances_against_load_and_lists_decisions(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    headers = {"Authorization": f"Bearer {admin_token()}"}
    page = new_page()
    log_in(page, dash, then="/dashboard/autoscaling")
    httpx.post(
        f"{dash.url}/api/v1/agents/{FLAGGED}/scale",
        json={"deployment": "production", "autoscale": {"min_instances": 1, "max_instances": 2}},
        headers=headers,
        timeout=30,
    ).raise_for_status()
    section = page.locator(f"#autoscale-{FLAGGED}-production")
    expect(section).to_contain_text("min_instances 1 · max_instances 2", timeout=LIVE)
    # The charts fill in as the autoscaler ticks (each second): uPlot draws each on a canvas,
    # from the data the page carries, a series each.
    plots = section.locator(".plot")
    expect(plots).to_have_count(2, timeout=LIVE)
    expect(plots.first).to_have_attribute("data-chart", re.compile('"label":"instances"'))
    expect(plots.nth(1)).to_have_attribute("data-chart", re.compile('"label":"load"'))
    expect(section.locator(".plot canvas")).to_have_count(2, timeout=LIVE)
    assert painted(section.locator(".plot canvas").first), "the chart's canvas is blank"
    expect(section.locator(".plot .u-legend").first).to_contain_text("instances")
    # Each decision with its reason ("steady: load 0.00 / target 0.5 per instance; kept at min 1").
    reason = section.locator("td[data-label='reason']").first
    expect(reason).to_have_text(re.compile(r"\w{4,}"), timeout=LIVE)
    # ...and grow with each tick: three samples at least (and the window's two ends).
    drawn = re.compile(r"^([5-9]|\d{2,})$")
    expect(plots.first).to_have_attribute("data-drawn", drawn, timeout=LIVE)
    page.screenshot(path=shots / "autoscaling.png", full_page=True)
    # Back to a fixed size: the other tests' numbers stay their own.
    httpx.post(
        f"{dash.url}/api/v1/agents/{FLAGGED}/scale",
        json={"deployment": "production", "replicas": 1},
        headers=headers,
        timeout=30,
    ).raise_for_status()


def make_key(server: Server, role: str) -> str:
    """A voicefleet API key made with `vf server keys create` on the server's data dir."""
    made = subprocess.run(
        [sys.executable, "-m", "voicefleet", "server", "keys", "create", "--role", role,
         "--name", f"browser-{role}", "--data-dir", str(server.data_dir), "--json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    token: str = json.loads(made.stdout)["token"]
    return token


def log_in_with_key(page: Any, server: Server, token: str, then: str) -> None:
    page.goto(server.url + then)
    page.get_by_label("API key").fill(token)  # the whole token; no secret
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(server.url + then)


@pytest.mark.timeout(600)
def test_a_viewer_key_sees_the_pages_without_commands_and_a_deployer_key_gets_them(
    dash: Server, flagged: Path, new_page: Callable[..., Any], shots: Path
) -> None:
    agent_page = f"/dashboard/agents/{FLAGGED}"
    httpx.put(
        f"{dash.url}/api/v1/agents/{FLAGGED}/flags/seen",
        json={"type": "boolean", "value": True},
        headers={"Authorization": f"Bearer {admin_token()}"},
        timeout=30,
    ).raise_for_status()
    viewer = new_page()
    log_in_with_key(viewer, dash, make_key(dash, "viewer"), agent_page)
    card = viewer.locator("#deployment-production")
    expect(card).to_contain_text("serving v1", timeout=LIVE)
    expect(viewer.locator("#events")).to_contain_text("deploy_started")
    expect(viewer.get_by_role("button", name="scale")).to_have_count(0)
    expect(viewer.get_by_role("button", name="rollback")).to_have_count(0)
    viewer.screenshot(path=shots / "agent-viewer.png", full_page=True)
    viewer.goto(dash.url + "/dashboard/flags")
    expect(viewer.locator(f"#flags-{FLAGGED}")).to_contain_text("seen")
    expect(viewer.get_by_role("button", name="Add flag")).to_have_count(0)
    expect(viewer.get_by_role("button", name="kill")).to_have_count(0)
    # A command sent anyway, with the page's own CSRF token, is refused for its role.
    token = viewer.locator('meta[name="csrf"]').get_attribute("content")
    status, body = viewer.evaluate(
        """async ([url, token]) => {
            const r = await fetch(url, {method: "POST", credentials: "same-origin",
                headers: {"Content-Type": "application/x-www-form-urlencoded",
                          "X-CSRF-Token": token},
                body: "command=scale&replicas=3&deployment=production"});
            return [r.status, await r.text()];
        }""",
        [f"{agent_page}/actions", token],
    )
    assert status == 403 and "needs the deployer role" in body, body
    # A deployer's page offers the commands.
    deployer = new_page()
    log_in_with_key(deployer, dash, make_key(dash, "deployer"), agent_page)
    card = deployer.locator("#deployment-production")
    expect(card).to_contain_text("serving v1", timeout=LIVE)
    expect(card.get_by_role("button", name="scale")).to_have_count(1)
