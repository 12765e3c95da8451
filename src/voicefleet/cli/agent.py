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
from voicefleet.build.dockerfile import DOCKERIGNORE, node_lockfile, render
from voicefleet.cli import livekit_toml
from voicefleet.cli.client import (
    FAILED,
    NOT_FOUND,
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
from voicefleet.errors import BuildFailed, VoicefleetError

app = typer.Typer(help="Create, deploy and operate agents.", no_args_is_help=True)
out = Console()


AgentOpt = Annotated[
    str | None, typer.Option("--id", help="Agent id or name (default: livekit.toml here).")
]
Deployment = Annotated[str, typer.Option("--deployment", "-d", help="Named deployment.")]


@app.callback()
def _options(
    url: Url = None,
    api_key: Key = None,
    api_secret: Secret = None,
    as_json: Json = False,
) -> None:
    configure(url, api_key, api_secret, as_json)


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


@app.command()
def create(
    name: Annotated[str | None, typer.Option(help="Agent name (default: the folder's).")] = None,
    grace_period: Annotated[float, typer.Option(help="Drain grace period, seconds.")] = 3600,
    folder: Annotated[Path, typer.Argument(help="The agent's folder.")] = Path("."),
) -> None:
    """Register the agent in FOLDER; write livekit.toml (and a Dockerfile if there is none)."""
    folder = folder.resolve()
    if not any((folder / f).exists() for f in ("agent.py", "package.json", "Dockerfile")):
        fail(f"{folder} has no agent.py, package.json or Dockerfile: is it an agent folder?", USAGE)
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
        try:
            # Python: the recipe that finds its dependency file at build time.
            text = render(folder).text if node_lockfile(folder) else livekit_toml.DOCKERFILE
            (folder / "Dockerfile").write_text(text)
            wrote.append("Dockerfile")
        except BuildFailed as e:  # e.g. package.json that cannot be read: said, not fatal
            out.print(f"[yellow]no Dockerfile written:[/yellow] {e}")
    if state.json:
        print_json(agent)
    else:
        out.print(f"Created agent [bold]{name}[/bold] ({agent['id']}); wrote {', '.join(wrote)}")


@app.command()
def dockerfile(
    folder: Annotated[Path, typer.Argument(help="The agent's folder.")] = Path("."),
    base: Annotated[
        str | None,
        typer.Option(help="Base image (default: python:3.11-slim, or node:20-slim for Node.js)."),
    ] = None,
    entry: Annotated[
        str | None, typer.Option(help="The agent's file (default: agent.py, or package.json's).")
    ] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Print it; write nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Replace the folder's Dockerfile.")] = False,
) -> None:
    """Write the Dockerfile voicefleet builds for FOLDER (and a .dockerignore if there is none).

    Multi-stage, dependencies in a cached layer before the code, the agent's download-files
    step in its own layer, bytecode compiled, a non-root user; Node.js (npm ci, the build
    script) when the folder has package.json and a lockfile, Python otherwise."""

    folder = folder.resolve()
    if not folder.is_dir():
        fail(f"{folder} is not a folder", USAGE)
    try:
        recipe = render(folder, base=base, entry=entry)
    except VoicefleetError as e:
        fail(str(e), USAGE)
    if print_only:
        typer.echo(recipe.text, nl=False)
        return
    if (folder / "Dockerfile").exists() and not force:
        fail(
            f"{folder / 'Dockerfile'} exists: --force replaces it, --print shows the new one", USAGE
        )
    (folder / "Dockerfile").write_text(recipe.text)
    wrote = ["Dockerfile"]
    if not (folder / ".dockerignore").exists():
        (folder / ".dockerignore").write_text(DOCKERIGNORE)
        wrote.append(".dockerignore")
    if state.json:
        print_json({"kind": recipe.kind, "entry": recipe.entry, "wrote": wrote})
    else:
        detail = f"{recipe.kind}, {recipe.dependencies or 'no dependency file'}, {recipe.entry}"
        out.print(f"Wrote {' and '.join(wrote)} ({detail})")


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
        print_json(status["agent"])
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
    version: Annotated[
        str | None,
        typer.Option("--version", help="Roll out this built version again (no upload, no build)."),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="Deploy this prebuilt image (registry/name:tag, or @sha256:… to pin its bytes) "
            "as a new version: no upload, no build. Kubernetes runtime only.",
        ),
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="rolling (default), canary or bluegreen.")
    ] = None,
    canary: Annotated[
        float | None,
        typer.Option(help="Canary: this % of new sessions, held until `vf agent canary promote`."),
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Canary steps in %, e.g. 10,25,50,100 (100 promotes).")
    ] = None,
    interval: Annotated[str, typer.Option(help="Canary: time at each step (30s, 5m, 1h).")] = "5m",
    max_failure_increase: Annotated[
        float, typer.Option(help="Canary: abort above stable's failure rate + this (0.05 = 5%).")
    ] = 0.05,
    min_sessions: Annotated[
        int, typer.Option(help="Canary: sessions before failure rates are judged.")
    ] = 5,
    max_restarts: Annotated[
        int, typer.Option(help="Canary: instance restarts (crashes) tolerated.")
    ] = 0,
    max_error_lines_increase: Annotated[
        float | None,
        typer.Option(
            help="Canary: abort when it logs more ERROR lines per session than stable by this "
            "(default 0.5)."
        ),
    ] = None,
    min_duration_ratio: Annotated[
        float | None,
        typer.Option(
            help="Canary: abort when its median session lasts less than this share of "
            "stable's, less 2 s (default 0.25; 0 turns it off)."
        ),
    ] = None,
    checks: Annotated[
        Path | None,
        typer.Option(
            help="Canary: a JSON file listing checks of your own (a PromQL query or a command, "
            "each interval; see docs/rollouts.md), judged beside the built-in ones."
        ),
    ] = None,
    smoke_sessions: Annotated[
        int, typer.Option(help="Blue-green: synthetic sessions sent to green.")
    ] = 3,
    smoke_command: Annotated[
        str, typer.Option(help="Blue-green: a command run in the agent folder; exit 0 passes.")
    ] = "",
    smoke_timeout: Annotated[
        float, typer.Option(help="Blue-green: smoke test time limit, s.")
    ] = 60,
    smoke_metadata: Annotated[
        str, typer.Option(help="Blue-green: job metadata of the synthetic sessions.")
    ] = '{"smoke": true}',
    smoke_max_error_lines: Annotated[
        int | None,
        typer.Option(help="Blue-green: ERROR lines the synthetic sessions may log (default 0)."),
    ] = None,
) -> None:
    """Upload FOLDER as a new version, build it, and roll it out without dropping a session.

    On a server with the Kubernetes runtime the build is an image (buildah), pushed to the
    server's --registry; --image REF deploys a prebuilt image instead.

    Rolling by default; --canary 10 or --steps 10,25,50,100 --interval 5m for a canary that is
    compared with stable and aborted automatically when worse; --strategy bluegreen for green
    beside blue, smoke-tested, then switched."""
    key = _agent(agent)
    client = state.client
    quiet = state.json
    if strategy is None:
        strategy = "canary" if canary is not None or steps is not None else "rolling"
    plan: dict[str, Any] = {"strategy": strategy}
    if strategy == "canary":
        try:
            shares = (
                [canary] if canary is not None else [float(x) for x in (steps or "").split(",")]
            )
        except ValueError:
            fail(f"--steps '{steps}' is not a list of percentages like 10,25,50,100", USAGE)
        thresholds: dict[str, float] = {
            "max_failure_rate_increase": max_failure_increase,
            "min_sessions": min_sessions,
            "max_restarts": max_restarts,
        }
        # Unset: the server's defaults apply (the plan is parsed there, once).
        if max_error_lines_increase is not None:
            thresholds["max_error_lines_increase"] = max_error_lines_increase
        if min_duration_ratio is not None:
            thresholds["min_duration_ratio"] = min_duration_ratio
        plan.update(steps=shares, interval=_duration(interval), thresholds=thresholds)
        if checks is not None:
            plan["checks"] = _checks_file(checks)  # checked by the server, which says what is wrong
    elif strategy == "bluegreen":
        plan["smoke"] = {
            "sessions": smoke_sessions,
            "timeout": smoke_timeout,
            "command": smoke_command,
            "metadata": smoke_metadata,
        }
        if smoke_max_error_lines is not None:
            plan["smoke"]["max_error_lines"] = smoke_max_error_lines
    elif strategy != "rolling":
        fail(f"unknown strategy '{strategy}' (rolling, canary or bluegreen)", USAGE)
    if version is not None and image is not None:
        fail("--version rolls out a version there is, --image makes a new one: give one", USAGE)
    if image is not None:
        made = client.request(
            "POST",
            f"/agents/{key}/images",
            json={"image": image, "deployment": deployment, "plan": plan},
        )
        v = made["version"]
        if not quiet:
            out.print(f"[bold]{v}[/bold] runs the prebuilt image {image} (no build)")
        rollout = _watch_rollout(key, v, quiet, made["rollout"])
        if quiet:
            print_json(
                {"version": {k: x for k, x in made.items() if k != "rollout"}, "rollout": rollout}
            )
        _report(rollout)
        return
    if version is not None:
        started = client.request(
            "POST",
            f"/agents/{key}/rollouts",
            json={"version": version, "deployment": deployment, "plan": plan},
        )
        rollout = _watch_rollout(key, version, quiet, started["id"])
        if quiet:
            print_json({"rollout": rollout})
        _report(rollout)
        return
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
            uploaded = client.request(
                "POST",
                f"/agents/{key}/versions",
                params={"deployment": deployment, "plan": json.dumps(plan)},
                content=_chunks(bundle, progress, task),
                headers={"Content-Type": "application/gzip"},
            )
    v = uploaded["version"]
    if not quiet:
        out.print(f"uploaded {info.files} files as [bold]{v}[/bold]; building:")
    for line in client.lines(f"/agents/{key}/versions/{v}/log", follow="true"):
        if not quiet:
            out.print(f"  [dim]{line}[/dim]", highlight=False)
    built = next(x for x in client.request("GET", f"/agents/{key}/versions") if x["version"] == v)
    if built["status"] != "ready":
        if quiet:
            print_json({"version": built, "rollout": None})
        fail(f"build of {v} failed; {deployment} keeps its current version", FAILED)
    rollout = _watch_rollout(key, v, quiet, uploaded["rollout"])
    if quiet:
        print_json({"version": built, "rollout": rollout})
    _report(rollout)


def _checks_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        fail(f"cannot read --checks {path}: {e.strerror}", USAGE)
    except ValueError as e:
        fail(f"--checks {path} is not JSON: {e}", USAGE)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        fail(f"'{text}' is not a duration like 30s, 5m or 1h", USAGE)


def _report(rollout: Any, wanted: tuple[str, ...] = ("complete", "promoted")) -> None:
    """Say how a rollout ended (or where a canary stands) and exit non-zero if it did not end
    as `wanted` (an abort asked for ends it aborted: that is success)."""
    state_, v = rollout["state"], rollout["to_version"]
    if state_ in ("progressing", "paused") and rollout["strategy"] == "canary":
        if not state.json:
            out.print(
                f"canary {v} takes {rollout['weight']:g}% of new sessions; "
                "follow with `vf agent canary status`"
            )
        return
    if state_ not in wanted:
        fail(f"rollout of {v} {state_}: {rollout['reason']}", FAILED)
    if not state.json:
        if rollout["strategy"] == "rolling":  # its reason is what started it: deploy, rollback
            out.print(f"{rollout['reason']} to {v}: {state_}")
        else:
            out.print(rollout["reason"])


STEPS = {
    "rolling": ["start", "wait", "shift", "drain", "done"],
    "bluegreen": ["start", "wait", "smoke", "shift", "drain", "done"],
    "canary": ["start", "wait", "step", "promote", "done"],
}
STEP_TEXT = {
    "start": "starting instances",
    "wait": "waiting for instances to register",
    "smoke": "smoke-testing green",
    "shift": "routing new sessions",
    "step": "canary taking its share",
    "promote": "promoting",
    "drain": "draining old instances",
    "done": "done",
}


def _watch_rollout(
    key: str, version: str, quiet: bool, rollout_id: str, to_end: bool = False
) -> Any:
    """Follow rollout `rollout_id` of `version` until it ends (or a canary holds a step). An
    upload's rollout exists once its version is built: until then, or if it was refused, the
    version says why."""
    client = state.client
    deadline = time.monotonic() + 600
    with Progress(
        TextColumn("rollout {task.description}"), BarColumn(), TextColumn("{task.fields[step]}"),
        console=Console(stderr=True), disable=quiet,
    ) as progress:  # fmt: skip
        task = progress.add_task(version, total=len(STEPS) - 1, step="")
        while True:
            rollout = client.get_if_found(f"/agents/{key}/rollouts/{rollout_id}")
            if rollout is None:  # built but refused, e.g. another rollout began meanwhile
                versions = client.request("GET", f"/agents/{key}/versions")
                error = next((v["error"] for v in versions if v["version"] == version), "")
                if error:
                    fail(
                        f"{version} {error}; roll it out later with "
                        f"`vf agent deploy --version {version}`",
                        FAILED,
                    )
            if rollout is not None:
                steps = STEPS.get(rollout["strategy"], STEPS["rolling"])
                step = (rollout["step"] or "start").split(":")[0]
                progress.update(
                    task, total=len(steps) - 1, completed=steps.index(step), step=STEP_TEXT[step]
                )
                if rollout["state"] != "progressing":
                    return rollout
                if step == "step" and not to_end:
                    return rollout  # a canary runs for minutes or hours: report where it is
            if time.monotonic() > deadline:
                fail(f"rollout of {version} still in progress after 10 minutes", FAILED)
            time.sleep(0.25)


@app.command()
def status(agent: AgentOpt = None) -> None:
    """Deployments, instances (with their live sessions) and recent rollouts."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}")
    if state.json:
        print_json(data)
        return
    a = data["agent"]
    out.print(f"[bold]{a['name']}[/bold] ({a['id']}), grace period {a['grace_period']:g}s")
    for d in data["deployments"]:
        routing = ", ".join(f"{v} {w:g}%" for v, w in d.get("routing", {}).items())
        out.print(
            f"  {d['name']}: {d['version'] or '(nothing deployed)'}, {d['replicas']} replica(s)"
            + (f"; new sessions: {routing}" if routing else "")
        )
        if d.get("decision"):
            dec = d["decision"]
            out.print(f"    autoscaler: {dec['desired']} instance(s) because {dec['reason']}")
        for what in ("draining", "retiring"):
            for v, n in d.get(what, {}).items():
                out.print(
                    f"    {what} {v}: {n['sessions']} active session(s) "
                    f"on {n['instances']} instance(s)"
                    + (" (kept warm for a rollback)" if what == "retiring" else "")
                )
    recent = data.get("sessions", {})
    if recent.get("by_version"):
        out.print(f"sessions in the last {recent['since_seconds'] / 60:g} min, by version:")
        for v, s in sorted(recent["by_version"].items()):
            last = s["last_failure"]
            out.print(
                f"  {v or '(unversioned)'}: {s['failed']} of {s['ended']} failed"
                + (f"; last {ago(last['ended_at'])} ({last['job_id']}): " if last else "")
                + (_one_line(last["error"]) if last else ""),
                markup=False,  # an exception's text is no markup: "[i]" must stay as it is
                highlight=False,
                overflow="fold",
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
        print_json(data)
        return
    t = Table(title="versions")
    images = any(v.get("image") for v in data)  # the Kubernetes runtime's versions
    columns = ("version", "status", "serving", "created", "source")
    for col in (*columns, "image" if images else "dependencies"):
        t.add_column(col, overflow="fold")
    for v in data:
        last = _short_image(v.get("image", "")) if images else v["dependency_digest"][:12]
        t.add_row(v["version"], v["status"], v["deployment"], ago(v["created_at"]),
                  v["source_digest"][:12], last)  # fmt: skip
    out.print(t)
    for v in data:
        if v["error"]:
            out.print(f"{v['version']}: {_one_line(v['error'])}", highlight=False, overflow="fold")
    if any(v["error"] for v in data):
        out.print("[dim](the whole of each: vf agent versions --json)[/dim]")


def _short_image(ref: str) -> str:
    """An image reference with its digest cut to 12 hex digits (the whole: --json)."""
    name, at, digest = ref.partition("@sha256:")
    return f"{name}{at}{digest[:12]}" if at else ref


def _one_line(error: str) -> str:
    """A version's error in a table cell: the tool's own `error:` line when it has one (a
    failed build's error ends with the build's last output lines)."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("error:")), lines[0] if lines else "")


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


def _finish(
    key: str,
    started: Any,
    to_end: bool = False,
    wanted: tuple[str, ...] = ("complete", "promoted"),
) -> None:
    rollout = _watch_rollout(key, started["to_version"], state.json, started["id"], to_end)
    if state.json:
        print_json(rollout)
    _report(rollout, wanted)


canary_app = typer.Typer(help="Watch and steer a running canary.", no_args_is_help=True)
app.add_typer(canary_app, name="canary")


@canary_app.command("status")
def canary_status(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """The canary's share, step and its comparison with stable over the current step."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}")
    canaries = [
        r for r in data["rollouts"] if r["strategy"] == "canary" and r["deployment"] == deployment
    ]
    if state.json:
        print_json(canaries[0] if canaries else None)
        return
    if not canaries:
        fail(f"no canary on {deployment}", NOT_FOUND)
    r = canaries[0]
    out.print(
        f"canary {r['to_version']} vs stable {r['from_version']}: {r['state']} at "
        f"{r['weight']:g}% ({r['step']}); steps {r['plan'].get('steps')}, "
        f"interval {r['plan'].get('interval', 0):g}s"
    )
    if r.get("analysis"):
        t = Table(title="this step so far")
        for col in ("version", "ended", "failed", "failure rate", "started", "start p50 (s)"):
            t.add_column(col)
        for role, version in (("canary", r["to_version"]), ("stable", r["from_version"])):
            w = r["analysis"][role]
            t.add_row(
                f"{version} ({role})", str(w["ended"]), str(w["failed"]),
                f"{w['failure_rate']:.1%}", str(w["started"]), f"{w['start_delay_p50']:.2f}",
            )  # fmt: skip
        out.print(t)
    if r["reason"] and r["state"] not in ("progressing", "paused"):
        out.print(r["reason"])
    for o in data.get("overflow", []):
        out.print(
            f"overflow: {o['sessions']} session(s) routed to {o['routed']} served by {o['served']}"
        )


def _canary(command: str, agent: str | None, deployment: str) -> None:
    key = _agent(agent)
    data = state.client.request(
        "POST", f"/agents/{key}/canary/{command}", params={"deployment": deployment}
    )
    if command == "promote":
        _finish(key, data, to_end=True)
    elif command == "abort":
        _finish(key, data, to_end=True, wanted=("aborted",))
    elif state.json:
        print_json(data)
    else:
        out.print(f"canary {data['to_version']}: {command} requested")


@canary_app.command("pause")
def canary_pause(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """Hold the canary at its current share (analysis and automatic abort go on)."""
    _canary("pause", agent, deployment)


@canary_app.command("resume")
def canary_resume(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """Carry on with the steps."""
    _canary("resume", agent, deployment)


@canary_app.command("promote")
def canary_promote(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """Make the canary the serving version now (the old one drains)."""
    _canary("promote", agent, deployment)


@canary_app.command("abort")
def canary_abort(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """All new sessions back to stable; the canary's instances drain."""
    _canary("abort", agent, deployment)


@app.command()
def scale(
    replicas: Annotated[
        int | None,
        typer.Argument(min=0, max=100, help="A fixed number of instances (autoscaling off)."),
    ] = None,
    agent: AgentOpt = None,
    deployment: Deployment = "production",
    min_: Annotated[int | None, typer.Option("--min", help="Autoscale: fewest instances.")] = None,
    max_: Annotated[int | None, typer.Option("--max", help="Autoscale: most instances.")] = None,
    scale_up_load: Annotated[
        float | None, typer.Option(help="Autoscale: target load per instance (default 0.5).")
    ] = None,
    load_threshold: Annotated[
        float | None, typer.Option(help="The load at which workers turn FULL (default 0.75).")
    ] = None,
    up_window: Annotated[
        str | None, typer.Option(help="Stabilization going up (default 15s).")
    ] = None,
    down_window: Annotated[
        str | None, typer.Option(help="Stabilization going down (default 300s).")
    ] = None,
    sessions_per_instance: Annotated[
        int | None, typer.Option(help="Hint: sessions one instance serves comfortably.")
    ] = None,
    idle_to_zero: Annotated[
        str | None, typer.Option(help="Scale to zero after this long without a session.")
    ] = None,
    warm: Annotated[
        int | None, typer.Option(help="Spare instances kept warm on top of the load's need.")
    ] = None,
) -> None:
    """Set a fixed number of instances, or an autoscaling policy (any policy option turns
    autoscaling on; `vf agent scale N` turns it off). Scaling down drains idle instances first
    and never cuts a session."""
    durations = {
        "up_window": up_window,
        "down_window": down_window,
        "idle_to_zero": idle_to_zero,
    }
    policy: dict[str, Any] = {
        k: v
        for k, v in {
            "min_instances": min_,
            "max_instances": max_,
            "scale_up_load": scale_up_load,
            "load_threshold": load_threshold,
            "sessions_per_instance": sessions_per_instance,
            "warm": warm,
            **{k: _duration(v) for k, v in durations.items() if v is not None},
        }.items()
        if v is not None
    }
    if replicas is not None and policy:
        fail("give either a number of instances or autoscaling options, not both", USAGE)
    if replicas is None and not policy:
        fail("give a number of instances or autoscaling options (--min, --max, ...)", USAGE)
    body: dict[str, Any] = {"deployment": deployment}
    if policy:
        body["autoscale"] = policy
    else:
        body["replicas"] = replicas
    data = state.client.request("POST", f"/agents/{_agent(agent)}/scale", json=body)
    if state.json:
        print_json(data)
    elif data["autoscale"]:
        a = data["autoscale"]
        out.print(
            f"{data['deployment']}: autoscaling {a['min_instances']}-{a['max_instances']} "
            f"instance(s) at load {a['scale_up_load']:g} (workers full at "
            f"{a['load_threshold']:g}); up after {a['up_window']:g}s, down after "
            f"{a['down_window']:g}s"
            + (
                f", to zero after {a['idle_to_zero']:g}s idle"
                if a["idle_to_zero"] is not None
                else ""
            )
            + (f", {a['warm']} warm" if a["warm"] else "")
        )
    else:
        out.print(f"{data['deployment']}: {data['replicas']} instance(s)")


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
    out.print(f"deleted {key}") if not state.json else print_json({"deleted": key})


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
    print_json(data) if state.json else out.print(f"set {', '.join(data['set'])}")


@secrets_app.command("list")
def secrets_list(agent: AgentOpt = None) -> None:
    """Secret names and when they changed (never their values)."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}/secrets")
    if state.json:
        print_json(data)
        return
    t = Table(title="secrets")
    t.add_column("name")
    t.add_column("updated")
    for s in data:
        t.add_row(s["name"], ago(s["updated_at"]))
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
    print_json(data) if state.json else out.print(f"removed {data['removed']}")
