"""Serving fixtures: the test family (see families.py) and a real server on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient
from client.synthetic import SHAPE, serving_family_at
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer, serve_in_thread


@pytest.fixture(scope="session")
def serving_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serving_family_at(tmp_path_factory.mktemp("serving") / "family")


@pytest.fixture(scope="session")
def server(serving_family: Path) -> Iterator[RunningServer]:
    """One server for the read-mostly tests (each test starts what it needs beyond this).

    It answers ``best-effort``: these tests check which variant a budget buys, and on a busy
    machine the default (shedding what cannot fit) would refuse their deliberately tight budgets.
    """
    opts = ServeOptions(threads=2, settings=Settings(on_miss="best-effort"))
    with serve_in_thread(serving_family, options=opts) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[AdaptiveClient]:
    with AdaptiveClient(server.target) as c:
        yield c


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
