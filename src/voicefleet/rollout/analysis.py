"""User-defined analysis checks of a canary, as Argo Rollouts' AnalysisTemplate metrics.

A check is a PromQL query (its scalar is `result`) or a local command (its exit code, or the
number it prints last), measured every `interval` seconds while the canary runs, and judged by a
`success` and/or a `failure` condition (`result < 0.05`). Each measurement is one of:

  successful    the conditions say so
  failed        the failure condition holds, or the success condition does not
  inconclusive  neither: no data (an empty vector, NaN), or a value between the two conditions
  error         no value at all: provider unreachable, bad query, timeout, no number printed

A check fails the rollout when more than `failure_limit` of its measurements failed (in all), or
more than `consecutive_error_limit` in a row were errors. Inconclusive ones count for nothing:
an error-rate query over a counter that has never been incremented has no series yet, and a
healthy canary must not be taken out for it.

`verdict` is the pure part (a check and its history in, a reason or None out); `Analysis` applies
it: it measures in the background so that a slow query or command never holds the canary loop
(which must still answer abort and pause each second), and kills a command's process group on a
timeout or when the analysis is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import operator
import os
import re
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import IO, Any, Literal

import httpx

from voicefleet.errors import InvalidRequest, check_numbers

log = logging.getLogger("voicefleet.rollout")

Phase = Literal["successful", "failed", "inconclusive", "error"]
SUCCESSFUL: Phase = "successful"
FAILED: Phase = "failed"
INCONCLUSIVE: Phase = "inconclusive"
ERROR: Phase = "error"

PLACEHOLDERS = ("agent", "deployment", "version", "stable_version")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMPARISON = re.compile(rf"result\s*(<=|>=|==|!=|<|>)\s*({_NUMBER})")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
}  # fmt: skip
_KEEP_RECENT = 100  # measurements kept besides every failure (enough for status and any verdict)
_OUTPUT_TAIL = 64 * 1024  # bytes of a command's output read back


@dataclass(frozen=True)
class Condition:
    """`result <op> <number>`, or several joined by `and` (all hold) or by `or` (any holds)."""

    text: str
    comparisons: tuple[tuple[str, float], ...]
    joined_by_or: bool = False

    def holds(self, result: float) -> bool:
        hits = (_OPS[op](result, bound) for op, bound in self.comparisons)
        return any(hits) if self.joined_by_or else all(hits)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=256)
def parse_condition(text: str) -> Condition:
    """A condition, parsed without eval: there is nothing else to it than comparisons."""
    parts = re.split(r"\s+(and|or)\s+", text.strip())
    joiners = set(parts[1::2])
    if len(joiners) > 1:
        raise InvalidRequest(f"{text!r} mixes `and` and `or` (there are no parentheses)")
    comparisons = []
    for part in parts[0::2]:
        match = _COMPARISON.fullmatch(part)
        if match is None:
            raise InvalidRequest(
                f"{text!r} is not a condition: write `result <op> <number>` with <op> one of "
                f"< <= > >= == !=, several joined by `and` or by `or`"
            )
        comparisons.append((match[1], float(match[2])))
    return Condition(" ".join(text.split()), tuple(comparisons), joiners == {"or"})


@dataclass(frozen=True)
class Context:
    """What is analysed: the names a query's placeholders and a command's environment take."""

    agent: str  # the agent's name, as voicefleet's metrics label it (agent_name)
    deployment: str
    version: str  # the version under analysis: the canary
    stable_version: str = ""  # the version it is compared with
    workdir: str | None = None  # where commands run (the version's folder); None: the server's


@dataclass(frozen=True)
class Prometheus:
    """An instant query against a Prometheus server's HTTP API (`url` is the server's base)."""

    url: str
    query: str
    timeout: float = 10.0

    def __post_init__(self) -> None:
        check_numbers("prometheus", {"timeout": self.timeout})
        if not isinstance(self.url, str) or not re.match(r"https?://[^/\s]", self.url):
            raise InvalidRequest(f"prometheus.url must be an http(s) URL (got {self.url!r})")
        if not isinstance(self.query, str) or not self.query.strip():
            raise InvalidRequest("prometheus.query must be a PromQL expression")
        unknown = sorted(set(_PLACEHOLDER.findall(self.query)) - set(PLACEHOLDERS))
        if unknown:
            known = ", ".join(f"{{{{{p}}}}}" for p in PLACEHOLDERS)
            raise InvalidRequest(
                f"prometheus.query uses {', '.join(f'{{{{{u}}}}}' for u in unknown)}; "
                f"known: {known}"
            )
        if not self.timeout > 0:
            raise InvalidRequest("prometheus.timeout must be > 0 seconds")

    def render(self, ctx: Context) -> str:
        """The query with its placeholders replaced, escaped for a double-quoted label value,
        so that no name can end the string and change the query."""
        values = {p: getattr(ctx, p) for p in PLACEHOLDERS}
        return _PLACEHOLDER.sub(lambda m: _escape(values[m[1]]), self.query)


@dataclass(frozen=True)
class Command:
    """A local command: `argv` (run as is, no shell) or `shell` (run by /bin/sh -c)."""

    argv: tuple[str, ...] | None = None
    shell: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        check_numbers("command", {"timeout": self.timeout})
        if (self.argv is None) == (self.shell is None):
            raise InvalidRequest("command needs one of argv (a list of strings) or shell")
        if self.argv is not None and (
            not isinstance(self.argv, tuple)
            or not self.argv
            or not all(isinstance(a, str) for a in self.argv)
        ):
            raise InvalidRequest(
                f"command.argv must be a non-empty list of strings ({self.argv!r})"
            )
        if self.shell is not None and (not isinstance(self.shell, str) or not self.shell.strip()):
            raise InvalidRequest("command.shell must be a non-empty string")
        if not self.timeout > 0:
            raise InvalidRequest("command.timeout must be > 0 seconds")

    def __str__(self) -> str:
        return " ".join(self.argv) if self.argv is not None else f"sh -c {self.shell!r}"


@dataclass(frozen=True)
class AnalysisCheck:
    """One check of a canary plan. `dataclasses.asdict` of it is the JSON `from_dict` reads."""

    name: str
    prometheus: Prometheus | None = None
    command: Command | None = None
    interval: float = 60.0
    success: str | None = None
    failure: str | None = None
    failure_limit: int = 0
    consecutive_error_limit: int = 4

    def __post_init__(self) -> None:
        where = f"check {self.name!r}"
        limits = ("failure_limit", "consecutive_error_limit")
        numbers = {f: getattr(self, f) for f in ("interval", *limits)}
        check_numbers(where, numbers, integers=limits)
        if (self.prometheus is None) == (self.command is None):
            raise InvalidRequest(f"{where}: needs one provider, prometheus or command")
        if not self.interval > 0:
            raise InvalidRequest(f"{where}: interval must be > 0 seconds")
        if self.failure_limit < 0 or self.consecutive_error_limit < 0:
            raise InvalidRequest(f"{where}: failure_limit and consecutive_error_limit are >= 0")
        for key in ("success", "failure"):
            text = getattr(self, key)
            if text is None:
                continue
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}: {key} must be a condition such as 'result < 1'")
            try:
                parse_condition(text)
            except InvalidRequest as e:
                raise InvalidRequest(f"{where}: {key}: {e}") from None
        if self.prometheus is not None and self.success is None and self.failure is None:
            raise InvalidRequest(
                f"{where}: a prometheus check needs a success or failure condition"
            )

    @classmethod
    def from_dict(cls, data: Any) -> AnalysisCheck:
        if not isinstance(data, dict):
            raise InvalidRequest(f"a check must be an object (got {data!r})")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"a check's name must be 1-63 letters, digits, '.', '_' or '-' (got {name!r})"
            )
        where = f"check {name!r}"
        given = _known(where, data, {f.name for f in fields(cls)})
        try:
            prometheus = command = None
            if (p := data.get("prometheus")) is not None:
                p = _known("prometheus", p, {"url", "query", "timeout"})
                for key in ("url", "query"):
                    if key not in p:
                        raise InvalidRequest(f"prometheus.{key} is required")
                prometheus = Prometheus(**p)
            if (c := data.get("command")) is not None:
                c = _known("command", c, {"argv", "shell", "timeout"})
                if isinstance(c.get("argv"), list):
                    c["argv"] = tuple(c["argv"])
                command = Command(**c)
        except InvalidRequest as e:
            raise InvalidRequest(f"{where}: {e}") from None
        return cls(**{**given, "prometheus": prometheus, "command": command})


def parse_checks(data: Any) -> tuple[AnalysisCheck, ...]:
    """A canary plan's `"checks": [...]` (absent or null: none)."""
    if data is None:
        return ()
    if not isinstance(data, list | tuple):
        raise InvalidRequest("checks must be a list of checks")
    checks = tuple(AnalysisCheck.from_dict(c) for c in data)
    names = [c.name for c in checks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidRequest(f"checks: names must be unique ({', '.join(twice)} repeated)")
    return checks


@dataclass(frozen=True)
class Measurement:
    check: str
    at: float  # when it started, on the clock of the caller's `now`
    phase: Phase
    value: float | None = None
    message: str = ""


def assess(check: AnalysisCheck, value: float | None, at: float = 0.0) -> Measurement:
    """A value judged by the check's conditions, as Argo does: with only a success condition,
    not meeting it is a failure; with only a failure condition, not meeting it is a success;
    with both, a value meeting neither is inconclusive. None or NaN is no data: inconclusive."""
    if value is None or math.isnan(value):
        what = "no series" if value is None else "NaN"
        return Measurement(check.name, at, INCONCLUSIVE, value, f"no data (result is {what})")
    success = parse_condition(check.success) if check.success is not None else None
    failure = parse_condition(check.failure) if check.failure is not None else None
    good = success.holds(value) if success is not None else None
    bad = failure.holds(value) if failure is not None else None
    phase, why = SUCCESSFUL, ""
    if bad:
        phase, why = FAILED, f" (failure when {failure})"
    elif good is False and bad is None:
        phase, why = FAILED, f" (success needs {success})"
    elif good is False:
        phase, why = INCONCLUSIVE, f" (neither success: {success}, nor failure: {failure})"
    return Measurement(check.name, at, phase, value, f"result {value:g}{why}")


def verdict(check: AnalysisCheck, history: Sequence[Measurement]) -> str | None:
    """Why this check fails the rollout, or None. Pure: the same history, the same verdict."""
    failed = [m for m in history if m.phase == FAILED]
    if len(failed) > check.failure_limit:
        n = len(failed)
        return (
            f"check {check.name} failed {n} time{'s' if n > 1 else ''} "
            f"(limit {check.failure_limit}): {failed[-1].message}"
        )
    errors = 0
    for m in reversed(history):
        if m.phase != ERROR:
            break
        errors += 1
    if errors > check.consecutive_error_limit:
        return (
            f"check {check.name} errored {errors} time{'s' if errors > 1 else ''} in a row "
            f"(limit {check.consecutive_error_limit}): {history[-1].message}"
        )
    return None


class CheckError(Exception):
    """A measurement that has no value: what went wrong, said for the rollout's reason."""


class Analysis:
    """The checks of one rollout and their measurements. Use it as `async with`: leaving it
    stops what is still measuring (a command's whole process group) and closes its HTTP client.
    Measurements live as long as this object: a server restart starts them afresh."""

    def __init__(self, checks: Sequence[AnalysisCheck]) -> None:
        self.checks = tuple(checks)
        self._http = httpx.AsyncClient()
        self._history: dict[str, list[Measurement]] = {c.name: [] for c in self.checks}
        self._started: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[Measurement]] = {}

    async def __aenter__(self) -> Analysis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def history(self, name: str) -> tuple[Measurement, ...]:
        return tuple(self._history[name])

    async def failure(self, ctx: Context, now: float) -> str | None:
        """Why the checks fail the rollout, or None. Call it often (the canary: each second),
        with `now` on any steady clock: it takes the measurements that finished, judges every
        check, then starts those whose interval has come, in the background."""
        self._collect()
        for check in self.checks:
            why = verdict(check, self._history[check.name])
            if why is not None:
                return why
        for check in self.checks:
            last = self._started.get(check.name)
            if check.name not in self._running and (last is None or now - last >= check.interval):
                self._started[check.name] = now
                self._running[check.name] = asyncio.create_task(
                    self.evaluate(check, ctx, now), name=f"analysis {check.name}"
                )
        return None

    async def settle(self) -> None:
        """Wait for the measurements in flight (the next `failure` call judges them)."""
        if self._running:
            await asyncio.wait(list(self._running.values()))

    async def evaluate(self, check: AnalysisCheck, ctx: Context, at: float = 0.0) -> Measurement:
        """One measurement of `check`, now."""
        try:
            if check.prometheus is not None:
                value = await self._query(check.prometheus, ctx)
            else:
                assert check.command is not None
                code, out, err = await _run(check.command, ctx)
                if check.success is None and check.failure is None:
                    if code == 0:
                        return Measurement(check.name, at, SUCCESSFUL, 0, "exit code 0")
                    return Measurement(check.name, at, FAILED, code, _exited(code, err or out))
                if code != 0:
                    raise CheckError(_exited(code, err or out))
                value = _last_number(out)
        except CheckError as e:
            return Measurement(check.name, at, ERROR, None, str(e))
        return assess(check, value, at)

    async def aclose(self) -> None:
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        self._running.clear()
        await self._http.aclose()

    def _collect(self) -> None:
        for name, task in list(self._running.items()):
            if not task.done():
                continue
            del self._running[name]
            try:
                m = task.result()
            except Exception as e:  # a bug here must not end the rollout's loop: count an error
                log.exception("analysis check raised", extra={"check": name})
                m = Measurement(name, self._started[name], ERROR, None, f"internal error: {e!r}")
            log.log(
                logging.DEBUG if m.phase in (SUCCESSFUL, INCONCLUSIVE) else logging.INFO,
                "analysis measurement",
                extra={"check": name, "phase": m.phase, "detail": m.message},
            )
            history = self._history[name]
            history.append(m)
            # Keep every failure (they count in all) and the recent tail (errors count in a row).
            if len(history) > 2 * _KEEP_RECENT:
                old, recent = history[:-_KEEP_RECENT], history[-_KEEP_RECENT:]
                history[:] = [m for m in old if m.phase == FAILED] + recent

    async def _query(self, p: Prometheus, ctx: Context) -> float | None:
        url = p.url.rstrip("/") + "/api/v1/query"
        try:
            r = await self._http.get(
                url, params={"query": p.render(ctx), "timeout": f"{p.timeout:g}"},
                timeout=p.timeout + 1,
            )  # fmt: skip
        except httpx.HTTPError as e:
            raise CheckError(
                f"prometheus at {p.url} unreachable: {type(e).__name__}: {e}"
            ) from None
        try:
            body = r.json()
        except ValueError:
            raise CheckError(f"prometheus at {p.url} answered HTTP {r.status_code}, not JSON: "
                             f"{r.text[:200]!r}") from None  # fmt: skip
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            kind = body.get("errorType", "error") if isinstance(body, dict) else "error"
            raise CheckError(f"query error ({kind}, HTTP {r.status_code}): {error}")
        try:
            kind, result = body["data"]["resultType"], body["data"]["result"]
            if kind == "scalar":
                return float(result[1])
            if kind == "vector" and len(result) > 1:
                raise CheckError(
                    f"query returned {len(result)} series, not one: aggregate them (sum, max, "
                    f"...); first: {result[0]['metric']}"
                )
            if kind == "vector":
                return float(result[0]["value"][1]) if result else None
        except (KeyError, IndexError, TypeError, ValueError):
            raise CheckError(f"unexpected answer from prometheus: {str(body)[:200]}") from None
        raise CheckError(f"query returned a {kind}, not a scalar or a one-series vector")


async def _run(command: Command, ctx: Context) -> tuple[int, str, str]:
    """Exit code, stdout and stderr (their tails) of one run. Output goes to files, not pipes:
    a child left running with them open would otherwise hold the wait until the timeout."""
    env = {
        **os.environ,
        "VF_AGENT": ctx.agent,
        "VF_DEPLOYMENT": ctx.deployment,
        "VF_VERSION": ctx.version,
        "VF_STABLE_VERSION": ctx.stable_version,
    }
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        argv = command.argv if command.argv is not None else ("/bin/sh", "-c", str(command.shell))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                cwd=ctx.workdir,
                start_new_session=True,  # its own process group: a kill reaches its children too
            )  # fmt: skip
        except OSError as e:
            raise CheckError(f"could not start {command}: {e}") from None
        try:
            code = await asyncio.wait_for(proc.wait(), command.timeout)
        except TimeoutError:
            raise CheckError(
                f"{command} did not finish within {command.timeout:g}s: killed"
            ) from None
        finally:
            # On a timeout or a cancel: the command and its children. After it exited: whatever
            # it left running in its group; a check leaves nothing behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        return code, _tail(out), _tail(err)


def _tail(f: IO[bytes]) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _OUTPUT_TAIL))
    return f.read().decode(errors="replace")


def _last_number(out: str) -> float:
    lines = out.strip().splitlines()
    words = lines[-1].split() if lines else []
    if not words or not re.fullmatch(_NUMBER, words[-1]):
        last = lines[-1][-80:] if lines else ""
        raise CheckError(f"the command printed no number last on stdout (last line: {last!r})")
    return float(words[-1])


def _exited(code: int, output: str) -> str:
    how = f"exit code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(-code).name}"
    tail = " | ".join(output.strip().splitlines()[-3:])[-300:]
    return f"{how}: {tail}" if tail else how


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _known(where: str, data: Any, known: set[str]) -> dict[str, Any]:
    """`data`'s fields, all of them known, without the null ones (null means the default)."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{where} must be an object (got {data!r})")
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequest(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return {k: v for k, v in data.items() if v is not None}
