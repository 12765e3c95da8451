"""`vf events`: the event log through the API: who changed what, when, and from where."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from voicefleet.cli.client import Json, Key, Secret, Url, configure, print_json, state

out = Console(soft_wrap=True)
PAGE = 1000  # the API's largest page


def events(
    agent: Annotated[
        str | None, typer.Option("--agent", help="One agent's events (name or id).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="From then on: a duration ago (1h, 7d), an ISO date-time, or seconds."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before then (same forms as --since).")] = None,
    kind: Annotated[
        list[str] | None, typer.Option(help="Only this kind, e.g. scaled, key_created (repeat).")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only what this key did.")] = None,
    changes: Annotated[
        bool,
        typer.Option("--changes", help="Only changes someone asked for, none of the platform's."),
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    url: Url = None,
    api_key: Key = None,
    api_secret: Secret = None,
    as_json: Json = False,
) -> None:
    """The event log, newest first: deploys, rollbacks, rollout commands, scaling, flags,
    secrets, agents and API keys, with who (the key), when, and from where (via, client IP)."""
    configure(url, api_key, api_secret, as_json)
    params: dict[str, Any] = {"agent": agent, "since": since, "until": until, "actor": actor}
    params = {k: v for k, v in params.items() if v is not None}
    if kind:
        params["kind"] = kind
    if changes:
        params["changes"] = "true"
    found: list[dict[str, Any]] = []
    before: int | None = None
    while len(found) < limit:
        page = {**params, "limit": min(PAGE, limit - len(found))}
        if before is not None:
            page["before"] = before
        data = state.client.request("GET", "/events", params=page)
        found += data["events"]
        before = data["next"]
        if before is None:
            break
    if state.json:
        print_json(found)
        return
    if not found:
        out.print("no events")
        return
    table = Table(
        Column("when", no_wrap=True), "agent", Column("kind", no_wrap=True), "what",
        Column("by", no_wrap=True), "via", Column("from", no_wrap=True), box=None,
    )  # fmt: skip
    for e in found:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])),
            e["agent"] or "-",
            e["kind"],
            e["message"],
            f"{e['actor']} ({e['actor_name']})" if e["actor_name"] else e["actor"] or "-",
            e["via"] or "-",
            e["ip"] or "-",
        )
    out.print(table)
