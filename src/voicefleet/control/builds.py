"""How an uploaded version is built, by the runtime that will run it.

The local runtime runs a version's code in a Python (or Node.js) environment built on this
machine (`build/local.py`). The Kubernetes runtime runs container images: the version's folder
is built into one with buildah (`build/image.py`, no daemon), tagged by the version's source
digest, and pushed to the server's registry; the version records the reference by digest that
every one of its pods runs, so that a rollback to it runs the very same bytes, with no build.
A build or a push that fails raises BuildFailed: the version is failed and never served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from voicefleet.build.image import ImageBuilder, repository_name
from voicefleet.build.local import LocalBuilder
from voicefleet.store.models import AgentRow, VersionRow

Log = Callable[[str], None]


@dataclass(frozen=True)
class Built:
    """What a build did: one line for the version's event, and whether it reused a cache
    (the build-duration metric counts the two apart)."""

    summary: str
    cached: bool = False


class VersionBuilder(Protocol):
    async def build(self, agent: AgentRow, row: VersionRow, source: Path, log: Log) -> Built:
        """Build `source` as version `row`; record what was built on `row` (the caller saves
        it)."""
        ...


class EnvironmentBuilds:
    """The local runtime's: an environment per dependency digest, shared by versions."""

    def __init__(self, builder: LocalBuilder) -> None:
        self.builder = builder

    async def build(self, agent: AgentRow, row: VersionRow, source: Path, log: Log) -> Built:
        artifact = await self.builder.build(source, log)
        done = "reused cached environment" if artifact.cached else "built environment"
        log(f"{done} {artifact.env_dir}")
        row.dependency_digest, row.python = artifact.dependency_digest, str(artifact.python)
        return Built(done, artifact.cached)


class ImageBuilds:
    """The Kubernetes runtime's: an image per version, pushed to `registry`
    (host[:port][/prefix]) as <registry>/<agent name>:<source digest>."""

    def __init__(
        self,
        builder: ImageBuilder,
        registry: str,
        *,
        tls_verify: bool = True,
        authfile: Path | None = None,
    ) -> None:
        self.builder = builder
        self.registry = registry.rstrip("/")
        self.tls_verify = tls_verify
        self.authfile = authfile

    async def build(self, agent: AgentRow, row: VersionRow, source: Path, log: Log) -> Built:
        # Tagged by content: the same source builds (from cache) and pushes to the same tag.
        local = f"localhost/{repository_name(agent.name)}:{row.source_digest or row.version}"
        log(f"building image {local} with buildah")
        built = await self.builder.build(source, local, log)
        log(f"pushing {local} to {self.registry}")
        pushed = await self.builder.push(
            local, self.registry, log, tls_verify=self.tls_verify, authfile=self.authfile
        )
        log(f"pushed {pushed.ref} ({built.size / 2**20:.1f} MiB)")
        row.image, row.image_digest = pushed.ref, pushed.digest
        return Built(f"image {pushed.ref}")
