"""Architectures: specs round-trip through JSON, and every exported graph equals torch."""

from __future__ import annotations

import json

import pytest
import torch

from compression import export, profile
from compression.core.errors import ConfigError
from compression.core.ort import session
from compression.models import DEFAULT_CNN, DEFAULT_MLP, build_model, example_input, validate


def test_spec_round_trip_rebuilds_the_same_network() -> None:
    spec = validate({**DEFAULT_CNN, "normalize": {"mean": [0.13], "std": [0.31]}})
    again = json.loads(json.dumps(spec))
    torch.manual_seed(0)
    a = build_model(spec)
    b = build_model(again)
    b.load_state_dict(a.state_dict())  # same parameter names and shapes
    x = example_input(spec, 4)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_default_cnn_is_big_enough_for_compression_to_matter() -> None:
    macs = profile.count_macs(build_model(DEFAULT_CNN), DEFAULT_CNN["input"])
    assert macs >= 25_000_000, macs


def test_per_block_channel_lists_and_depthwise() -> None:
    spec = {**DEFAULT_CNN, "stages": [{"channels": [8, 6], "pool": False},
                                      {"channels": 12, "depth": 1, "pool": True, "conv": "depthwise"}]}
    model = build_model(spec)
    out = model.eval()(example_input(spec, 2))
    assert out.shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 6, 6, 12]
    assert convs[2].groups == 6  # the depthwise half of the converted block


@pytest.mark.parametrize("spec", [DEFAULT_CNN, DEFAULT_MLP], ids=["cnn", "mlp"])
def test_onnx_equals_torch(spec: dict) -> None:
    torch.manual_seed(0)
    model = build_model(spec).eval()
    graph = export.to_onnx(model, spec["input"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = example_input(spec, batch)
        got = torch.from_numpy(export.run(session(graph), x.numpy()))
        torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("bad, fragment", [
    ({"kind": "resnet"}, "kind 'resnet' is unknown"),
    ({**DEFAULT_CNN, "stages": []}, "stages must be a non-empty list"),
    ({**DEFAULT_CNN, "stages": [{"channels": 8, "strides": 2}]}, "unknown keys ['strides']"),
    ({**DEFAULT_CNN, "input": [1, 28]}, "input must be [C, H, W]"),
    ({**DEFAULT_CNN, "dropout": 0.1}, "unknown keys ['dropout']"),
    ({**DEFAULT_CNN, "conv": "grouped"}, "conv must be 'standard' or 'depthwise'"),
])
def test_bad_specs_name_the_field(bad: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        validate(bad)
    assert fragment in str(err.value)
