"""Architectures: specs round-trip through JSON, and every exported graph equals torch; a user's
own network (kind ``user``) is rebuilt from its factory, and edits describe its compressed forms."""

from __future__ import annotations

import json

import pytest
import torch

from compression import export, profile
from compression.core.errors import ConfigError
from compression.core.ort import session
from compression.methods.pruned_neurons import prune_channels, pruned_spec
from compression.models import (
    DEFAULT_CNN,
    DEFAULT_MLP,
    build_model,
    example_input,
    fold_batchnorm,
    layers_in_call_order,
    separable_convs,
    validate,
)

RESNET = {"kind": "user", "factory": "tests.fixtures_models:resnet",
          "args": {"num_classes": 3, "width": 8}, "input": [3, 16, 16], "num_classes": 3}


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
    ({**RESNET, "factory": "resnet"}, "[base] model must be 'package.module:factory', got 'resnet'"),
    ({**RESNET, "factory": "tests.no_such_module:resnet"}, "cannot import 'tests.no_such_module'"),
    ({**RESNET, "factory": "tests.fixtures_models:vgg"}, "has no attribute 'vgg'"),
    ({**RESNET, "factory": "tests.fixtures_models:__doc__"}, "'__doc__' is not callable"),
    ({**RESNET, "args": [3]}, "model_args must be a table, got [3]"),
    ({**RESNET, "edits": [{"prune": {}}]}, "edits must be a list of 'resize' / 'separable'"),
    ({**RESNET, "weights": "x.pt"}, "unknown keys ['weights']"),
])
def test_bad_specs_name_the_field(bad: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        validate(bad)
    assert fragment in str(err.value)


def test_a_user_model_is_its_factorys_module_and_bad_arguments_name_them() -> None:
    model = build_model(RESNET)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 3
    with pytest.raises(ConfigError, match=r"model_args \{'depth': 50\} failed: TypeError"):
        build_model({**RESNET, "args": {"depth": 50}})


def test_layers_in_call_order_finds_the_input_layer_and_the_classifier() -> None:
    """The fixture declares its classifier first: module order would call it the input layer."""
    model = build_model(RESNET)
    layers = layers_in_call_order(model, RESNET["input"])
    assert layers[0] is model.stem[0] and layers[-1] is model.fc
    assert list(model.modules())[1] is model.fc


def test_a_resize_edit_rebuilds_a_channel_pruned_resnet_exactly() -> None:
    torch.manual_seed(0)
    model = build_model(RESNET)
    prune_channels(model, (3, 16, 16), 0.5, 1)
    spec = json.loads(json.dumps(pruned_spec(RESNET, model)))  # plain JSON, in the manifest
    assert [list(e) for e in spec["edits"]] == [["resize"]]
    clean = build_model(spec)
    clean.load_state_dict(model.state_dict())  # every tensor shape agrees
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(clean.eval()(x), model.eval()(x))
    assert clean.layer2[0].conv1.in_channels == clean.stem[0].out_channels == 4
    # a residual addition joins layer1's output and layer2's shortcut: pruned as one
    assert clean.layer2[0].shortcut[0].in_channels == clean.layer1[0].conv2.out_channels


def test_a_separable_edit_swaps_the_named_convs_for_depthwise_pairs() -> None:
    convs = separable_convs(build_model(RESNET))
    assert "stem.0" in convs and "layer2.0.shortcut.0" not in convs  # 1×1: nothing to separate
    model = build_model({**RESNET, "edits": [{"separable": convs}]})
    pair = model.get_submodule("layer1.0.conv1")
    assert isinstance(pair, torch.nn.Sequential) and pair[0].groups == 8
    assert profile.count_macs(model, RESNET["input"]) < profile.count_macs(
        build_model(RESNET), RESNET["input"]) / 3
    assert model.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_fold_batchnorm_folds_a_user_blocks_attribute_batchnorms() -> None:
    """``self.bn1(self.conv1(x))`` in a residual block folds as a Sequential's conv-BN does."""
    torch.manual_seed(0)
    model = build_model(RESNET).eval()
    with torch.no_grad():  # non-trivial statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
