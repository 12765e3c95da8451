"""Sessions: recent jobs, searched by room, agent, version and state; one job's timeline
(dispatched, dispatched again, assigned, running, ended) from its timestamps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.dashboard.joblog import MAX_LINES, session_lines
from voicefleet.dispatch.jobs import JobState
from voicefleet.fleet import Paths
from voicefleet.store.records import Recorder

SHOWN = 100  # rows on the page
# The store filters by room and state; agent and version are matched among this many recent
# jobs (enough for a first look; the store would filter them itself for more).
SCANNED = 2000
STATES = tuple(str(s) for s in JobState)


@dataclass(frozen=True)
class Search:
    room: str = ""
    agent: str = ""
    version: str = ""
    state: str = ""
    job: str = ""  # the job whose timeline shows above the list

    @classmethod
    def of(cls, params: dict[str, str]) -> Search:
        state = params.get("state", "").strip()
        return cls(
            room=params.get("room", "").strip()[:200],
            agent=params.get("agent", "").strip()[:200],
            version=params.get("version", "").strip()[:40],
            state=state if state in STATES else "",
            job=params.get("job", "").strip()[:40],
        )

    def query(self, **change: str) -> str:
        return urlencode({k: v for k, v in {**vars(self), **change}.items() if v})

    def matches(self, job: dict[str, Any]) -> bool:
        return (not self.agent or job["agent_name"] == self.agent) and (
            not self.version or job["version"] == self.version
        )


def search_form(search: Search) -> Html:
    def field(name: str, value: str, placeholder: str) -> Html:
        return el(
            "label",
            el("span", name),
            el("input", type="search", name=name, value=value, placeholder=placeholder),
        )

    options = [el("option", "any state", value="")] + [
        el("option", s, value=s, selected=s == search.state) for s in STATES
    ]
    return el(
        "form",
        field("room", search.room, "room name"),
        field("agent", search.agent, "agent name"),
        field("version", search.version, "v3"),
        el("label", el("span", "state"), el("select", *options, name="state")),
        el("button", "Search", type="submit", class_="btn"),
        method="get",
        action="/dashboard/sessions",
        class_="search",
        id="search",
    )


def _seconds(start: float, end: float) -> str:
    return f"{end - start:.1f}s" if start and end and end >= start else "-"


def timeline(job: dict[str, Any]) -> Html:
    """The job's steps in order, each with its time and how long after the dispatch. A job
    dispatched again (its worker was lost) keeps its creation time; the later steps are its
    latest attempt's."""
    created = job["created_at"]
    steps: list[tuple[str, float, object]] = [("dispatched", created, f"room {job['room']}")]
    if job["redispatches"]:
        steps.append(
            (
                "re-dispatched",
                0.0,
                f"{job['redispatches']} time(s), after its worker was lost; "
                "what follows is its latest attempt",
            )
        )
    if job["assigned_at"]:
        where = join(
            (
                f"{job['version'] or 'unversioned'} on ",
                el("code", job["instance"] or job["worker_id"] or "a worker"),
            )
        )
        steps.append(("assigned", job["assigned_at"], where))
    if job["started_at"]:
        steps.append(("running", job["started_at"], ""))
    if job["ended_at"]:
        steps.append(
            ("ended", job["ended_at"], join((badge(job["state"]), " ", job["error"] or "")))
        )
    else:
        steps.append(("now", 0.0, badge(job["state"])))
    items = [
        el(
            "li",
            el("b", name),
            " ",
            when(at) if at else "",
            el("small", f" +{at - created:.1f}s")
            if at and at >= created and name != "dispatched"
            else "",
            el("span", " · ", what) if what else "",
            class_=f"step {name}",
        )
        for name, at, what in steps
    ]
    return el(
        "section",
        el("h2", "Timeline of ", el("code", job["id"])),
        el("ol", *items, class_="timeline"),
        class_="card",
        id="timeline",
    )


async def log_section(paths: Paths, job: dict[str, Any]) -> Html:
    """The session's lines of its instance's log (those naming its job id)."""
    head = el("h2", "Log lines of ", el("code", job["id"]))
    if not (job["agent_id"] and job["instance"]):
        text = "Its worker is not an instance voicefleet runs: its log is not here."
        return el("section", head, el("p", text, class_="empty"), class_="card", id="session-log")
    lines = await session_lines(paths, job["agent_id"], job["instance"], job["id"])
    where = el(
        "a",
        job["instance"],
        href=f"/dashboard/instances/{job['agent_name']}/{job['instance']}",
    )
    note = el(
        "p",
        f"{len(lines)} line(s) of instance ",
        where,
        "'s log name this job" + (f" (the newest {MAX_LINES})" if len(lines) >= MAX_LINES else ""),
        class_="muted",
    )
    body = el("pre", "\n".join(lines), class_="log") if lines else ""
    return el("section", head, note, body, class_="card", id="session-log")


async def render_sessions(recorder: Recorder, search: Search, paths: Paths) -> Html:
    narrowed = bool(search.agent or search.version)
    jobs = await recorder.history(
        limit=SCANNED if narrowed else SHOWN, room=search.room or None, state=search.state or None
    )
    found = [j for j in jobs if search.matches(j)][:SHOWN]
    rows = [
        [
            el("a", el("code", j["id"]), href=f"/dashboard/sessions?{search.query(job=j['id'])}"),
            when(j["created_at"]),
            el("a", j["agent_name"], href=f"/dashboard/agents/{j['agent_name']}")
            if j["agent_id"]
            else j["agent_name"],
            j["deployment"] or "-",
            j["version"] or "-",
            j["room"],
            badge(j["state"]),
            _seconds(j["created_at"], j["started_at"]),
            _seconds(j["started_at"], j["ended_at"]),
            el("code", j["instance"]) if j["instance"] else "-",
            el("small", j["error"]) if j["error"] else "",
        ]
        for j in found
    ]
    head = ["job", "created", "agent", "deployment", "version", "room", "state", "to start",
            "duration", "instance", "error"]  # fmt: skip
    note = f"{len(found)} session(s)" + (f", the newest {SHOWN}" if len(found) == SHOWN else "")
    parts = [el("p", note, class_="summary"), table(head, rows, id="jobs")]
    if search.job:
        picked = await recorder.history(limit=1, job_id=search.job)
        if picked:
            parts[:0] = [timeline(picked[0]), await log_section(paths, picked[0])]
        else:
            parts.insert(0, el("p", f"No job {search.job}.", class_="empty", id="timeline"))
    return esc(join(parts))
