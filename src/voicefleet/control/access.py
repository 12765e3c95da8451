"""Who may do what: voicefleet's own API keys, their roles, and the principal a request acts as.

A key is `vfk_<12 hex>.<secret>`: the id part is what `vf server keys list`, the event log and
the logs show; the secret part is 256 random bits, shown once, and only its HMAC-SHA256 under a
pepper is stored. A slow password hash (scrypt, argon2) buys nothing for a secret with that
much entropy, which no one can guess however fast the hash, and it would cost every request
tens of milliseconds of CPU; the pepper, derived from the data dir's `secrets.key` and never in
the database, means a leaked database (a dump, a backup) cannot even be used to check a guess.

The project's LiveKit key, signing tokens with the agent admin grant, stays an admin.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.exc import DBAPIError

from voicefleet.errors import AuthError, InvalidRequest, NotFound, PermissionDenied
from voicefleet.protocol import tokens
from voicefleet.protocol.tokens import Role
from voicefleet.store.models import SYSTEM, Actor, AgentRow, ApiKeyRow
from voicefleet.store.repo import Repo

log = logging.getLogger("voicefleet.access")

PEPPER_PURPOSE = "api key pepper v1"
USED_EVERY = 60.0  # seconds: a key's last use is written at most this often
_TOKEN = re.compile(r"^(vfk_[0-9a-f]{12})\.([A-Za-z0-9_-]{20,100})$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def split_token(token: str) -> tuple[str, str]:
    """(key id, secret) of a key token; AuthError when it is not one."""
    found = _TOKEN.match(token.strip())
    if found is None:
        raise AuthError("malformed voicefleet API key (expected vfk_<id>.<secret>)")
    return found.group(1), found.group(2)


def parse_duration(text: str) -> float:
    """Seconds in "30d", "12h", "1h30m", "90s", "2w"; InvalidRequest otherwise."""
    clean = text.strip().lower()
    parts = _DURATION.findall(clean)
    if not clean or "".join(n + u for n, u in parts) != clean:
        raise InvalidRequest(f"'{text}' is not a duration: use e.g. 90s, 30m, 12h, 30d, 2w, 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise InvalidRequest(f"the duration '{text}' must be more than zero")
    return seconds


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time: a duration ago ("1h", "30d"), an ISO 8601 date or date-time (UTC when
    it names no zone), or Unix seconds."""
    now = time.time() if now is None else now
    clean = text.strip()
    try:
        seconds = float(clean)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        return now - parse_duration(clean)
    except InvalidRequest:
        pass
    try:
        when = datetime.fromisoformat(clean.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"'{text}' is not a time: give a duration ago (1h, 30d), an ISO date "
            "(2026-11-30 or 2026-11-30T18:00:00Z) or Unix seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key, its role, and the one agent it is limited to (if any)."""

    key: str  # a voicefleet key's id, or the project's LiveKit key
    name: str
    role: Role
    agent_id: str = ""
    agent_name: str = ""

    def allows(self, role: Role) -> bool:
        return self.role.rank >= role.rank

    def require(self, role: Role, what: str) -> None:
        """PermissionDenied, saying which role `what` needs, unless this key has it."""
        if not self.allows(role):
            raise PermissionDenied(
                f"{what} needs the {role} role; key {self.key}"
                f"{f' ({self.name})' if self.name else ''} is a {self.role}"
            )

    def covers(self, agent: str) -> bool:
        """Whether this key may act on `agent` (an id or a name)."""
        return not self.agent_id or agent in (self.agent_id, self.agent_name)

    def require_agent(self, agent: str) -> None:
        if not self.covers(agent):
            raise PermissionDenied(
                f"key {self.key} is limited to agent {self.agent_name}; it may not act on {agent}"
            )

    def actor(self, via: str, ip: str = "") -> Actor:
        return Actor(key=self.key, via=via, ip=ip)


def project_principal(api_key: str) -> Principal:
    """The project's own LiveKit key: an admin, as before there were roles."""
    return Principal(key=api_key, name="project key", role=Role.ADMIN)


class Keys:
    """Make, list, revoke and check voicefleet API keys."""

    def __init__(self, repo: Repo, pepper: bytes) -> None:
        self.repo = repo
        self._pepper = pepper

    def digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    async def create(
        self,
        role: Role | str,
        *,
        agent: str = "",
        name: str = "",
        expires_in: float | None = None,
        actor: Actor = SYSTEM,
    ) -> tuple[ApiKeyRow, str]:
        """A new key and its token (`vfk_<id>.<secret>`): the token is not kept anywhere."""
        try:
            role = Role(role)
        except ValueError:
            raise InvalidRequest(
                f"role '{role}' is not one of {', '.join(r.value for r in Role)}"
            ) from None
        if len(name) > 100:
            raise InvalidRequest("a key's name is at most 100 characters")
        if expires_in is not None and expires_in <= 0:
            raise InvalidRequest("a key's lifetime must be more than zero")
        scope: AgentRow | None = None
        if agent:
            scope = await self.repo.agent(agent)
            if scope is None:
                raise NotFound(f"no agent '{agent}' to limit the key to")
        now = time.time()
        key_id = tokens.KEY_PREFIX + secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=key_id,
            name=name,
            role=role.value,
            agent_id=scope.id if scope else "",
            digest=self.digest(secret),
            created_by=actor.label,
            created_at=now,
            expires_at=now + expires_in if expires_in else 0.0,
            revoked_at=0.0,
            last_used_at=0.0,
        )
        await self.repo.save(row)
        what = f"key {key_id}{f' ({name})' if name else ''} created: {role}"
        if scope is not None:
            what += f", agent {scope.name} only"
        if row.expires_at:
            what += (
                f", expires {datetime.fromtimestamp(row.expires_at).astimezone():%Y-%m-%d %H:%M %Z}"
            )
        await self.repo.event(row.agent_id, "key_created", what, actor)
        return row, f"{key_id}.{secret}"

    async def list(self) -> list[ApiKeyRow]:
        return await self.repo.api_keys()

    async def revoke(self, key_id: str, actor: Actor = SYSTEM) -> ApiKeyRow:
        """Revoke a key (at once: the next request with it is refused). Revoking it again
        changes nothing."""
        row = await self.repo.api_key(key_id)
        if row is None:
            raise NotFound(f"no API key '{key_id}'")
        if not row.revoked_at:
            row.revoked_at = time.time()
            await self.repo.save(row)
            label = f"{row.id} ({row.name})" if row.name else row.id
            await self.repo.event(row.agent_id, "key_revoked", f"key {label} revoked", actor)
        return row

    async def authenticate(self, token: str) -> Principal:
        """The principal a key token stands for; AuthError if it is unknown, wrong, revoked
        or expired."""
        key_id, secret = split_token(token)
        row = await self.repo.api_key(key_id)
        # Compared even for an unknown key, so that timing does not tell which ids exist.
        expected = row.digest if row is not None else self.digest("")
        if not hmac.compare_digest(self.digest(secret), expected) or row is None:
            raise AuthError(f"unknown API key '{key_id}', or a wrong secret")
        return await self._principal(row)

    async def principal(self, key_id: str) -> Principal:
        """The principal of a key already proven (a dashboard session): revoked, expired, or
        gone keys are refused as `authenticate` refuses them."""
        row = await self.repo.api_key(key_id)
        if row is None:
            raise AuthError(f"unknown API key '{key_id}'")
        return await self._principal(row)

    async def _principal(self, row: ApiKeyRow) -> Principal:
        now = time.time()
        if row.revoked_at:
            raise AuthError(f"API key {row.id} was revoked")
        if row.expires_at and row.expires_at <= now:
            raise AuthError(f"API key {row.id} has expired")
        agent_name = ""
        if row.agent_id:
            agent = await self.repo.agent(row.agent_id)
            if agent is None:
                raise AuthError(f"API key {row.id} was limited to an agent that has been deleted")
            agent_name = agent.name
        if now - row.last_used_at >= USED_EVERY:
            try:
                await self.repo.key_used(row.id, now)
            except (DBAPIError, OSError) as e:
                # A note, not a gate: a full disk must not lock out the keys that could fix it.
                log.warning("the last use of key %s was not recorded: %s", row.id, e)
        return Principal(
            key=row.id, name=row.name, role=Role(row.role), agent_id=row.agent_id,
            agent_name=agent_name,
        )  # fmt: skip


def key_dict(row: ApiKeyRow, agent_names: dict[str, str]) -> dict[str, object]:
    """A key as `vf server keys list` and GET /api/v1/keys show it (never its digest)."""
    now = time.time()
    if row.revoked_at:
        state = "revoked"
    elif row.expires_at and row.expires_at <= now:
        state = "expired"
    elif row.agent_id and row.agent_id not in agent_names:
        state = "agent deleted"  # refused, as _principal says
    else:
        state = "active"
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "agent_id": row.agent_id,
        "agent": agent_names.get(row.agent_id, row.agent_id),
        "state": state,
        "created_by": row.created_by,
        "created_at": row.created_at,
        "expires_at": row.expires_at or None,
        "revoked_at": row.revoked_at or None,
        "last_used_at": row.last_used_at or None,
    }
