"""Memory comes back after a large batch: ONNX Runtime's arena is shrunk past
`SHRINK_ABOVE_ROWS` rows, and glibc's thresholds are fixed so freed buffers are unmapped.

Each case runs in a fresh interpreter, so its RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from server.memory import IdleTrim

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np, onnx, psutil
    from onnx import TensorProto, helper
    from compression.core import ort as core_ort
    from server.memory import return_freed_memory

    shrink, trim = sys.argv[1] == "shrink", sys.argv[2] == "trim"
    if trim:
        assert return_freed_memory()
    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05
    w0 = np.random.default_rng(1).standard_normal((64, 1, 3, 3)).astype(np.float32)
    graph = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["input", "w0"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Conv", ["b", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("ReduceMean", ["c"], ["logits"], axes=[2, 3], keepdims=0)],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 64])],
        [onnx.numpy_helper.from_array(w0, "w0"), onnx.numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 13)])
    sess = core_ort.session(graph)
    small = np.random.default_rng(2).random((1, 1, 32, 32), dtype=np.float32)
    core_ort.run(sess, {"input": small}, rows=1)
    rss = psutil.Process().memory_info().rss
    big = np.random.default_rng(3).random((256, 1, 32, 32), dtype=np.float32)
    if shrink:
        core_ort.run(sess, {"input": big}, rows=256)
    else:
        sess.run(None, {"input": big})
    del big
    core_ort.run(sess, {"input": small}, rows=1)
    print(json.dumps({"kept_mib": (psutil.Process().memory_info().rss - rss) / 2**20}))
""")


def _kept_mib(shrink: bool, trim: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, "shrink" if shrink else "keep",
                          "trim" if trim else "default"],
                         capture_output=True, text=True, timeout=120, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["kept_mib"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and RSS: Linux only")
def test_a_large_batch_gives_its_memory_back() -> None:
    """One batch of 256 through a graph whose activations take ~130 MB: without the shrink the
    process keeps them after the batch; with the server's settings it keeps a small part."""
    kept = _kept_mib(shrink=False, trim=False)
    returned = _kept_mib(shrink=True, trim=True)
    assert kept > 60, f"control: the arena should have kept the batch's activations ({kept:.0f} MiB)"
    assert returned < kept / 4, f"kept {returned:.0f} MiB of {kept:.0f} MiB after the batch"


FRAGMENTED = textwrap.dedent("""
    import json
    import psutil
    from server.memory import IdleTrim, return_freed_memory

    assert return_freed_memory()
    rss = lambda: psutil.Process().memory_info().rss / 2**20
    start = rss()
    # 200 buffers of 1 MB (under the 4 MiB mmap threshold: from the heap), one after another;
    # freeing every other one leaves 100 MB of holes between live blocks, never a free top
    buffers = [b"\\x01" * 2**20 for _ in range(200)]  # one allocation each: no temporaries
    del buffers[::2]
    kept = rss() - start
    trim = IdleTrim()
    trimmed = trim.tick(0.5), trim.tick(0.0)
    print(json.dumps({"kept_mib": kept, "after_mib": rss() - start, "trimmed": trimmed}))
    assert len(buffers) == 100
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and RSS: Linux only")
def test_the_first_quiet_interval_gives_a_fragmented_heap_back() -> None:
    """100 MB of freed 1 MB buffers, each between two live ones: glibc keeps them (it returns
    only a free top) until `IdleTrim` trims on the first quiet interval after the burst."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["trimmed"] == [False, True]
    assert got["kept_mib"] > 190, f"control: the heap should have kept the freed buffers {got}"
    assert got["after_mib"] < got["kept_mib"] - 90, f"the trim gave back too little: {got}"


def test_the_heap_is_trimmed_once_per_burst_on_its_first_quiet_interval() -> None:
    """The decision alone (the C call is counted, not made; the test above makes it): never
    while busy, never without traffic since the last trim, once when traffic stops."""
    calls: list[int] = []
    trim = IdleTrim(lambda pad: calls.append(pad) or 1)
    busy = [0.0, 0.002, 0.4, 0.9, 0.5, 0.0, 0.001, 0.0, 0.3, 0.005, 0.0]
    assert [trim.tick(b) for b in busy] == [
        False, False, False, False, False, True, False, False, False, True, False]
    assert calls == [0, 0]
