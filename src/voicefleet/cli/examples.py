"""The example agents `vf demo` deploys and `vf agent init` starts from.

They live in the repository's `examples/` folder; a built wheel carries a copy inside the package
(`voicefleet/_examples/`, see pyproject.toml), so an installed `vf` needs no checkout.
"""

from __future__ import annotations

from pathlib import Path

import voicefleet

PACKAGED = Path(voicefleet.__file__).parent / "_examples"
CHECKOUT = Path(voicefleet.__file__).resolve().parents[2] / "examples"

# What `vf agent init --lang` offers: language -> example folder.
TEMPLATES = {"python": "voice_agent", "node": "node_agent"}


class NoExample(LookupError):
    pass


def example(name: str) -> Path:
    """The folder of example `name`: the package's copy (an installed wheel), else the
    checkout's (a source or editable install)."""
    for root in (PACKAGED, CHECKOUT):
        if (root / name).is_dir():
            return root / name
    raise NoExample(
        f"example '{name}' is neither in {PACKAGED} nor in {CHECKOUT}: this voicefleet was "
        "installed without its examples (reinstall it from a wheel or a checkout)"
    )
