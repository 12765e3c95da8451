"""Agent images: the Dockerfile recipes, the `vf agent dockerfile` verb, and real builds.

The builds are real: buildah (no daemon) builds examples/voice_agent from the local base image
that `scripts/base-image` makes with debootstrap (Debian bookworm + its Python 3.11; no registry
serves python:3.11-slim here), the dependencies from PyPI, and pushes it to a real registry
(Debian's docker-registry, the distribution registry) on 127.0.0.1. Skipped, saying why, when
buildah, debootstrap or docker-registry is missing (CI's `.ci/run` installs them). The base is
cached between runs (~/.cache/voicefleet-peers), and so are buildah's layers: only the first
run on a machine pays for the debootstrap (about a minute) and the dependency install.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests import images
from voicefleet.build.dockerfile import python_dockerfile, render
from voicefleet.build.image import ImageArtifact, ImageBuilder, host_ca_bundle, split_ref
from voicefleet.cli.main import app
from voicefleet.errors import BuildFailed

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "voice_agent"
OCI_MANIFEST, DOCKER_MANIFEST = images.OCI_MANIFEST, images.DOCKER_MANIFEST


# -- the recipes (no builder needed) ---------------------------------------------------------


def test_python_recipe_orders_layers_for_the_cache() -> None:
    recipe = render(EXAMPLE)
    text = recipe.text
    assert (recipe.kind, recipe.dependencies, recipe.entry) == (
        "python",
        "requirements.txt",
        "agent.py",
    )
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2  # multi-stage
    deps = text.index("COPY requirements.txt ./")
    install = text.index("uv pip install")
    venv = text.index("COPY --from=build /app/.venv")
    source = text.index("COPY . .")
    user = text.index("USER 10001:10001")
    download = text.index("RUN python agent.py download-files")
    assert deps < install < venv < source < user < download
    assert "UV_COMPILE_BYTECODE=1" in text and "compileall" in text
    assert text.rstrip().endswith('CMD ["python", "agent.py", "start"]')
    assert "ARG BASE_IMAGE=localhost/base:1" in render(EXAMPLE, base="localhost/base:1").text


def test_python_recipe_follows_the_dependency_file(tmp_path: Path) -> None:
    (tmp_path / "agent.py").write_text("")
    assert "an empty environment" in render(tmp_path).text
    (tmp_path / "pyproject.toml").write_text("[project]\nname='a'\nversion='0'\n")
    assert "COPY pyproject.toml ./" in render(tmp_path).text
    (tmp_path / "uv.lock").write_text("")
    text = render(tmp_path).text
    assert "COPY pyproject.toml uv.lock ./" in text and "uv sync --locked" in text
    # What `vf agent create` writes: decided when it is built.
    assert "COPY pyproject.toml* requirements.txt* uv.lock* ./" in python_dockerfile(
        dependencies="auto"
    )


def test_node_recipe(tmp_path: Path) -> None:
    package = {"name": "a", "scripts": {"build": "tsc", "download-files": "node dist/agent.js x"}}
    (tmp_path / "package.json").write_text(json.dumps(package))
    (tmp_path / "package-lock.json").write_text("{}")
    recipe = render(tmp_path)
    text = recipe.text
    assert (recipe.kind, recipe.entry) == ("node", "dist/agent.js")
    assert "ARG BASE_IMAGE=node:20-slim" in text
    assert text.index("COPY package.json package-lock.json ./") < text.index("npm ci --omit=dev")
    assert text.index("RUN npm run build") < text.index("COPY --from=build /app ./")
    assert text.index("COPY --from=deps /app/node_modules") < text.index("COPY --from=build")
    assert "USER 10001:10001" in text and "RUN npm run download-files" in text
    assert text.rstrip().endswith('CMD ["node", "dist/agent.js", "start"]')
    # No build script: package.json's main, no download step.
    package = {"name": "a", "main": "./src/agent.mjs"}
    (tmp_path / "package.json").write_text(json.dumps(package))
    (tmp_path / "package-lock.json").unlink()
    (tmp_path / "pnpm-lock.yaml").write_text("")
    text = render(tmp_path).text
    assert "pnpm install --frozen-lockfile --prod" in text and "corepack enable pnpm" in text
    assert "download-files" not in text and "run build" not in text
    assert text.rstrip().endswith('CMD ["node", "src/agent.mjs", "start"]')
    (tmp_path / "pnpm-lock.yaml").unlink()
    with pytest.raises(BuildFailed, match="no lockfile"):
        render(tmp_path)


def test_dockerfile_verb(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE / "agent.py", tmp_path)
    shutil.copy(EXAMPLE / "requirements.txt", tmp_path)
    runner = CliRunner()
    printed = runner.invoke(app, ["agent", "dockerfile", str(tmp_path), "--print"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == render(tmp_path).text
    assert not (tmp_path / "Dockerfile").exists()
    wrote = runner.invoke(app, ["agent", "dockerfile", str(tmp_path), "--base", "local/py:1"])
    assert wrote.exit_code == 0, wrote.output
    assert "ARG BASE_IMAGE=local/py:1" in (tmp_path / "Dockerfile").read_text()
    assert ".venv" in (tmp_path / ".dockerignore").read_text()
    again = runner.invoke(app, ["agent", "dockerfile", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["agent", "dockerfile", str(tmp_path), "--force"])
    assert forced.exit_code == 0
    assert (tmp_path / "Dockerfile").read_text() == render(tmp_path).text


def test_split_ref() -> None:
    assert split_ref("localhost/vf/bot:v2") == ("vf/bot", "v2")
    assert split_ref("127.0.0.1:5000/a/b") == ("a/b", "latest")
    assert split_ref("bot") == ("bot", "latest")
    assert split_ref("library/python:3.11-slim") == ("library/python", "3.11-slim")


# -- real builds --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_image() -> str:
    """The local base (scripts/base-image: built once, then cached)."""
    return images.base_image()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (plain HTTP), its storage in a temporary folder."""
    with images.registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


def _inspect(ref: str) -> dict[str, object]:
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True, check=True
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def _layers(ref: str) -> list[tuple[str, int]]:
    manifest = json.loads(str(_inspect(ref)["Manifest"]))
    return [(layer["digest"], int(layer["size"])) for layer in manifest["layers"]]


def _rmi(*refs: str) -> None:
    subprocess.run(["buildah", "rmi", *refs], capture_output=True)


async def _build(
    builder: ImageBuilder, folder: Path, tag: str
) -> tuple[ImageArtifact, list[str], float]:
    lines: list[str] = []
    started = time.monotonic()
    artifact = await builder.build(folder, tag, lines.append)
    return artifact, lines, time.monotonic() - started


@pytest.mark.timeout(1800)
async def test_build_push_and_rebuild_the_example(
    base_image: str, registry: str, tmp_path: Path
) -> None:
    folder = tmp_path / "voice_agent"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", ".venv"))
    builder = ImageBuilder(base_image, work_dir=tmp_path / "work", ca_bundle=host_ca_bundle())
    v1, v2 = "localhost/vf-test/voice-agent:v1", "localhost/vf-test/voice-agent:v2"
    try:
        first, lines, first_s = await _build(builder, folder, v1)
        assert first.ref == v1 and first.digest.startswith("sha256:")
        assert any("STEP" in line for line in lines)  # buildah's own output, streamed
        config = _inspect(v1)["OCIv1"]["config"]  # type: ignore[index]
        assert config["User"] == "10001:10001"
        assert config["Cmd"] == ["python", "agent.py", "start"]
        assert "PYTHONUNBUFFERED=1" in config["Env"]

        # The image runs: its environment imports the agent's dependencies, as the user.
        ctr = subprocess.run(
            ["buildah", "from", "--pull=false", v1], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            ran = subprocess.run(
                ["buildah", "run", ctr, "--", "python", "-c",
                 "import os, livekit.agents, livekit.plugins.silero; print(os.getuid())"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert ran.returncode == 0 and ran.stdout.strip() == "10001", ran.stderr
        finally:
            subprocess.run(["buildah", "rm", ctr], capture_output=True)

        # Pushed: the registry serves it by tag, with the digest push gave.
        pushed = await builder.push(v1, registry, tls_verify=False)
        name, _ = split_ref(v1)
        assert pushed.ref == f"{registry}/{name}@{pushed.digest}"
        response = httpx.get(
            f"http://{registry}/v2/{name}/manifests/v1",
            headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
        )
        assert response.status_code == 200
        assert response.headers["Docker-Content-Digest"] == pushed.digest
        by_digest = httpx.get(
            f"http://{registry}/v2/{name}/manifests/{pushed.digest}",
            headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
        )
        assert by_digest.status_code == 200

        # A change to the agent's code alone: the dependency layers are reused.
        with open(folder / "agent.py", "a") as f:
            f.write(f"\n# changed at {time.time_ns()}\n")
        second, lines, second_s = await _build(builder, folder, v2)
        print(
            f"\nimage build: first {first_s:.1f} s, after a source-only change {second_s:.1f} s; "
            f"image {first.size / 2**20:.0f} MiB"
        )
        assert sum("Using cache" in line for line in lines) >= 3, "\n".join(lines)
        old, new = _layers(v1), _layers(v2)
        base_layers = _layers(base_image)
        assert old[: len(base_layers)] == base_layers
        shared = 0
        while shared < min(len(old), len(new)) and old[shared] == new[shared]:
            shared += 1
        assert len(old) == len(new) and shared < len(new)  # the source layer and after: new
        # The shared prefix holds the dependencies (livekit-agents, silero, onnxruntime, …).
        dependencies = sum(size for _, size in old[len(base_layers) : shared])
        assert dependencies > 50 * 2**20, (old, new)
        assert second.digest != first.digest
    finally:
        _rmi(v1, v2)


@pytest.mark.timeout(900)
async def test_broken_builds_fail_with_the_log(base_image: str, tmp_path: Path) -> None:
    builder = ImageBuilder(base_image, work_dir=tmp_path / "work", ca_bundle=host_ca_bundle())
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "agent.py").write_text("print('hi')\n")
    (folder / "requirements.txt").write_text("voicefleet-no-such-package-xyz==0.0.1\n")
    lines: list[str] = []
    with pytest.raises(BuildFailed) as failed:
        await builder.build(folder, "localhost/vf-test/bad:v1", lines.append)
    message = str(failed.value)
    assert "the image build failed" in message and "STEP" in message
    assert "voicefleet-no-such-package-xyz" in message  # the tail of the log says why
    assert len(message.splitlines()) <= 40

    (folder / "requirements.txt").write_text("")
    (folder / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo broken-step && exit 3\n")
    with pytest.raises(BuildFailed, match=r"exit status 3|exited with 3|broken-step") as failed:
        await builder.build(folder, "localhost/vf-test/bad:v2", lines.append)
    assert "broken-step" in str(failed.value)

    # Cancelled mid-build (a server shutdown): buildah is stopped, not left running.
    (folder / "Dockerfile").write_text(f"FROM {base_image}\nRUN sleep 300\n")
    task = asyncio.create_task(builder.build(folder, "localhost/vf-test/bad:v3", lines.append))
    await asyncio.sleep(5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    leftover = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
