"""`vf agent` as `lk agent` users know it: list, logs --log-type build|deploy (tail),
update-secrets (--overwrite), deploy --secrets-file/--secret-mount in one step, file secrets in
the running instance, --json on every verb.

One real `vf server` and one agent (tests/agents/deployable, built and run by the server's local
runtime) are shared by the module: v1 is deployed with its secrets in one step, v2 after it. The
CLI runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import ROOT, Server
from tests.test_deploy import AGENT_SRC, SECRET, api_get, vf_env

# The module's first test waits for the shared agent: two builds (the first one fills the env
# cache) and two rollouts on a shared machine.
pytestmark = pytest.mark.timeout(600)
T = TypeVar("T")
CREDENTIALS = '{"type": "service_account", "private_key": "-----BEGIN KEY-----"}\n'


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def run(server: Server, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", *args],
        cwd=folder,
        env=vf_env(server),
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(server: Server, folder: Path, *args: str) -> str:
    result = run(server, folder, *args)
    assert result.returncode == 0, f"vf agent {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def as_json(server: Server, folder: Path, *args: str) -> Any:
    """The verb's stdout parsed as JSON, with --json after the verb (as `lk agent … --json`)."""
    return json.loads(ok(server, folder, *args, "--json"))


def refused(server: Server, folder: Path, *args: str, code: int) -> dict[str, Any]:
    """The verb fails with `code` and says why as one JSON line on stderr."""
    result = run(server, folder, "--json", *args)
    assert result.returncode == code, f"{args}: {result.returncode}\n{result.stderr}"
    assert result.stdout == ""
    error: dict[str, Any] = json.loads(result.stderr.strip().splitlines()[-1])
    assert error["exit_code"] == code
    return error


def boot(markers: Path, instance: str) -> dict[str, Any] | None:
    path = markers / f"boot-{instance}.json"
    return json.loads(path.read_text()) if path.exists() else None


def serving_instances(server: Server) -> list[str]:
    status = api_get(server, "/agents/my-agent")
    return [i["id"] for i in status["instances"] if i["status"] in ("ready", "starting")]


@dataclass
class Deployed:
    server: Server
    folder: Path
    markers: Path
    deploy_v1: str  # what `vf agent deploy` printed for v1
    deploy_v2: str


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """my-agent: v1 deployed with --secrets-file and --secret-mount in one step, then v2."""
    base = tmp_path_factory.mktemp("parity")
    server = Server(base / "server", "--keep-warm", "1").start()
    try:
        folder = base / "my-agent"
        shutil.copytree(AGENT_SRC, folder)
        (folder / "VERSION").write_text("one")
        markers = base / "markers"
        markers.mkdir()
        env_file = base / "prod.env"
        env_file.write_text(
            f"# secrets of my-agent\nMARKER_DIR={markers}\nVF_TEST_SECRET={SECRET}\n"
            "LIVEKIT_URL=ws://elsewhere\n"  # voicefleet sets it: skipped, as lk does
        )
        mounted = base / "google-credentials.json"
        mounted.write_text(CREDENTIALS)
        ok(server, folder, "create")
        v1 = ok(
            server, folder, "deploy", "--secrets-file", str(env_file),
            "--secret-mount", str(mounted),
        )  # fmt: skip
        (folder / "VERSION").write_text("two")
        v2 = ok(server, folder, "deploy")
        yield Deployed(server, folder, markers, v1, v2)
    finally:
        server.stop()


def test_deploy_stores_secrets_first_and_the_instance_sees_them_and_its_file(
    deployed: Deployed,
) -> None:
    server, markers = deployed.server, deployed.markers
    assert "set secrets MARKER_DIR, VF_TEST_SECRET, google-credentials.json" in deployed.deploy_v1
    secrets = {s["name"]: s["kind"] for s in as_json(server, deployed.folder, "secrets", "list")}
    assert secrets == {
        "MARKER_DIR": "env",
        "VF_TEST_SECRET": "env",
        "google-credentials.json": "file",
    }
    (instance,) = serving_instances(server)
    seen = wait_until(lambda: boot(markers, instance), 60, "the instance's boot marker")
    assert seen["secret"] == SECRET  # from --secrets-file, in the environment
    assert seen["files"] == {"google-credentials.json": {"content": CREDENTIALS, "mode": 0o600}}
    folder = Path(seen["secrets_dir"])
    assert folder == server.data_dir / "secrets" / instance
    assert folder.stat().st_mode & 0o777 == 0o700  # the instance's own, nobody else's
    assert (folder / "google-credentials.json").stat().st_mode & 0o777 == 0o600
    # The value is stored encrypted: not in the database file.
    for db in server.data_dir.glob("*.db"):
        assert b"BEGIN KEY" not in db.read_bytes()


def test_the_secret_file_is_gone_once_its_instance_stops(deployed: Deployed) -> None:
    server, markers = deployed.server, deployed.markers
    (old,) = serving_instances(server)
    seen = wait_until(lambda: boot(markers, old), 60, "the instance's boot marker")
    old_dir = Path(seen["secrets_dir"])
    assert old_dir.exists()
    rollout = as_json(server, deployed.folder, "restart")
    assert rollout["state"] == "complete"
    (new,) = serving_instances(server)
    assert new != old
    fresh = wait_until(lambda: boot(markers, new), 60, "the new instance's boot marker")
    assert fresh["files"]["google-credentials.json"]["content"] == CREDENTIALS
    wait_until(lambda: not old_dir.exists(), 60, f"{old_dir} removed after {old} stopped")
    assert Path(fresh["secrets_dir"]).exists()


def test_update_stores_secrets_and_restarts_so_the_instance_has_them(
    deployed: Deployed, tmp_path: Path
) -> None:
    server, markers = deployed.server, deployed.markers
    (old,) = serving_instances(server)
    extra = tmp_path / "extra.txt"
    extra.write_text("second file")
    done = as_json(server, deployed.folder, "update", "--secret-mount", str(extra))
    assert done["set"] == ["extra.txt"]
    assert [(r["state"], r["deployment"]) for r in done["rollouts"]] == [("complete", "production")]
    (new,) = serving_instances(server)
    assert new != old
    seen = wait_until(lambda: boot(markers, new), 60, "the new instance's boot marker")
    assert {n: f["content"] for n, f in seen["files"].items()} == {
        "google-credentials.json": CREDENTIALS,
        "extra.txt": "second file",
    }
    ok(server, deployed.folder, "secrets", "unset", "extra.txt")


def test_list_shows_every_agent_with_its_versions_instances_and_sessions(
    deployed: Deployed, tmp_path: Path
) -> None:
    server = deployed.server
    listed = as_json(server, tmp_path, "list")
    mine = next(a for a in listed if a["name"] == "my-agent")
    assert mine["id"].startswith("CA_")
    assert mine["serving"] == [
        {"deployment": "production", "version": "v2", "instances": 1, "sessions": 0}
    ]
    assert mine["instances"] == 1 and mine["sessions"] == 0
    other = as_json(
        server, tmp_path, "create", "--name", "listed-too", str(_agent_folder(tmp_path))
    )
    both = as_json(server, tmp_path, "list", "--id", f"{mine['id']},listed-too")
    assert [a["name"] for a in both] == ["my-agent", "listed-too"]
    assert [a["name"] for a in as_json(server, tmp_path, "list", "--id", other["id"])] == [
        "listed-too"
    ]
    text = ok(server, tmp_path, "list")
    assert "my-agent" in text and "production: v2" in text and "listed-too" in text
    error = refused(server, tmp_path, "list", "--id", "no-such-agent", code=4)
    assert "no-such-agent" in error["error"]
    as_json(server, tmp_path, "delete", "--id", "listed-too", "--yes")


def _agent_folder(tmp_path: Path, name: str = "other") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "agent.py").write_text("# an agent folder; never built\n")
    return folder


def test_build_logs_of_the_newest_and_of_an_older_version(deployed: Deployed) -> None:
    server, folder = deployed.server, deployed.folder
    newest = ok(server, folder, "logs", "--log-type", "build")
    v1 = ok(server, folder, "logs", "--log-type", "build", "--version", "v1")
    assert "version v1 is ready" in v1 and "version v2 is ready" in newest

    def bare(text: str) -> str:  # the deploy's output is folded to the terminal's width
        return "".join(text.split())

    # After the fact, each is what its deploy showed while it built.
    assert bare(v1) in bare(deployed.deploy_v1)
    assert bare(newest) in bare(deployed.deploy_v2)
    data = as_json(server, folder, "logs", "--log-type", "build", "--version", "v1")
    assert data["log_type"] == "build" and data["version"] == "v1"
    assert "\n".join(data["lines"]).strip() == v1.strip()
    # Following a build that is over ends at once; with --json, one {"line": …} per line.
    followed = ok(server, folder, "logs", "--log-type", "build", "-f", "--json", "--version", "v1")
    assert [json.loads(x)["line"] for x in followed.splitlines()] == data["lines"]
    error = refused(server, folder, "logs", "--log-type", "build", "--version", "v9", code=4)
    assert "v9" in error["error"]
    refused(server, folder, "logs", "--log-type", "nonsense", code=2)


def test_tail_is_logs_and_deploy_logs_are_the_instances_output(deployed: Deployed) -> None:
    server, folder = deployed.server, deployed.folder
    logs = ok(server, folder, "logs")
    tail = ok(server, folder, "tail", "--log-type", "deploy")
    (instance,) = serving_instances(server)
    assert f"--- voicefleet: starting {instance}" in logs
    assert f"--- voicefleet: starting {instance}" in tail
    # Only the instances of a deployment: production has them all, staging none.
    assert ok(server, folder, "logs", "-d", "staging") == ""
    lines = as_json(server, folder, "tail")["lines"]
    assert any(line.startswith(f"--- voicefleet: starting {instance}") for line in lines)


def test_update_secrets_merges_and_overwrite_replaces_the_set(
    deployed: Deployed, tmp_path: Path
) -> None:
    server = deployed.server
    folder = _agent_folder(tmp_path)
    ok(server, folder, "create", "--name", "secretive", "--secrets", "KEEP=1")

    def names() -> dict[str, str]:
        return {s["name"]: s["kind"] for s in as_json(server, folder, "secrets", "list")}

    mounted = tmp_path / "token.txt"
    mounted.write_text("t0ken")
    out = as_json(
        server, folder, "update-secrets", "--secrets", "A=1,B=x,y", "--secret-mount", str(mounted)
    )
    assert out == {"set": ["A", "B", "token.txt"]}
    assert names() == {"A": "env", "B": "env", "KEEP": "env", "token.txt": "file"}
    text = ok(server, folder, "update-secrets", "--secrets", "C=3")
    assert "updated secrets C" in text
    assert set(names()) == {"A", "B", "C", "KEEP", "token.txt"}
    ok(server, folder, "update-secrets", "--overwrite", "--yes", "--secrets", "ONLY=1")
    assert names() == {"ONLY": "env"}
    # The old verbs go on working beside it; `vf agent secrets` alone lists, as lk's does.
    ok(server, folder, "secrets", "set", "SET=1")
    assert as_json(server, folder, "secrets", "unset", "ONLY") == {"removed": 1}
    assert [s["name"] for s in json.loads(ok(server, folder, "--json", "secrets"))] == ["SET"]
    # --overwrite asks first; --json asks nothing, so it needs --yes.
    refused(server, folder, "update-secrets", "--overwrite", "--secrets", "X=1", code=2)
    assert set(names()) == {"SET"}


def test_bad_secrets_input_is_refused_clearly_and_stores_nothing(
    deployed: Deployed, tmp_path: Path
) -> None:
    server, folder = deployed.server, deployed.folder
    before_secrets = as_json(server, folder, "secrets", "list")
    before_versions = as_json(server, folder, "versions")
    missing = tmp_path / "nope.json"
    error = refused(server, folder, "deploy", "--secret-mount", str(missing), code=2)
    assert error["error"] == f"--secret-mount {missing}: no such file"
    error = refused(server, folder, "update-secrets", "--secret-mount", str(tmp_path), code=2)
    assert "not a file" in error["error"]
    bad = tmp_path / "bad.env"
    bad.write_text(f"GOOD=1\nthis line is no secret {SECRET}\nALSO_GOOD=2\nNAME_ONLY\n")
    error = refused(server, folder, "update-secrets", "--secrets-file", str(bad), code=2)
    assert error["error"] == f"secrets file {bad}: lines 2, 4 not KEY=VALUE; nothing was stored"
    assert SECRET not in json.dumps(error)  # a bad line is named by number, never shown
    text = run(server, folder, "deploy", "--secrets-file", str(bad))
    assert text.returncode == 2 and "lines 2, 4 not KEY=VALUE" in text.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("SET=1\nEMPTY=\n")
    error = refused(server, folder, "update-secrets", "--secrets-file", str(empty), code=2)
    assert "EMPTY is empty" in error["error"] and "--ignore-empty-secrets" in error["error"]
    refused(server, folder, "update-secrets", "--secrets", "not a pair", code=2)
    refused(server, folder, "update-secrets", "--secrets-file", str(tmp_path / "none.env"), code=2)
    assert as_json(server, folder, "secrets", "list") == before_secrets
    assert as_json(server, folder, "versions") == before_versions
    # --ignore-empty-secrets skips the empty one, as lk does.
    skipped = run(
        server, folder, "update-secrets", "--secrets-file", str(empty), "--ignore-empty-secrets"
    )
    assert skipped.returncode == 0 and "skipped EMPTY" in skipped.stderr
    ok(server, folder, "secrets", "unset", "SET")


def test_every_verb_prints_json(deployed: Deployed, tmp_path: Path) -> None:
    """Each verb's --json output parses (the ones above aside), and says what the verb did."""
    server, folder = deployed.server, deployed.folder
    assert as_json(server, folder, "status")["agent"]["name"] == "my-agent"
    assert [v["version"] for v in as_json(server, folder, "versions")] == ["v2", "v1"]
    assert as_json(server, folder, "config")["name"] == "my-agent"
    assert as_json(server, folder, "canary", "status") is None
    assert as_json(server, folder, "scale", "1")["replicas"] == 1
    recipe = as_json(server, folder, "dockerfile", "--print")
    assert recipe["kind"] == "python" and "FROM " in recipe["text"]
    made = as_json(server, tmp_path, "init", "fresh-agent")
    assert made == {
        "name": "fresh-agent",
        "lang": "python",
        "folder": str(tmp_path / "fresh-agent"),
    }
    created = as_json(server, tmp_path / "fresh-agent", "create")
    assert created["name"] == "fresh-agent" and created["secrets"] == []
    assert as_json(server, tmp_path, "destroy", "--id", "fresh-agent", "--yes") == {
        "deleted": "fresh-agent"
    }


def test_json_before_or_after_the_verb_and_errors_as_json(
    deployed: Deployed, tmp_path: Path
) -> None:
    server = deployed.server
    assert json.loads(ok(server, tmp_path, "--json", "list")) == json.loads(
        ok(server, tmp_path, "list", "-j")
    )
    error = refused(server, tmp_path, "status", code=2)  # no livekit.toml here, no --id
    assert "livekit.toml" in error["error"]
    unreachable = subprocess.run(
        [sys.executable, "-m", "voicefleet", "agent", "--url", "http://127.0.0.1:9", "list", "-j"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert unreachable.returncode == 5
    assert json.loads(unreachable.stderr)["exit_code"] == 5
