"""GPU lanes and placement as a routing choice, through a real server and the real client.

This machine (and CI) has no GPU, so the GPU lanes run their code on the CPU: `--accelerator cpu`
builds the same torch runners (`server/torch_runner.py`) the GPU uses, minus CUDA graphs and pinned
memory, and names the lanes ``torch-cpu:…``. That is the only stand-in; routing, batching, lanes,
warm-up and the wire are the production code. The CUDA path itself is exercised by
`bench/gpu.py` on a GPU host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient
from server.app import TORCH_CPU
from server.errors import AdaptiveError, NotFound
from server.settings import ServeOptions
from tests.harness import serve_in_thread

OPTIONS = ServeOptions(port=0, metrics_port=None, device="auto", accelerator="cpu")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def test_every_variant_with_a_torch_form_gets_a_lane_that_answers_the_same(
        quick_family: Path) -> None:
    with serve_in_thread(quick_family, options=OPTIONS) as running, \
            AdaptiveClient(running.target) as client:
        table = client.variants()
        cpu = {c.variant for c in table if not c.name.startswith(f"{TORCH_CPU}:")}
        accel = {c.variant for c in table if c.name.startswith(f"{TORCH_CPU}:")}
        assert "full" in accel and accel <= cpu
        # int8 has no torch form (no int8 kernels there): it stays on the CPU lanes only
        assert not any(v.startswith("int8") for v in accel)
        x = _images(5)
        for variant in sorted(accel):
            on_accel = client.infer(x, variant=f"{TORCH_CPU}:{variant}")
            on_cpu = client.infer(x, variant=f"cpu:{variant}")
            assert on_accel.device == TORCH_CPU and on_cpu.device == "cpu", variant
            assert on_accel.variant == on_cpu.variant == variant
            np.testing.assert_allclose(on_accel.outputs, on_cpu.outputs, atol=1e-4, rtol=0)
            assert (on_accel.classes == on_cpu.classes).all(), variant


def test_a_variant_pin_may_run_on_either_device_and_unknown_lanes_are_not_found(
        quick_family: Path) -> None:
    with serve_in_thread(quick_family, options=OPTIONS) as running, \
            AdaptiveClient(running.target) as client:
        devices = {client.infer(_images(1, seed=i), variant="full").device for i in range(20)}
        assert devices <= {"cpu", TORCH_CPU} and devices
        with pytest.raises(NotFound, match="no such variant"):
            client.infer(_images(1), variant=f"{TORCH_CPU}:int8")


def test_requests_spread_over_both_devices_when_one_is_busy(quick_family: Path) -> None:
    """Concurrent requests for one variant with budgets that one lane's queue cannot hold: its
    lanes on both devices answer (the router sends a request to the other device's queue when
    the faster one's backlog would make it late)."""
    from concurrent.futures import ThreadPoolExecutor

    def send(i: int) -> str:
        try:
            return client.infer(_images(32, seed=i), variant="full", budget_ms=25.0).device
        except AdaptiveError as exc:  # shed: nothing fitted (counted, not expected to be many)
            return type(exc).__name__

    with serve_in_thread(quick_family, options=OPTIONS) as running, \
            AdaptiveClient(running.target) as client, ThreadPoolExecutor(48) as pool:
        devices = list(pool.map(send, range(300)))
    counts = {d: devices.count(d) for d in set(devices)}
    assert counts.get("cpu", 0) > 0 and counts.get(TORCH_CPU, 0) > 0, counts


def test_fp16_lanes_are_ranked_by_their_accuracy_remeasured_on_the_validation_sample(
        quick_family: Path) -> None:
    """``--gpu-dtype fp16``: the GPU lanes' candidates carry the accuracy they have in fp16 on the
    family's validation sample (measured at start-up), not the build's fp32 figure."""
    from dataclasses import replace

    from compression.core.family import load_family
    from server.torch_runner import TorchGraphRunner

    family = load_family(quick_family)
    sample = family.validation()
    assert sample is not None, "the build keeps a validation sample"
    x, y = sample
    runner = TorchGraphRunner(family.graph("full"), dtype="fp16", max_batch=256)
    expected = float((np.concatenate([runner(x[i:i + 256])["logits"].argmax(1)
                                      for i in range(0, len(x), 256)]) == y).mean())
    with serve_in_thread(quick_family, options=replace(OPTIONS, gpu_dtype="fp16")) as running, \
            AdaptiveClient(running.target) as client:
        table = {c.name: c.accuracy for c in client.variants()}
    assert table[f"{TORCH_CPU}:full"] == pytest.approx(expected, abs=1e-9)
    assert table["full"] == pytest.approx(family.variant("full").val_accuracy, abs=1e-6)
