"""Shared fixtures: the quick family (configs/quick.toml) built once per test session, and
``record``, which keeps a test's own measurements for the docs (bench/docs.py).

Under ``CI=true`` a skipped test fails instead: a test skips only when something it needs is
missing (promtool, Prometheus, an optional client), and CI must install everything, not hide it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server import grpc_io
from server.settings import ServeOptions

# In-process servers read their sockets as `serve`'s do. gRPC reads this once, when it loads, and
# nothing imported above loads it (`serve` makes the same call before importing the server).
grpc_io.configure(ServeOptions.grpc_io)

from tests.harness import write_measurement  # noqa: E402  (loads gRPC)

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture
def record() -> Callable[..., None]:
    """``record(key, **figures)`` (`write_measurement`): the figures docs/reliability.md shows
    come from here."""
    return write_measurement


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
