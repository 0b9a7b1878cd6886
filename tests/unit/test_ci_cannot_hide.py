"""Under CI=true a test that would skip for a missing tool fails, naming the tool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST = "tests/unit/test_deploy_prometheus.py::test_promtool_checks_the_scrape_config"


def _run(ci: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": "/nonexistent"}  # no promtool anywhere on it
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_tool_skips_locally_and_fails_under_ci() -> None:
    local = _run(ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout[-2000:]
    ci = _run(ci=True)
    # a skip in setup (a skipif mark) becomes an error, one in the test body a failure: both fail
    assert ci.returncode == 1 and ("1 failed" in ci.stdout or "1 error" in ci.stdout), \
        ci.stdout[-2000:]
    assert "skipped under CI=true" in ci.stdout and "promtool not on PATH" in ci.stdout
