"""Feature flag definitions and their evaluation for one session. Standard library only: this runs
inside agents' own environments as well as in the server, and both must give the same answer.

A flag, as stored and streamed:

    {"key": "new_voice", "type": "boolean", "value": false,
     "rules": [{"when": [{"attr": "room", "op": "prefix", "value": "vip-"}],
                "percent": 100, "value": true},
               {"when": [], "percent": 20, "value": true}],
     "killed": false, "off": false}

The first rule whose conditions all hold and whose percentage admits the session gives the value;
otherwise `value`. A killed flag gives `off` to every session (a kill switch). A session's place
in a percentage is a hash of the flag's key and the session (its dispatch id, else its room), so
one session gets one answer wherever it is evaluated, and 20 % today is a superset of 10 %
yesterday. An evaluation without a session (no dispatch id, no room) is in no percentage: a
share of "no session" would otherwise be one arbitrary answer given to every such call.

Conditions compare text: a JSON value that is not a string (in the rule, or under a key of the
job's metadata) is compared as its JSON text, so `true` in a rule matches `{"vip": true}`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TYPES: dict[str, type | tuple[type, ...]] = {"boolean": bool, "string": str, "number": (int, float)}
OPS = ("equals", "in", "prefix", "glob", "contains")
KEY = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
ATTR = re.compile(r"^(room|dispatch_id|metadata|(metadata|attributes)\.[^\s]{1,100})$")
OFF = {"boolean": False, "string": "", "number": 0}


@dataclass(frozen=True)
class Session:
    """What a flag may look at: the job's room, dispatch, metadata and attributes."""

    room: str = ""
    dispatch_id: str = ""
    metadata: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.dispatch_id or self.room

    @classmethod
    def from_job(cls, job: Any) -> Session:
        """From a livekit `JobContext.job` (the `livekit.protocol.agent.Job` message)."""
        return cls(
            room=getattr(getattr(job, "room", None), "name", "") or "",
            dispatch_id=getattr(job, "dispatch_id", "") or "",
            metadata=getattr(job, "metadata", "") or "",
            attributes=dict(getattr(job, "attributes", {}) or {}),
        )

    def get(self, attr: str) -> str | None:
        if attr == "room":
            return self.room
        if attr == "dispatch_id":
            return self.dispatch_id
        if attr == "metadata":
            return self.metadata
        if attr.startswith("attributes."):
            return self.attributes.get(attr.removeprefix("attributes."))
        if attr.startswith("metadata."):
            try:
                value = json.loads(self.metadata or "{}").get(attr.removeprefix("metadata."))
            except (ValueError, AttributeError):
                return None
            return None if value is None else _text(value)
        return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def bucket(flag_key: str, session_key: str) -> int:
    """The session's place in [0, 10000) for this flag."""
    digest = hashlib.sha256(f"{flag_key}:{session_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def _holds(cond: Mapping[str, Any], session: Session) -> bool:
    actual = session.get(str(cond["attr"]))
    if actual is None:
        return False
    want = cond["value"]
    op = cond.get("op", "equals")
    if op == "in":
        return actual in [_text(v) for v in want]
    text = _text(want)
    if op == "equals":
        return actual == text
    if op == "prefix":
        return actual.startswith(text)
    if op == "glob":
        return fnmatch.fnmatchcase(actual, text)
    return text in actual  # contains


def evaluate(flag: Mapping[str, Any], session: Session) -> tuple[Any, str]:
    """The flag's value for `session`, and why: "killed", "rule N" or "default"."""
    if flag.get("killed"):
        return flag.get("off", OFF[flag["type"]]), "killed"
    for i, rule in enumerate(flag.get("rules", ())):
        if all(_holds(c, session) for c in rule.get("when", ())):
            percent = float(rule.get("percent", 100))
            if percent >= 100 or (session.key and bucket(flag["key"], session.key) < percent * 100):
                return rule["value"], f"rule {i + 1}"
    return flag["value"], "default"


def is_type(kind: str, value: Any) -> bool:
    """Whether `value` is a flag value of type `kind` (True is no number, though Python says)."""
    return isinstance(value, TYPES[kind]) and not (kind == "number" and isinstance(value, bool))


def _check_value(kind: str, value: Any, what: str) -> None:
    if not is_type(kind, value):
        raise ValueError(f"{what} must be a {kind}, not {json.dumps(value)}")


def validate(flag: Mapping[str, Any]) -> dict[str, Any]:
    """A flag definition checked and normalized; ValueError says what is wrong."""
    if not isinstance(flag, Mapping):
        raise ValueError("a flag is a JSON object")
    key = flag.get("key")
    if not isinstance(key, str) or not KEY.match(key):
        raise ValueError("a flag key is 1-100 letters, digits, '_', '.' or '-'")
    if key == "stream":  # GET /agents/<agent>/flags/stream is the live stream
        raise ValueError("'stream' is reserved: choose another flag key")
    kind = flag.get("type")
    if kind not in TYPES:
        raise ValueError(f"flag type must be one of {', '.join(TYPES)}")
    _check_value(kind, flag.get("value"), "the value")
    raw_rules = flag.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ValueError("'rules' is a list of {when, percent, value}")
    rules = [_rule(kind, i + 1, rule) for i, rule in enumerate(raw_rules)]
    off = flag.get("off", OFF[kind])
    _check_value(kind, off, "the kill switch's 'off' value")
    return {
        "key": key,
        "type": kind,
        "value": flag["value"],
        "rules": rules,
        "killed": bool(flag.get("killed", False)),
        "off": off,
    }


def _rule(kind: str, n: int, rule: Any) -> dict[str, Any]:
    if not isinstance(rule, Mapping):
        raise ValueError(f"rule {n} is not an object {{when, percent, value}}")
    raw_when = rule.get("when") or []
    if not isinstance(raw_when, list):
        raise ValueError(f"rule {n}: 'when' is a list of conditions")
    when = []
    for cond in raw_when:
        if not isinstance(cond, Mapping) or not isinstance(cond.get("attr"), str):
            raise ValueError(f"rule {n}: a condition is {{attr, op, value}}")
        if not ATTR.match(cond["attr"]):
            raise ValueError(
                f"rule {n}: attr '{cond['attr']}' is not room, dispatch_id, metadata, "
                "metadata.<key> or attributes.<name>"
            )
        if "value" not in cond:
            raise ValueError(f"rule {n}: the condition on {cond['attr']} has no 'value'")
        op = cond.get("op", "equals")
        if op not in OPS:
            raise ValueError(f"rule {n}: op must be one of {', '.join(OPS)}")
        if (op == "in") != isinstance(cond["value"], list):
            raise ValueError(f"rule {n}: 'in' and only 'in' takes a list")
        when.append({"attr": cond["attr"], "op": op, "value": cond["value"]})
    percent = rule.get("percent", 100)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise ValueError(f"rule {n}: percent must be a number between 0 and 100")
    _check_value(kind, rule.get("value"), f"rule {n}'s value")
    return {"when": when, "percent": percent, "value": rule["value"]}
