"""A variant the build marked as not within ``max_drop`` is not served: not routed, not listed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client import AdaptiveClient
from client.synthetic import SHAPE, cnn, plain, write_family
from tests.harness import serve_in_thread


def test_marked_variant_is_neither_listed_nor_routed_to(tmp_path: Path) -> None:
    torch.manual_seed(0)
    marked = plain(tmp_path, "accurate-but-marked", 0.99, cnn(4, 1), 0.05)
    # what `compression.build` records when no setting met the target
    marked = replace(marked, details={"search": {"knob": "width", "max_drop_pt": 1.0,
                                                 "drop_pt": 3.2, "within_max_drop": False,
                                                 "chosen": 2.0, "trials": []}})
    kept = plain(tmp_path, "kept", 0.90, cnn(2, 1), 0.03)
    within = replace(plain(tmp_path, "within", 0.95, cnn(2, 1), 0.04),
                     details={"search": {"within_max_drop": True}})
    family = write_family(tmp_path, [marked, kept, within], name="marked")
    with serve_in_thread(family) as running, AdaptiveClient(running.target,
                                                            model="marked") as client:
        assert sorted(v.name for v in client.variants()) == ["kept", "within"]
        # no budget: the most accurate servable variant, never the marked (more accurate) one
        x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
        assert client.infer(x).variant == "within"
