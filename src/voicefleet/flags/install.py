"""The SDK's files where an agent's own Python can import them.

Agents run in environments of their own, without voicefleet installed. The runtime puts this
directory (a copy of `voicefleet/__init__.py` and `voicefleet/sdk/`, standard library only) on
their PYTHONPATH, so `from voicefleet.sdk import flags` works in any agent, unchanged otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import voicefleet

PACKAGE = Path(voicefleet.__file__).parent


def install_sdk(data_dir: Path) -> Path:
    """Copy the SDK under `data_dir` (fresh, so it matches this server) and return the path."""
    root = data_dir / "sdk"
    staging = data_dir / "sdk.new"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "voicefleet").mkdir(parents=True)
    shutil.copy2(PACKAGE / "__init__.py", staging / "voicefleet" / "__init__.py")
    shutil.copytree(
        PACKAGE / "sdk",
        staging / "voicefleet" / "sdk",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root
