"""`--backend torch`: variants that record a torch spec run on eager torch, the rest on ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from client import AdaptiveClient
from client.synthetic import SHAPE, cnn, plain, table, write_family
from compression.core.family import Variant, write_artifact
from compression.export import to_onnx
from compression.models import build_model
from server.app import ServeOptions
from server.runtime import OrtRunner, TorchRunner
from tests.harness import serve_in_thread

SPEC = {"kind": "cnn", "input": list(SHAPE), "num_classes": 10,
        "stages": [{"channels": 8, "depth": 1, "pool": False},
                   {"channels": 16, "depth": 1, "pool": True}]}


def _torch_variant(root: Path) -> Variant:
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    graph = write_artifact(root, "full/model.onnx", to_onnx(model, SHAPE).SerializeToString())
    state = write_artifact(root, "full/state.safetensors",
                           save_safetensors({k: v.contiguous()
                                             for k, v in model.state_dict().items()}),
                           role="extra")
    return Variant(name="full", method="full", params={}, artifacts=[graph, state],
                   accuracy=0.99, params_count=0, macs=0, size_bytes=graph.bytes + state.bytes,
                   latency_ms=table(0.3),
                   details={"torch": {"spec": SPEC, "state": "full/state.safetensors"}})


def test_torch_backend_serves_spec_variants_and_matches_ort(tmp_path: Path) -> None:
    root = tmp_path / "family"
    family = write_family(root, [_torch_variant(root), plain(root, "tiny", 0.5, cnn(2, 1), 0.03)])
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    results = {}
    for backend in ("onnxruntime", "torch"):
        with serve_in_thread(family, options=ServeOptions(threads=1, backend=backend),
                             metrics=False) as running, AdaptiveClient(running.target) as c:
            runners = running.server.engine.runners
            results[backend] = c.infer(x, variant="full").outputs
            assert isinstance(runners["tiny"], OrtRunner)  # no spec recorded: stays on ORT
            assert isinstance(runners["full"], TorchRunner if backend == "torch" else OrtRunner)
            assert c.infer(x, variant="tiny").outputs.shape == (3, 10)
    np.testing.assert_allclose(results["torch"], results["onnxruntime"], rtol=1e-4, atol=1e-4)
