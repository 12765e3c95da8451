"""The pure parts of access control: which role a route needs, what an agent-limited key may
reach, durations and times as `--expires` and `--since` take them."""

from __future__ import annotations

import pytest

from voicefleet.api.guard import authorize, required_role
from voicefleet.control.access import Principal, parse_duration, parse_time
from voicefleet.errors import InvalidRequest, PermissionDenied
from voicefleet.protocol.tokens import Role, is_key_token
from voicefleet.store.models import Actor, actor_parts

ROUTES = {
    ("GET", "/api/v1/agents/a/logs"): Role.VIEWER,
    ("GET", "/api/v1/events"): Role.VIEWER,
    ("POST", "/api/v1/agents/a/versions"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/rollouts"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/rollback"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/promote"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/restart"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/canary/pause"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/scale"): Role.DEPLOYER,
    ("PUT", "/api/v1/agents/a/flags/f"): Role.DEPLOYER,
    ("POST", "/api/v1/agents/a/flags/f/kill"): Role.DEPLOYER,
    ("DELETE", "/api/v1/agents/a/flags/f"): Role.DEPLOYER,
    ("PUT", "/api/v1/routing/x"): Role.DEPLOYER,
    ("POST", "/api/v1/agents"): Role.ADMIN,
    ("DELETE", "/api/v1/agents/a"): Role.ADMIN,
    ("PATCH", "/api/v1/agents/a"): Role.ADMIN,
    ("PUT", "/api/v1/agents/a/secrets"): Role.ADMIN,
    ("DELETE", "/api/v1/agents/a/secrets"): Role.ADMIN,
    ("GET", "/api/v1/keys"): Role.ADMIN,
    ("POST", "/api/v1/keys"): Role.ADMIN,
    ("DELETE", "/api/v1/keys/vfk_1"): Role.ADMIN,
    # A change nobody listed is an admin's: new routes are closed until given a role.
    ("POST", "/api/v1/agents/a/something-new"): Role.ADMIN,
    ("POST", "/api/v1/agents/a/scale/extra"): Role.ADMIN,
}


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_each_route_needs_its_role(method: str, path: str) -> None:
    assert required_role(method, path) == ROUTES[(method, path)]


def test_an_agent_limited_key_reaches_its_agent_by_name_or_id_and_nothing_about_all() -> None:
    key = Principal("vfk_1", "", Role.ADMIN, agent_id="CA_1", agent_name="shop")
    authorize(key, "POST", "/api/v1/agents/shop/scale")
    authorize(key, "GET", "/api/v1/agents/CA_1")
    authorize(key, "GET", "/api/v1/agents")
    authorize(key, "GET", "/api/v1/events")
    for method, path in [
        ("GET", "/api/v1/agents/bank"),
        ("GET", "/api/v1/workers"),
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/keys"),
        ("PUT", "/api/v1/routing/x"),
    ]:
        with pytest.raises(PermissionDenied, match="limited to agent shop"):
            authorize(key, method, path)


def test_durations_and_times() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2w") == 14 * 86400
    for bad in ("", "0s", "30", "d", "3 days", "1h-5m"):
        with pytest.raises(InvalidRequest):
            parse_duration(bad)
    assert parse_time("1h", now=10_000.0) == 6400.0
    assert parse_time("1700000000") == 1_700_000_000
    assert parse_time("2026-01-01") == 1767225600  # UTC when no zone is named
    assert parse_time("2026-01-01T01:00:00+01:00") == 1767225600
    for bad in ("yesterday", "nan", "inf", ""):
        with pytest.raises(InvalidRequest, match="not a time"):
            parse_time(bad)


def test_key_tokens_and_actors() -> None:
    assert is_key_token("vfk_0123456789ab.secret") and not is_key_token("devkey")
    assert not is_key_token("eyJhbGciOiJIUzI1NiJ9.e30.x")
    assert Actor("vfk_1", "dashboard", "10.0.0.1").label == "vfk_1 (dashboard)"
    assert Actor("APIkey").label == "APIkey"
    assert actor_parts(Actor("vfk_1", "cli").label) == ("vfk_1", "cli")
    assert actor_parts("") == ("", "")
