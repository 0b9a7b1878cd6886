"""Every method on a user's own network (`tests.fixtures_models`): a ResNet with skip connections,
and one torch.fx cannot trace. Small tensors and at most one epoch; the whole family is built in
tests/integration/test_user_model.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression import export, profile, tracing
from compression.core.errors import ConfigError, Unsupported
from compression.core.family import load_family
from compression.data import Splits
from compression.methods import binary, clustered, depthwise, distilled, early_exit, low_rank
from compression.methods import pruned_neurons as pn
from compression.models import build_model
from compression.registry import BuildContext, Built
from compression.train import TrainConfig, seed_everything
from tests.build_configs import build_family, config_toml, one_torch_thread, variant

SHAPE = (3, 16, 16)
RESNET = {"kind": "user", "factory": "tests.fixtures_models:resnet",
          "args": {"num_classes": 3, "width": 8}, "input": list(SHAPE), "num_classes": 3}
UNTRACEABLE = {**RESNET, "factory": "tests.fixtures_models:untraceable", "args": {}}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _splits(n: int = 96) -> Splits:
    """RGB noise whose class is the brightest channel."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.random((n, *SHAPE), dtype=np.float32) * 0.5
    x[np.arange(n), y] += 0.5
    k = n // 6
    return Splits(x[2 * k:], y[2 * k:], x[:k], y[:k], x[k:2 * k], y[k:2 * k], num_classes=3)


def _ctx() -> BuildContext:
    return BuildContext(splits=_splits(), seed=0, built={}, progress=False,
                        train=TrainConfig(epochs=1, lr=3e-3, batch_size=32, augment_shift=0))


def _base(spec: dict = RESNET) -> Built:
    seed_everything(0)
    model = build_model(spec).eval()
    return Built("full", model, spec, export.to_onnx(model, SHAPE), accuracy=0.5,
                 val_accuracy=0.5)


# --- cutting a network with skip connections --------------------------------------------------

def test_a_resnet_is_cut_only_where_no_skip_connection_crosses() -> None:
    model = build_model(RESNET).eval()
    gm = tracing.trace(copy.deepcopy(model))
    cuts = tracing.cuts(gm, SHAPE)
    ends = {m for c in cuts for m in c.modules}
    assert {"stem", "layer1", "layer2", "layer3"} <= ends
    # inside a block the input still waits for the addition: no cut there
    assert not ends & {"layer1.0.conv1", "layer1.0.bn1", "layer2.0.conv2", "layer2.0.bn2",
                       "layer2.0.shortcut"}
    macs = [c.macs for c in cuts]
    assert macs == sorted(macs) and macs[-1] == profile.count_macs(model, SHAPE)
    at = [next(c.node for c in cuts if "layer1" in c.modules),
          next(c.node for c in cuts if "layer2" in c.modules)]
    parts = tracing.split(gm, at)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = x
    with torch.no_grad():
        for part in parts:
            y = part(y)
        torch.testing.assert_close(y, model(x))


def test_exits_go_where_named_or_by_macs_and_a_bad_name_lists_the_boundaries() -> None:
    model = build_model(RESNET)
    auto = early_exit.backbone(model, SHAPE, early_exit.EarlyExitConfig())
    assert auto.places == ["layer1", "layer2"]  # nearest to 1/3 and 2/3 of the MACs
    named = early_exit.backbone(model, SHAPE, early_exit.EarlyExitConfig(
        exit_after=("layer2", "stem")))
    assert named.places == ["stem", "layer2"] and len(named.stages) == 3  # forward order
    with pytest.raises(ConfigError, match=r"'layer2.0.bn1' is not a module boundary .*"
                                          r"boundaries: \[.*'layer1'.*\]"):
        early_exit.backbone(model, SHAPE, early_exit.EarlyExitConfig(
            exit_after=("layer1", "layer2.0.bn1")))
    with pytest.raises(Unsupported, match="lower auto_exits, or name them with exit_after"):
        early_exit.backbone(model, SHAPE, early_exit.EarlyExitConfig(auto_exits=9))
    with pytest.raises(ValueError, match="exit_after must name ≥ 2 different modules"):
        early_exit.EarlyExitConfig(exit_after=("layer1",))


def test_early_exit_stages_of_a_resnet_export_and_match_torch() -> None:
    parts = early_exit.backbone(build_model(RESNET).eval(), SHAPE, early_exit.EarlyExitConfig())
    net = early_exit.EarlyExitNet(parts, early_exit.feature_shapes(parts.pre, parts.stages, SHAPE),
                                  3, pool=4, hidden=0).eval()
    graphs = early_exit.export_stages(net, SHAPE)
    early_exit.check_against_torch(net, graphs, SHAPE)


def test_a_network_fx_cannot_trace_is_unsupported_where_fx_is_needed() -> None:
    ctx, base = _ctx(), _base(UNTRACEABLE)
    with pytest.raises(Unsupported, match=r"torch\.fx cannot trace Untraceable"):
        early_exit.apply(ctx, base, early_exit.EarlyExitConfig())
    with pytest.raises(Unsupported, match="BatchNorm cannot be folded"):
        clustered.apply(ctx, base, clustered.ClusteredConfig(epochs=0))
    # the methods that work module by module do not need fx
    out = low_rank.apply(ctx, base, low_rank.LowRankConfig(fine_tune_epochs=0, min_weights=0))
    assert out.model is not None


# --- the methods, module by module ---------------------------------------------------------

def test_channel_pruning_of_a_resnet_rebuilds_from_its_spec() -> None:
    ctx, base = _ctx(), _base()
    out = pn.apply(ctx, base, pn.PrunedNeuronsConfig(ratio=0.5, steps=1, epochs_per_step=0,
                                                     final_epochs=0))
    assert out.spec is not None and out.spec["factory"] == RESNET["factory"]
    assert out.model is not None and out.model.fc.out_features == 3  # the classes stay
    assert profile.count_macs(out.model, SHAPE) < profile.count_macs(base.model, SHAPE) / 3
    rebuilt = build_model(out.spec)
    rebuilt.load_state_dict(out.model.state_dict())


@pytest.mark.parametrize("spec", [
    {"kind": "cnn", "input": list(SHAPE), "num_classes": 3, "stages": [
        {"channels": 8, "depth": 1}, {"channels": 16, "depth": 1, "pool": True}]},
    {"kind": "mlp", "input": list(SHAPE), "num_classes": 3, "hidden": [32, 16]},
    RESNET,
], ids=["cnn", "mlp", "user"])
def test_channel_pruning_and_narrower_students_work_on_every_kind(spec: dict) -> None:
    ctx, base = _ctx(), _base(spec)
    out = pn.apply(ctx, base, pn.PrunedNeuronsConfig(ratio=0.5, steps=1, epochs_per_step=0,
                                                     final_epochs=0))
    assert out.spec is not None and out.model is not None
    build_model(out.spec).load_state_dict(out.model.state_dict())  # the spec is exact
    assert profile.count_params(out.model) < profile.count_params(base.model) / 2
    student = build_model(distilled.student_spec(spec, "base", 0.5))
    assert profile.count_params(student) < profile.count_params(base.model) / 2


def test_students_of_a_user_model_the_base_narrower_or_a_built_in_one() -> None:
    base = _base()
    norm = _splits().normalization()
    narrow = build_model(distilled.student_spec(RESNET, "base", 0.5, norm))
    assert type(narrow).__name__ == "ResNet"
    ratio = profile.count_macs(base.model, SHAPE) / profile.count_macs(narrow, SHAPE)
    assert 3 < ratio < 5  # half the channels: about a quarter of the MACs
    cnn = distilled.student_spec(RESNET, "cnn", 1.0, norm)
    assert cnn["kind"] == "cnn" and cnn["normalize"] == norm and cnn["input"] == list(SHAPE)
    mlp = distilled.student_spec(RESNET, "mlp", 0.5, norm)
    assert mlp["hidden"] == [150, 50]
    assert distilled.DistilledConfig(student="base", width=0.5).strength.field == "width"
    with pytest.raises(ValueError, match="width must be below 1 with student = 'base'"):
        distilled.DistilledConfig(student="base")
    with pytest.raises(ValueError, match="student must be a table, 'base' or one of"):
        distilled.DistilledConfig(student="resnet50")


def test_binary_keeps_the_first_called_layer_and_the_classifier_float() -> None:
    ctx, base = _ctx(), _base()
    out = binary.apply(ctx, base, binary.BinaryConfig(epochs=0, full_precision="ends"))
    assert out.model is not None
    first, last = out.model.stem[0], out.model.fc  # fc is declared first, called last
    for m in (first, last):
        assert len(m.weight[0].abs().unique()) > 2
    assert len(out.model.layer1[0].conv1.weight[0].abs().unique()) == 1
    assert out.details["float32_weights"] == first.weight.numel() + last.weight.numel()


def test_depthwise_conversion_of_a_resnet_keeps_the_other_layers_weights() -> None:
    ctx, base = _ctx(), _base()
    out = depthwise.apply(ctx, base, depthwise.DepthwiseConfig(epochs=1))
    assert out.spec is not None and out.spec["edits"][-1]["separable"]
    assert out.model is not None and isinstance(out.model.layer1[0].conv1, nn.Sequential)
    assert all(r["converted"] and r["ratio"] < 1 for r in out.details["layers"])
    assert out.details["cost"]["mac_reduction"] > 3


# --- the build --------------------------------------------------------------------------------

def test_a_user_model_with_the_wrong_class_count_stops_the_build(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_splits().x_train, y=_splits().y_train)
    config = config_toml(data=f"npz:{tmp_path / 'd.npz'}", model="tests.fixtures_models:resnet",
                         model_args={"num_classes": 10})
    with pytest.raises(ConfigError, match=r"returns \[2, 10\] for input \[2, 3, 16, 16\]; "
                                          r"expected logits \[2, 3\]"):
        build_family(tmp_path, config)


def untraceable_family(npz: Path) -> str:
    return config_toml(
        max_drop=100,
        data=f"npz:{npz}",
        model="tests.fixtures_models:untraceable",
        train={"epochs": 1, "batch_size": 32, "augment_shift": 0},
        variants=[variant("early-exit"),
                  variant("int8-of-early-exit", "int8", base="early-exit"),
                  variant("int8", calibration_images=16)])


@pytest.mark.slow
def test_a_method_that_cannot_handle_the_model_is_left_out_and_says_why(tmp_path: Path) -> None:
    splits = _splits()
    np.savez(tmp_path / "d.npz", x=splits.x_train, y=splits.y_train)
    out = build_family(tmp_path, untraceable_family(tmp_path / "d.npz"))
    fam = load_family(out)
    assert set(fam.variants) == {"full", "int8"}
    skipped = {s["name"]: s for s in fam.manifest["skipped"]}
    assert "torch.fx cannot trace Untraceable" in skipped["early-exit"]["reason"]
    assert skipped["int8-of-early-exit"]["reason"] == "its base 'early-exit' was left out"
    report = (out / "report.md").read_text()
    assert "## Left out" in report and "`int8-of-early-exit` (int8 of `early-exit`)" in report
