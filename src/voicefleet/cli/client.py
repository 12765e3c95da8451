"""How the CLI reaches a server: where, with which credentials, and what its errors mean.

Server and credentials come from flags, else VF_URL / VF_API_KEY / VF_API_SECRET, else the
LIVEKIT_* variables an agent folder already has, else the config file
(~/.config/voicefleet/config.toml or $VF_CONFIG: `url`, `api_key`, `api_secret`), else the
dev server's defaults (http://127.0.0.1:7880, devkey / secret).

The key is either a voicefleet API key (`vfk_<id>.<secret>`, from `vf server keys create`;
VOICEFLEET_API_KEY is looked at first, then the places above; it needs no secret) or the
project's LiveKit key, with its secret, from which an admin token is signed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from voicefleet.protocol import tokens

# Exit codes a script can rely on.
OK, FAILED, USAGE, AUTH, NOT_FOUND, UNREACHABLE = 0, 1, 2, 3, 4, 5

err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = FAILED) -> NoReturn:
    """Say what went wrong on stderr and exit with `code`. With --json, the error is JSON too,
    one line: {"error": message, "exit_code": code}."""
    if state.json:
        print(json.dumps({"error": message, "exit_code": code}), file=sys.stderr)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str
    api_secret: str


def resolve(url: str | None, api_key: str | None, api_secret: str | None) -> Target:
    file: dict[str, Any] = {}
    path = Path(os.environ.get("VF_CONFIG", Path.home() / ".config" / "voicefleet" / "config.toml"))
    if path.exists():
        try:
            file = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            fail(f"{path} is not valid TOML: {e}", USAGE)

    def pick(flag: str | None, names: tuple[str, ...], key: str, default: str) -> str:
        if flag:
            return flag
        for name in names:
            if os.environ.get(name):
                return os.environ[name]
        return str(file.get(key) or default)

    server = pick(url, ("VF_URL", "LIVEKIT_URL"), "url", "http://127.0.0.1:7880")
    server = server.replace("wss://", "https://").replace("ws://", "http://").rstrip("/")
    return Target(
        url=server,
        api_key=pick(
            api_key, ("VOICEFLEET_API_KEY", "VF_API_KEY", "LIVEKIT_API_KEY"), "api_key", "devkey"
        ),
        api_secret=pick(
            api_secret, ("VF_API_SECRET", "LIVEKIT_API_SECRET"), "api_secret", "secret"
        ),
    )


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        if tokens.is_key_token(target.api_key):  # a voicefleet key is its own bearer token
            token = target.api_key
        else:
            token = tokens.mint_admin(target.api_key, target.api_secret)
        self.http = httpx.Client(
            base_url=target.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30, read=None),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            self.unreachable(e)
        check(r)
        return r.json() if r.content else None

    def unreachable(self, e: httpx.TransportError, what: str = "cannot reach") -> NoReturn:
        url = self.target.url
        hint = ""
        if url.startswith("http://") and isinstance(e, httpx.RemoteProtocolError):
            # What plain HTTP to a TLS port looks like from here: closed without an answer.
            hint = f" (does it serve TLS? try {'https://' + url.removeprefix('http://')})"
        fail(f"{what} the voicefleet server at {url}: {e}{hint}", UNREACHABLE)

    def get_if_found(self, path: str, **kwargs: Any) -> Any:
        """GET `path`; None when the server answers 404 (not there, or not yet)."""
        try:
            r = self.http.request("GET", path, **kwargs)
        except httpx.TransportError as e:
            self.unreachable(e)
        if r.status_code == 404:
            return None
        check(r)
        return r.json() if r.content else None

    def lines(self, path: str, **params: Any) -> Iterator[str]:
        """A streamed text response (a log being followed), line by line."""
        try:
            with self.http.stream("GET", path, params=params) as r:
                if not r.is_success:
                    r.read()
                    check(r)
                yield from r.iter_lines()
        except httpx.TransportError as e:
            self.unreachable(e, "lost")


def check(r: httpx.Response) -> None:
    if r.is_success:
        return
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    if isinstance(detail, list):  # FastAPI validation errors
        detail = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
        )
    code = {401: AUTH, 403: AUTH, 404: NOT_FOUND}.get(r.status_code, FAILED)
    fail(f"{detail} (HTTP {r.status_code})", code)


# -- what every command group shares ------------------------------------------------------------

Url = Annotated[str | None, typer.Option("--url", help="Server URL (env VF_URL).")]
Key = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="A voicefleet API key vfk_<id>.<secret> (env VOICEFLEET_API_KEY), or the "
        "project's LiveKit key (env VF_API_KEY) with --api-secret.",
    ),
]
Secret = Annotated[str | None, typer.Option("--api-secret", help="API secret (env VF_API_SECRET).")]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        "-j",
        help="Output as JSON (on every verb; also after it). Errors: one JSON line on stderr.",
    ),
]


class JsonAnywhere(typer.core.TyperGroup):
    """A command group whose --json may also come after the verb (`vf agent list --json`, as
    `lk agent list --json`): it is moved in front, where the group's own option takes it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:end] if a in JSON_FLAGS]
        if flags:
            args = ["--json", *(a for a in args[:end] if a not in JSON_FLAGS), *args[end:]]
        return super().parse_args(ctx, args)


JSON_FLAGS = ("--json", "-j")


class State:
    """The server client and output mode, set by a command group's callback."""

    client: Client
    json: bool = False


state = State()


def configure(url: str | None, api_key: str | None, api_secret: str | None, as_json: bool) -> None:
    state.json = as_json  # first: an error resolving the server is JSON too
    state.client = Client(resolve(url, api_key, api_secret))


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def ago(ts: float) -> str:
    if not ts:
        return "-"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"
