"""The dashboard's vendored chart library is what its pinned version gives: scripts/dashboard-assets
fetches uPlot's npm tarball (checked against the pinned integrity) and compares its dist files
with those in src/voicefleet/dashboard/static/. Needs npm and its registry (CI has both)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voicefleet.dashboard import web

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dashboard-assets"


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (CI has it)")
def test_the_vendored_chart_library_matches_the_pinned_version() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_pages_load_the_chart_library_from_this_server_only() -> None:
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"):
        assert name in web.STATIC and web.asset(name)
    page = (ROOT / "src/voicefleet/dashboard/templates/page.html").read_text()
    assert '<script src="/dashboard/static/uPlot.iife.min.js?v=$version" defer>' in page
    # Self-hosted: the CSP's 'self' covers it; no other origin, no inline script.
    assert "script-src 'self';" in web.HEADERS["Content-Security-Policy"]
