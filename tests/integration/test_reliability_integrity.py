"""Integrity: a family with a tampered, truncated or missing artifact, or an unknown manifest schema,
is refused by `adaptive-inference serve` with one line naming the file (exit 2, no traceback,
nothing listening), and an in-process server given one never reports SERVING or answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient, Unavailable
from client.synthetic import SHAPE
from compression.core.errors import FamilyError
from server.settings import ServeOptions
from tests.harness import serve_in_thread


def _tamper(root: Path) -> Path:
    path = root / "mid" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the digest can tell
    path.write_bytes(bytes(data))
    return path


def _truncate(root: Path) -> Path:
    path = root / "slow" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _remove(root: Path) -> Path:
    path = root / "early-exit" / "stage_1.onnx"
    path.unlink()
    return path


def _future_schema(root: Path) -> Path:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    return path


CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("tampered", _tamper, "sha256 mismatch (tampered?)"),
    ("truncated", _truncate, "manifest says"),
    ("missing", _remove, "artifact missing"),
    ("unknown schema", _future_schema, "unknown schema_version 99"),
]


@pytest.fixture
def broken(serving_family: Path, tmp_path: Path, request: pytest.FixtureRequest
           ) -> tuple[Path, Path, str]:
    """A copy of the serving family with one thing wrong: (family dir, the bad file, phrase)."""
    _name, breaker, phrase = request.param
    root = tmp_path / "family"
    shutil.copytree(serving_family, root)
    return root, breaker(root), phrase


@pytest.mark.parametrize("broken", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_serve_refuses_a_broken_family_in_one_line(broken: tuple[Path, Path, str]) -> None:
    root, bad_file, phrase = broken
    proc = subprocess.run([sys.executable, "-m", "client.cli", "serve", str(root), "--port", "0",
                           "--metrics-port", "-1"], capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [lines[0]] and lines[0].startswith(f"error: {bad_file}: "), proc.stderr
    assert phrase in lines[0]


@pytest.mark.parametrize("broken", CASES[:1], ids=[CASES[0][0]], indirect=True)
def test_server_never_serves_a_broken_family(broken: tuple[Path, Path, str]) -> None:
    root, bad_file, _phrase = broken
    with serve_in_thread(root, options=ServeOptions(threads=1), metrics=False,
                         wait_ready=False) as running:
        running.call(running.server.ready_event.wait())
        assert isinstance(running.server.failure, FamilyError)
        assert str(bad_file) in str(running.server.failure)
        with AdaptiveClient(running.target, model="servetest") as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(Unavailable, match="loading"):
                c.infer(np.zeros((1, *SHAPE), np.float32), timeout=5)
