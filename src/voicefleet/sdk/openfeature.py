"""An OpenFeature provider on top of `FlagsClient`, for agents that use the OpenFeature API.

    from openfeature import api
    from voicefleet.sdk.openfeature import VoicefleetProvider

    api.set_provider(VoicefleetProvider())
    client = api.get_client()
    ctx = EvaluationContext(targeting_key=ctx.job.dispatch_id, attributes={"room": room_name})
    client.get_boolean_value("new_voice", False, ctx)

The evaluation context maps to a session: the targeting key is the dispatch id, attributes
"room" and "metadata" are the room name and job metadata, any other attribute is a job attribute.
Needs `openfeature-sdk` in the agent's environment (the rest of voicefleet.sdk needs nothing).

Reasons: TARGETING_MATCH (a rule matched), SPLIT (a rule's percentage admitted the session),
DEFAULT (no rule did), DISABLED (killed), CACHED (the server is out of reach: its last flags),
STATIC (no flag known: a VOICEFLEET_FLAG_<KEY> variable), ERROR (FLAG_NOT_FOUND, TYPE_MISMATCH).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider
from openfeature.provider.metadata import Metadata

from voicefleet.sdk.evaluate import TYPES, Session, evaluate, is_type
from voicefleet.sdk.flags import CACHED, FlagsClient, env_value, flags


def session_of(context: EvaluationContext | None) -> Session:
    if context is None:
        return Session()
    attrs = dict(context.attributes or {})
    return Session(
        room=_text(attrs.pop("room", "")),
        dispatch_id=context.targeting_key or "",
        metadata=_text(attrs.pop("metadata", "")),
        attributes={k: _text(v) for k, v in attrs.items()},
    )


def _text(value: Any) -> str:
    """A context value as a job would carry it: text as is, anything else as JSON (True ->
    "true", {"vip": true} -> '{"vip": true}'), so rules match as they do on the server."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


class VoicefleetProvider(AbstractProvider):
    def __init__(self, client: FlagsClient | None = None) -> None:
        self.client = client or flags()

    def get_metadata(self) -> Metadata:
        return Metadata(name="voicefleet")

    def _resolve(
        self, key: str, default: Any, kind: str, context: EvaluationContext | None
    ) -> FlagResolutionDetails[Any]:
        flag = self.client.definition(key)
        if flag is None:
            value = env_value(key)
            if value is not None and is_type(kind, value):
                # The server has not said (down since before this process, no cache): the
                # operator's VOICEFLEET_FLAG_<KEY> variable, as FlagsClient.get falls back to.
                return FlagResolutionDetails(value, reason=Reason.STATIC, variant="env")
            return FlagResolutionDetails(
                default,
                error_code=ErrorCode.FLAG_NOT_FOUND,
                error_message=f"no flag '{key}'",
                reason=Reason.ERROR,
            )
        if flag["type"] != kind:
            return FlagResolutionDetails(
                default,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag '{key}' is a {flag['type']}, not a {kind}",
                reason=Reason.ERROR,
            )
        value, why = evaluate(flag, session_of(context))
        if why == "killed":
            reason: Reason = Reason.DISABLED
        elif self.client.source == CACHED:
            reason = Reason.CACHED
        elif why == "default":
            reason = Reason.DEFAULT
        elif flag["rules"][int(why.removeprefix("rule ")) - 1]["percent"] < 100:
            reason = Reason.SPLIT  # a percentage admitted this session
        else:
            reason = Reason.TARGETING_MATCH
        return FlagResolutionDetails(value, reason=reason, variant=why)

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, "boolean", evaluation_context)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, "string", evaluation_context)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        details = self._resolve(flag_key, default_value, "number", evaluation_context)
        if details.error_code is None and not float(details.value).is_integer():
            return FlagResolutionDetails(
                default_value,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag '{flag_key}' is {details.value}, not an integer",
                reason=Reason.ERROR,
            )
        if details.error_code is None:
            details.value = int(details.value)
        return details

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        details = self._resolve(flag_key, default_value, "number", evaluation_context)
        if details.error_code is None:
            details.value = float(details.value)
        return details

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[Any] | Mapping[str, Any],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[Any] | Mapping[str, Any]]:
        return FlagResolutionDetails(
            default_value,
            error_code=ErrorCode.TYPE_MISMATCH,
            error_message=f"voicefleet flags are {', '.join(TYPES)}; not objects",
            reason=Reason.ERROR,
        )
