"""Feature flags for a running agent: changes arrive within a second, no restart.

    from voicefleet.sdk import Session, flags

    async def entrypoint(ctx):
        voice = flags().get_str("voice", "alloy", session=Session.from_job(ctx.job))

`flags()` is a process-wide client, started on first use. It keeps one streaming HTTP connection
to the server (server-sent events: the agent's flags at connect and after every change) in a
daemon thread of its own, so it works under any event loop, in job processes and job threads
alike, and never blocks a call: `get` reads the local copy. The copy is also written to a cache
file, so a process started while the server is down has the last flags it knew. With neither,
`VOICEFLEET_FLAG_<KEY>` environment variables (JSON, else a string), then the caller's default.

Standard library only: it runs in the agent's own environment. voicefleet's local runtime puts
this package on the instances' PYTHONPATH and sets VOICEFLEET_URL, VOICEFLEET_AGENT_ID and the
instance's own LIVEKIT_API_KEY / LIVEKIT_API_SECRET, which is all the client needs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from voicefleet.sdk.evaluate import Session, evaluate, is_type

log = logging.getLogger("voicefleet.sdk")

LIVE, CACHED, ENV = "live", "cached", "env"


def _token(api_key: str, api_secret: str, ttl: int = 3600) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {
        "iss": api_key,
        "sub": "voicefleet-flags",
        "nbf": now - 5,
        "exp": now + ttl,
        # Needed when signing with the project's key (a worker started by hand); an
        # instance's own key reads its agent's flags without it.
        "agent": {"admin": True},
    }
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(api_secret.encode(), f"{header}.{body}".encode(), hashlib.sha256)
    return f"{header}.{body}.{b64(signature.digest())}"


def env_name(key: str) -> str:
    return "VOICEFLEET_FLAG_" + re.sub(r"[^A-Za-z0-9]", "_", key).upper()


def env_value(key: str, default: Any = None) -> Any:
    """The flag's `VOICEFLEET_FLAG_<KEY>` variable (JSON, else the text), else `default`."""
    raw = os.environ.get(env_name(key))
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class FlagsClient:
    def __init__(
        self,
        url: str | None = None,
        agent: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
        cache_path: str | Path | None = None,
    ) -> None:
        self.url = (url or os.environ.get("VOICEFLEET_URL", "")).rstrip("/")
        self.agent = agent or os.environ.get("VOICEFLEET_AGENT_ID", "")
        self.api_key = api_key or os.environ.get("LIVEKIT_API_KEY", "")
        self.api_secret = api_secret or os.environ.get("LIVEKIT_API_SECRET", "")
        # The user's own cache dir, not the shared temp dir (where another user could plant a
        # file or a link under the same name); instances voicefleet runs get one per agent.
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        default_cache = Path(cache_home) / "voicefleet" / f"flags-{self.agent or 'x'}.json"
        self.cache_path = Path(
            cache_path or os.environ.get("VOICEFLEET_FLAGS_CACHE", "") or default_cache
        )
        self.source = ENV
        self.version = 0  # bumps with every snapshot received (or read from the cache)
        self._flags: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._started = False
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._read_cache()
        _clients.add(self)

    def _forked(self) -> None:
        """In a forked child (livekit-agents forks job processes from a forkserver, which may
        have imported the agent and started its client): the stream thread stayed behind, and
        a lock it held would stay held forever. Fresh locks; the thread restarts on next use."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread, self._conn = None, None

    def _running(self) -> None:
        if self._started and self._thread is None:
            self.start()

    # -- reading flags ------------------------------------------------------------------------

    def get(self, key: str, default: Any = None, session: Session | None = None) -> Any:
        """The flag's value for `session`. Without a session, rules that look at the session
        do not match and percentages admit nobody: what every session gets for sure."""
        self._running()
        with self._lock:
            flag = self._flags.get(key)
        if flag is not None:
            return evaluate(flag, session or Session())[0]
        return env_value(key, default)

    def get_bool(self, key: str, default: bool = False, session: Session | None = None) -> bool:
        value = self.get(key, default, session)
        return value if isinstance(value, bool) else default

    def get_str(self, key: str, default: str = "", session: Session | None = None) -> str:
        value = self.get(key, default, session)
        return value if isinstance(value, str) else default

    def get_number(self, key: str, default: float = 0.0, session: Session | None = None) -> float:
        value = self.get(key, default, session)
        return value if is_type("number", value) else default

    def definition(self, key: str) -> dict[str, Any] | None:
        self._running()
        with self._lock:
            return self._flags.get(key)

    def wait_version(self, version: int, timeout: float) -> bool:
        """Wait until a snapshot newer than `version` has arrived; False after `timeout`."""
        self._running()
        with self._changed:
            return self._changed.wait_for(lambda: self.version > version, timeout)

    def wait_ready(self, timeout: float = 2.0) -> bool:
        """Wait for the first live snapshot; False (still serving cache/env) after `timeout`."""
        self._running()
        with self._changed:
            return self._changed.wait_for(lambda: self.source == LIVE, timeout)

    # -- the stream ---------------------------------------------------------------------------

    def start(self) -> FlagsClient:
        with self._lock:  # job threads may all ask at once: one stream
            if self._thread is None and self.url and self.agent:
                self._started = True
                self._thread = threading.Thread(
                    target=self._run, name="voicefleet-flags", daemon=True
                )
                self._thread.start()
        return self

    def close(self) -> None:
        self._started = False
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(2)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                self._stream()
                delay = 0.1
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.debug("flag stream: %s", e)
            except Exception:
                # Anything else (a snapshot of an unexpected shape) must not end the thread:
                # the agent would keep stale flags for the rest of its life.
                log.exception("flag stream failed; reconnecting")
            with self._lock:
                if self.source == LIVE:
                    self.source = CACHED  # the server went away: keep serving the copy
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)

    def _stream(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        conn_type = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = conn_type(parts.netloc, timeout=5)  # a host that does not answer: retry soon
        self._conn = conn
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(30)  # keepalives come every 15 s: silence means a dead link
            path = f"{parts.path}/api/v1/agents/{urllib.parse.quote(self.agent)}/flags/stream"
            token = _token(self.api_key, self.api_secret)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            if response.status != 200:
                body = response.read(500).decode(errors="replace")
                log.warning("flag stream refused: %s %s", response.status, body)
                self._stop.wait(5)
                return
            data: list[str] = []
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return  # the server closed the stream
                text = line.decode().rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[5:].strip())
                elif not text and data:
                    self._apply(json.loads("\n".join(data)))
                    data = []
        finally:
            conn.close()
            self._conn = None

    def _apply(self, snapshot: Mapping[str, Any]) -> None:
        flags = {f["key"]: f for f in snapshot.get("flags", [])}
        with self._changed:
            self._flags, self.source = flags, LIVE
            self.version += 1
            self._changed.notify_all()
        self._write_cache(flags)

    # -- the cache file -----------------------------------------------------------------------

    def _read_cache(self) -> None:
        try:
            flags = json.loads(self.cache_path.read_text())["flags"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        self._flags = {f["key"]: f for f in flags}
        self.source, self.version = CACHED, 1

    def _write_cache(self, flags: Mapping[str, Any]) -> None:
        tmp = self.cache_path.with_name(self.cache_path.name + f".{os.getpid()}.tmp")
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"flags": list(flags.values()), "at": time.time()}))
            os.replace(tmp, self.cache_path)  # readers never see half a file
        except OSError as e:
            log.debug("flag cache not written: %s", e)


_clients: weakref.WeakSet[FlagsClient] = weakref.WeakSet()
_client: FlagsClient | None = None
_client_lock = threading.Lock()


def _after_fork() -> None:
    global _client_lock
    _client_lock = threading.Lock()
    for client in list(_clients):
        client._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork)


def flags() -> FlagsClient:
    """The process's client, started on first use (configured from the environment)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = FlagsClient().start()
        return _client
