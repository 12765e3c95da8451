"""The errors a user can act on, mapped to HTTP status and Twirp codes in one place."""

from __future__ import annotations

import math


class VoicefleetError(Exception):
    """Base of every error voicefleet raises on purpose."""

    status = 500
    twirp_code = "internal"


class AuthError(VoicefleetError):
    """A missing, malformed, expired or wrongly signed token, or one without the needed grant."""

    status = 401
    twirp_code = "unauthenticated"


class PermissionDenied(AuthError):
    """A valid token that lacks the grant this call needs."""

    status = 403
    twirp_code = "permission_denied"


class InvalidRequest(VoicefleetError):
    status = 400
    twirp_code = "invalid_argument"


class NotFound(VoicefleetError):
    status = 404
    twirp_code = "not_found"


class NoCapacity(VoicefleetError):
    """The dispatch queue is full: no worker can take the job and no room is left to wait."""

    status = 429
    twirp_code = "resource_exhausted"


class ProtocolError(VoicefleetError):
    """A worker sent a frame that is not a valid `WorkerMessage`, or sent it out of turn."""

    status = 400
    twirp_code = "malformed"


class BundleRejected(InvalidRequest):
    """An uploaded source bundle is unsafe or too big: path traversal, links out, size limits."""


class BuildFailed(VoicefleetError):
    """Building a version's environment failed; the log says why. The serving version is kept."""

    status = 422
    twirp_code = "failed_precondition"


def check_numbers(what: str, values: dict[str, object], integers: tuple[str, ...] = ()) -> None:
    """Settings read from JSON: each value (None aside) must be a finite number, not a bool,
    and those named in `integers` whole numbers; else InvalidRequest naming them."""
    bad = [
        f"{name} must be {'a whole number' if name in integers else 'a number'} (got {value!r})"
        for name, value in values.items()
        if value is not None
        and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)  # NaN, or 1e999 read as infinity
            or (name in integers and value != int(value))
        )
    ]
    if bad:
        raise InvalidRequest(f"{what}: {'; '.join(bad)}")
