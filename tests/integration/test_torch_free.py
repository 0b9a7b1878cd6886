"""The serving path never imports torch: the server image can ship without it.

Each check runs in a fresh interpreter, so nothing the test process imported (the fixtures build
families with torch) can hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SERVE_AND_ANSWER = """
import json, sys
import numpy as np
from client import AdaptiveClient
from tests.harness import serve_in_thread

x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
with serve_in_thread(sys.argv[1], metrics=True) as srv, AdaptiveClient(srv.target) as c:
    answered = sorted({c.infer(x, variant=v.name).variant for v in c.variants()} |
                      {c.infer(x, budget_ms=1000).variant})
print(json.dumps({"answered": answered,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import compression.core, server
names = ["protos.wire", "client", "client.client", "client.cli"]
for pkg in (compression.core, server):
    names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
for n in names:
    importlib.import_module(n)
print(json.dumps({"modules": names, "torch": "torch" in sys.modules}))
"""

PURE = """
import json, sys
import server.engine, server.router, server.latency, server.settings
print(json.dumps({m: m in sys.modules for m in ("grpc", "protos.generated", "torch")}))
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_a_family_end_to_end_imports_no_torch(serving_family: Path) -> None:
    res = _run(SERVE_AND_ANSWER, str(serving_family))
    assert res["torch"] == []
    assert {"fast", "mid", "slow", "early-exit"} <= set(res["answered"])


def test_every_server_and_core_module_imports_without_torch() -> None:
    res = _run(IMPORT_ALL)
    assert "server.engine" in res["modules"] and "compression.core.exits" in res["modules"]
    assert res["torch"] is False


def test_router_and_engine_need_neither_grpc_nor_the_wire_messages() -> None:
    # (protobuf itself comes with onnx, which the family format reads)
    assert _run(PURE) == {"grpc": False, "protos.generated": False, "torch": False}
