"""Shared fixtures: the quick family (configs/quick.toml) built once per test session, and
``record``, which keeps a test's own measurements for the docs (bench/docs.py).

Under ``CI=true`` a skipped test fails instead: a test skips only when something it needs is
missing (promtool, Prometheus, an optional client), and CI must install everything, not hide it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where `record` writes; bench/docs.py renders docs/*.md's measured blocks from it.
MEASURED = Path(os.environ.get("ADAPTIVE_MEASURED_DIR", ROOT / "results" / "measured"))


@pytest.fixture
def record() -> Callable[..., None]:
    """``record(key, **figures)``: what this test measured, as results/measured/KEY.json with
    the machine it ran on — the figures docs/reliability.md shows come from here."""
    from client.results import host_info

    def write(key: str, **figures: Any) -> None:
        MEASURED.mkdir(parents=True, exist_ok=True)
        (MEASURED / f"{key}.json").write_text(
            json.dumps({**figures, "host": host_info()}, indent=2, default=str) + "\n")
    return write


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private base-model cache, so tests never read or write the user's."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def quick_family(tmp_path_factory: pytest.TempPathFactory, build_cache: Path) -> Path:
    """configs/quick.toml built into a temp dir (seconds): a real, verified family directory."""
    from compression.build import build, load_config

    out = tmp_path_factory.mktemp("families") / "quick"
    build(load_config(ROOT / "configs" / "quick.toml"), out, cache_dir=build_cache, progress=False)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be missing: {reason}"
