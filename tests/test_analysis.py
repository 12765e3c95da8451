"""User-defined analysis checks of a canary (src/voicefleet/rollout/analysis.py).

The pure parts (conditions, parsing, each measurement's phase, a check's verdict) are checked
directly, in milliseconds. Command checks run real child processes; Prometheus checks query a
real Prometheus (Debian's package: .ci/run installs it) that this module starts on 127.0.0.1,
scraping itself twice, as a "canary" job labelled version="v2" and a "stable" one labelled
version="v1", so that queries compare the two as a canary's would.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.prometheus import free_port, running_prometheus
from tests.support import wait_for
from voicefleet.errors import InvalidRequest
from voicefleet.rollout import analysis as analysis_module
from voicefleet.rollout.analysis import (
    ERROR,
    FAILED,
    INCONCLUSIVE,
    SUCCESSFUL,
    Analysis,
    AnalysisCheck,
    Command,
    Context,
    Measurement,
    Prometheus,
    assess,
    parse_checks,
    parse_condition,
    verdict,
)

CTX = Context(agent="my-agent", deployment="production", version="v2", stable_version="v1")


def check(**fields: Any) -> AnalysisCheck:
    """A command check named 'c' (the provider does not matter to the pure parts)."""
    return AnalysisCheck(**{"name": "c", "command": Command(argv=("true",)), **fields})


def measured(*phases: str, value: float = 0.31) -> list[Measurement]:
    messages = {FAILED: "result 0.31 (failure when result > 0.05)", ERROR: "unreachable"}
    return [Measurement("c", i, p, value, messages.get(p, "")) for i, p in enumerate(phases)]  # type: ignore[arg-type]


# -- conditions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "true_for", "false_for"),
    [
        ("result < 0.05", [0.0, 0.049, -1], [0.05, 1]),
        ("result>=1", [1, 2.5], [0.999]),
        ("result == 0", [0, -0.0], [1e-9]),
        ("result != 1e-3", [0, 1], [0.001]),
        ("result > 0.9 and result < 1.1", [1.0], [0.9, 1.1, 5]),
        ("result < 0 or result > 10", [-1, 11], [0, 10]),
        ("  result  <=  -2.5e1 ", [-25, -30], [-24]),
    ],
)
def test_conditions_compare_result_with_numbers(
    text: str, true_for: list[float], false_for: list[float]
) -> None:
    condition = parse_condition(text)
    assert [condition.holds(v) for v in true_for] == [True] * len(true_for)
    assert [condition.holds(v) for v in false_for] == [False] * len(false_for)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/x')",
        "result",
        "result <",
        "result < abc",
        "0.05 > result",
        "result =< 1",
        "result < 1 and result > 0 or result == 5",  # no parentheses: and/or may not mix
        "result < 1 and",
        "",
    ],
)
def test_anything_but_comparisons_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"is not a condition|mixes `and` and `or`"):
        parse_condition(text)


# -- parsing a plan's checks ---------------------------------------------------------------------

PLAN_CHECKS = [
    {
        "name": "error-rate",
        "prometheus": {
            "url": "http://prometheus:9090",
            "query": 'sum(rate(voicefleet_jobs_total{state="failed",version="{{ version }}"}[1m]))',
        },
        "interval": 30,
        "failure": "result > 0.05",
        "failure_limit": 2,
    },
    {
        "name": "synthetic-call",
        "command": {"argv": ["./check-call.sh", "--room", "probe"], "timeout": 20},
        "consecutive_error_limit": 1,
    },
]


def test_checks_parse_from_a_plan_and_asdict_gives_the_same_json_back() -> None:
    checks = parse_checks(PLAN_CHECKS)
    rate, call = checks
    assert rate.prometheus == Prometheus(
        "http://prometheus:9090", PLAN_CHECKS[0]["prometheus"]["query"]
    )
    assert (rate.interval, rate.failure, rate.success, rate.failure_limit) == (
        30, "result > 0.05", None, 2,
    )  # fmt: skip
    assert rate.consecutive_error_limit == 4  # Argo's default
    assert call.command == Command(argv=("./check-call.sh", "--room", "probe"), timeout=20)
    assert (call.interval, call.failure_limit, call.consecutive_error_limit) == (60, 0, 1)
    # What a plan stores (asdict, as CanaryPlan.to_dict does) reads back as the same checks.
    stored = json.loads(json.dumps([asdict(c) for c in checks]))
    assert parse_checks(stored) == checks
    assert parse_checks(None) == () == parse_checks([])


def cmd(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "command": {"argv": ["true"]}, **fields}


def prom(**prometheus: Any) -> dict[str, Any]:
    return {"name": "x", "prometheus": prometheus, "success": "result > 0"}


KNOWN = "known: {{agent}}, {{deployment}}, {{version}}, {{stable_version}}"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"prometheus": {}}, "a check's name"),
        (cmd(name="a b"), "a check's name"),
        ({"name": "x"}, "check 'x': needs one provider, prometheus or command"),
        (cmd(prometheus={"url": "http://p", "query": "up"}), "needs one provider"),
        (cmd(interval=0), "check 'x': interval must be > 0"),
        (cmd(interval="60"), "check 'x': interval must be a number (got '60')"),
        (cmd(failure_limit=1.5), "failure_limit must be a whole number"),
        (cmd(failure_limit=-1), "failure_limit and consecutive_error_limit are >= 0"),
        (cmd(consecutive_error_limit=True), "consecutive_error_limit must be a whole number"),
        (cmd(thresold=1), "check 'x': unknown field(s) thresold; known: command, "),
        (cmd(success="result << 1"), "check 'x': success: 'result << 1' is not a condition"),
        (cmd(failure=1), "check 'x': failure must be a condition"),
        (cmd(command={"argv": "true"}), "command.argv must be a non-empty list of strings"),
        (cmd(command={"argv": []}), "command.argv must be a non-empty list"),
        (cmd(command={"argv": ["a", 1]}), "command.argv must be"),
        (cmd(command={"argv": ["a"], "shell": "a"}), "command needs one of argv"),
        (cmd(command={"shell": " "}), "check 'x': command.shell must be a non-empty string"),
        (cmd(command={"argv": ["a"], "timeout": 0}), "command.timeout must be > 0"),
        (cmd(command={"argv": ["a"], "cwd": "/"}), "check 'x': command: unknown field(s) cwd"),
        (cmd(command=["true"]), "check 'x': command must be an object"),
        (prom(query="up"), "check 'x': prometheus.url is required"),
        (prom(url="http://p"), "check 'x': prometheus.query is required"),
        (prom(url="ftp://p", query="up"), "prometheus.url must be an http(s) URL"),
        (prom(url="http://p", query=" "), "prometheus.query must be"),
        (prom(url="http://p", query="up", timeout=-1), "prometheus.timeout must be > 0"),
        (
            prom(url="http://p", query='up{v="{{canary}}"}'),
            f"check 'x': prometheus.query uses {{{{canary}}}}; {KNOWN}",
        ),
        (
            {"name": "x", "prometheus": {"url": "http://p", "query": "up"}},
            "check 'x': a prometheus check needs a success or failure condition",
        ),
    ],
)
def test_a_bad_check_is_refused_naming_the_field(data: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        AnalysisCheck.from_dict(data)
    assert says in str(refused.value)


def test_a_plan_s_checks_must_be_a_list_with_unique_names() -> None:
    with pytest.raises(InvalidRequest, match="checks must be a list"):
        parse_checks({"name": "x"})
    with pytest.raises(InvalidRequest, match=r"names must be unique \(a repeated\)"):
        parse_checks([{"name": "a", "command": {"argv": ["true"]}}] * 2)


# -- one measurement, and a check's verdict over its history -------------------------------------


@pytest.mark.parametrize(
    ("success", "failure", "value", "phase", "message"),
    [
        ("result < 0.05", None, 0.01, SUCCESSFUL, "result 0.01"),
        ("result < 0.05", None, 0.31, FAILED, "result 0.31 (success needs result < 0.05)"),
        (None, "result > 0.05", 0.01, SUCCESSFUL, "result 0.01"),
        (None, "result > 0.05", 0.31, FAILED, "result 0.31 (failure when result > 0.05)"),
        ("result < 0.02", "result > 0.05", 0.01, SUCCESSFUL, "result 0.01"),
        (
            "result < 0.02",
            "result > 0.05",
            0.31,
            FAILED,
            "result 0.31 (failure when result > 0.05)",
        ),
        (
            "result < 0.02",
            "result > 0.05",
            0.03,
            INCONCLUSIVE,
            "result 0.03 (neither success: result < 0.02, nor failure: result > 0.05)",
        ),
        ("result < 0.05", None, None, INCONCLUSIVE, "no data (result is no series)"),
        (None, "result > 0.05", float("nan"), INCONCLUSIVE, "no data (result is NaN)"),
        (None, "result > 0.05", float("inf"), FAILED, "result inf (failure when result > 0.05)"),
    ],
)
def test_a_value_is_judged_as_argo_judges_it(
    success: str | None, failure: str | None, value: float | None, phase: str, message: str
) -> None:
    m = assess(check(success=success, failure=failure), value, at=7)
    assert (m.check, m.at, m.phase, m.message) == ("c", 7, phase, message)


def test_failures_count_in_all_and_fail_the_check_past_its_limit() -> None:
    limit2 = check(name="error-rate", failure_limit=2)
    assert verdict(limit2, []) is None
    assert verdict(limit2, measured(FAILED, SUCCESSFUL, FAILED, SUCCESSFUL)) is None
    # Successes in between do not forgive: the third failure in all fails the check.
    assert verdict(limit2, measured(FAILED, SUCCESSFUL, FAILED, SUCCESSFUL, FAILED)) == (
        "check error-rate failed 3 times (limit 2): result 0.31 (failure when result > 0.05)"
    )
    assert verdict(check(name="e"), measured(FAILED)) == (
        "check e failed 1 time (limit 0): result 0.31 (failure when result > 0.05)"
    )


def test_errors_fail_the_check_only_past_their_limit_in_a_row() -> None:
    limit2 = check(name="probe", consecutive_error_limit=2)
    # Any measurement with a value (even inconclusive) ends a run of errors.
    assert verdict(limit2, measured(ERROR, ERROR, SUCCESSFUL, ERROR, ERROR)) is None
    assert verdict(limit2, measured(ERROR, ERROR, INCONCLUSIVE, ERROR, ERROR)) is None
    assert verdict(limit2, measured(SUCCESSFUL, ERROR, ERROR, ERROR)) == (
        "check probe errored 3 times in a row (limit 2): unreachable"
    )
    # Errors are not failures: many, each run short, never fail the check.
    assert verdict(check(consecutive_error_limit=1), measured(*[ERROR, SUCCESSFUL] * 20)) is None


def test_inconclusive_measurements_count_for_nothing() -> None:
    assert verdict(check(), measured(*[INCONCLUSIVE] * 50)) is None


def test_placeholders_take_the_rollout_s_names_escaped_as_label_values() -> None:
    query = Prometheus(
        "http://p", 'a{agent_name="{{agent}}",deployment="{{deployment}}",'
        'version=~"{{ version }}|{{stable_version}}"}'
    )  # fmt: skip
    assert query.render(CTX) == (
        'a{agent_name="my-agent",deployment="production",version=~"v2|v1"}'
    )
    hostile = replace(CTX, version='v2"} or vector(1) or a{x="\\', stable_version="a\nb")
    assert query.render(hostile) == (
        'a{agent_name="my-agent",deployment="production",'
        'version=~"v2\\"} or vector(1) or a{x=\\"\\\\|a\\nb"}'
    )


# -- command checks: real child processes --------------------------------------------------------


async def measure(c: AnalysisCheck, ctx: Context = CTX) -> Measurement:
    async with Analysis([c]) as analysis:
        return await analysis.evaluate(c, ctx)


def sh(script: str, **fields: Any) -> AnalysisCheck:
    timeout = fields.pop("timeout", 10)
    return check(command=Command(argv=("sh", "-c", script), timeout=timeout), **fields)


async def test_a_command_without_conditions_passes_on_exit_0_and_fails_otherwise() -> None:
    ok = await measure(sh("echo fine"))
    assert (ok.phase, ok.value, ok.message) == (SUCCESSFUL, 0, "exit code 0")
    bad = await measure(sh("echo 'probe call: no answer' >&2; exit 3"))
    assert (bad.phase, bad.value, bad.message) == (FAILED, 3, "exit code 3: probe call: no answer")
    killed = await measure(sh("kill -SEGV $$"))
    assert (killed.phase, killed.message) == (FAILED, "killed by SIGSEGV")


async def test_a_command_with_conditions_is_judged_by_the_number_it_prints_last() -> None:
    below = await measure(sh("echo calls: 40; echo 'failure ratio 0.02'", failure="result > 0.05"))
    assert (below.phase, below.value) == (SUCCESSFUL, 0.02)
    above = await measure(sh("echo 0.02; echo 3.1e-1", failure="result > 0.05"))
    assert (above.phase, above.value, above.message) == (
        FAILED, 0.31, "result 0.31 (failure when result > 0.05)",
    )  # fmt: skip


async def test_a_command_under_conditions_that_prints_no_number_or_exits_non_zero_errs() -> None:
    words = await measure(sh("echo 0.01; echo done", success="result < 1"))
    assert (words.phase, words.message) == (
        ERROR, "the command printed no number last on stdout (last line: 'done')",
    )  # fmt: skip
    nothing = await measure(sh("true", success="result < 1"))
    assert nothing.phase == ERROR
    exited = await measure(
        sh("echo 0.01; echo 'no metrics endpoint' >&2; exit 2", success="result < 1")
    )
    assert (exited.phase, exited.message) == (ERROR, "exit code 2: no metrics endpoint")
    missing = await measure(check(command=Command(argv=("/nonexistent/check",))))
    assert missing.phase == ERROR
    assert missing.message.startswith("could not start /nonexistent/check: [Errno 2]")


async def test_a_command_gets_the_rollout_in_its_environment_and_runs_in_its_workdir(
    tmp_path: Path,
) -> None:
    script = (
        'test "$VF_AGENT/$VF_DEPLOYMENT/$VF_VERSION/$VF_STABLE_VERSION" = '
        'my-agent/production/v2/v1 && test "$(pwd)" = "$1"'
    )
    c = check(command=Command(argv=("sh", "-c", script, "sh", str(tmp_path))))
    assert (await measure(c, replace(CTX, workdir=str(tmp_path)))).phase == SUCCESSFUL
    assert (await measure(c, replace(CTX, version="v3", workdir=str(tmp_path)))).phase == FAILED


async def test_argv_runs_without_a_shell_and_a_shell_string_with_one() -> None:
    # One argument, taken literally: no word splitting, no `;`, no `$X` expansion.
    argv = Command(argv=(sys.executable, "-c", "import sys; print(len(sys.argv[1]))", "a b;$X"))
    literal = await measure(check(command=argv, success="result == 6"))
    assert (literal.phase, literal.value) == (SUCCESSFUL, 6)
    piped = await measure(check(command=Command(shell="echo 1 | tr 1 7"), success="result == 7"))
    assert (piped.phase, piped.value) == (SUCCESSFUL, 7)


async def gone(*pids: int) -> bool:
    """Wait until these processes died (SIGKILL takes effect a moment after it is sent)."""

    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return await wait_for(lambda: all(dead(p) for p in pids), timeout=5, what=f"{pids} to die")


async def test_a_command_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    started = time.monotonic()
    script = f"sleep 300 & echo $! $$ > {pids}; wait"
    m = await measure(sh(script, timeout=0.5))
    assert time.monotonic() - started < 5
    assert (m.phase, m.message) == (ERROR, f"sh -c {script} did not finish within 0.5s: killed")
    child, shell = map(int, pids.read_text().split())
    assert await gone(child, shell)


async def test_what_a_command_leaves_running_does_not_hold_or_outlive_it(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    started = time.monotonic()
    m = await measure(sh(f"sleep 300 & echo $! > {pids}; echo 1", success="result == 1"))
    assert m.phase == SUCCESSFUL
    assert time.monotonic() - started < 5  # its output is not held open by the sleep
    assert await gone(int(pids.read_text()))


async def test_closing_the_analysis_kills_a_command_in_flight_and_its_children(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    c = sh(f"sleep 300 & echo $! $$ > {pids}; wait", timeout=300)
    analysis = Analysis([c])
    assert await analysis.failure(CTX, now=0) is None
    await wait_for(lambda: pids.exists() and pids.read_text().strip(), what="the command's pids")
    child, shell = map(int, pids.read_text().split())
    await analysis.aclose()
    assert await gone(child, shell)


async def test_measurements_start_each_interval_and_never_overlap(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    c = sh(f"echo run >> {runs}; sleep 0.2", interval=10)
    async with Analysis([c]) as analysis:
        assert await analysis.failure(CTX, now=0) is None
        assert await analysis.failure(CTX, now=20) is None  # the first still runs: no second
        await analysis.settle()
        assert analysis.history("c") == ()  # finished, not yet taken
        assert await analysis.failure(CTX, now=21) is None  # takes it, starts the next
        assert [m.phase for m in analysis.history("c")] == [SUCCESSFUL]
        assert analysis.history("c")[0].at == 0
        await analysis.settle()
        assert await analysis.failure(CTX, now=25) is None  # takes it; 4 s < interval
        await analysis.settle()
        assert runs.read_text().count("run") == 2
        assert await analysis.failure(CTX, now=31) is None
        await analysis.settle()
        assert runs.read_text().count("run") == 3


async def test_a_long_history_keeps_every_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every other run fails; past twice the recent tail kept, older successes are let go and
    # every failure still counts against the limit.
    monkeypatch.setattr(analysis_module, "_KEEP_RECENT", 5)
    counter = tmp_path / "n"
    counter.write_text("0")
    script = f"n=$(cat {counter}); echo $((n+1)) > {counter}; exit $((n % 2))"
    c = sh(script, failure_limit=14, interval=1)
    async with Analysis([c]) as analysis:
        for now in range(30):
            assert await analysis.failure(CTX, now) is None
            await analysis.settle()
        assert await analysis.failure(CTX, 30) == "check c failed 15 times (limit 14): exit code 1"
        assert len(analysis.history("c")) < 30


# -- prometheus checks: a real Prometheus --------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on 127.0.0.1 scraping itself each second as two labelled jobs."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    jobs = [
        {"job_name": name, "static_configs": [{"targets": [target], "labels": labels}]}
        for name, labels in [
            ("canary", {"agent_name": "my-agent", "version": "v2"}),
            ("stable", {"agent_name": "my-agent", "version": "v1"}),
        ]
    ]
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), config, 2, port) as url:
        yield url


def promql(url: str, query: str, **fields: Any) -> AnalysisCheck:
    return AnalysisCheck(name="q", prometheus=Prometheus(url, query), **fields)


async def test_a_query_whose_value_meets_its_condition_is_successful(prometheus: str) -> None:
    m = await measure(promql(prometheus, 'sum(up{job="canary"})', success="result >= 1"))
    assert (m.phase, m.value, m.message) == (SUCCESSFUL, 1, "result 1")


async def test_a_query_failing_its_condition_fails_the_rollout_past_the_failure_limit(
    prometheus: str,
) -> None:
    c = AnalysisCheck.from_dict({
        "name": "error-rate", "prometheus": {"url": prometheus, "query": 'sum(up{job="canary"})'},
        "interval": 1, "failure": "result > 0.05", "failure_limit": 2,
    })  # fmt: skip
    async with Analysis([c]) as analysis:
        verdicts = []
        for now in range(4):
            verdicts.append(await analysis.failure(CTX, now))
            await analysis.settle()
    assert verdicts == [None, None, None, (
        "check error-rate failed 3 times (limit 2): result 1 (failure when result > 0.05)"
    )]  # fmt: skip


async def test_an_unreachable_prometheus_fails_the_rollout_past_consecutive_error_limit() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = promql(url, "up", success="result > 0", interval=1, consecutive_error_limit=2)
    async with Analysis([c]) as analysis:
        verdicts = []
        for now in range(4):
            verdicts.append(await analysis.failure(CTX, now))
            await analysis.settle()
    assert verdicts[:3] == [None] * 3
    assert verdicts[3] is not None
    assert verdicts[3].startswith(
        f"check q errored 3 times in a row (limit 2): prometheus at {url} unreachable: ConnectError"
    )


async def test_bad_promql_is_an_error_saying_why(prometheus: str) -> None:
    m = await measure(promql(prometheus, 'sum(up{job="canary"}', success="result > 0"))
    assert m.phase == ERROR
    assert m.message.startswith("query error (bad_data, HTTP 400): ")
    assert "parse error" in m.message
    wrong_path = await measure(promql(prometheus + "/nope", "up", success="result > 0"))
    assert wrong_path.phase == ERROR
    assert "answered HTTP 404, not JSON" in wrong_path.message


async def test_a_query_compares_canary_with_stable_by_the_rollout_s_names(prometheus: str) -> None:
    compare = (
        'sum(up{agent_name="{{agent}}",version="{{version}}"}) '
        '- sum(up{agent_name="{{agent}}",version="{{stable_version}}"})'
    )
    same = await measure(promql(prometheus, compare, success="result == 0"))
    assert (same.phase, same.value) == (SUCCESSFUL, 0)
    # A name that would end the label string and add `or vector(42)` stays a label value.
    only = 'sum(up{version="{{version}}"})'
    hostile = replace(CTX, version='v9"}) or vector(42) or sum(up{version="')
    m = await measure(promql(prometheus, only, success="result < 1"), hostile)
    assert (m.phase, m.message) == (INCONCLUSIVE, "no data (result is no series)")


@pytest.mark.parametrize(
    ("query", "phase", "value", "message"),
    [
        ('sum(up{job="none"})', INCONCLUSIVE, None, "no data (result is no series)"),
        ("1 + 1", SUCCESSFUL, 2.0, "result 2"),  # a scalar
        ("0/0", INCONCLUSIVE, float("nan"), "no data (result is NaN)"),
        ("up", ERROR, None, "query returned 2 series, not one: aggregate them (sum, max, ...)"),
        ('up{job="x"}[1m]', ERROR, None, "query returned a matrix, not a scalar or a one-series"),
    ],
)
async def test_a_query_s_result_is_a_scalar_or_one_series(
    prometheus: str, query: str, phase: str, value: float | None, message: str
) -> None:
    m = await measure(promql(prometheus, query, success="result > 0"))
    assert m.phase == phase
    assert m.message.startswith(message)
    assert str(m.value) == str(value)  # NaN == NaN
