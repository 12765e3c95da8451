"""The soak (benchmarks/soak/run.py) in its short mode, and its bookkeeping on its own.

The short run starts a real `vf server`, deploys the deployable test agent and keeps calls coming
through livekit-api for a minute, and until it has made each of its faults once: a deploy, a
rollback, a canary, a scale, a worker killed with kill -9, a server restart (SIGTERM) and one
kill -9 of the server. Then it checks every session; this test reads its report. The fast tests
beside it feed the soak's accounting made-up records, to show that a lost, stuck or unexplained
session, an open rollout or a growing server breaks the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

_spec = importlib.util.spec_from_file_location("soak_run", ROOT / "benchmarks" / "soak" / "run.py")
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak_run"] = soak  # its dataclasses look their module up
_spec.loader.exec_module(soak)

SOAK = ROOT / "benchmarks" / "soak" / "run.py"
CHAOS = ("deploy", "rollback", "canary", "scale", "kill_worker", "restart", "hard_restart")


@pytest.mark.timeout(420)
def test_short_soak_accounts_for_every_session_under_every_fault(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    # One instance to start with, two at most: fewer instance starts on a small machine.
    result = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "1",
            "--replicas",
            "1",
            "--max-replicas",
            "2",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())

    # Every kind of fault happened, and each did what it was asked.
    for kind in CHAOS:
        assert report["faults"].get(kind, 0) >= 1, (kind, report["faults"], output)
    assert report["faults_failed"] == 0, output

    # Calls came all along, and every one the server accepted is accounted for.
    assert report["sessions"] >= 30, output
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == report["sessions"], outcomes
    assert set(outcomes) <= {"succeeded", "failed"}, outcomes  # none lost, stuck, terminated
    assert outcomes.get("succeeded", 0) >= report["sessions"] * 0.8, outcomes
    failed_explained = sum(n for k, n in report["explained"].items() if k.startswith("failed"))
    assert failed_explained == outcomes.get("failed", 0), report["explained"]
    assert not any(k.endswith(("progressing", "paused")) for k in report["rollouts"]), report

    assert report["violations"] == [], output
    assert report["ok"] and result.returncode == 0, output
    assert report["samples"] > 0 and report["trends"]["server"]["rss_mb_max"] > 0


# -- the bookkeeping alone -------------------------------------------------------------------


def bare(tmp_path: Path) -> soak.Soak:
    args = argparse.Namespace(
        seed=1, minutes=1.0, warmup=0.0, max_rss_slope=1.0, max_fd_slope=1.0,
        slope_min_minutes=0.5, drain_timeout=60.0, replicas=2, max_replicas=3,
    )  # fmt: skip
    run = soak.Soak(args, tmp_path)
    run.markers.mkdir(parents=True)
    return run


def job(job_id: str, state: str = "succeeded", error: str = "", redispatches: int = 0) -> Any:
    now = time.time()
    return {
        "id": job_id, "state": state, "error": error, "redispatches": redispatches,
        "created_at": now - 10, "ended_at": now - 5 if state in soak.ENDED else 0.0,
    }  # fmt: skip


def judge(run: soak.Soak, records: dict[str, Any]) -> list[str]:
    for job_id in records:
        run.jobs[job_id] = {"room": f"room-{job_id}", "dispatched_at": 0.0}
    now = time.time()
    report = run.report(records, [], now - 60, now, drained=True)
    violations: list[str] = report["violations"]
    return violations


def test_a_clean_run_passes_and_each_broken_invariant_fails_it(tmp_path: Path) -> None:
    run = bare(tmp_path)
    (run.markers / "AJ_ok.done").write_text("done")
    assert judge(run, {"AJ_ok": job("AJ_ok")}) == []

    run = bare(tmp_path / "lost")
    assert "lost" in judge(run, {"AJ_gone": None})[0]

    run = bare(tmp_path / "stuck")
    assert "stuck running" in judge(run, {"AJ_s": job("AJ_s", "running")})[0]

    run = bare(tmp_path / "unfinished")
    assert "never finished" in judge(run, {"AJ_u": job("AJ_u")})[0]

    run = bare(tmp_path / "unexplained")
    found = judge(
        run, {"AJ_f": job("AJ_f", "failed", "worker AW_x closed while the job was running")}
    )
    assert "no fault of this run explains it" in found[0]

    run = bare(tmp_path / "open rollout")
    now = time.time()
    report = run.report(
        {},
        [{"id": "RO_1", "to_version": "v2", "state": "progressing", "strategy": "rolling"}],
        now - 60,
        now,
        drained=True,
    )
    assert "left progressing" in report["violations"][0]


def test_a_failure_or_redispatch_is_explained_only_by_the_fault_it_names(tmp_path: Path) -> None:
    run = bare(tmp_path)
    now = time.time()
    kill = soak.Fault(
        "kill_worker", now - 8, now - 8, detail={"workers": ["AW_dead"], "jobs": ["AJ_r"]}
    )
    restart = soak.Fault("restart", now - 7, now - 6)
    run.faults = [kill, restart]
    records = {
        "AJ_k": job("AJ_k", "failed", "worker AW_dead closed while the job was running"),
        "AJ_r": job("AJ_r", redispatches=1),
        "AJ_v": job(
            "AJ_v",
            "failed",
            "voicefleet restarted and no worker reported this job after reconnecting",
        ),
        "AJ_x": job("AJ_x", "failed", "worker AW_alive closed while the job was running"),
    }
    (run.markers / "AJ_r.done").write_text("done")
    violations = judge(run, records)
    assert len(violations) == 1 and "AJ_x" in violations[0], violations

    # The same restart long before the session: it explains nothing.
    run = bare(tmp_path / "late")
    run.faults = [soak.Fault("restart", now - 300, now - 299)]
    violations = judge(run, {"AJ_v": records["AJ_v"]})
    assert len(violations) == 1 and "AJ_v" in violations[0]


def test_the_servers_slope_gates_the_run_once_long_enough(tmp_path: Path) -> None:
    run = bare(tmp_path)
    start = time.time() - 600
    # Two server processes, each leaking 2 MB/min from its own baseline (a restart resets it).
    for generation, offset in ((1, 0), (2, 300)):
        for i in range(50):
            t = start + offset + i * 6
            rss = (100 + 2 * (i * 6) / 60) * 2**20
            run.samples.append(soak.Sample(t, generation, int(rss), 40, None, None, None))
    now = time.time()
    report = run.report({}, [], now - 600, now, drained=True)
    assert report["trends"]["server"]["rss_mb_per_min"] == pytest.approx(2.0, rel=0.01)
    assert any("server RSS grows" in v for v in report["violations"]), report["violations"]

    run.args.slope_min_minutes = 60  # a short run: reported, not gated
    report = run.report({}, [], now - 600, now, drained=True)
    assert report["violations"] == [] and not report["trends"]["gated"]
