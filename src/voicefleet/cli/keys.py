"""`vf server keys`: make, list and revoke voicefleet API keys, on the server's own data dir.

Run where the server runs (its data dir holds the pepper the keys are hashed with, and its
database or --database-url the keys): it works whether the server is up or not, and a change
takes effect at the server's next request. Remotely, an admin key does the same through
`/api/v1/keys`.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

from voicefleet.cli.client import NOT_FOUND, USAGE, Json, fail, print_json
from voicefleet.errors import CannotStart, InvalidRequest, NotFound, VoicefleetError
from voicefleet.protocol.tokens import Role

# The store's modules load only when a command runs: every `vf` command imports this one.
if TYPE_CHECKING:
    from voicefleet.control.access import Keys
    from voicefleet.store.models import Actor
    from voicefleet.store.repo import Repo

app = typer.Typer(
    help="API keys with a role (viewer, deployer, admin), on this server's data dir.",
    no_args_is_help=True,
)
out = Console(soft_wrap=True)
T = TypeVar("T")

DataDir = Annotated[
    Path,
    typer.Option(envvar="VF_DATA_DIR", help="The server's data dir (as given to vf server)."),
]
DatabaseUrl = Annotated[
    str,
    typer.Option(
        envvar="VF_DATABASE_URL", help="The server's store URL, if not SQLite in the data dir."
    ),
]


def _run(data_dir: Path, database_url: str, use: Callable[[Keys, Repo], Awaitable[T]]) -> T:
    from voicefleet.config import Settings
    from voicefleet.control.access import PEPPER_PURPOSE, Keys
    from voicefleet.store.db import check_store, open_engine
    from voicefleet.store.repo import Repo
    from voicefleet.store.secrets import KEY_FILE, SecretBox

    data_dir = data_dir.expanduser().resolve()
    if not (data_dir / KEY_FILE).exists():
        fail(
            f"{data_dir} is not a voicefleet server's data dir (it has no {KEY_FILE}): pass "
            "--data-dir (VF_DATA_DIR) as given to vf server, or start the server once first",
            USAGE,
        )
    url = Settings(data_dir=data_dir, database=database_url).database_url

    async def run() -> T:
        await check_store(url)
        engine = await open_engine(url)
        try:
            repo = Repo(engine)
            return await use(Keys(repo, SecretBox.open(data_dir).derive(PEPPER_PURPOSE)), repo)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except CannotStart as e:
        fail(f"{e}\nhint: {e.hint}", USAGE)
    except NotFound as e:
        fail(str(e), NOT_FOUND)
    except InvalidRequest as e:
        fail(str(e), USAGE)
    except VoicefleetError as e:
        fail(str(e))


def _local() -> Actor:
    """Who runs `vf server keys` on the server: the system user, via the data dir."""
    from voicefleet.store.models import Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = "unknown"
    return Actor(key=f"local:{user}", via="cli")


async def _names(repo: Repo) -> dict[str, str]:
    return {a.id: a.name for a in await repo.agents()}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@app.command()
def create(
    role: Annotated[Role, typer.Option(help="viewer reads; deployer also deploys; admin: all.")],
    agent: Annotated[
        str | None, typer.Option(help="Limit the key to this agent (name or id).")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 30d, 12h, 2w (default: never expires).")
    ] = None,
    name: Annotated[
        str, typer.Option(help="What the key is for (shown in lists and events).")
    ] = "",
    data_dir: DataDir = Path(".voicefleet"),
    database_url: DatabaseUrl = "",
    as_json: Json = False,
) -> None:
    """Make a key. Its token (vfk_<id>.<secret>) is shown once: only a hash of it is kept."""
    from voicefleet.control.access import key_dict, parse_duration

    try:
        lifetime = parse_duration(expires) if expires else None
    except InvalidRequest as e:
        fail(f"--expires: {e}", USAGE)

    async def use(keys: Keys, repo: Repo) -> tuple[dict[str, Any], str]:
        row, token = await keys.create(
            role, agent=agent or "", name=name, expires_in=lifetime, actor=_local()
        )
        return key_dict(row, await _names(repo)), token

    shown, token = _run(data_dir, database_url, use)
    if as_json:
        print_json({**shown, "token": token})
        return
    limits = [shown["role"]]
    if shown["agent"]:
        limits.append(f"agent {shown['agent']} only")
    limits.append(f"expires {_when(shown['expires_at'])}" if shown["expires_at"] else "no expiry")
    out.print(
        f"Created API key {shown['id']} ({', '.join(limits)}). Its token is shown this once:\n\n"
        f"  {token}\n\n"
        "Use it as VOICEFLEET_API_KEY (or vf … --api-key), or in the dashboard's API key field.",
        highlight=False,
    )


@app.command("list")
def list_keys(
    data_dir: DataDir = Path(".voicefleet"),
    database_url: DatabaseUrl = "",
    as_json: Json = False,
) -> None:
    """Every key: active, expired and revoked (the event log still names them)."""
    from voicefleet.control.access import key_dict

    async def use(keys: Keys, repo: Repo) -> list[dict[str, Any]]:
        names = await _names(repo)
        return [key_dict(row, names) for row in await keys.list()]

    found = _run(data_dir, database_url, use)
    if as_json:
        print_json(found)
        return
    if not found:
        out.print("no API keys (the project's own key is an admin): vf server keys create")
        return
    table = Table(
        Column("id", no_wrap=True), "name", "role", "agent", "state",
        Column("created", no_wrap=True), Column("expires", no_wrap=True),
        Column("last used", no_wrap=True), box=None,
    )  # fmt: skip
    for k in found:
        table.add_row(
            k["id"], k["name"] or "-", k["role"], k["agent"] or "all", k["state"],
            _when(k["created_at"]), _when(k["expires_at"]), _when(k["last_used_at"]),
        )  # fmt: skip
    out.print(table)


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (vfk_…).")],
    data_dir: DataDir = Path(".voicefleet"),
    database_url: DatabaseUrl = "",
    as_json: Json = False,
) -> None:
    """Revoke a key: the server refuses it from its next request on."""
    from voicefleet.control.access import key_dict

    key_id = key_id.partition(".")[0]  # a whole token pasted: its id part

    async def use(keys: Keys, repo: Repo) -> dict[str, Any]:
        return key_dict(await keys.revoke(key_id, _local()), await _names(repo))

    shown = _run(data_dir, database_url, use)
    print_json(shown) if as_json else out.print(f"Revoked API key {shown['id']}.")
