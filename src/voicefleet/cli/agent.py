"""`vf agent …`: create, deploy, watch and roll back agents on a voicefleet server."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
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
    JsonAnywhere,
    Key,
    Secret,
    Url,
    ago,
    configure,
    err,
    fail,
    print_json,
    state,
)
from voicefleet.cli.secrets_input import BadSecrets, SecretsInput, gather
from voicefleet.errors import BuildFailed, VoicefleetError

app = typer.Typer(
    cls=JsonAnywhere,
    help="Manage agents: create, deploy and operate them on a voicefleet server (the verbs of "
    "`lk agent`; see docs/cli.md).",
    no_args_is_help=True,
)
out = Console()


AgentOpt = Annotated[
    str | None, typer.Option("--id", help="Agent id or name (default: livekit.toml here).")
]
Deployment = Annotated[str, typer.Option("--deployment", "-d", help="Named deployment.")]
# Secrets as `lk agent create|deploy|update-secrets` take them (voicefleet.cli.secrets_input).
SecretsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--secrets",
        help="KEY=VALUE secrets, injected as environment variables (repeatable, or "
        "comma-separated: A=1,B=2). These take precedence over --secrets-file.",
    ),
]
SecretsFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--secrets-file",
        help="FILE of KEY=VALUE secrets, one per line (.env syntax), injected as environment "
        "variables. A line that is not KEY=VALUE stores nothing.",
    ),
]
SecretMountOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--secret-mount",
        help="Local path to a secret file, delivered to each instance as a file of that name "
        "in $VOICEFLEET_SECRETS_DIR (repeatable; 1 MiB at most).",
    ),
]
IgnoreEmptyOpt = Annotated[
    bool,
    typer.Option(
        "--ignore-empty-secrets",
        help="Skip variables with empty values in --secrets-file instead of failing.",
    ),
]


@app.callback()
def _options(
    url: Url = None,
    api_key: Key = None,
    api_secret: Secret = None,
    as_json: Json = False,
) -> None:
    configure(url, api_key, api_secret, as_json)


def _quietly(into: dict[str, Any], key: str, step: Callable[[], None]) -> None:
    """Run a verb whose JSON goes into `into[key]`; if it fails, what was done is printed
    before its error ends the command."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            step()
    except BaseException:
        into[key] = json.loads(captured.getvalue() or "null")
        print_json(into)
        raise
    into[key] = json.loads(captured.getvalue() or "null")


def _agent_of(folder: Path) -> str:
    made = livekit_toml.read(folder)
    assert made is not None  # `create` wrote it
    return made.agent_id


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


def _gather(
    pairs: list[str] | None,
    secrets_file: Path | None,
    mounts: list[Path] | None,
    ignore_empty: bool,
    allow_empty: bool = False,
) -> SecretsInput:
    """The secrets given, read and checked before anything is sent (else a usage error)."""
    try:
        given = gather(pairs, secrets_file, mounts, ignore_empty, allow_empty)
    except BadSecrets as e:
        fail(str(e), USAGE)
    if given.skipped:
        err.print(
            f"skipped {', '.join(given.skipped)} (voicefleet sets LIVEKIT_* for each instance; "
            "empty values skipped with --ignore-empty-secrets)",
            highlight=False,
        )
    return given


def _store_secrets(key: str, given: SecretsInput, overwrite: bool = False) -> Any:
    return state.client.request(
        "PUT", f"/agents/{key}/secrets", json=given.body(overwrite=overwrite)
    )


@app.command()
def create(
    name: Annotated[str | None, typer.Option(help="Agent name (default: the folder's).")] = None,
    grace_period: Annotated[float, typer.Option(help="Drain grace period, seconds.")] = 3600,
    folder: Annotated[Path, typer.Argument(help="The agent's folder.")] = Path("."),
    secrets: SecretsOpt = None,
    secrets_file: SecretsFileOpt = None,
    secret_mount: SecretMountOpt = None,
    ignore_empty_secrets: IgnoreEmptyOpt = False,
) -> None:
    """Create a new agent.

    Registers the agent in FOLDER, writes livekit.toml (and a Dockerfile if there is none) and
    stores the secrets given; `vf agent deploy` then deploys it."""
    given = _gather(secrets, secrets_file, secret_mount, ignore_empty_secrets)
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
            err.print(f"[yellow]no Dockerfile written:[/yellow] {e}")
    stored = _store_secrets(agent["id"], given)["set"] if given else []
    if state.json:
        print_json({**agent, "secrets": stored})
    else:
        out.print(f"Created agent [bold]{name}[/bold] ({agent['id']}); wrote {', '.join(wrote)}")
        if stored:
            out.print(f"set secrets {', '.join(stored)}")


@app.command()
def init(
    name: Annotated[
        str, typer.Argument(help="The agent's name; its folder is made here under that name.")
    ] = "my-agent",
    lang: Annotated[str, typer.Option(help='Language of the project: "python" or "node".')] = (
        "python"
    ),
    deploy_it: Annotated[
        bool, typer.Option("--deploy", help="Then create the agent on the server and deploy it.")
    ] = False,
) -> None:
    """Initialize a new agent project.

    From voicefleet's example agent (Python or Node.js), ready to deploy as it is."""
    from voicefleet.cli.examples import TEMPLATES, NoExample, example

    if lang not in TEMPLATES:
        fail(f"unsupported language: {lang} (python or node)", USAGE)
    folder = Path.cwd() / name
    if folder.exists():
        fail(f"{folder} already exists: choose another name, or remove it", USAGE)
    try:
        template = example(TEMPLATES[lang])
    except NoExample as e:
        fail(str(e), FAILED)
    skip = ("livekit.toml", "Dockerfile", "node_modules", "dist", "__pycache__", ".venv")
    shutil.copytree(template, folder, ignore=shutil.ignore_patterns(*skip))
    if lang == "node":  # the package takes the agent's name
        manifest = json.loads((folder / "package.json").read_text())
        manifest["name"] = name
        (folder / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        lock = json.loads((folder / "package-lock.json").read_text())
        lock["name"] = name
        lock.get("packages", {}).get("", {})["name"] = name
        (folder / "package-lock.json").write_text(json.dumps(lock, indent=2) + "\n")
    if not state.json:
        out.print(f"Made [bold]{name}[/bold] ({lang}) from the example agent in {folder}")
    if deploy_it and state.json:  # one JSON document: the project, the agent, its deploy
        made_json: dict[str, Any] = {"name": name, "lang": lang, "folder": str(folder)}
        _quietly(made_json, "agent", lambda: create(name=name, folder=folder))
        _quietly(made_json, "deploy", lambda: deploy(agent=_agent_of(folder), folder=folder))
        print_json(made_json)
    elif deploy_it:
        create(name=name, folder=folder)
        deploy(agent=_agent_of(folder), folder=folder)
    elif state.json:
        print_json({"name": name, "lang": lang, "folder": str(folder)})
    else:
        out.print(f"Next: cd {name} && vf agent create && vf agent deploy")


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
    force: Annotated[
        bool, typer.Option("--force", "--overwrite", help="Replace the folder's Dockerfile.")
    ] = False,
) -> None:
    """Generate Dockerfile and .dockerignore for your project.

    The Dockerfile voicefleet builds: multi-stage, dependencies in a cached layer before the
    code, the agent's download-files step in its own layer, bytecode compiled, a non-root
    user; Node.js (npm ci, the build script) when the folder has package.json and a lockfile,
    Python otherwise."""

    folder = folder.resolve()
    if not folder.is_dir():
        fail(f"{folder} is not a folder", USAGE)
    try:
        recipe = render(folder, base=base, entry=entry)
    except VoicefleetError as e:
        fail(str(e), USAGE)
    if print_only:
        if state.json:
            print_json({"kind": recipe.kind, "entry": recipe.entry, "text": recipe.text})
        else:
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
    """Show or change an agent's settings.

    Its drain grace period (livekit.toml is written by `vf agent create`)."""
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
    secrets: SecretsOpt = None,
    secrets_file: SecretsFileOpt = None,
    secret_mount: SecretMountOpt = None,
    ignore_empty_secrets: IgnoreEmptyOpt = False,
) -> None:
    """Deploy a new version of the agent.

    Uploads FOLDER, builds it, and rolls it out without dropping a session. Secrets given
    (--secrets, --secrets-file, --secret-mount) are stored first, merged into the agent's, so
    that the new version's instances start with them.

    On a server with the Kubernetes runtime the build is an image (buildah), pushed to the
    server's --registry; --image REF deploys a prebuilt image instead.

    Rolling by default; --canary 10 or --steps 10,25,50,100 --interval 5m for a canary that is
    compared with stable and aborted automatically when worse; --strategy bluegreen for green
    beside blue, smoke-tested, then switched."""
    key = _agent(agent)
    client = state.client
    quiet = state.json
    given = _gather(secrets, secrets_file, secret_mount, ignore_empty_secrets)
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
    if given:  # before the version exists: its instances start with them
        stored = _store_secrets(key, given)["set"]
        if not quiet:
            out.print(f"set secrets {', '.join(stored)}")
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


@app.command("list")
def list_agents(
    ids: Annotated[
        list[str] | None,
        typer.Option("--id", help="IDs (or names) of agent(s): repeatable, or comma-separated."),
    ] = None,
) -> None:
    """List all agents.

    Each one's deployments with the version they serve, their instances and live sessions."""
    wanted = [i for given in ids or [] for i in given.split(",") if i]
    data = state.client.request("GET", "/agents", params={"id": wanted} if wanted else None)
    if state.json:
        print_json(data)
        return
    if not data:
        out.print("No agents found")
        return
    t = Table(title="agents")
    for col in ("id", "name", "deployments", "instances", "sessions"):
        t.add_column(col)
    for a in data:
        serving = ", ".join(
            f"{d['deployment']}: {d['version'] or '(nothing deployed)'}" for d in a["serving"]
        )
        t.add_row(a["id"], a["name"], serving, str(a["instances"]), str(a["sessions"]))
    out.print(t)


@app.command()
def status(agent: AgentOpt = None) -> None:
    """Get the status of an agent.

    Deployments, instances (with their live sessions) and recent rollouts."""
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
    """List versions of an agent.

    Newest first, and which deployment serves each."""
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


LogType = Annotated[
    str,
    typer.Option(
        "--log-type",
        help="Type of logs to retrieve: 'deploy' (the instances' output) or 'build' (a "
        "version's build log, kept after the build).",
    ),
]


@app.command()
def logs(
    agent: AgentOpt = None,
    log_type: LogType = "deploy",
    deployment: Annotated[
        str | None,
        typer.Option("--deployment", "-d", help="Deploy logs of this deployment's instances."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Build logs of this version (default: the newest)."),
    ] = None,
    instance: Annotated[str | None, typer.Option(help="One instance's logs.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
) -> None:
    """Tail logs from agent (alias: tail).

    Its instances' output (--log-type deploy), or a version's build log (--log-type build).
    With --json: {"log_type", "version", "lines": [...]}; with --follow, one {"line": ...} per
    line as it comes (JSON Lines)."""
    key = _agent(agent)
    params: dict[str, Any] = {"follow": str(follow).lower()}
    if log_type == "build":
        if instance or deployment:
            fail("--instance and --deployment are for --log-type deploy", USAGE)
        if version is None:
            known = state.client.request("GET", f"/agents/{key}/versions")
            if not known:
                fail(f"agent {key} has no version yet: nothing was built", NOT_FOUND)
            version = known[0]["version"]  # newest first
        path = f"/agents/{key}/versions/{version}/log"
    elif log_type == "deploy":
        if version is not None:
            fail("--version is for --log-type build", USAGE)
        if instance:
            params["instance"] = instance
        if deployment:
            params["deployment"] = deployment
        path = f"/agents/{key}/logs"
    else:
        fail(f"unknown --log-type '{log_type}' (deploy or build)", USAGE)
    lines: list[str] = []
    try:
        for line in state.client.lines(path, **params):
            if not state.json:
                print(line, flush=follow)
            elif follow:
                print(json.dumps({"line": line}), flush=True)
            else:
                lines.append(line)
    except KeyboardInterrupt:
        pass
    if state.json and not follow:
        print_json({"log_type": log_type, "version": version, "lines": lines})


app.command("tail", hidden=True, help="Tail logs from agent (alias of `vf agent logs`).")(logs)


@app.command()
def rollback(
    agent: AgentOpt = None,
    deployment: Deployment = "production",
    version: Annotated[
        str | None, typer.Option(help="Version (default: the previous one).")
    ] = None,
) -> None:
    """Rollback an agent to a previous version.

    The previous one, or --version: from the stored build, no rebuild."""
    key = _agent(agent)
    started = state.client.request(
        "POST", f"/agents/{key}/rollback", json={"deployment": deployment, "version": version}
    )
    _finish(key, started)


@app.command()
def restart(agent: AgentOpt = None, deployment: Deployment = "production") -> None:
    """Restart an agent.

    New instances of the serving version; the old ones drain."""
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
    """Promote an agent to a new deployment.

    Rolls the version serving --from out to --to."""
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
    """Set the number of instances, or autoscale.

    A fixed number of instances, or an autoscaling policy (any policy option turns
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
    """Delete an agent (alias: destroy).

    Its instances drain (their sessions finish), then it is gone."""
    key = _agent(agent)
    if not yes and state.json:
        fail("--json asks nothing: add --yes to delete", USAGE)
    if not yes and not typer.confirm(f"Delete agent {key} and drain its instances?"):
        raise typer.Exit(FAILED)
    state.client.request("DELETE", f"/agents/{key}")
    out.print(f"deleted {key}") if not state.json else print_json({"deleted": key})


app.command("destroy", hidden=True, help="Delete an agent (alias of `vf agent delete`).")(delete)


@app.command("update-secrets")
def update_secrets(
    secrets: SecretsOpt = None,
    secrets_file: SecretsFileOpt = None,
    secret_mount: SecretMountOpt = None,
    ignore_empty_secrets: IgnoreEmptyOpt = False,
    agent: AgentOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace all of the agent's secrets with these (else merged)."
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (--overwrite).")] = False,
) -> None:
    """Update secrets for an agent.

    Merged into its secrets, or all replaced (--overwrite). Instances started from now on get
    them; `vf agent restart` renews the running ones."""
    given = _gather(secrets, secrets_file, secret_mount, ignore_empty_secrets)
    if not given:
        fail("no secrets given (--secrets, --secrets-file or --secret-mount)", USAGE)
    key = _agent(agent)
    if overwrite and not yes:
        if state.json:
            fail("--json asks nothing: add --yes to replace every secret", USAGE)
        if not typer.confirm(f"This removes every other secret of agent {key}. Go on?"):
            raise typer.Exit(FAILED)
    data = _store_secrets(key, given, overwrite=overwrite)
    if state.json:
        print_json(data)
    else:
        what = "replaced the agent's secrets with" if overwrite else "updated secrets"
        out.print(f"{what} {', '.join(data['set'])}; new instances get them")


@app.command()
def update(
    secrets: SecretsOpt = None,
    secrets_file: SecretsFileOpt = None,
    secret_mount: SecretMountOpt = None,
    ignore_empty_secrets: IgnoreEmptyOpt = False,
    agent: AgentOpt = None,
) -> None:
    """Update an agent's secrets and restart it.

    `update-secrets` (merged), then a restart of each deployment that serves a version, so that
    every instance runs with them; no session is cut (the old instances drain)."""
    given = _gather(secrets, secrets_file, secret_mount, ignore_empty_secrets)
    if not given:
        fail("no secrets given (--secrets, --secrets-file or --secret-mount)", USAGE)
    key = _agent(agent)
    stored = _store_secrets(key, given)["set"]
    if not state.json:
        out.print(f"updated secrets {', '.join(stored)}")
    rollouts = []
    for d in state.client.request("GET", f"/agents/{key}")["deployments"]:
        if d["version"]:
            started = state.client.request(
                "POST", f"/agents/{key}/restart", params={"deployment": d["name"]}
            )
            rollouts.append(_watch_rollout(key, started["to_version"], state.json, started["id"]))
    if state.json:
        print_json({"set": stored, "rollouts": rollouts})
    for rollout in rollouts:
        _report(rollout)


secrets_app = typer.Typer(
    help="List secrets for an agent; set and unset them.",
    invoke_without_command=True,
)
app.add_typer(secrets_app, name="secrets")


@secrets_app.callback()
def _secrets(ctx: typer.Context, agent: AgentOpt = None) -> None:
    if ctx.invoked_subcommand is None:  # `vf agent secrets`, as `lk agent secrets`: the list
        secrets_list(agent)


@secrets_app.command("set")
def secrets_set(
    pairs: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE …")] = None,
    secrets_file: Annotated[Path | None, typer.Option(help="A .env file of secrets.")] = None,
    agent: AgentOpt = None,
) -> None:
    """Set secrets (values are never printed back). New instances see them."""
    given = _gather(pairs, secrets_file, None, ignore_empty=False, allow_empty=True)
    if not given:
        fail("no secrets given (NAME=VALUE or --secrets-file)", USAGE)
    data = _store_secrets(_agent(agent), given)
    print_json(data) if state.json else out.print(f"set {', '.join(data['set'])}")


@secrets_app.command("list")
def secrets_list(agent: AgentOpt = None) -> None:
    """Secret names, kinds (env or file) and when they changed (never their values)."""
    data = state.client.request("GET", f"/agents/{_agent(agent)}/secrets")
    if state.json:
        print_json(data)
        return
    t = Table(title="secrets")
    t.add_column("name")
    t.add_column("kind")
    t.add_column("updated")
    for s in data:
        kind = "file" if s.get("kind") == "file" else "env"
        t.add_row(s["name"], kind, ago(s["updated_at"]))
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
