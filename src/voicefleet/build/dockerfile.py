"""The Dockerfile voicefleet writes for an agent folder, and builds when the folder has none.

Two recipes, chosen by the folder: Node.js when it has package.json and a lockfile, Python
otherwise. Both are multi-stage and ordered for the layer cache: the files that decide the
dependencies are copied and installed first, so a change to the agent's code alone rebuilds
only the layers after them. The image runs as a numeric non-root user (Kubernetes'
runAsNonRoot can check a number, not a name), with the agent's own `start` command.

The base image is a build argument, BASE_IMAGE, with LiveKit's choice as its default
(python:3.11-slim, node:20-slim); the image builder passes its own (`--build-arg`), so the same
Dockerfile builds from a local base where no registry serves those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voicefleet.build import node
from voicefleet.errors import BuildFailed

PYTHON_BASE = "python:3.11-slim"
NODE_BASE = "node:20-slim"
UV_VERSION = "0.13.9"
UID = 10001
# The lockfile of each Node.js package manager, and how it installs (all, then production only),
# runs a script, and is enabled (corepack ships with Node.js; npm needs nothing).
NODE_MANAGERS = {
    "package-lock.json": ("npm ci", "npm ci --omit=dev", "npm run", ""),
    "npm-shrinkwrap.json": ("npm ci", "npm ci --omit=dev", "npm run", ""),
    "pnpm-lock.yaml": (
        "pnpm install --frozen-lockfile",
        "pnpm install --frozen-lockfile --prod",
        "pnpm run",
        "corepack enable pnpm",
    ),
    "yarn.lock": (
        "yarn install --frozen-lockfile",
        "yarn install --frozen-lockfile --production",
        "yarn run",
        "corepack enable yarn",
    ),
}
# Python: the first of these the folder has decides the dependencies (as the local builder).
PYTHON_DEPENDENCIES = ("uv.lock", "requirements.txt", "pyproject.toml")

DOCKERIGNORE = """\
# What the image's build context leaves out (voicefleet's bundles honour this file too).
.git
.venv
venv
__pycache__
*.pyc
node_modules
.env
.env.*
.voicefleet
"""

_PYTHON_INSTALL = {
    "uv.lock": (
        "COPY pyproject.toml uv.lock ./",
        "RUN /opt/uv/bin/uv sync --locked --no-install-project --no-dev --python python3",
    ),
    "requirements.txt": (
        "COPY requirements.txt ./",
        "RUN /opt/uv/bin/uv venv --python python3 /app/.venv \\\n"
        "    && /opt/uv/bin/uv pip install --python /app/.venv/bin/python -r requirements.txt",
    ),
    "pyproject.toml": (
        "COPY pyproject.toml ./",
        "RUN /opt/uv/bin/uv venv --python python3 /app/.venv \\\n"
        "    && /opt/uv/bin/uv pip install --python /app/.venv/bin/python -r pyproject.toml",
    ),
    # Whichever of the three the folder has, decided at build time (`vf agent create` writes
    # this one); a pattern that matches nothing copies nothing.
    "auto": (
        "COPY pyproject.toml* requirements.txt* uv.lock* ./",
        "RUN /opt/uv/bin/uv venv --python python3 /app/.venv \\\n"
        "    && if [ -f uv.lock ]; then \\\n"
        "      /opt/uv/bin/uv sync --locked --no-install-project --no-dev --python python3; \\\n"
        "    elif [ -f requirements.txt ]; then \\\n"
        "      /opt/uv/bin/uv pip install --python /app/.venv/bin/python -r requirements.txt; \\\n"
        "    elif [ -f pyproject.toml ]; then \\\n"
        "      /opt/uv/bin/uv pip install --python /app/.venv/bin/python -r pyproject.toml; fi",
    ),
    "": (
        "# (no uv.lock, requirements.txt or pyproject.toml: an empty environment)",
        "RUN /opt/uv/bin/uv venv --python python3 /app/.venv",
    ),
}


def python_dockerfile(
    base: str = PYTHON_BASE, dependencies: str = "requirements.txt", entry: str = "agent.py"
) -> str:
    """The Python recipe. `dependencies`: the file that decides them ("" for none, "auto":
    whichever the folder has when it is built)."""
    copy, install = _PYTHON_INSTALL[dependencies]
    return f"""\
# syntax=docker/dockerfile:1
# Made by voicefleet (`vf agent dockerfile`, `vf agent create`): the image its Kubernetes
# runtime runs for this agent.
# (The local runtime runs {entry} in a uv-built environment and does not use it.) Edit it
# freely: a folder's own Dockerfile is built as it is. Build it with buildah or docker:
#   buildah bud --layers -t my-agent .        (--build-arg BASE_IMAGE=… for another base)
ARG BASE_IMAGE={base}

# -- build: the dependencies, in a virtual environment, bytecode compiled -------------------
FROM ${{BASE_IMAGE}} AS build
# pip and uv trust the system's certificates (a build behind a TLS-inspecting proxy mounts
# its own bundle there: ImageBuilder's ca_bundle).
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet uv=={UV_VERSION}
WORKDIR /app
# Only the files that decide the dependencies: while they are unchanged, this layer and the
# install below are reused, whatever else in the folder changes.
{copy}
{install}

# -- run: the environment, then the agent's code, as a non-root user ------------------------
FROM ${{BASE_IMAGE}}
ENV PYTHONUNBUFFERED=1 PATH=/app/.venv/bin:$PATH
RUN groupadd --gid {UID} appuser \\
    && useradd --uid {UID} --gid {UID} --create-home --home-dir /home/appuser \\
       --shell /usr/sbin/nologin appuser
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY . .
# The agent's own modules compiled now, not by every instance at its start.
RUN python -m compileall -q -x '^/app/\\.venv/' /app
USER {UID}:{UID}
# Models and other files the agent's plugins fetch, in the image (a layer of its own): nothing
# is downloaded when an instance starts.
RUN python {entry} download-files
# livekit-agents' health endpoint
EXPOSE 8081
CMD ["python", "{entry}", "start"]
"""


def node_dockerfile(
    base: str = NODE_BASE,
    lockfile: str = "package-lock.json",
    entry: str = "agent.js",
    build: bool = False,
    download_files: bool = False,
) -> str:
    """The Node.js recipe. `build`: package.json has a build script (run before pruning);
    `download_files`: it has a download-files script (run as the agent's user)."""
    install, install_prod, run, enable = NODE_MANAGERS[lockfile]
    files = "package.json " + lockfile
    enable_line = f"RUN {enable}\n" if enable else ""
    build_lines = (
        f"COPY . .\nRUN {run} build && rm -rf node_modules\n"
        if build
        else "COPY . .\nRUN rm -rf node_modules\n"
    )
    download = (
        "# Models and other files the agent fetches, in the image (a layer of its own).\n"
        f"RUN {run} download-files\n"
        if download_files
        else ""
    )
    return f"""\
# syntax=docker/dockerfile:1
# Made by voicefleet (`vf agent dockerfile`, `vf agent create`): the image its Kubernetes
# runtime runs for this agent.
# Edit it freely: a folder's own Dockerfile is built as it is. Build it with buildah or docker:
#   buildah bud --layers -t my-agent .        (--build-arg BASE_IMAGE=… for another base)
ARG BASE_IMAGE={base}

# -- dependencies: production packages only, from the lockfile ------------------------------
FROM ${{BASE_IMAGE}} AS deps
{enable_line}WORKDIR /app
# Only the files that decide the dependencies: while they are unchanged, this install is reused.
COPY {files} ./
RUN {install_prod}

# -- build: every package, the project's build script -----------------------------------------
FROM ${{BASE_IMAGE}} AS build
{enable_line}WORKDIR /app
COPY {files} ./
RUN {install}
{build_lines}
# -- run: the dependencies, then the agent's code, as a non-root user ------------------------
FROM ${{BASE_IMAGE}}
ENV NODE_ENV=production
RUN groupadd --gid {UID} appuser \\
    && useradd --uid {UID} --gid {UID} --create-home --home-dir /home/appuser \\
       --shell /usr/sbin/nologin appuser
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app ./
USER {UID}:{UID}
{download}# livekit-agents' health endpoint
EXPOSE 8081
CMD ["node", "{entry}", "start"]
"""


@dataclass(frozen=True)
class Recipe:
    """What `render` chose for a folder, and the Dockerfile."""

    kind: str  # "python" or "node"
    dependencies: str  # the file that decides them ("" for none)
    entry: str
    text: str


def node_lockfile(folder: Path) -> str:
    """The folder's Node.js lockfile, or "" (no package.json, or no lockfile)."""
    return node.lockfile(folder) if (folder / "package.json").is_file() else ""


def node_entry(folder: Path, package: dict[str, object], build: bool) -> str:
    """The file `node … start` runs: package.json's main, else the first agent file found
    (the built one under dist/ when there is a build script)."""
    main = package.get("main")
    if isinstance(main, str) and main:
        return main.removeprefix("./")
    names = ("agent.js", "agent.mjs", "agent.cjs", "index.js", "main.js")
    found = [f"dist/{n}" for n in names if build] + [n for n in names if (folder / n).is_file()]
    return found[0] if found else ("dist/agent.js" if build else "agent.js")


def render(folder: Path, *, base: str | None = None, entry: str | None = None) -> Recipe:
    """The Dockerfile for `folder`: Node.js when it has package.json and a lockfile (npm,
    pnpm or yarn), else Python. `base`: the base image (LiveKit's default for the kind)."""
    lockfile = node_lockfile(folder)
    if lockfile:
        package = node.package(folder)
        scripts = package.get("scripts")
        scripts = scripts if isinstance(scripts, dict) else {}
        build = "build" in scripts
        entry = entry or node_entry(folder, package, build)
        text = node_dockerfile(
            base or NODE_BASE, lockfile, entry, build, "download-files" in scripts
        )
        return Recipe("node", lockfile, entry, text)
    if (folder / "package.json").is_file() and not (folder / "agent.py").is_file():
        raise BuildFailed(
            "package.json has no lockfile beside it (package-lock.json, pnpm-lock.yaml or "
            "yarn.lock): run `npm install` and keep the lockfile, so that the image installs "
            "exactly the versions you tested"
        )
    dependencies = next((n for n in PYTHON_DEPENDENCIES if (folder / n).is_file()), "")
    if dependencies == "uv.lock" and not (folder / "pyproject.toml").is_file():
        raise BuildFailed("uv.lock has no pyproject.toml beside it")
    entry = entry or "agent.py"
    return Recipe(
        "python", dependencies, entry, python_dockerfile(base or PYTHON_BASE, dependencies, entry)
    )
