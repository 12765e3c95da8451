"""`vf flags …`: an agent's feature flags, changed live (running agents see changes within 1 s)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from voicefleet.cli.client import (
    USAGE,
    Json,
    Key,
    Secret,
    Url,
    ago,
    configure,
    fail,
    print_json,
    state,
)

app = typer.Typer(help="Feature flags: live values per session, no redeploy.", no_args_is_help=True)
out = Console()


AgentArg = Annotated[str, typer.Argument(help="Agent id or name.")]
KeyArg = Annotated[str, typer.Argument(help="Flag key.")]


@app.callback()
def _options(
    url: Url = None,
    api_key: Key = None,
    api_secret: Secret = None,
    as_json: Json = False,
) -> None:
    configure(url, api_key, api_secret, as_json)


def parse_value(text: str, kind: str | None) -> tuple[Any, str]:
    """A command-line value and its type: true/false, a number, else a string (or as --type)."""
    if kind not in (None, "boolean", "string", "number"):
        fail(f"--type '{kind}' is not boolean, string or number", USAGE)
    if kind in (None, "boolean") and text.lower() in ("true", "false"):
        return text.lower() == "true", "boolean"
    if kind in (None, "number"):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number):  # "nan" and "inf" parse, but are not JSON
            return (int(number) if number.is_integer() and "." not in text else number), "number"
        if kind == "number":
            fail(f"'{text}' is not a number", USAGE)
    if kind == "boolean":
        fail(f"'{text}' is not true or false", USAGE)
    return text, "string"


def parse_when(text: str) -> dict[str, Any]:
    """`attr=value`, `attr=prefix:vip-`, `attr=glob:vip-*`, `attr=in:a,b`, `attr=contains:x`."""
    attr, sep, rest = text.partition("=")
    if not sep or not attr:
        fail(f"--when '{text}' is not ATTR=[OP:]VALUE (e.g. room=prefix:vip-)", USAGE)
    op, colon, value = rest.partition(":")
    if colon and op in ("equals", "prefix", "glob", "contains", "in"):
        return {"attr": attr, "op": op, "value": value.split(",") if op == "in" else value}
    return {"attr": attr, "op": "equals", "value": rest}


@app.command("set")
def set_flag(
    agent: AgentArg,
    key: KeyArg,
    value: Annotated[str, typer.Argument(help="The value (true/false, a number or text).")],
    kind: Annotated[
        str | None, typer.Option("--type", help="boolean, string or number (default: guessed).")
    ] = None,
    default: Annotated[
        str | None,
        typer.Option(help="With --percent/--when: what the other sessions get (default: off)."),
    ] = None,
    percent: Annotated[
        float | None, typer.Option(help="Only this % of sessions get VALUE (stable per session).")
    ] = None,
    when: Annotated[
        list[str] | None,
        typer.Option(help="Only sessions where ATTR=[OP:]VALUE (room, metadata.x, attributes.x)."),
    ] = None,
    rules_file: Annotated[
        Path | None, typer.Option(help="A JSON list of rules: [{when, percent, value}, ...].")
    ] = None,
) -> None:
    """Create or change a flag (and lift a kill). Running agents see it within a second."""
    parsed, kind = parse_value(value, kind)
    body: dict[str, Any] = {"type": kind, "value": parsed, "rules": []}
    if percent is not None or when:
        off = {"boolean": False, "string": "", "number": 0}[kind]
        other = parse_value(default, kind)[0] if default is not None else off
        body["value"] = other
        rule: dict[str, Any] = {"when": [parse_when(w) for w in when or []], "value": parsed}
        rule["percent"] = 100 if percent is None else percent
        body["rules"].append(rule)
    elif default is not None:
        fail("--default goes with --percent or --when", USAGE)
    if rules_file is not None:
        try:
            body["rules"] += json.loads(rules_file.read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read rules from {rules_file}: {e}", USAGE)
    data = state.client.request("PUT", f"/agents/{agent}/flags/{key}", json=body)
    print_json(data) if state.json else out.print(f"{key} = {_summary(data)}")


@app.command("get")
def get_flag(
    agent: AgentArg,
    key: KeyArg,
    room: Annotated[str | None, typer.Option(help="Evaluate for a session in this room.")] = None,
    dispatch_id: Annotated[str | None, typer.Option(help="...with this dispatch id.")] = None,
    metadata: Annotated[str, typer.Option(help="...with this job metadata.")] = "",
    attr: Annotated[
        list[str] | None, typer.Option(help="...with this job attribute: NAME=VALUE (repeat).")
    ] = None,
) -> None:
    """A flag's definition, or (with --room/--dispatch-id) what one session gets."""
    if room is None and dispatch_id is None:
        if metadata or attr:
            fail("--metadata and --attr go with --room or --dispatch-id", USAGE)
        data = state.client.request("GET", f"/agents/{agent}/flags/{key}")
        print_json(data) if state.json else out.print(f"{key} = {_summary(data)}")
        return
    params = {"room": room or "", "dispatch_id": dispatch_id or "", "metadata": metadata}
    for pair in attr or []:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            fail(f"--attr '{pair}' is not NAME=VALUE", USAGE)
        params[f"attr.{name}"] = text
    data = state.client.request("GET", f"/agents/{agent}/flags/{key}/evaluate", params=params)
    if state.json:
        print_json(data)
    else:
        out.print(f"{key} = {json.dumps(data['value'])} ({data['reason']})")


@app.command("list")
def list_flags(agent: AgentArg) -> None:
    """Every flag of the agent."""
    data = state.client.request("GET", f"/agents/{agent}/flags")
    if state.json:
        print_json(data)
        return
    t = Table(title="flags")
    for col in ("key", "type", "value", "changed", "by"):
        t.add_column(col)
    for f in data:
        t.add_row(f["key"], f["type"], _summary(f), ago(f["updated_at"]), f["updated_by"])
    out.print(t)


@app.command("delete")
def delete_flag(agent: AgentArg, key: KeyArg) -> None:
    """Remove a flag: agents fall back to their defaults (or VOICEFLEET_FLAG_* variables)."""
    state.client.request("DELETE", f"/agents/{agent}/flags/{key}")
    print_json({"deleted": key}) if state.json else out.print(f"deleted {key}")


@app.command("kill")
def kill_flag(agent: AgentArg, key: KeyArg) -> None:
    """Kill switch: every session gets the flag's off value now; `vf flags set` revives it."""
    data = state.client.request("POST", f"/agents/{agent}/flags/{key}/kill")
    print_json(data) if state.json else out.print(f"{key} killed: every session gets off")


def _summary(flag: dict[str, Any]) -> str:
    if flag.get("killed"):
        return f"KILLED ({json.dumps(flag['off'])})"
    text = json.dumps(flag["value"])
    for r in flag.get("rules", []):
        cond = " and ".join(f"{c['attr']} {c['op']} {json.dumps(c['value'])}" for c in r["when"])
        share = f"{r['percent']:g}% " if r["percent"] < 100 else ""
        text += f"; {share}{'where ' + cond if cond else 'of sessions'}: {json.dumps(r['value'])}"
    return text
