"""Flags: every agent's feature flags, edited through `voicefleet.flags` (as `vf flags` does):
value, percentage and rules, the kill switch, and each flag's history from the event log.

A change is the whole definition again (the flag service replaces a flag; setting it lifts a
kill). The percentage field edits the flag's rollout rule, the first rule with no conditions;
a boolean flag without one gets one that turns it on for that share of sessions.
"""

from __future__ import annotations

import json
from typing import Any

from voicefleet.control.service import ControlPlane
from voicefleet.dashboard.agent_page import who
from voicefleet.dashboard.html import Html, badge, el, esc, join, table, when
from voicefleet.errors import InvalidRequest
from voicefleet.flags.service import FlagService
from voicefleet.sdk.evaluate import TYPES
from voicefleet.store.models import AgentRow

HISTORY = 30  # flag events shown per agent


def parse_value(kind: str, text: str) -> Any:
    text = text.strip()
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise InvalidRequest(f"a boolean flag's value is true or false, not '{text}'")
        return text.lower() == "true"
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(f"'{text}' is not a number") from None
        return int(number) if number.is_integer() and "." not in text else number
    return text


def rollout_rule(rules: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rules if not r.get("when")), None)


def changed(flag: dict[str, Any] | None, form: dict[str, str]) -> dict[str, Any]:
    """The definition a form asks for: `type` (a new flag), `value`, `rules` (JSON) and
    `percent` (the rollout rule's share)."""
    kind = flag["type"] if flag is not None else form.get("type", "boolean")
    if kind not in TYPES:
        raise InvalidRequest(f"type is one of {', '.join(TYPES)}")
    value = parse_value(kind, form.get("value", ""))
    rules_text = form.get("rules", "").strip()
    try:
        rules = json.loads(rules_text) if rules_text else []
    except ValueError as e:
        raise InvalidRequest(f"rules are not JSON: {e}") from None
    if not isinstance(rules, list):
        raise InvalidRequest("rules are a JSON list of {when, percent, value}")
    percent_text = form.get("percent", "").strip()
    if percent_text:
        try:
            percent = float(percent_text)
        except ValueError:
            raise InvalidRequest(f"percentage '{percent_text}' is not a number") from None
        rule = rollout_rule(rules)
        if rule is None:
            if kind != "boolean":
                raise InvalidRequest(
                    "a percentage needs a rule with no conditions giving the value to roll out"
                )
            rule = {"when": [], "percent": percent, "value": not value}
            rules.append(rule)
        rule["percent"] = percent
    definition: dict[str, Any] = {"type": kind, "value": value, "rules": rules}
    if flag is not None:
        definition["off"] = flag.get("off")
    return definition


def _rules_text(rules: list[dict[str, Any]]) -> str:
    return json.dumps(rules, indent=1) if rules else ""


def _summary(flag: dict[str, Any]) -> Html:
    parts: list[object] = []
    for rule in flag["rules"]:
        when_ = " and ".join(
            f"{c['attr']} {c.get('op', 'equals')} {json.dumps(c['value'])}" for c in rule["when"]
        )
        share = f"{rule['percent']:g}%" if rule["percent"] < 100 else "all"
        parts.append(
            el("li", f"{share}{' where ' + when_ if when_ else ''} → {json.dumps(rule['value'])}")
        )
    return el("ul", *parts, class_="rules") if parts else el("span", "no rules", class_="muted")


def _edit(agent: str, flag: dict[str, Any], csrf: str) -> Html:
    if not csrf:  # a viewer's page: no commands
        return Html("")
    key = flag["key"]
    rule = rollout_rule(flag["rules"])
    value = json.dumps(flag["value"]) if flag["type"] != "string" else flag["value"]
    return el(
        "details",
        el("summary", "edit"),
        el(
            "form",
            el("input", type="hidden", name="csrf", value=csrf),
            el("input", type="hidden", name="command", value="set"),
            el("label", el("span", "default value"), el("input", name="value", value=value)),
            el(
                "label",
                el("span", "rollout percentage"),
                el(
                    "input",
                    name="percent",
                    type="number",
                    min="0",
                    max="100",
                    step="any",
                    value=f"{rule['percent']:g}" if rule else "",
                    placeholder="-" if rule or flag["type"] == "boolean" else "needs a rule",
                ),
            ),
            el(
                "label",
                el("span", "rules (JSON)"),
                el("textarea", _rules_text(flag["rules"]), name="rules", rows="4"),
            ),
            el("button", "Save", type="submit", class_="btn primary"),
            method="post",
            action=f"/dashboard/flags/{agent}/{key}",
            data_confirm=f"Change flag {key} of {agent}? Running agents get it in their next "
            "session.",
            class_="flag-edit",
        ),
        id=f"edit-{agent}-{key}",
    )


def _kill(agent: str, flag: dict[str, Any], csrf: str) -> Html:
    if not csrf:  # a viewer's page: no commands
        return Html("")
    key = flag["key"]
    return el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el("input", type="hidden", name="command", value="kill"),
        el("button", "kill", type="submit", class_="btn abort"),
        method="post",
        action=f"/dashboard/flags/{agent}/{key}",
        data_confirm=f"Kill flag {key} of {agent}? Every session gets "
        f"{json.dumps(flag.get('off'))} until it is set again.",
        class_="action",
    )


def _new(agent: str, csrf: str) -> Html:
    if not csrf:  # a viewer's page: no commands
        return Html("")
    return el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el("input", type="hidden", name="command", value="create"),
        el("label", el("span", "key"), el("input", name="key", required=True, placeholder="key")),
        el(
            "label",
            el("span", "type"),
            el("select", *(el("option", t, value=t) for t in TYPES), name="type"),
        ),
        el("label", el("span", "value"), el("input", name="value", placeholder="false")),
        el("button", "Add flag", type="submit", class_="btn"),
        method="post",
        action=f"/dashboard/flags/{agent}",
        data_confirm=f"Add this flag to {agent}?",
        class_="search flag-new",
    )


async def render_agent_flags(
    plane: ControlPlane, service: FlagService, agent: AgentRow, csrf: str
) -> Html:
    name = agent.name
    rows = [
        [
            el("b", f["key"]),
            f["type"],
            el("code", json.dumps(f["value"])),
            _summary(f),
            badge("killed") if f.get("killed") else badge("live", "ready"),
            join((when(f["updated_at"]), " ", el("small", who(f["updated_by"])))),
            join((_edit(name, f, csrf), _kill(name, f, csrf) if not f.get("killed") else "")),
        ]
        for f in service.list(agent.id)
    ]
    history = [e for e in await plane.events(agent, 500) if e.kind.startswith("flag_")][:HISTORY]
    return el(
        "section",
        el("h2", el("a", name, href=f"/dashboard/agents/{name}")),
        table(["flag", "type", "default", "rules", "state", "updated", ""], rows),
        _new(name, csrf),
        el("h3", "History"),
        table(
            ["when", "change", "what", "by"],
            [
                [when(e.at), e.kind.removeprefix("flag_"), e.message, who(e.actor, e.ip)]
                for e in history
            ],
        ),
        class_="flags",
        id=f"flags-{name}",
    )


async def render_flags(plane: ControlPlane, service: FlagService, csrf: str) -> Html:
    parts = [
        await render_agent_flags(plane, service, agent, csrf)
        for agent, _ in await plane.agents_serving()
    ]
    if not parts:
        return el("p", "No agents yet: flags belong to an agent.", class_="empty")
    return esc(join(parts))
