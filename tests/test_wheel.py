"""voicefleet as a user installs it: the wheel built from this checkout, installed into a fresh
environment, run from a folder that is not a checkout. `vf demo` deploys the example agent the
wheel carries and serves sessions; `vf agent init` makes Python and Node.js projects from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

UV = Path(sys.executable).parent / "uv"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the wheel (and what it depends on): its bin."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [UV, "build", "--wheel", "--out-dir", work / "dist", ROOT],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("voicefleet-*.whl")
    subprocess.run([UV, "venv", "--quiet", work / "venv"], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(work / "venv")}
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--compile-bytecode", wheel], check=True, env=env
    )
    return work / "venv" / "bin"


def run_vf(
    bin: Path, cwd: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{bin}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [bin / "vf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_wheels_demo_deploys_its_example_and_serves_every_session(
    installed: Path, tmp_path: Path
) -> None:
    done = run_vf(
        installed, tmp_path, "demo", "--replicas", "1", "--sessions", "1", "--seconds", "1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # 1 session during the deploy, 2 after it: all on the example agent from the wheel.
    assert "3/3 sessions succeeded" in done.stdout, done.stdout
    assert not (tmp_path / "examples").exists()


def test_vf_agent_init_makes_python_and_node_projects_from_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    python = run_vf(installed, tmp_path, "agent", "init", "talker")
    assert python.returncode == 0, python.stderr
    made = tmp_path / "talker"
    assert (made / "agent.py").read_text().startswith('"""A voice agent')
    assert "livekit-agents==" in (made / "requirements.txt").read_text()
    assert not (made / "livekit.toml").exists()  # `vf agent create` writes it, for its server

    node = run_vf(installed, tmp_path, "agent", "init", "node-talker", "--lang", "node")
    assert node.returncode == 0, node.stderr
    package = json.loads((tmp_path / "node-talker" / "package.json").read_text())
    assert package["name"] == "node-talker"
    assert "@livekit/agents" in package["dependencies"]
    lock = json.loads((tmp_path / "node-talker" / "package-lock.json").read_text())
    assert lock["name"] == lock["packages"][""]["name"] == "node-talker"

    again = run_vf(installed, tmp_path, "agent", "init", "talker")
    assert again.returncode != 0 and "already exists" in again.stderr
    unknown = run_vf(installed, tmp_path, "agent", "init", "x", "--lang", "go")
    assert unknown.returncode != 0 and "unsupported language: go" in unknown.stderr
    assert not (tmp_path / "x").exists()
