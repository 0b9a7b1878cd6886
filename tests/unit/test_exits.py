"""The early-exit rules that the build and the server share (`compression.core.exits`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compression.core.exits import (
    StageChain,
    assign_exits,
    confidence,
    last_threshold,
    leaves,
    never_threshold,
    stage_io,
    walk,
)

SURE, UNSURE = [8.0, 0.0, 0.0], [0.3, 0.2, 0.1]


def _stage(index: int, num_stages: int) -> onnx.ModelProto:
    """Stage ``index``: logits = its input × (index + 1); features = its input (ONNX Identity)."""
    inp, outs = stage_io(index, num_stages)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [float(index + 1)])
    nodes = [helper.make_node("Mul", [inp, "scale"], ["logits"])]
    if "features" in outs:
        nodes.append(helper.make_node("Identity", [inp], ["features"]))
    graph = helper.make_graph(
        nodes, f"stage{index}", [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 3]) for o in outs],
        initializer=[scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _chain(n: int = 3) -> StageChain:
    return StageChain.from_graphs([_stage(i, n) for i in range(n)])


def test_confidence_and_thresholds() -> None:
    logits = np.array([SURE, UNSURE], np.float32)
    assert leaves(confidence(logits, "max_prob"), 0.9, "max_prob").tolist() == [True, False]
    assert leaves(confidence(logits, "entropy"), 0.2, "entropy").tolist() == [True, False]
    for criterion in ("max_prob", "entropy"):
        conf = confidence(logits, criterion)
        assert leaves(conf, last_threshold(criterion, 3), criterion).all()
        assert not leaves(conf, never_threshold(criterion), criterion).any()
    with pytest.raises(ValueError, match="'margin'"):
        confidence(logits, "margin")


def test_walk_lets_confident_samples_leave_early() -> None:
    x = np.array([SURE, UNSURE, SURE], np.float32)
    out = walk(_chain(), x, [0.9, 0.9, 0.0], "max_prob")
    assert out.exits.tolist() == [0, 2, 0]
    np.testing.assert_allclose(out.logits[1], np.array(UNSURE) * 3)  # the last stage's logits
    assert [(s, n) for s, n, _ms in out.timings] == [(0, 3), (1, 1), (2, 1)]


def test_walk_agrees_with_assign_exits_on_precomputed_logits() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32) * 3
    chain, thresholds = _chain(), [0.9, 0.8, 0.0]
    expected = assign_exits(chain.run(x), thresholds, "max_prob")
    assert walk(chain, x, thresholds, "max_prob").exits.tolist() == expected.tolist()


def test_walk_stops_at_max_exit_and_when_keep_going_says_no() -> None:
    x = np.array([UNSURE, UNSURE, UNSURE], np.float32)
    out = walk(_chain(), x, [0.99, 0.99, 0.0], "max_prob", max_exit=np.array([0, 2, 2]),
               keep_going=lambda stage, samples: samples != 2)  # sample 2: no time for stage 1
    assert out.exits.tolist() == [0, 2, 0]


def test_chain_refuses_graphs_that_break_the_stage_contract() -> None:
    with pytest.raises(ValueError, match="stage contract"):
        StageChain.from_graphs([_stage(0, 2), _stage(0, 2)])  # stage 1 must take 'features_in'
