"""The LiveKit server voicefleet registers with: where its agent endpoint is, how to sign in,
how long to wait between attempts, and what to tell the operator when it refuses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import InvalidStatus, InvalidURI

from voicefleet.protocol import tokens

TOKEN_TTL = 6 * 3600  # as livekit-agents' worker token; a new one is minted per connection


class BadTarget(ValueError):
    """The LiveKit url cannot be an agent endpoint (said once, at start)."""


@dataclass(frozen=True)
class LiveKitTarget:
    url: str  # as given: ws(s):// or http(s)://, with an optional path prefix
    api_key: str
    api_secret: str

    @property
    def agent_url(self) -> str:
        """`<url>/agent` over ws(s), keeping a path prefix, as livekit-agents builds it."""
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        if scheme not in ("ws", "wss") or not parts.netloc:
            raise BadTarget(
                f"--livekit-url {self.url!r} is not a LiveKit server url "
                "(ws://, wss://, http:// or https:// and a host)"
            )
        path = parts.path.rstrip("/") + "/agent"
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    @property
    def room_url(self) -> str:
        """The url jobs join their rooms at when LiveKit's assignment names none (OSS)."""
        return self.url

    def headers(self) -> dict[str, str]:
        """The worker's credentials: a LiveKit token of this key with the agent grant."""
        token = tokens.mint(self.api_key, self.api_secret, video={"agent": True}, ttl=TOKEN_TTL)
        return {"Authorization": f"Bearer {token}"}


def backoff(attempt: int, first: float, most: float) -> float:
    """Seconds to wait before reconnection attempt `attempt` (0-based): doubling, capped."""
    return float(min(first * 2.0 ** min(attempt, 30), most))


def why_not(target: LiveKitTarget, error: BaseException) -> str:
    """One line an operator can act on, for a failed connection or registration."""
    if isinstance(error, InvalidStatus):
        status = error.response.status_code
        # LiveKit quotes the token it refused in its answer: never in our logs.
        body = _JWT.sub("<token>", (error.response.body or b"").decode(errors="replace"))
        said = f": {body.strip()[:200]}" if body.strip() else ""
        if status in (401, 403):
            return (
                f"LiveKit at {target.url} refused API key {target.api_key!r} (HTTP {status}"
                f"{said}): check --livekit-api-key and --livekit-api-secret"
            )
        return f"LiveKit at {target.url} answered HTTP {status}{said}"
    if isinstance(error, InvalidURI):
        return f"--livekit-url {target.url!r} is not a valid url: {error}"
    if isinstance(error, TimeoutError):
        return f"LiveKit at {target.url} did not answer in time"
    if isinstance(error, OSError):
        return f"cannot reach LiveKit at {target.url}: {error.strerror or error}"
    return f"connection to LiveKit at {target.url} failed: {error!r}"


_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.?[\w-]*")
