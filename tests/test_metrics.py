"""`/metrics` per agent, deployment and version; the alert rules; the Grafana dashboard.

The fast parts run in-process or with promtool and TypeScript; the rest as an operator would
see it: a real `vf server` running a canary of real livekit-agents workers
(tests/agents/canary_cases, deployed with `vf agent deploy`), scraped by a real Prometheus
(Debian's package) that loads deploy/prometheus/voicefleet-rules.yml.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from livekit import api
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.prometheus import running_prometheus
from tests.support import DEV_KEY, DEV_SECRET, ROOT, Server, release, started, wait_for
from tests.test_deploy import api_get, dispatch, job_state, vf
from tests.test_rollouts import CASES_SRC
from voicefleet.config import DispatchSettings, Project
from voicefleet.control.telemetry import Telemetry, _Catalog
from voicefleet.dispatch.jobs import Job
from voicefleet.dispatch.service import DispatchService
from voicefleet.metrics import SESSIONS_ENDED, SESSIONS_STARTED, AgentSeries, Metrics, Scraped
from voicefleet.runtime import InstanceSpec, InstanceState
from voicefleet.store.models import InstanceRow

RULES = ROOT / "deploy" / "prometheus" / "voicefleet-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "voicefleet-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "voicefleet.json"
ENDED = ("succeeded", "failed", "terminated")
SESSIONS = "voicefleet_sessions_ended_total"

# -- in-process ---------------------------------------------------------------------------------


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric `name` in an exposition, by their sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_agent_series_carry_the_store_s_names_and_go_with_a_deleted_agent() -> None:
    series = AgentSeries()
    registry = CollectorRegistry()
    names = {"CA_1": "bot", "CA_2": "other"}
    registry.register(Scraped(lambda: series.families(names)))
    series.ensure(SESSIONS_ENDED, "CA_1", ("production", "v2", "failed"))
    for _ in range(3):
        series.inc(SESSIONS_ENDED, "CA_1", ("production", "v2", "succeeded"))
    series.inc(SESSIONS_STARTED, "CA_2", ("staging", "v1"))
    series.inc(SESSIONS_STARTED, "CA_9", ("production", "v1"))  # an id the store does not have
    text = generate_latest(registry).decode()
    ended = {dict(k)["outcome"]: (dict(k), v) for k, v in samples(text, SESSIONS).items()}
    where = {"agent": "bot", "deployment": "production", "version": "v2"}
    assert ended == {
        "failed": ({**where, "outcome": "failed"}, 0),
        "succeeded": ({**where, "outcome": "succeeded"}, 3),
    }
    assert list(samples(text, "voicefleet_sessions_started_total").values()) == [1]
    del names["CA_1"]
    series.keep_only(names)
    names["CA_1"] = "bot"  # even were the name to come back, the deleted agent's counts are gone
    text = generate_latest(registry).decode()
    assert samples(text, SESSIONS) == {}
    assert 'agent="other"' in text


def test_a_session_is_labelled_by_the_store_s_agent_and_its_instance_s_deployment() -> None:
    metrics = Metrics()
    service = DispatchService(Project("p", "k", "s"), DispatchSettings(), metrics)
    spec = InstanceSpec(
        instance_id="bot-v2-1", agent_id="CA_new", version="v2", workdir=Path("."),
        python=Path("python"), env={}, log_dir=Path("."), grace_period=0, deployment="staging",
    )  # fmt: skip
    states = {spec.instance_id: InstanceState(spec)}
    fleet = SimpleNamespace(runtime=SimpleNamespace(on_change=lambda f: None), state=states.get)
    autoscaler = SimpleNamespace(last=lambda agent_id, deployment: None)
    telemetry = Telemetry(metrics, None, service, fleet, autoscaler)  # type: ignore[arg-type]
    telemetry.catalog = _Catalog(
        names={"CA_new": "bot"}, ids={"bot": "CA_new"}, pairs=frozenset({("CA_new", "production")})
    )

    def job(name: str, **fields: str) -> Job:
        j = Job(id=f"AJ_{name}", dispatch_id="", agent_name=name, room="r", room_sid="")
        for k, v in fields.items():
            setattr(j, k, v)
        return j

    # Served by an instance: its deployment, whatever the dispatch named.
    served = job("bot", agent_id="CA_new", version="v2", instance="bot-v2-1", deployment="x")
    assert telemetry._labels(served) == ("CA_new", "staging", "v2")
    # Waiting for a worker: the deployment its dispatch named, if the agent has it.
    assert telemetry._labels(job("bot")) == ("CA_new", "production", "")
    assert telemetry._labels(job("bot", deployment="made-up")) == ("CA_new", "", "")
    # A worker started by hand for a known agent's name.
    assert telemetry._labels(job("bot", version="unmanaged")) == (
        "CA_new",
        "production",
        "unmanaged",
    )
    # Names the store does not have, and a deleted agent's instance (its id, not its name).
    assert telemetry._labels(job("nobody")) is None
    assert telemetry._labels(job("bot", agent_id="CA_old", version="v9")) is None


def test_a_version_that_no_longer_runs_loses_its_series_after_a_while() -> None:
    metrics = Metrics()
    service = DispatchService(Project("p", "k", "s"), DispatchSettings(), metrics)
    fleet = SimpleNamespace(runtime=SimpleNamespace(on_change=lambda f: None), state={}.get)
    autoscaler = SimpleNamespace(last=lambda agent_id, deployment: None)
    telemetry = Telemetry(
        metrics,
        None,  # type: ignore[arg-type]
        service,
        fleet,  # type: ignore[arg-type]
        autoscaler,  # type: ignore[arg-type]
        retired_after=60,
    )
    running = InstanceRow(agent_id="CA_1", deployment="production", version="v2", status="ready")
    catalog = _Catalog(names={"CA_1": "bot"}, ids={"bot": "CA_1"}, instances=[running])
    telemetry.series.inc(SESSIONS_ENDED, "CA_1", ("production", "v1", "succeeded"))
    telemetry.series.inc(SESSIONS_ENDED, "CA_1", ("production", "v2", "succeeded"))
    telemetry._retire(catalog, now=1000)
    telemetry._retire(catalog, now=1059)
    assert {v for _, _, v in telemetry.series.versions()} == {"v1", "v2"}
    telemetry._retire(catalog, now=1061)  # v1 ran nothing for over a minute; v2 still runs
    assert {v for _, _, v in telemetry.series.versions()} == {"v2"}
    stopped = _Catalog(names={"CA_1": "bot"})  # v2's instance stopped after 1061
    telemetry._retire(stopped, now=1100)
    assert telemetry.series.versions() == {("CA_1", "production", "v2")}
    telemetry._retire(stopped, now=1122)
    assert telemetry.series.versions() == set()


# -- the alert rules, checked by promtool --------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian package `prometheus`); .ci/run installs it")
    return found


def test_the_alert_rules_pass_promtool_and_fire_on_made_up_series_as_their_tests_say() -> None:
    checked = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout, checked.stdout
    tested = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_refuses_a_rule_that_does_not_parse(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("group_left ()", "group_left (", 1))
    checked = subprocess.run(
        [promtool(), "check", "rules", str(broken)], capture_output=True, text=True
    )
    assert checked.returncode != 0 and "VoicefleetCanaryWorseThanStable" in checked.stdout + (
        checked.stderr
    )


# -- the dashboard, checked against Grafana's published schema ----------------------------------


@pytest.fixture(scope="module")
def grafana_schema() -> Path:
    """npm's @grafana/schema and TypeScript, cached by version (tests/grafana/install.sh)."""
    if shutil.which("npm") is None:
        pytest.skip("npm not installed: Grafana's dashboard schema comes from npm's registry")
    out = subprocess.run(
        [str(ROOT / "tests" / "grafana" / "install.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def type_check(
    board: dict[str, Any], schema: Path, where: Path
) -> subprocess.CompletedProcess[str]:
    """`tsc --strict` over the dashboard as a literal typed with tests/grafana/schema.ts."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "node_modules").symlink_to(schema / "node_modules")
    shutil.copy(ROOT / "tests" / "grafana" / "schema.ts", where / "schema.ts")
    literal = json.dumps(board, indent=2)
    (where / "board.ts").write_text(
        f'import type {{ Board }} from "./schema";\nexport const board: Board = {literal};\n'
    )
    return subprocess.run(
        [str(schema / "node_modules" / ".bin" / "tsc"), "--strict", "--noEmit", "--skipLibCheck",
         "--module", "nodenext", "--moduleResolution", "nodenext", "--target", "es2022",
         "board.ts"],
        cwd=where, capture_output=True, text=True,
    )  # fmt: skip


def test_the_dashboard_matches_grafana_s_dashboard_schema(
    grafana_schema: Path, tmp_path: Path
) -> None:
    board = json.loads(DASHBOARD.read_text())
    checked = type_check(board, grafana_schema, tmp_path / "good")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check can fail: a legend mode Grafana does not have, a field no panel has.
    panel = next(p for p in board["panels"] if p["type"] == "timeseries")
    panel["options"]["legend"]["displayMode"] = "tabel"
    panel["fieldConfig"]["defaults"]["custom"]["lineWidht"] = 2
    bad = type_check(board, grafana_schema, tmp_path / "bad")
    assert bad.returncode != 0
    assert '"tabel"' in bad.stdout and "lineWidht" in bad.stdout, bad.stdout


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]
    ]


def test_the_dashboard_s_panels_fit_its_grid_and_query_the_chosen_prometheus() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    for p in board["panels"]:
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for title, expr in panel_queries(board):
        used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
        assert used <= variables, (title, used)


# -- a real server, a real canary, a real Prometheus ----------------------------------------------


def scrape(server: Server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def by_version(text: str, name: str, agent: str, *keys: str) -> Counter[tuple[str, ...]]:
    """A metric's samples of one agent summed by the labels `keys` (deployments together)."""
    out: Counter[tuple[str, ...]] = Counter()
    for labels, value in samples(text, name).items():
        found = dict(labels)
        if found.get("agent") == agent and value:
            out[tuple(found[k] for k in keys)] += int(value)
    return out


def jobs_by_version(server: Server, agent: str) -> dict[str, Counter[tuple[str, ...]]]:
    """What the jobs API says: started, ended by outcome and live sessions, per version."""
    jobs = [j for j in server.jobs(limit=1000) if j["agent_name"] == agent]
    return {
        "started": Counter((j["version"],) for j in jobs if j["started_at"]),
        "ended": Counter((j["version"], j["state"]) for j in jobs if j["state"] in ENDED),
        "live": Counter((j["version"],) for j in jobs if j["state"] in ("assigned", "running")),
    }


def metrics_by_version(text: str, agent: str) -> dict[str, Counter[tuple[str, ...]]]:
    return {
        "started": by_version(text, "voicefleet_sessions_started_total", agent, "version"),
        "ended": by_version(text, "voicefleet_sessions_ended_total", agent, "version", "outcome"),
        "live": by_version(text, "voicefleet_live_sessions", agent, "version"),
    }


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    found: list[dict[str, Any]] = body["data"]["result"]
    return found


def firing(prometheus: str, name: str, **labels: str) -> list[dict[str, Any]]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [
        a
        for a in alerts
        if a["labels"]["alertname"] == name
        and a["state"] == "firing"
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


@pytest.fixture
def cases_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-agent"
    shutil.copytree(CASES_SRC, folder)
    return folder


@pytest.mark.timeout(600)
async def test_a_failing_canary_scraped_by_prometheus_matches_the_jobs_api_and_fires_alerts(
    start_server: Callable[..., Server], cases_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    began = time.time()
    # The rules as shipped, with every `for:` at 0s: the test cannot wait minutes.
    rules = tmp_path / "rules.yml"
    rules.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 0s", RULES.read_text()))
    assert "for: 0s" in rules.read_text() and "for: 5m" not in rules.read_text()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "voicefleet", "static_configs": [{"targets": [server.url[7:]]}]}
        ],
    }
    root = tmp_path / "prometheus"
    root.mkdir()
    with running_prometheus(root, config, up=1) as prometheus:
        lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
        try:
            await _scenario(server, prometheus, lk, cases_dir, tmp_path, began)
        finally:
            await lk.aclose()


async def _scenario(
    server: Server,
    prometheus: str,
    lk: api.LiveKitAPI,
    cases_dir: Path,
    tmp_path: Path,
    began: float,
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, cases_dir, "create")
    vf(server, cases_dir, "secrets", "set", f"MARKER_DIR={markers}")
    # A caller dials in before any instance runs: the session waits in the queue until v1 is up.
    # Another dials an agent the store does not have: no per-agent series names it.
    early = await dispatch(lk, "early")
    await lk.agent_dispatch.create_dispatch(
        api.CreateAgentDispatchRequest(agent_name="nobody\nhere", room="nowhere")
    )
    queued = await wait_for(
        lambda: query(prometheus, 'voicefleet_queued_sessions{agent="my-agent"}'),
        30,
        "Prometheus to see the queued session",
    )
    assert queued[0]["metric"]["deployment"] == "production", queued
    text = scrape(server)
    assert samples(text, "voicefleet_queued_sessions") == {
        (("agent", "my-agent"), ("deployment", "production")): 1
    }
    assert "nobody" not in text and samples(text, "voicefleet_queued_jobs") == {
        (("agent_name", "(unknown)"),): 2  # the dispatcher's own: neither agent has a worker yet
    }
    vf(server, cases_dir, "deploy")
    # Served by v1 once it is up, or failed past the queue timeout on a slow machine.
    await wait_for(job_state(server, early, "succeeded", "failed"), 90, "the early session")

    # Calls in flight on v1, then a canary v2 whose every session raises.
    held = [await dispatch(lk, f"held-{i}", until_released=True) for i in range(2)]
    for job_id in held:
        await wait_for(lambda j=job_id: started(markers, j), 60, f"call {job_id} to start")
    (cases_dir / "RAISE").write_text("v2 is broken")
    out = vf(
        server, cases_dir, "deploy", "--canary", "50", "--min-sessions", "1000",
        "--interval", "1h",
    )  # fmt: skip
    assert "canary v2 takes 50% of new sessions" in out.stdout, out.stdout
    # The canary's series exist from 0 before its first session: rate() sees every failure.
    await wait_for(
        lambda: query(
            prometheus,
            'voicefleet_sessions_ended_total{agent="my-agent",version="v2",outcome="failed"} == 0',
        ),
        30,
        "Prometheus to scrape the canary's series at 0",
    )

    # Callers dial in one after another, each call over before the next, until the canary
    # has failed enough sessions to judge (and stable served some).
    for i in range(80):
        job_id = await dispatch(lk, f"call-{i}")
        await wait_for(job_state(server, job_id, *ENDED), 60, job_id)
        ended = jobs_by_version(server, "my-agent")["ended"]
        if ended[("v2", "failed")] >= 6 and ended[("v1", "succeeded")] >= 6:
            break

    # During the canary: /metrics per version agrees with the jobs API, and so does Prometheus.
    expected = jobs_by_version(server, "my-agent")
    seen = metrics_by_version(scrape(server), "my-agent")
    print("jobs API:", {k: dict(v) for k, v in expected.items()})
    print("/metrics:", {k: dict(v) for k, v in seen.items()})
    assert seen == expected
    on_canary = expected["ended"][("v2", "failed")]
    assert on_canary >= 5 and expected["ended"][("v2", "succeeded")] == 0, expected
    assert expected["live"] == {("v1",): 2}, expected
    assert expected["ended"][("v1", "succeeded")] >= 5, expected

    def prometheus_ended() -> Counter[tuple[str, ...]] | None:
        found = query(
            prometheus,
            "sum by (version, state) (label_replace(voicefleet_sessions_ended_total{agent="
            '"my-agent"}, "state", "$1", "outcome", "(.*)")) > 0',
        )
        counts = Counter(
            {
                (r["metric"]["version"], r["metric"]["state"]): int(float(r["value"][1]))
                for r in found
            }
        )
        return counts if counts == expected["ended"] else None

    await wait_for(prometheus_ended, 30, "Prometheus's counts to match the jobs API")
    rollout = api_get(server, "/agents/my-agent")["rollouts"][0]
    assert (rollout["strategy"], rollout["state"], rollout["weight"]) == (
        "canary", "progressing", 50,
    )  # fmt: skip

    # The rules fire: a version failing its sessions, and a canary worse than stable.
    failing = await wait_for(
        lambda: firing(prometheus, "VoicefleetVersionFailingSessions", version="v2"),
        60,
        "VoicefleetVersionFailingSessions to fire",
        interval=0.5,
    )
    worse = await wait_for(
        lambda: firing(
            prometheus, "VoicefleetCanaryWorseThanStable", version="v2", stable_version="v1"
        ),
        60,
        "VoicefleetCanaryWorseThanStable to fire",
        interval=0.5,
    )
    for alert in (*failing, *worse):
        print(f"fired: {alert['labels']} value={alert['value']} {alert['annotations']['summary']}")
    assert failing[0]["labels"]["agent"] == "my-agent" and float(failing[0]["value"]) == 1.0
    assert float(worse[0]["value"]) == 1.0
    assert not firing(prometheus, "VoicefleetVersionFailingSessions", version="v1")

    # A canary instance crashes (the canary is then aborted for it), and the deployment is
    # autoscaled: the dashboard's last panels get data too.
    v2 = [
        i for i in api_get(server, "/agents/my-agent")["instances"]
        if i["version"] == "v2" and i["status"] == "ready"
    ]  # fmt: skip
    os.kill(v2[0]["pid"], signal.SIGKILL)
    await wait_for(
        lambda: query(prometheus, 'voicefleet_instance_restarts_total{version="v2"} > 0'),
        30,
        "the crash to be counted",
    )
    await wait_for(
        lambda: api_get(server, "/agents/my-agent")["rollouts"][0]["state"] == "aborted",
        60,
        "the crashed canary to be aborted",
    )
    vf(server, cases_dir, "scale", "--min", "1", "--max", "2")
    await wait_for(
        lambda: query(prometheus, 'voicefleet_autoscaler_decision{agent="my-agent"} == 1'),
        60,
        "the autoscaler's decision on Prometheus",
    )

    # Every panel's query runs on this Prometheus and has data for what this test did (asked
    # again for a while: the autoscaler's series reach Prometheus a scrape after its decision).
    board = json.loads(DASHBOARD.read_text())

    def empty_panels() -> list[tuple[str, str]] | None:
        empty = []
        for title, expr in panel_queries(board):
            promql = (
                expr.replace("$__rate_interval", "1m")
                .replace("$agent", "my-agent")
                .replace("$deployment", "production")
            )
            r = httpx.get(
                f"{prometheus}/api/v1/query_range",
                params={"query": promql, "start": began, "end": time.time(), "step": 1},
                timeout=30,
            )
            body = r.json()
            assert r.status_code == 200 and body["status"] == "success", (title, promql, body)
            if not body["data"]["result"]:
                empty.append((title, promql))
        return empty or None

    still_empty = empty_panels()
    deadline = time.monotonic() + 30
    while still_empty and time.monotonic() < deadline:
        await asyncio.sleep(1)
        still_empty = empty_panels()
    assert not still_empty, still_empty

    # The agent deleted: its series leave /metrics (the dispatcher's own stay).
    for job_id in held:
        release(markers, job_id)
    vf(server, cases_dir, "delete", "--yes")
    await wait_for(lambda: 'agent="my-agent"' not in scrape(server), 30, "my-agent's series to go")
    assert "voicefleet_jobs_total" in scrape(server)
