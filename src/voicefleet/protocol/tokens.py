"""LiveKit access tokens: verify what workers and API callers send, mint what workers need.

LiveKit tokens are HS256 JWTs: `iss` is the API key, the key's secret signs, grants sit under
`video` with camelCase names (`agent`, `roomAdmin`, `roomJoin`, ...), and the agent grants that
manage LiveKit Cloud's agents under `agent` (`{"admin": true}`): voicefleet's control API takes
exactly that one. A grant counts only when it is JSON `true`: `"false"` is not a grant.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from voicefleet.errors import AuthError, PermissionDenied

# voicefleet's own API keys (`vf server keys`): what the CLI sends and what a route requires.
KEY_PREFIX = "vfk_"


def is_key_token(value: str) -> bool:
    """Whether `value` looks like a voicefleet key (`vfk_….…`), not a LiveKit key or a JWT."""
    return value.startswith(KEY_PREFIX) and "." in value


class Role(StrEnum):
    """What a voicefleet API key may do; each role may do all the ones before it may."""

    VIEWER = "viewer"  # read everything
    DEPLOYER = "deployer"  # deploy, roll back, rollout commands, scale, flags
    ADMIN = "admin"  # create and delete agents, their settings and secrets; API keys

    @property
    def rank(self) -> int:
        return list(Role).index(self)


# LiveKit's dev credentials (`devkey` / `secret`) are short by design; the server generates
# long secrets for real projects, so the warning would only be noise.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

# Clock skew tolerated between the token's minter and this server, as LiveKit's verifier does.
LEEWAY_SECONDS = 10
WORKER_TOKEN_ISSUER = "voicefleet"


@dataclass(frozen=True)
class Claims:
    api_key: str
    identity: str
    video: Mapping[str, Any]
    raw: Mapping[str, Any]

    def require(self, grant: str, room: str | None = None) -> None:
        """Raise PermissionDenied unless the token holds `grant` (for `room`, when given)."""
        if self.video.get(grant) is not True:
            raise PermissionDenied(f"token lacks the '{grant}' grant")
        if room is not None and self.video.get("room", "") != room:
            raise PermissionDenied(f"token's '{grant}' grant is not for room '{room}'")

    def require_admin(self) -> None:
        """Raise PermissionDenied unless the token holds LiveKit's agent admin grant
        (`"agent": {"admin": true}`, what manages a project's agents). Room grants never do:
        a LiveKit app hands `roomAdmin` for one room to that room's moderator."""
        grants = self.raw.get("agent")
        if not isinstance(grants, dict) or grants.get("admin") is not True:
            raise PermissionDenied(
                "the control API needs a token with the agent admin grant "
                '({"agent": {"admin": true}}, signed with the project\'s key); room grants '
                "such as roomAdmin are not enough"
            )


def bearer(header: str | None) -> str:
    """The token in an `Authorization: Bearer <token>` header (LiveKit webhooks omit `Bearer`)."""
    if not header:
        raise AuthError("missing Authorization header with a LiveKit access token")
    scheme, _, token = header.strip().partition(" ")
    if not token:
        return scheme
    if scheme.lower() != "bearer":
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()


def verify(token: str, secret_for: Callable[[str], str | None]) -> Claims:
    """Check signature, issuer, exp and nbf; return the claims. `secret_for` maps key -> secret."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as e:  # DecodeError, and header checks such as `crit`
        raise AuthError(f"malformed access token: {e}") from None
    api_key = unverified.get("iss")
    if not isinstance(api_key, str) or not api_key:
        raise AuthError("access token has no issuer (iss must be the API key)")
    secret = secret_for(api_key)
    if secret is None:
        raise AuthError(f"unknown API key '{api_key}'")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("access token has expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("access token is not valid yet (nbf is in the future)") from None
    except jwt.InvalidSignatureError:
        raise AuthError(f"access token signature does not match API key '{api_key}'") from None
    except jwt.MissingRequiredClaimError as e:
        raise AuthError(f"access token lacks the '{e.claim}' claim") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid access token: {e}") from None
    video = claims.get("video") or {}
    if not isinstance(video, dict):
        raise AuthError("access token's 'video' grant is not an object")
    return Claims(api_key=api_key, identity=str(claims.get("sub") or ""), video=video, raw=claims)


def mint(
    api_key: str,
    api_secret: str,
    *,
    video: Mapping[str, Any],
    identity: str = "",
    ttl: float = 6 * 3600,
    **extra: Any,
) -> str:
    """A LiveKit access token, as `livekit-api`'s AccessToken.to_jwt() makes one."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": api_key,
        "sub": identity,
        "nbf": now,
        "exp": now + int(ttl),
        "video": dict(video),
        **extra,
    }
    return jwt.encode(claims, api_secret, algorithm="HS256")


def mint_admin(api_key: str, api_secret: str, ttl: float = 3600) -> str:
    """A token for voicefleet's control API: LiveKit's agent admin grant, no room grants."""
    return mint(api_key, api_secret, video={}, ttl=ttl, agent={"admin": True})


def mint_room_token(
    api_key: str,
    api_secret: str,
    *,
    room: str,
    identity: str,
    name: str,
    metadata: str,
    attributes: Mapping[str, str],
    permissions: Mapping[str, Any],
    ttl: float = 6 * 3600,
) -> str:
    """The token a worker's job joins its room with: the identity the worker chose, agent kind."""
    video = {"roomJoin": True, "room": room, "agent": True, **permissions}
    extra: dict[str, Any] = {"name": name or identity, "kind": "agent", "jti": identity}
    if metadata:
        extra["metadata"] = metadata
    if attributes:
        extra["attributes"] = dict(attributes)
    return mint(api_key, api_secret, video=video, identity=identity, ttl=ttl, **extra)


@dataclass(frozen=True)
class WorkerIdentity:
    """Which agent, version and instance a managed worker is (from its `worker_token`)."""

    agent: str
    version: str
    instance: str


UNMANAGED = WorkerIdentity(agent="", version="", instance="")


INSTANCE_KEY_PREFIX = "vf/"


def instance_credentials(project_secret: str, identity: WorkerIdentity) -> tuple[str, str]:
    """The API key and secret an instance's worker signs with.

    The key names the agent, version and instance; the secret is derived from the project's, so
    the server knows both from the key alone and stores nothing. (Not `LIVEKIT_WORKER_TOKEN`:
    with it, livekit-agents believes it runs on LiveKit Cloud and replaces the agent's own
    load_fnc and load_threshold by its CPU-based defaults.)
    """
    key = f"{INSTANCE_KEY_PREFIX}{identity.agent}/{identity.version}/{identity.instance}"
    return key, instance_secret(project_secret, key)


def instance_secret(project_secret: str, key: str) -> str:
    return hmac.new(project_secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def instance_identity(key: str) -> WorkerIdentity | None:
    """The identity an instance key names, or None for any other key."""
    if not key.startswith(INSTANCE_KEY_PREFIX):
        return None
    parts = key[len(INSTANCE_KEY_PREFIX) :].split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return WorkerIdentity(agent=parts[0], version=parts[1], instance=parts[2])


def mint_worker_token(api_secret: str, identity: WorkerIdentity, ttl: float = 365 * 86400) -> str:
    """A `worker_token` (LiveKit's hosted-mode query parameter) naming agent, version and
    instance. Accepted from workers that send one; voicefleet's own runtime uses instance keys."""
    now = int(time.time())
    claims = {
        "iss": WORKER_TOKEN_ISSUER,
        "nbf": now,
        "exp": now + int(ttl),
        "agent": identity.agent,
        "version": identity.version,
        "instance": identity.instance,
    }
    return jwt.encode(claims, api_secret, algorithm="HS256")


def verify_worker_token(token: str, api_secret: str) -> WorkerIdentity:
    try:
        claims = jwt.decode(
            token,
            api_secret,
            algorithms=["HS256"],
            issuer=WORKER_TOKEN_ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iss"]},
        )
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid worker_token: {e}") from None
    return WorkerIdentity(
        agent=str(claims.get("agent", "")),
        version=str(claims.get("version", "")),
        instance=str(claims.get("instance", "")),
    )
