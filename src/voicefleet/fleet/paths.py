"""Where an agent's files live in the data directory: versions, builds, logs, flag caches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    data_dir: Path

    def version_dir(self, agent_id: str, version: str) -> Path:
        return self.data_dir / "agents" / agent_id / version

    def source(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "src"

    def bundle(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "bundle.tar.gz"

    def build_log(self, agent_id: str, version: str) -> Path:
        return self.version_dir(agent_id, version) / "build.log"

    @property
    def uploads(self) -> Path:
        """Bundles as they stream in, before they become a version."""
        return self.data_dir / "uploads"

    @property
    def envs(self) -> Path:
        return self.data_dir / "envs"

    @property
    def image_builds(self) -> Path:
        """Build contexts of images while they are built (the Kubernetes runtime)."""
        return self.data_dir / "image-builds"

    @property
    def sdk(self) -> Path:
        """voicefleet.sdk for the agents' own Python (voicefleet.flags.install)."""
        return self.data_dir / "sdk"

    def flags_cache(self, agent_id: str) -> Path:
        """The agent's instances' copy of its flags, for when the server is unreachable."""
        return self.data_dir / "agents" / agent_id / "flags-cache.json"

    def instance_secrets(self, instance_id: str) -> Path:
        """An instance's file secrets while it runs (the local runtime; 0700, files 0600)."""
        return self.data_dir / "secrets" / instance_id

    def instance_logs(self, agent_id: str) -> Path:
        return self.data_dir / "logs" / agent_id
