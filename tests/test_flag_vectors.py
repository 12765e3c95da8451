"""Shared flag test vectors (sdk/vectors/flags.json): flag definitions, sessions, and what the
Python SDK gives for them. The Node SDK's tests (sdk/node/test) check the same file, so both SDKs
give one session one answer.

The cases are written here; the expected answers are the Python evaluator's. After a change to
the cases (or, deliberately, to evaluation), rewrite the file and review its diff:

    .venv/bin/python -m tests.test_flag_vectors --write
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from openfeature.evaluation_context import EvaluationContext

from tests.support import ROOT
from voicefleet.sdk import FlagsClient, Session
from voicefleet.sdk.evaluate import _text as text
from voicefleet.sdk.evaluate import bucket, evaluate, validate
from voicefleet.sdk.flags import env_name
from voicefleet.sdk.openfeature import VoicefleetProvider

VECTORS = ROOT / "sdk" / "vectors" / "flags.json"


def cond(attr: str, value: Any, op: str = "equals") -> dict[str, Any]:
    return {"attr": attr, "op": op, "value": value}


def rule(value: Any, *when: dict[str, Any], percent: float = 100) -> dict[str, Any]:
    return {"when": list(when), "percent": percent, "value": value}


FLAGS: list[dict[str, Any]] = [
    {"key": "plain", "type": "string", "value": "alloy"},
    {"key": "ops", "type": "string", "value": "none", "rules": [
        rule("equals", cond("room", "exact-room")),
        rule("prefix", cond("room", "vip-", "prefix")),
        rule("in", cond("attributes.lang", ["fr", "de", "1"], "in")),
        rule("contains", cond("dispatch_id", "_beta_", "contains")),
        rule("glob", cond("room", "call-??-[0-9]*", "glob")),
    ]},
    {"key": "globs", "type": "number", "value": 0, "rules": [
        rule(1, cond("room", "[!a-c]x", "glob")),
        rule(2, cond("room", "a[]]b", "glob")),
        rule(3, cond("room", "[z-a]*", "glob")),
        rule(4, cond("room", "x[a-]y", "glob")),
        rule(5, cond("room", "p[", "glob")),
        rule(6, cond("room", "*.mp3", "glob")),
        rule(7, cond("room", "Q*Q*Q", "glob")),
        rule(8, cond("room", "é?ü", "glob")),
        rule(9, cond("room", "[!]", "glob")),
        rule(10, cond("room", "[a-c-e]", "glob")),
    ]},
    {"key": "meta", "type": "string", "value": "default", "rules": [
        rule("vip", cond("metadata.vip", True)),
        rule("tier2", cond("metadata.tier", 2)),
        rule("tiers", cond("metadata.tier", [3, 4], "in")),
        rule("score", cond("metadata.score", 0.5)),
        rule("tiny", cond("metadata.score", 1e-05)),
        rule("huge", cond("metadata.score", 1e20)),
        rule("tags", cond("metadata.tags", '["a", "\\u00e9"]')),
        rule("obj", cond("metadata.obj", {"a": [1, 2], "b": None})),
        rule("name", cond("metadata.name", "Zoë")),
        rule("whole", cond("metadata", '{"whole": 1}')),
    ]},
    {"key": "both", "type": "boolean", "value": False, "rules": [
        rule(True, cond("attributes.tier", "gold"), cond("room", "vip-", "prefix")),
    ]},
    {"key": "empty_room", "type": "boolean", "value": False, "rules": [
        rule(True, cond("room", "")),
    ]},
    {"key": "everyone", "type": "number", "value": 1, "rules": [rule(2.5)]},
    {"key": "pct20", "type": "boolean", "value": False, "rules": [rule(True, percent=20)]},
    {"key": "pct50", "type": "string", "value": "a", "rules": [rule("b", percent=50)]},
    {"key": "pct_fraction", "type": "boolean", "value": False,
     "rules": [rule(True, percent=33.33)]},
    {"key": "pct_zero", "type": "boolean", "value": False, "rules": [rule(True, percent=0)]},
    {"key": "pct_targeted", "type": "string", "value": "stable", "rules": [
        rule("vip", cond("room", "vip-", "prefix"), percent=50),
        rule("canary", percent=10),
    ]},
    {"key": "killed_bool", "type": "boolean", "value": True, "killed": True,
     "rules": [rule(True)]},
    {"key": "killed_string", "type": "string", "value": "x", "killed": True, "off": "safe",
     "rules": [rule("y")]},
    {"key": "killed_number", "type": "number", "value": 9, "killed": True},
]  # fmt: skip

NO_SESSION: dict[str, Any] = {}
SESSIONS: list[dict[str, Any]] = [
    NO_SESSION,
    {"room": "exact-room"},
    {"room": "vip-1", "attributes": {"tier": "gold"}},
    {"room": "vip-2", "attributes": {"tier": "silver"}},
    {"room": "r", "attributes": {"lang": "de"}},
    {"room": "r", "attributes": {"lang": "1"}},
    {"room": "r", "dispatch_id": "AD_beta_7"},
    {"room": "call-42-7b"},
    {"room": "call-4-7"},
    {"room": "dx"}, {"room": "ax"}, {"room": "a]b"}, {"room": "zz"}, {"room": "x-y"},
    {"room": "xby"}, {"room": "p["}, {"room": "song.mp3"}, {"room": "QaQbQ"}, {"room": "QQ"},
    {"room": "éaü"}, {"room": "é😀ü"}, {"room": "[!]"}, {"room": "-"}, {"room": "d"},
    {"room": "r", "metadata": '{"vip": true}'},
    {"room": "r", "metadata": '{"vip": "true"}'},
    {"room": "r", "metadata": '{"vip": false}'},
    {"room": "r", "metadata": '{"tier": 2}'},
    {"room": "r", "metadata": '{"tier": "2"}'},
    {"room": "r", "metadata": '{"tier": 4}'},
    {"room": "r", "metadata": '{"score": 0.5}'},
    {"room": "r", "metadata": '{"score": 1e-5}'},
    {"room": "r", "metadata": '{"score": 1e20}'},
    {"room": "r", "metadata": '{"tags": ["a", "\\u00e9"]}'},
    {"room": "r", "metadata": '{"tags": ["a","é"]}'},
    {"room": "r", "metadata": '{"obj": {"a": [1, 2], "b": null}}'},
    {"room": "r", "metadata": '{"name": "Zoë"}'},
    {"room": "r", "metadata": '{"whole": 1}'},
    {"room": "r", "metadata": '{"vip": null}'},
    {"room": "r", "metadata": "not json"},
    {"room": "r", "metadata": '["a list"]'},
    {"room": "r", "metadata": '"a string"'},
    {"dispatch_id": "AD_only"},
]  # fmt: skip

PERCENT_FLAGS = ("pct20", "pct50", "pct_fraction", "pct_zero", "pct_targeted")
# Many sessions for the percentages: by dispatch id (with and without a room), by room alone.
PERCENT_SESSIONS: list[dict[str, Any]] = (
    [{"dispatch_id": f"AD_{n:04x}{n * 7919 % 65536:04x}", "room": "vip-x"} for n in range(24)]
    + [{"dispatch_id": f"AD_{n}"} for n in range(24)]
    + [{"room": f"room-{n}"} for n in range(24)]
    + [{"room": "vip-été"}, NO_SESSION]
)

BUCKETS = [
    ("f", "AD_1"), ("f", "AD_2"), ("new_voice", "room-1"), ("new_voice", ""),
    ("été", "🎧-room"), ("k", "x" * 300), ("a:b", "c:d"), ("", ""),
]  # fmt: skip

# JSON values as conditions compare them (their Python json.dumps text): floats of every
# magnitude, integers up to 2^53, text that needs escaping, nesting. (JavaScript has one number
# type: a float with no fraction below 2^53, 1.0, reads as 1 there; those are not here.)
_rng = random.Random(15)
TEXTS: list[str] = [
    "0.1", "1e-05", "1e-7", "0.0001", "123456789.125", "1e16", "1e17", "2.5e20",
    "1.7976931348623157e308", "5e-324", "-3.25", "9007199254740991", "-42", "0",
    '"plain"', '"tab\\t, quote \\" and \\u0001"', '"é ü 😀 \\u007f"', "true", "null",
    '[1, "a", [true, null], {"k": 2.5}]', '{"z": 1, "a": {"b": []}, "é": "x"}', "{}", "[]",
] + [
    repr(x)
    for x in (_rng.uniform(-1, 1) * 10.0 ** _rng.randint(-12, 30) for _ in range(60))
    if not (x.is_integer() and abs(x) < 2**53)
]  # fmt: skip

# The typed getters over a client holding FLAGS (from its cache file), then the environment.
GETTERS: list[dict[str, Any]] = [
    {"getter": "bool", "flag": "both", "default": True, "session": NO_SESSION},
    {"getter": "bool", "flag": "both", "default": False,
     "session": {"room": "vip-1", "attributes": {"tier": "gold"}}},
    {"getter": "bool", "flag": "plain", "default": True, "session": NO_SESSION},
    {"getter": "string", "flag": "plain", "default": "x", "session": NO_SESSION},
    {"getter": "string", "flag": "everyone", "default": "x", "session": NO_SESSION},
    {"getter": "number", "flag": "everyone", "default": 7, "session": NO_SESSION},
    {"getter": "number", "flag": "killed_bool", "default": 7, "session": NO_SESSION},
    {"getter": "number", "flag": "globs", "default": 7, "session": {"room": "song.mp3"}},
    {"getter": "get", "flag": "killed_string", "default": None, "session": NO_SESSION},
    {"getter": "get", "flag": "absent", "default": "fallback", "session": NO_SESSION},
    {"getter": "bool", "flag": "absent", "default": True, "session": NO_SESSION},
    {"getter": "bool", "flag": "env.bool", "default": False, "env": "true"},
    {"getter": "number", "flag": "env-num", "default": 0, "env": "12.5"},
    {"getter": "number", "flag": "env_num_text", "default": 3, "env": "twelve"},
    {"getter": "string", "flag": "env_text", "default": "", "env": "salut"},
    {"getter": "string", "flag": "env_json_text", "default": "", "env": '"quoted"'},
    {"getter": "string", "flag": "env_bool_as_text", "default": "d", "env": "false"},
    {"getter": "get", "flag": "env_list", "default": None, "env": "[1, 2]"},
    # A flag the server knows wins over its variable.
    {"getter": "string", "flag": "plain", "default": "", "env": "from-env"},
]  # fmt: skip

# The OpenFeature provider: the same flags, live (or, with "source": "cached", from the cache).
OPENFEATURE: list[dict[str, Any]] = [
    {"kind": "string", "flag": "ops", "default": "d", "context": {"room": "vip-9"}},
    {"kind": "string", "flag": "ops", "default": "d", "context": {"targetingKey": "AD_x"}},
    {"kind": "string", "flag": "ops", "default": "d",
     "context": {"targetingKey": "AD_beta_1", "room": "r"}},
    {"kind": "string", "flag": "ops", "default": "d", "context": {"room": "r", "lang": "fr"}},
    {"kind": "string", "flag": "ops", "default": "d", "context": {"room": "r", "lang": 1}},
    {"kind": "string", "flag": "meta", "default": "d",
     "context": {"room": "r", "metadata": {"vip": True}}},
    {"kind": "string", "flag": "meta", "default": "d",
     "context": {"room": "r", "metadata": '{"tier": 2}'}},
    {"kind": "boolean", "flag": "both", "default": False,
     "context": {"room": "vip-1", "tier": "gold"}},
    {"kind": "boolean", "flag": "killed_bool", "default": True, "context": {"room": "r"}},
    {"kind": "string", "flag": "killed_string", "default": "d", "context": {}},
    {"kind": "number", "flag": "everyone", "default": 0, "context": {}},
    {"kind": "number", "flag": "killed_number", "default": 5, "context": {}},
    {"kind": "boolean", "flag": "plain", "default": True, "context": {}},
    {"kind": "string", "flag": "absent", "default": "d", "context": {}},
    {"kind": "boolean", "flag": "env_on", "default": False, "context": {}, "env": "true"},
    {"kind": "number", "flag": "env_on", "default": 1, "context": {}, "env": "true"},
    {"kind": "string", "flag": "plain", "default": "d", "context": {}, "source": "cached"},
    {"kind": "boolean", "flag": "killed_bool", "default": True, "context": {},
     "source": "cached"},
] + [
    {"kind": "string", "flag": "pct_targeted", "default": "d", "context": context}
    for context in (
        {"targetingKey": f"AD_{n}", **({"room": "vip-1"} if n % 2 else {})} for n in range(12)
    )
]  # fmt: skip


def _session(s: dict[str, Any]) -> Session:
    return Session(
        room=s.get("room", ""),
        dispatch_id=s.get("dispatch_id", ""),
        metadata=s.get("metadata", ""),
        attributes=s.get("attributes", {}),
    )


@contextmanager
def _client(flags: list[dict[str, Any]], tmp: Path) -> Iterator[FlagsClient]:
    cache = tmp / "flags-cache.json"
    cache.write_text(json.dumps({"flags": flags, "at": 0}))
    # No URL: it never streams; it holds what the cache file says.
    yield FlagsClient("http://127.0.0.1:9", "CA_vectors", "k", "s", cache_path=cache)


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if value is not None:
            mp.setenv(env_name(name), value)
        yield


def _getter(client: FlagsClient, case: dict[str, Any]) -> Any:
    session = _session(case.get("session", NO_SESSION))
    key, default = case["flag"], case["default"]
    with _env(key, case.get("env")):
        match case["getter"]:
            case "bool":
                return client.get_bool(key, default, session=session)
            case "string":
                return client.get_str(key, default, session=session)
            case "number":
                return client.get_number(key, default, session=session)
            case _:
                return client.get(key, default, session=session)


def _openfeature(client: FlagsClient, case: dict[str, Any]) -> dict[str, Any]:
    client.source = case.get("source", "live")
    provider = VoicefleetProvider(client)
    context = dict(case["context"])
    ctx = EvaluationContext(context.pop("targetingKey", None), context)
    key, default = case["flag"], case["default"]
    with _env(key, case.get("env")):
        match case["kind"]:
            case "boolean":
                details: Any = provider.resolve_boolean_details(key, default, ctx)
            case "string":
                details = provider.resolve_string_details(key, default, ctx)
            case _:
                details = provider.resolve_float_details(key, float(default), ctx)
    value = details.value
    if case["kind"] == "number" and float(value).is_integer():
        value = int(value)  # JSON has one number type: 2.0 and 2 are one value
    return {
        "value": value,
        "reason": str(details.reason.value if details.reason else None),
        "variant": details.variant,
        "error": details.error_code.value if details.error_code else None,
    }


def build(tmp: Path) -> dict[str, Any]:
    """The vectors file's content: the cases above with the Python SDK's answers."""
    flags = [validate(f) for f in FLAGS]
    by_key = {f["key"]: f for f in flags}
    evaluations = []
    for key in by_key:
        sessions = PERCENT_SESSIONS if key in PERCENT_FLAGS else SESSIONS
        for s in sessions:
            value, reason = evaluate(by_key[key], _session(s))
            evaluations.append({"flag": key, "session": s, "value": value, "reason": reason})
    with _client(flags, tmp) as client:
        getters = [{**case, "value": _getter(client, case)} for case in GETTERS]
        openfeature = [{**case, **_openfeature(client, case)} for case in OPENFEATURE]
    return {
        "about": (
            "Flag evaluation vectors shared by the Python SDK (tests/test_flag_vectors.py) and "
            "the Node SDK (sdk/node/test): written by `python -m tests.test_flag_vectors "
            "--write`, answers from the Python SDK. Sessions: room, dispatch_id, metadata, "
            "attributes (absent: empty). texts: JSON values as conditions compare them. "
            "getters: a client holding `flags` (from its cache file), `env` the flag's "
            "VOICEFLEET_FLAG_<KEY> variable. openfeature: the provider over that client, its "
            "source live unless said."
        ),
        "flags": flags,
        "buckets": [{"flag": f, "session": s, "bucket": bucket(f, s)} for f, s in BUCKETS],
        "texts": [{"json": j, "text": text(json.loads(j))} for j in TEXTS],
        "evaluations": evaluations,
        "getters": getters,
        "openfeature": openfeature,
    }


def dump(data: dict[str, Any]) -> str:
    """JSON with one case a line: a change to the answers reads as a short diff."""

    def line(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for key, value in data.items():
        if isinstance(value, list):
            items = ",\n".join(f"  {line(item)}" for item in value)
            parts.append(f" {line(key)}: [\n{items}\n ]")
        else:
            parts.append(f" {line(key)}: {line(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def test_the_shared_vectors_are_the_python_sdks_answers(tmp_path: Path) -> None:
    assert VECTORS.read_text() == dump(build(tmp_path)), (
        "sdk/vectors/flags.json is not what the Python SDK answers: "
        "rewrite it with `python -m tests.test_flag_vectors --write` and review the diff"
    )


def test_the_vectors_cover_every_outcome() -> None:
    """A file of nothing but defaults would agree with any SDK: the cases must reach every
    rule of the rule flags, both sides of each percentage, and every provider reason."""
    data = json.loads(VECTORS.read_text())
    seen: dict[str, set[str]] = {}
    for e in data["evaluations"]:
        seen.setdefault(e["flag"], set()).add(e["reason"])
    assert seen["ops"] == {"default", *(f"rule {n}" for n in range(1, 6))}
    assert seen["globs"] == {"default", *(f"rule {n}" for n in (1, 2, 4, 5, 6, 7, 8, 9, 10))}
    assert seen["meta"] == {"default", *(f"rule {n}" for n in range(1, 11))}
    for key in ("pct20", "pct50", "pct_fraction"):
        assert seen[key] == {"default", "rule 1"}, key
    assert seen["pct_zero"] == {"default"}
    assert seen["pct_targeted"] == {"default", "rule 1", "rule 2"}
    assert all(seen[k] == {"killed"} for k in ("killed_bool", "killed_string", "killed_number"))
    reasons = {c["reason"] for c in data["openfeature"]}
    assert reasons == {
        "TARGETING_MATCH", "SPLIT", "DEFAULT", "DISABLED", "CACHED", "STATIC", "ERROR",
    }  # fmt: skip
    assert {c["error"] for c in data["openfeature"]} == {None, "FLAG_NOT_FOUND", "TYPE_MISMATCH"}


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_flag_vectors --write")
    with tempfile.TemporaryDirectory() as tmp:
        VECTORS.parent.mkdir(parents=True, exist_ok=True)
        VECTORS.write_text(dump(build(Path(tmp))))
    print(f"wrote {VECTORS.relative_to(ROOT)}")
