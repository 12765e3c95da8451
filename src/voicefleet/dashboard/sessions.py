"""Sessions: recent jobs, searched by room, agent, version and state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.dispatch.jobs import JobState
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

    @classmethod
    def of(cls, params: dict[str, str]) -> Search:
        state = params.get("state", "").strip()
        return cls(
            room=params.get("room", "").strip()[:200],
            agent=params.get("agent", "").strip()[:200],
            version=params.get("version", "").strip()[:40],
            state=state if state in STATES else "",
        )

    def query(self) -> str:
        return urlencode({k: v for k, v in vars(self).items() if v})

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


async def render_sessions(recorder: Recorder, search: Search) -> Html:
    narrowed = bool(search.agent or search.version)
    jobs = await recorder.history(
        limit=SCANNED if narrowed else SHOWN, room=search.room or None, state=search.state or None
    )
    found = [j for j in jobs if search.matches(j)][:SHOWN]
    rows = [
        [
            el("code", j["id"]),
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
    return esc(join((el("p", note, class_="summary"), table(head, rows, id="jobs"))))
