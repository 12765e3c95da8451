"""`vf agent …`: create, deploy, watch and roll back agents on a voicefleet server."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from dotenv import dotenv_values
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from voicefleet.build.bundle import create_bundle
from voicefleet.cli import livekit_toml
from voicefleet.cli.client import FAILED, NOT_FOUND, USAGE, Client, fail, resolve
from voicefleet.errors import VoicefleetError

app = typer.Typer(help="Create, deploy and operate agents.", no_args_is_help=True)
out = Console()


class State:
    client: Client
    json: bool = False


state = State()

Url = Annotated[str | None, typer.Option("--url", help="Server URL (env VF_URL).")]
Key = Annotated[str | None, typer.Option("--api-key", help="API key (env VF_API_KEY).")]
Secret = Annotated[str | None, typer.Option("--api-secret", help="API secret (env VF_API_SECRET).")]
AgentOpt = Annotated[
    str | None, typer.Option("--id", help="Agent id or name (default: livekit.toml here).")
]
Deployment = Annotated[str, typer.Option("--deployment", "-d", help="Named deployment.")]


@app.callback()
def _options(
    url: Url = None,
    api_key: Key = None,
    api_secret: Secret = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    state.client = Client(resolve(url, api_key, api_secret))
    state.json = as_json


def _agent(key: str | None) -> str:
    if key:
        return key
    try:
        config = livekit_toml.read(Path.cwd())
    except VoicefleetError as e:
        fail(str(e), USAGE)
    if config is None:
        fail("no livekit.toml here: run `vf agent create`, or pass --id", USAGE)
    return config.agent_id


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


@app.command()
def create(
    name: Annotated[str | None, typer.Option(help="Agent name (default: the folder's).")] = None,
    grace_period: Annotated[float, typer.Option(help="Drain grace period, seconds.")] = 3600,
    folder: Annotated[Path, typer.Argument(help="The agent's folder.")] = Path("."),
) -> None:
    """Register the agent in FOLDER; write livekit.toml (and a Dockerfile if there is none)."""
    folder = folder.resolve()
    if not (folder / "agent.py").exists() and not (folder / "Dockerfile").exists():
        fail(f"{folder} has no agent.py (or Dockerfile): is it an agent folder?", USAGE)
    try:
        existing = livekit_toml.read(folder)
    except VoicefleetError:
        existing = None
    if existing is not None:
        fail(f"{folder / 'livekit.toml'} already names agent {existing.agent_id}", USAGE)
    name = name or folder.name.lower().replace(" ", "-")
    agent = state.client.request(
        "POST", "/agents", json={"name": name, "grace_period": grace_period}
    )
    livekit_toml.write(
        folder,
        livekit_toml.AgentConfig(
            agent_id=agent["id"], subdomain="voicefleet", name=name, server=state.client.target.url
        ),
    )
    wrote = ["livekit.toml"]
    if not (folder / "Dockerfile").exists():
        (folder / "Dockerfile").write_text(livekit_toml.DOCKERFILE)
        wrote.append("Dockerfile")
    if state.json:
        _print_json(agent)
    else:
        out.print(f"Created agent [bold]{name}[/bold] ({agent['id']}); wrote {', '.join(wrote)}")


@app.command()
def config(
    agent: AgentOpt = None,
    grace_period: Annotated[float | None, typer.Option(help="Drain grace, seconds.")] = None,
) -> None:
    """Show or change an agent's settings."""
    key = _agent(agent)
    if grace_period is not None:
        state.client.request("PATCH", f"/agents/{key}", json={"grace_period": grace_period})
    status = state.client.request("GET", f"/agents/{key}")
    if state.json:
        _print_json(status["agent"])
    else:
        for k, v in status["agent"].items():
            out.print(f"{k}: {v}")


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(256 * 1024):
            progress.update(task, advance=len(chunk))
            yield chunk


@app.command()
def deploy(
    agent: AgentOpt = None,
    deployment: Deployment = "production",
    folder: Annotated[Path, typer.Argument(help="The agent's folder.")] = Path("."),
) -> None:
    """Upload FOLDER as a new version, build it, and roll it out without dropping a session."""
    key = _agent(agent)
    client = state.client
    quiet = state.json
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.tar.gz"
        try:
            info = create_bundle(folder, bundle)
        except VoicefleetError as e:
            fail(str(e), USAGE)
        size = bundle.stat().st_size
        with Progress(
            TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True), disable=quiet, transient=False,
        ) as progress:  # fmt: skip
            task = progress.add_task("upload", total=size)
            version = client.request(
                "POST",
                f"/agents/{key}/versions",
                params={"deployment": deployment},
                content=_chunks(bundle, progress, task),
                headers={"Content-Type": "application/gzip"},
            )
    v = version["version"]
    if not quiet:
        out.print(f"uploaded {info.files} files as [bold]{v}[/bold]; building:")
    for line in client.lines(f"/agents/{key}/versions/{v}/log", follow="true"):
        if not quiet:
            out.print(f"  [dim]{line}[/dim]", highlight=False)
    built = next(x for x in client.request("GET", f"/agents/{key}/versions") if x["version"] == v)
    if built["status"] != "ready":
        if quiet:
            _print_json({"version": built, "rollout": None})
        fail(f"build of {v} failed; {deployment} keeps its current version", FAILED)
    rollout = _watch_rollout(key, v, quiet)
    if quiet:
        _print_json({"version": built, "rollout": rollout})
    if rollout["state"] != "complete":
        fail(f"rollout of {v} {rollout['state']}: {rollout['reason']}", FAILED)


STEPS = ["start", "wait", "shift", "drain", "done"]
STEP_TEXT = {
    "start": "starting instances",
    "wait": "waiting for instances to register",
    "shift": "routing new sessions",
    "drain": "draining old instances",
    "done": "done",
}


def _watch_rollout(key: str, version: str, quiet: bool, rollout_id: str | None = None) -> Any:
    client = state.client
    deadline = time.monotonic() + 600
    with Progress(
        TextColumn("rollout {task.description}"), BarColumn(), TextColumn("{task.fields[step]}"),
        console=Console(stderr=True), disable=quiet,
    ) as progress:  # fmt: skip
        task = progress.add_task(version, total=len(STEPS) - 1, step="")
        while True:
            if rollout_id:
                rollout = client.request("GET", f"/agents/{key}/rollouts/{rollout_id}")
            else:
                found = client.request(
                    "GET", f"/agents/{key}/rollouts", params={"version": version}
                )
                rollout = found[0] if found else None
            if rollout is not None:
                step = rollout["step"] or "start"
                progress.update(task, completed=STEPS.index(step), step=STEP_TEXT[step])
                if rollout["state"] != "progressing":
                    return rollout
            if time.monotonic() > deadline:
                fail(f"rollout of {version} still in progress after 10 minutes", FAILED)
            time.sleep(0.25)


@app.command()
def status(agent: AgentOpt = None) -> None:
    """Deployments, instances (with their live sessions) and recent rollouts."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}")
    if state.json:
        _print_json(data)
        return
    a = data["agent"]
    out.print(f"[bold]{a['name']}[/bold] ({a['id']}), grace period {a['grace_period']:g}s")
    for d in data["deployments"]:
        out.print(
            f"  {d['name']}: {d['version'] or '(nothing deployed)'}, {d['replicas']} replica(s)"
        )
    t = Table(title="instances")
    for col in ("instance", "deployment", "version", "status", "sessions", "restarts", "pid"):
        t.add_column(col)
    for i in data["instances"]:
        t.add_row(i["id"], i["deployment"], i["version"], i["status"], str(i["sessions"]),
                  str(i["restarts"]), str(i["pid"]))  # fmt: skip
    out.print(t)
    if data["rollouts"]:
        r = data["rollouts"][0]
        out.print(
            f"last rollout {r['id']}: {r['from_version'] or '-'} -> {r['to_version']} "
            f"{r['state']} ({r['step']}) {r['reason']}"
        )


@app.command()
def versions(agent: AgentOpt = None) -> None:
    """Every version of the agent, newest first, and which deployment serves it."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}/versions")
    if state.json:
        _print_json(data)
        return
    t = Table(title="versions")
    for col in ("version", "status", "serving", "created", "source", "dependencies"):
        t.add_column(col)
    for v in data:
        t.add_row(v["version"], v["status"], v["deployment"], _ago(v["created_at"]),
                  v["source_digest"][:12], v["dependency_digest"][:12])  # fmt: skip
    out.print(t)


@app.command()
def logs(
    agent: AgentOpt = None,
    instance: Annotated[str | None, typer.Option(help="One instance's logs.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
) -> None:
    """The instances' output."""
    params: dict[str, Any] = {"follow": str(follow).lower()}
    if instance:
        params["instance"] = instance
    try:
        for line in state.client.lines(f"/agents/{_agent(agent)}/logs", **params):
            print(line)
    except KeyboardInterrupt:
        pass


@app.command()
def rollback(
    agent: AgentOpt = None,
    deployment: Deployment = "production",
    version: Annotated[
        str | None, typer.Option(help="Version (default: the previous one).")
    ] = None,
) -> None:
    """Go back to the previous (or a named) version: the stored build, no rebuild."""
    key = _agent(agent)
    started = state.client.request(
        "POST", f"/agents/{key}/rollback", json={"deployment": deployment, "version": version}
    )
    _finish(key, started)


@app.command()
def restart(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """Replace the instances of the serving version, draining the old ones."""
    key = _agent(agent)
    _finish(
        key,
        state.client.request("POST", f"/agents/{key}/restart", params={"deployment": deployment}),
    )


@app.command()
def promote(
    agent: AgentOpt = None,
    source: Annotated[str, typer.Option("--from", help="Deployment to copy.")] = "staging",
    target: Annotated[str, typer.Option("--to", help="Deployment to update.")] = "production",
) -> None:
    """Roll the version serving one deployment out to another."""
    key = _agent(agent)
    _finish(
        key,
        state.client.request("POST", f"/agents/{key}/promote", json={"from": source, "to": target}),
    )


def _finish(key: str, started: Any) -> None:
    rollout = _watch_rollout(key, started["to_version"], state.json, started["id"])
    if state.json:
        _print_json(rollout)
    else:
        out.print(f"{rollout['reason']} to {rollout['to_version']}: {rollout['state']}")
    if rollout["state"] != "complete":
        fail(f"rollout {rollout['state']}: {rollout['reason']}", FAILED)


@app.command()
def scale(
    replicas: Annotated[int, typer.Argument(min=0, max=100, help="Instances to run.")],
    agent: AgentOpt = None,
    deployment: Deployment = "production",
) -> None:
    """Set the number of instances; scaling down drains idle instances first."""
    data = state.client.request(
        "POST",
        f"/agents/{_agent(agent)}/scale",
        json={"deployment": deployment, "replicas": replicas},
    )
    _print_json(data) if state.json else out.print(
        f"{data['deployment']}: {data['replicas']} instance(s)"
    )


@app.command()
def delete(
    agent: AgentOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete the agent: its instances drain (sessions finish), then it is gone."""
    key = _agent(agent)
    if not yes and not typer.confirm(f"Delete agent {key} and drain its instances?"):
        raise typer.Exit(FAILED)
    state.client.request("DELETE", f"/agents/{key}")
    out.print(f"deleted {key}") if not state.json else _print_json({"deleted": key})


secrets_app = typer.Typer(
    help="Secrets the agent gets as environment variables.", no_args_is_help=True
)
app.add_typer(secrets_app, name="secrets")


@secrets_app.command("set")
def secrets_set(
    pairs: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE …")] = None,
    secrets_file: Annotated[Path | None, typer.Option(help="A .env file of secrets.")] = None,
    agent: AgentOpt = None,
) -> None:
    """Set secrets (values are never printed back). New instances see them."""
    values: dict[str, str] = {}
    if secrets_file is not None:
        if not secrets_file.exists():
            fail(f"no secrets file {secrets_file}", USAGE)
        values.update({k: v or "" for k, v in dotenv_values(secrets_file).items()})
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            fail(f"'{name}' is not NAME=VALUE", USAGE)
        values[name] = value
    if not values:
        fail("no secrets given (NAME=VALUE or --secrets-file)", USAGE)
    data = state.client.request("PUT", f"/agents/{_agent(agent)}/secrets", json={"secrets": values})
    _print_json(data) if state.json else out.print(f"set {', '.join(data['set'])}")


@secrets_app.command("list")
def secrets_list(agent: AgentOpt = None) -> None:
    """Secret names and when they changed (never their values)."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}/secrets")
    if state.json:
        _print_json(data)
        return
    t = Table(title="secrets")
    t.add_column("name")
    t.add_column("updated")
    for s in data:
        t.add_row(s["name"], _ago(s["updated_at"]))
    out.print(t)


@secrets_app.command("unset")
def secrets_unset(
    names: Annotated[list[str], typer.Argument(help="Names to remove.")], agent: AgentOpt = None
) -> None:
    """Remove secrets."""
    data = state.client.request(
        "DELETE", f"/agents/{_agent(agent)}/secrets", params={"name": names}
    )
    if data["removed"] == 0:
        fail(f"none of {', '.join(names)} was set", NOT_FOUND)
    _print_json(data) if state.json else out.print(f"removed {data['removed']}")
