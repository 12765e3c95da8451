"""The corpus's bad tokens against a real `vf server`: each is refused with 401 or 403 by the
control API, the dispatch API (Twirp) and the worker endpoint, never with a server error."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from tests.support import DEV_KEY, DEV_SECRET, Server

CORPUS = Path(__file__).parent / "corpus" / "tokens"
BAD = [p for p in sorted(CORPUS.iterdir()) if not p.name.startswith("ok-")]


def crit_admin_token() -> str:
    """Signed with the server's own key and holding the admin grant, but with a critical header
    extension nobody here implements (RFC 7515: such a token must be refused)."""
    claims = {"iss": DEV_KEY, "exp": 4_000_000_000, "agent": {"admin": True}}
    with warnings.catch_warnings():  # the dev secret is short by design
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(claims, DEV_SECRET, algorithm="HS256", headers={"crit": ["x"]})


@pytest.mark.parametrize(
    "token",
    [p.read_text().strip() for p in BAD] + [crit_admin_token()],
    ids=[p.name for p in BAD] + ["crit-signed-by-the-server-key"],
)
def test_bad_tokens_are_refused_never_a_server_error(server: Server, token: str) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    api = httpx.get(server.url + "/api/v1/agents", headers=auth, timeout=10)
    assert api.status_code in (401, 403), api.text
    twirp = httpx.post(
        server.url + "/twirp/livekit.AgentDispatchService/ListDispatch",
        headers={**auth, "Content-Type": "application/json"},
        json={"room": "r"},
        timeout=10,
    )
    assert twirp.status_code in (401, 403), twirp.text
    worker = httpx.get(
        server.url + "/agent",
        headers={
            **auth,
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
        timeout=10,
    )
    assert worker.status_code in (401, 403), worker.text
