"""`livekit.toml`, the file LiveKit's CLI reads: `[project] subdomain`, `[agent] id`.

voicefleet reads the same file from the current folder, so one folder works with both, and keeps
its own keys (the agent's name, the server) under `[voicefleet]`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from voicefleet.build.dockerfile import python_dockerfile
from voicefleet.errors import InvalidRequest

FILE = "livekit.toml"


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    subdomain: str = ""
    name: str = ""
    server: str = ""


def read(folder: Path) -> AgentConfig | None:
    path = folder / FILE
    if not path.exists():
        return None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidRequest(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path} is not UTF-8 text") from None
    agent = data.get("agent")
    if not isinstance(agent, dict) or not isinstance(agent.get("id"), str) or not agent["id"]:
        raise InvalidRequest(f"{path} has no [agent] id (run `vf agent create` in this folder)")
    project = data.get("project") if isinstance(data.get("project"), dict) else {}
    ours = data.get("voicefleet") if isinstance(data.get("voicefleet"), dict) else {}
    return AgentConfig(
        agent_id=agent["id"],
        subdomain=str(project.get("subdomain", "")),  # type: ignore[union-attr]
        name=str(ours.get("name", "")),  # type: ignore[union-attr]
        server=str(ours.get("server", "")),  # type: ignore[union-attr]
    )


def write(folder: Path, config: AgentConfig) -> Path:
    path = folder / FILE
    path.write_text(
        "[project]\n"
        f'  subdomain = "{config.subdomain}"\n\n'
        "[agent]\n"
        f'  id = "{config.agent_id}"\n\n'
        "[voicefleet]\n"
        f'  name = "{config.name}"\n'
        f'  server = "{config.server}"\n'
    )
    return path


# What `vf agent create` writes when the folder has no Dockerfile: the Python recipe, deciding
# at build time which of uv.lock, requirements.txt or pyproject.toml holds the dependencies
# (`vf agent dockerfile` writes one made for the folder, Node.js or Python).
DOCKERFILE = python_dockerfile(dependencies="auto")
