"""Shared fixtures: the quick family (configs/quick.toml) built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
