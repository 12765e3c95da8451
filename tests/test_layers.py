"""Imports run one way, downwards: a package imports only packages in tiers below its own.

Read from the source with `ast` (no import-linter, nothing executed), so a `TYPE_CHECKING`
import or one inside a function counts as much as any other: a layer that needs a type from
above it should be given a narrow port (a Protocol of its own) instead.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import voicefleet

PACKAGE = Path(voicefleet.__file__).parent

# Bottom first. Shared leaves sit below everything and import none of the project's packages.
TIERS: tuple[frozenset[str], ...] = tuple(
    frozenset(tier.split())
    for tier in (
        "voicefleet config errors metrics logs sdk",  # shared leaves ("voicefleet": __init__)
        "protocol",  # frames and tokens, no I/O
        "dispatch",  # registry, scheduler, jobs, routing; its facade is DispatchService
        "store build runtime fleet gateway",  # records, builds, processes, instances, upstream
        "rollout",  # plans, runner, strategies
        "autoscale flags",  # policies and their loops
        "control",  # use cases
        "api dashboard",  # HTTP by resource; the web pages (same auth, same services)
        "server cli __main__",  # composition root, the vf command
    )
)

# Imports allowed between packages of one tier (any other sideways import is refused).
SIDEWAYS: dict[str, frozenset[str]] = {
    # Instances are processes of the runtime recorded in the store, built by the builder.
    "fleet": frozenset({"store", "runtime", "build"}),
    # `vf server` runs the server; `python -m voicefleet` is the vf command.
    "cli": frozenset({"server"}),
    "__main__": frozenset({"cli"}),
}

# gateway sits beside fleet: it relays between an upstream LiveKit server and the dispatcher,
# so of its own tier and the one below it reaches only the dispatcher (and protocol, leaves).
ONLY: dict[str, frozenset[str]] = {
    "gateway": frozenset({"dispatch", "protocol"}) | TIERS[0],
}


def tier_of(package: str) -> int:
    for n, tier in enumerate(TIERS):
        if package in tier:
            return n
    raise AssertionError(f"voicefleet.{package} is in no layer: add it to TIERS in {__file__}")


def package_of(module: str) -> str:
    """'voicefleet.dispatch.service' -> 'dispatch'; 'voicefleet' -> 'voicefleet'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: Path = PACKAGE) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, wherever it stands."""
    module = module_name(path, package)
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield node.lineno, target


def violations() -> Iterator[str]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue  # Alembic's scripts, run by Alembic
        source = package_of(module_name(path))
        mine = tier_of(source)
        for line, target in imports(path):
            if target != "voicefleet" and not target.startswith("voicefleet."):
                continue
            other = package_of(target)
            if other == source:
                continue
            theirs = tier_of(other)
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if source in ONLY and other not in ONLY[source]:
                yield f"{where}: {source} may import only {sorted(ONLY[source])}"
            elif theirs > mine:
                yield f"{where}: {other} is a layer above {source}"
            elif theirs == mine and other not in SIDEWAYS.get(source, frozenset()):
                yield f"{where}: {other} is beside {source}, not below it"


def test_every_package_has_a_layer() -> None:
    for path in PACKAGE.iterdir():
        if path.name.startswith(("_", ".")) and path.name not in ("__init__.py", "__main__.py"):
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            name = path.stem if path.name != "__init__.py" else "voicefleet"
            tier_of(name)


def test_imports_run_downwards_only_type_checking_and_local_imports_included() -> None:
    found = list(violations())
    assert not found, "\n".join(found)


def test_the_rule_sees_imports_from_above_local_and_type_checking_ones_too(tmp_path: Path) -> None:
    source = tmp_path / "voicefleet" / "dispatch" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from voicefleet.control.service import ControlPlane\n"
        "def f():\n"
        "    from ..rollout import rolling\n"
    )
    found = [target for _, target in imports(source, tmp_path / "voicefleet")]
    assert found == ["typing", "voicefleet.control.service", "voicefleet.rollout"]
    assert [tier_of(package_of(t)) > tier_of("dispatch") for t in found[1:]] == [True, True]


def test_the_cli_loads_no_server_module_until_a_command_needs_it() -> None:
    """Every `vf` command imports the CLI: the store, the server and the web framework load only
    in the commands that use them, so that `vf agent status` starts in a fraction of a second."""
    heavy = ("sqlalchemy", "alembic", "fastapi", "uvicorn", "voicefleet.server")
    code = (
        "import sys, voicefleet.cli.main\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m in {heavy!r}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]", loaded
