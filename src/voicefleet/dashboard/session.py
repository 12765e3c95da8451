"""Who is logged in to the dashboard: a signed, expiring session cookie, and its CSRF token.

The dashboard takes the same credentials as the control API (a voicefleet API key, whose role
it keeps, or the project's key and secret, an admin), so it opens no door the API does not. A
key limited to one agent cannot log in: the pages show every agent. A key revoked or expired
after the login ends its sessions at once: each request asks the key store again.

The cookie is `<payload>.<HMAC-SHA256>` with a key derived from the project's secret, so
changing that secret logs every browser out. Each session has a random nonce; its CSRF token is
an HMAC of that nonce, so a token is good for one session only and needs no server-side store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from voicefleet.config import Project
from voicefleet.control.access import Principal
from voicefleet.protocol import tokens
from voicefleet.protocol.tokens import Role

COOKIE = "vf_session"
LIFETIME = 12 * 3600.0  # seconds a login lasts
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    api_key: str
    expires: float
    csrf: str
    # Who the key is now (its role), once the key store has said it is still valid.
    principal: Principal | None = None

    @property
    def can_act(self) -> bool:
        """Whether the pages offer commands: the deployer role or more."""
        return self.principal is not None and self.principal.allows(Role.DEPLOYER)

    @property
    def form_token(self) -> str:
        """The CSRF token for the pages' command forms; "" leaves the forms out (a viewer)."""
        return self.csrf if self.can_act else ""


class Sessions:
    def __init__(self, project: Project) -> None:
        self.project = project
        # A key of its own, not the project secret itself: a cookie is not an API token.
        self._key = hmac.new(
            project.api_secret.encode(), b"voicefleet dashboard session v1", hashlib.sha256
        ).digest()

    def project_credentials(self, api_key: str, api_secret: str) -> bool:
        """The project's own key and secret (an instance's derived key is not enough)."""
        key_ok = hmac.compare_digest(api_key.encode(), self.project.api_key.encode())
        secret_ok = hmac.compare_digest(api_secret.encode(), self.project.api_secret.encode())
        return key_ok and secret_ok

    def issue(self, api_key: str, now: float | None = None) -> str:
        """A new session's cookie value, for the key (a voicefleet key's id, or the
        project's key) that logged in."""
        payload = {
            "k": api_key,
            "e": int((now if now is not None else time.time()) + LIFETIME),
            "n": secrets.token_urlsafe(16),
        }
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries; None if it is missing, forged, expired or for a key
        that is neither the project's nor a voicefleet key (whether that one is still valid is
        the key store's to say)."""
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            key, expires, nonce = str(payload["k"]), float(payload["e"]), str(payload["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if key != self.project.api_key and not key.startswith(tokens.KEY_PREFIX):
            return None
        if expires <= (now if now is not None else time.time()):
            return None
        return Session(api_key=key, expires=expires, csrf=self._sign("csrf:" + nonce))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), session.csrf)

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
