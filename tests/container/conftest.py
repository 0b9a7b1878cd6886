"""Container tests: the repository's Dockerfile built and run on a private Docker daemon.

They take minutes and need root-installed tools (`make container-deps`), so they run only when
selected by marker, ``pytest -m container`` (`make test-container`, which `.ci/run` calls after
`make test`); a plain ``pytest`` deselects them. Selected but unable to run (no dockerd, no
debootstrap) they skip, which fails under ``CI=true`` (tests/conftest.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.container.localdocker import LocalDocker
from tests.harness import write_measurement

IMAGE = "adaptive-inference:container-test"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "container" in (config.option.markexpr or ""):
        return  # the -m expression decides (`-m container`, or `-m "not container"`)
    skipped = [i for i in items if i.get_closest_marker("container")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if not i.get_closest_marker("container")]


@pytest.fixture(scope="session")
def local_docker() -> Iterator[LocalDocker]:
    missing = [t for t in ("dockerd", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH (`make container-deps` installs "
                    "docker.io and debootstrap)")
    docker = LocalDocker()
    docker.start()
    try:
        yield docker
    finally:
        docker.stop()


@pytest.fixture(scope="session")
def image(local_docker: LocalDocker) -> str:
    """The repository's Dockerfile, unchanged, built on the private daemon."""
    seconds = local_docker.build(IMAGE)
    size = local_docker.inspect(IMAGE, "image")["Size"]
    print(f"\nimage {IMAGE}: built in {seconds:.0f} s, {size / 1e6:.0f} MB")
    write_measurement("container-image", build_s=round(seconds), size_mb=round(size / 1e6))
    return IMAGE
