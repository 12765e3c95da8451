"""`livekit.toml`, the file LiveKit's CLI reads: `[project] subdomain`, `[agent] id`.

voicefleet reads the same file from the current folder, so one folder works with both, and keeps
its own keys (the agent's name, the server) under `[voicefleet]`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

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


DOCKERFILE = """\
# Made by `vf agent create`: the image voicefleet's Kubernetes runtime builds for this agent.
# (The local runtime runs agent.py in a uv-built environment and does not use it.)
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --no-cache-dir uv
COPY . .
RUN if [ -f uv.lock ]; then uv sync --frozen --no-dev; \\
    elif [ -f requirements.txt ]; then uv pip install --system -r requirements.txt; \\
    elif [ -f pyproject.toml ]; then uv pip install --system -r pyproject.toml; fi
CMD ["python", "agent.py", "start"]
"""
