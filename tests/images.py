"""Real parts for image tests: buildah's local base image and a registry on 127.0.0.1.

Shared by tests/test_images.py (the builder itself) and tests/test_kube_deploy.py (deploys on
the Kubernetes runtime). Debian's buildah, debootstrap and docker-registry; builds run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.kube import free_ports
from tests.support import with_us

ROOT = Path(__file__).resolve().parent.parent
BASE_SCRIPT = ROOT / "scripts" / "base-image"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFESTS = f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"


def require(*tools: str) -> None:
    """Skip, saying why, unless the tools are installed and this is root."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (Debian packages buildah, debootstrap, "
            "docker-registry: .ci/run installs them)"
        )
    if os.geteuid() != 0:
        pytest.skip("image builds here run as root (debootstrap, buildah's storage)")


def base_image() -> str:
    """The local base (scripts/base-image: built once, then cached); its reference."""
    require("buildah", "debootstrap")
    started = time.monotonic()
    done = subprocess.run([str(BASE_SCRIPT)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"scripts/base-image failed:\n{done.stderr[-3000:]}")
    print(f"\nbase image ready in {time.monotonic() - started:.1f} s")
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def registry(folder: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (plain HTTP), its storage in `folder`; yields
    its address, host:port."""
    require("docker-registry")
    folder.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {folder / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(folder / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            with_us(["docker-registry", "serve", str(config)]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"docker-registry did not start: {(folder / 'registry.log').read_text()}"
                )
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tags(registry: str, repository: str) -> list[str]:
    """The repository's tags, from the registry's HTTP API ([] when it has none)."""
    r = httpx.get(f"http://{registry}/v2/{repository}/tags/list", timeout=10)
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return sorted(r.json().get("tags") or [])


def manifest_digest(registry: str, repository: str, reference: str) -> str:
    """The digest the registry serves `reference` (a tag or a digest) by."""
    r = httpx.get(
        f"http://{registry}/v2/{repository}/manifests/{reference}",
        headers={"Accept": MANIFESTS},
        timeout=10,
    )
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]
