"""Compression II: low-rank factorisation, depthwise separable conversion, the early-exit network."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import data as datasets
from compression import export, profile, registry
from compression.core import stats
from compression.core.errors import ConfigError
from compression.core.exits import (
    StageChain,
    assign_exits,
    calibrate,
    confidence,
    exit_shares,
    last_threshold,
    policy_predictions,
    stage_io,
    walk,
)
from compression.core.family import BATCH_SIZES, load_family
from compression.core.ort import session
from compression.data import Splits
from compression.methods import low_rank
from compression.methods.depthwise import conv_records
from compression.methods.early_exit import (
    EarlyExitConfig,
    EarlyExitNet,
    backbone,
    capped_policy_accuracies,
    export_stages,
    feature_shapes,
    joint_loss,
)
from compression.methods.early_exit import apply as apply_early_exit
from compression.methods.low_rank import (
    LowRankConfig,
    choose_rank,
    factorize,
    factorize_model,
    layer_params,
)
from compression.models import StagedCNN, build_model
from compression.train import TrainConfig
from tests.build_configs import SMALL_CNN, build_family, config_toml, one_torch_thread, variant

TINY = {"kind": "cnn", "input": [1, 28, 28], "num_classes": 10,
        "stages": [{"channels": 4, "depth": 1}, {"channels": 8, "depth": 2, "pool": True},
                   {"channels": 6, "depth": 1, "pool": True}]}


def _rank_deficient(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


# --- low rank ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_at_full_rank_reproduce_w(bias: bool) -> None:
    layer = nn.Linear(20, 12, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(_rank_deficient(12, 20, 5))
    k = int(torch.linalg.matrix_rank(layer.weight))
    assert k == 5
    pair = factorize(layer, k)
    first, second = pair
    torch.testing.assert_close(second.weight @ first.weight, layer.weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(7, 20)
    torch.testing.assert_close(pair(x), layer(x), atol=1e-5, rtol=1e-5)
    # K·(M+N) weights (+ M bias on the second layer) instead of M·N (+ M)
    assert sum(p.numel() for p in pair.parameters()) == layer_params(12, 20, k, bias)
    assert layer_params(12, 20, k, bias) == k * (12 + 20) + (12 if bias else 0)
    assert sum(p.numel() for p in layer.parameters()) == layer_params(12, 20, None, bias)


def test_conv_factors_at_full_rank_reproduce_the_conv() -> None:
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_rank_deficient(6, 27, 4).reshape(6, 3, 3, 3))
    k = int(torch.linalg.matrix_rank(conv.weight.reshape(6, -1)))
    pair = factorize(conv, k)
    a, b = pair[0].weight.reshape(k, -1), pair[1].weight.reshape(6, k)
    torch.testing.assert_close(b @ a, conv.weight.reshape(6, -1), atol=1e-5, rtol=1e-5)
    x = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(pair(x), conv(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in pair.parameters()) == k * (6 + 27) + 6


def test_truncation_is_the_best_rank_k_approximation() -> None:
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    pair = factorize(_linear(w), 4)
    err = torch.linalg.matrix_norm(pair[1].weight @ pair[0].weight - w)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(err, s[4:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)


def _linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_factorize_model_only_where_it_saves_and_records_k() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    cfg = LowRankConfig(param_ratio=0.5, min_weights=0, rank_multiple=1)
    out, records = factorize_model(model, cfg)
    assert len(records) == 5  # 4 convs + the head's linear
    for r in records:
        m, n = r["shape"]
        if r["rank"] is None:
            assert r["params_after"] == r["params_before"]
        else:
            assert r["rank"] * (m + n) < m * n
            assert r["params_after"] < r["params_before"]
    assert any(r["rank"] is not None for r in records)
    # the parameter drop of the whole model is exactly the per-layer records' drop
    drop = sum(r["params_before"] - r["params_after"] for r in records)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in out.parameters()) \
        == drop
    assert out(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_rank_from_energy_or_parameter_ratio() -> None:
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
    w = u[:, :4] @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0])) @ v[:, :4].T  # σ² = 16, 4, 1, 1
    energy = LowRankConfig(criterion="energy", rank_multiple=1, energy=0.9)
    assert choose_rank(w, energy) == 2  # (16 + 4) / 22 = 0.909
    assert choose_rank(w, LowRankConfig(criterion="energy", rank_multiple=1, energy=0.92)) == 3
    # ratio: K = ⌊r·M·N/(M+N)⌋, rounded up to rank_multiple: 0.25·32·288/320 = 7.2 → 7 → 8
    assert choose_rank(torch.randn(32, 288), LowRankConfig(param_ratio=0.25)) == 8


@pytest.mark.parametrize("method, params, fragment", [
    ("low-rank", {"criterion": "svd"}, "criterion must be one of"),
    ("low-rank", {"param_ratio": 1.5}, "param_ratio must lie in (0, 1), got 1.5"),
    ("depthwise", {"alpha": 2}, "alpha must lie in [0, 1], got 2"),
    ("early-exit", {"criterion": "margin"}, "criterion must be one of"),
    ("early-exit", {"serve": "both"}, "serve must be 'joint' or 'frozen', got 'both'"),
])
def test_bad_parameters_are_config_errors(method: str, params: dict[str, object],
                                          fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        registry.get(method).parse(params)
    assert fragment in str(err.value) and method in str(err.value)


# --- depthwise --------------------------------------------------------------------------------

def test_depthwise_ratio_per_layer_is_one_over_o_plus_one_over_k2() -> None:
    before = build_model(TINY)
    after = build_model({**TINY, "conv": "depthwise"})
    records = conv_records(before, after)
    assert len(records) == 4
    assert not records[0]["converted"] and records[0]["ratio"] == 1.0  # 1 input channel
    for r, block in zip(records[1:], [m for s in after.stages for m in s
                                      if isinstance(m, nn.Sequential)][1:], strict=True):
        assert r["converted"]
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is None for c in convs)  # no bias terms to account for
        i, o = r["in_channels"], r["out_channels"]
        k2 = r["kernel"][0] * r["kernel"][1]
        assert r["params_before"] == k2 * i * o
        assert r["params_after"] == k2 * i + i * o
        # after / before == 1/O + 1/k², exactly, in integers
        assert r["params_after"] * o * k2 == r["params_before"] * (k2 + o)


# --- early exit -------------------------------------------------------------------------------

def _tiny_exit_net() -> EarlyExitNet:
    torch.manual_seed(0)
    base = build_model(TINY)
    assert isinstance(base, StagedCNN)
    with torch.no_grad():  # non-trivial BN statistics, so folding them is exercised
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    parts = backbone(base, (1, 28, 28), EarlyExitConfig())
    return EarlyExitNet(parts, feature_shapes(parts.pre, parts.stages, (1, 28, 28)), 10, pool=4,
                        hidden=0).eval()


def test_stage_graphs_chained_in_ort_match_torch_at_every_exit() -> None:
    net = _tiny_exit_net()
    graphs = export_stages(net, (1, 28, 28))
    assert len(graphs) == 3
    for i, g in enumerate(graphs):
        inp, outs = stage_io(i, 3)
        assert [v.name for v in g.graph.input] == [inp]
        assert [v.name for v in g.graph.output] == list(outs)
    assert [v.name for v in graphs[-1].graph.output] == ["logits"]
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net.exit_logits(x)
    got = StageChain.from_graphs(graphs).run(x.numpy())
    assert len(got) == 3
    for g, t in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), t, atol=1e-4, rtol=1e-3)
    # stopping early runs only the stages up to that exit, with the same logits
    torch.testing.assert_close(torch.from_numpy(StageChain.from_graphs(graphs).run(x.numpy(), upto=0)[0]),
                               expected[0], atol=1e-4, rtol=1e-3)


def test_joint_loss_is_the_former_hand_written_kd_formula() -> None:
    """joint_loss distils through `distilled.soft_target_loss`; it must equal the formula it
    replaced, Σ wᵢ·CE + distill·T²·Σ_{i<last} KL(log_softmax(last/T) ‖ log_softmax(exit i/T)),
    in value and in every gradient (the last exit detached as the teacher)."""
    weights, distill, temp = (0.5, 1.0, 2.0), 0.7, 3.0
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 4, 5])

    def former(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outs = model.exit_logits(x)
        total = sum(w * F.cross_entropy(o, y) for w, o in zip(weights, outs, strict=True))
        soft = F.log_softmax(outs[-1].detach() / temp, dim=1)
        for o in outs[:-1]:
            total = total + distill * temp**2 * F.kl_div(
                F.log_softmax(o / temp, dim=1), soft, log_target=True, reduction="batchmean")
        return total

    losses, grads = [], []
    for fn in (joint_loss(weights, distill, temp), former):
        net = _tiny_exit_net().train()
        loss = fn(net, x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1])
    for g_new, g_old in zip(*grads, strict=True):
        torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6)


def _synthetic_exits(n: int = 600, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three exits, increasingly accurate; logit scale varies so confidences spread."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    exits = []
    for noise in (1.6, 1.0, 0.6):
        lg = rng.normal(0, noise, (n, 10))
        lg[np.arange(n), y] += rng.uniform(0, 4, n)
        exits.append(lg.astype(np.float32))
    return exits, y


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_calibrated_thresholds_meet_the_target_and_reproduce_shares(criterion: str) -> None:
    exits, y = _synthetic_exits()
    th = calibrate(exits, y, criterion, target_drop=0.0)
    where = assign_exits(exits, th, criterion)
    shares = exit_shares(where, 3)
    assert abs(sum(shares) - 1) < 1e-9 and 0 < shares[0] < 1
    # on the samples each early exit lets go, it is no worse than the last exit
    for e in (0, 1):
        sel = where == e
        assert (exits[e][sel].argmax(1) == y[sel]).sum() >= (exits[2][sel].argmax(1) == y[sel]).sum()
    # so the policy is at least as accurate as running the full depth, on this split
    assert (policy_predictions(exits, where) == y).mean() >= (exits[2].argmax(1) == y).mean()
    # re-deciding sample by sample from the thresholds alone gives the same shares
    again = np.array([next((e for e in range(2) if (
        confidence(exits[e][i:i + 1], criterion)[0] >= th[e] if criterion == "max_prob"
        else confidence(exits[e][i:i + 1], criterion)[0] <= th[e])), 2) for i in range(len(y))])
    np.testing.assert_array_equal(again, where)
    # an absolute target: each early exit's accepted samples reach it
    th_abs = calibrate(exits, y, criterion, target_accuracy=0.97)
    where_abs = assign_exits(exits, th_abs, criterion)
    for e in (0, 1):
        sel = where_abs == e
        if sel.any():
            assert (exits[e][sel].argmax(1) == y[sel]).mean() >= 0.97


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_capped_policy_accuracy_is_what_the_server_returns_at_that_depth(criterion: str) -> None:
    """Exit k as the deepest: the same answers as `walk` with ``max_exit = k`` on the chain."""
    graphs = export_stages(_tiny_exit_net(), (1, 28, 28))
    chain = StageChain.from_graphs(graphs)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(4)).numpy()
    logits = chain.all_logits(x)
    y = np.random.default_rng(0).integers(0, 10, len(x))
    y[:32] = logits[0][:32].argmax(1)  # some samples right at exit 0, so accuracies differ
    # thresholds that let about half of the still-running samples go at each early exit
    th = [float(np.median(confidence(lg, criterion))) for lg in logits[:-1]]
    th.append(last_threshold(criterion, 10))
    capped = capped_policy_accuracies(logits, y, th, criterion)
    for k in range(3):
        served = walk(chain, x, th, criterion, max_exit=np.full(len(x), k))
        assert served.exits.max() <= k
        assert capped[k] == float((served.logits.argmax(1) == y).mean()), k
    assert capped[0] == float((logits[0].argmax(1) == y).mean())  # exit 0 alone
    where = assign_exits(logits, th, criterion)  # the last entry is the uncapped policy
    assert capped[-1] == float((policy_predictions(logits, where) == y).mean())


# --- the report sections: intervals on the right split, McNemar against full -----------------

# an accuracy as the sections print it ("91.80%") that no 95 % interval follows
BARE_ACCURACY = re.compile(r"\d+\.\d\d%(?! \[\d)")
N_VAL, N_TEST = 40, 60  # unequal, so an interval over the wrong split cannot pass


def _noise_splits(seed: int = 0) -> Splits:
    """Ten brightness levels of noise: 160 training, 40 validation and 60 test images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, 260)
    x = (rng.random((260, 1, 28, 28), dtype=np.float32) * 0.1 + 0.09 * y[:, None, None, None])
    x = x.astype(np.float32)
    return Splits(x[:160], y[:160], x[160:200], y[160:200], x[200:], y[200:], num_classes=10)


def _tiny_full(splits: Splits) -> tuple[registry.BuildContext, registry.Built, np.ndarray]:
    """A context, an untrained TINY as `full`, and which test images its graph gets right."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    graph = export.to_onnx(model, (1, 28, 28))
    right = export.run(session(graph), splits.x_test).argmax(1) == splits.y_test
    ctx = registry.BuildContext(splits=splits, seed=0, built={}, progress=False,
                                train=TrainConfig(epochs=1, lr=3e-3, batch_size=32,
                                                  augment_shift=0))
    return ctx, registry.Built(name="full", model=model, spec=TINY, graph=graph,
                               accuracy=float(right.mean())), right


@pytest.mark.usefixtures("one_torch_thread")
def test_low_rank_section_gives_the_accuracy_before_fine_tuning_with_its_interval() -> None:
    ctx, full, _ = _tiny_full(_noise_splits())
    out = low_rank.apply(ctx, full, LowRankConfig(min_weights=0, fine_tune_epochs=0))
    acc = out.details["test_accuracy_before_fine_tune"]
    assert (f"Test accuracy [95% Wilson] right after factorising: "
            f"{stats.format_rate(acc, N_TEST)}.") in out.report_md
    assert not BARE_ACCURACY.findall(out.report_md), out.report_md


@pytest.mark.usefixtures("one_torch_thread")
def test_early_exit_section_gives_intervals_on_their_split_and_mcnemar_against_full() -> None:
    splits = _noise_splits()
    ctx, full, full_right = _tiny_full(splits)
    out = apply_early_exit(ctx, full, EarlyExitConfig(head_pool=4, joint_epochs=1))
    assert out.stages is not None and out.exits is not None
    md = out.report_md
    # the served policy against full on the same test images: both intervals, Δ and its p
    policy = profile.policy_correct(out.stages, out.exits, splits.x_test, splits.y_test)[-1]
    assert float(policy.mean()) == out.accuracy
    delta, p_value = stats.format_delta(full_right, policy)
    assert (f"test accuracy {stats.format_bits(policy)} vs full {stats.format_bits(full_right)} "
            f"on the same {N_TEST} test images (95% Wilson intervals; {delta}, exact McNemar "
            f"{p_value})") in md
    # per exit: test columns over the test images, the routing column over the validation ones
    for e in out.exits:
        assert e.policy_accuracy is not None and e.policy_val_accuracy is not None
        assert (f"| {e.index} | {stats.format_rate(e.accuracy, N_TEST)} | "
                f"{stats.format_rate(e.policy_accuracy, N_TEST)} | "
                f"{stats.format_rate(e.policy_val_accuracy, N_VAL)} | ") in md
    # the threshold curve: every row pairs the policy with full (Δ and McNemar)
    curve = [line.strip("|").split(" | ") for line in
             md.split("common max_prob threshold (test split)")[1].splitlines()
             if line.startswith("| 0.")]
    assert len(curve) == len(out.details["threshold_curve"]) > 0
    for row, recorded in zip(curve, out.details["threshold_curve"], strict=True):
        assert row[1] == stats.format_rate(recorded["test_accuracy"], N_TEST)
        assert float(row[2].removesuffix(" pt")) == pytest.approx(-recorded["drop_pt"], abs=0.005)
        assert re.fullmatch(r"p[=<][\d.]+", row[3]), row
    assert not BARE_ACCURACY.findall(md), md


# --- a tiny family with all three methods -----------------------------------------------------

TINY_FAMILY = config_toml(
    family="tiny-cii", seed=0,
    max_drop=100,  # the methods are tested here; the accuracy target in test_max_drop.py
    data="mnist5k",
    arch=SMALL_CNN,
    train={"epochs": 1, "lr": 5e-3, "augment_shift": 0},
    variants=[variant("low-rank", param_ratio=0.3, min_weights=512, fine_tune_epochs=1),
              variant("depthwise", epochs=1),
              variant("early-exit", frozen_epochs=1, joint_epochs=1)])


@pytest.fixture(name="one_torch_thread")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_family_with_the_three_methods(tmp_path: Path) -> None:
    out = build_family(tmp_path, TINY_FAMILY)
    fam = load_family(out)
    full = fam.variant("full")

    lr = fam.variant("low-rank")
    assert any(r["rank"] for r in lr.details["layers"])
    assert lr.params_count < full.params_count and lr.macs < full.macs

    dw = fam.variant("depthwise")
    assert all(r["ratio"] < 1 for r in dw.details["layers"] if r["converted"])
    assert dw.macs < full.macs

    ee = fam.variant("early-exit")
    assert ee.exits is not None and len(ee.exits) == 3
    graphs = fam.stage_graphs("early-exit")
    assert [a.path for a in ee.artifacts if a.role == "stage"] == \
        [f"early-exit/stage_{i}.onnx" for i in range(3)]
    for e in ee.exits:
        assert set(e.latency_ms) == {str(b) for b in BATCH_SIZES}
    p50 = [e.latency_ms["1"]["p50"] for e in ee.exits]
    assert ee.latency_ms == ee.exits[-1].latency_ms and p50[0] < p50[-1]
    assert ee.details["stages"][-1]["outputs"] == ["logits"]
    # the recorded thresholds reproduce the recorded exit shares on the validation split
    cfg = fam.manifest["build"]["config"]
    splits = datasets.split(datasets.load(cfg["data_spec"]), seed=cfg["seed"],
                            val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"])
    val = StageChain.from_graphs(graphs).all_logits(splits.x_val)
    where = assign_exits(val, [e.threshold for e in ee.exits], ee.exits[0].criterion)
    np.testing.assert_allclose(exit_shares(where, 3), [e.exit_share for e in ee.exits], atol=1e-6)
    # and the variant's accuracy is the policy's on the test split
    test = StageChain.from_graphs(graphs).all_logits(splits.x_test)
    where = assign_exits(test, [e.threshold for e in ee.exits], ee.exits[0].criterion)
    assert abs((policy_predictions(test, where) == splits.y_test).mean() - ee.accuracy) < 1e-6
    # validation accuracy: every variant; for early-exit, the policy (uncapped) on validation
    for v in fam.variants.values():
        assert v.val_accuracy is not None and 0.0 <= v.val_accuracy <= 1.0, v.name
    th, criterion = [e.threshold for e in ee.exits], ee.exits[0].criterion
    where = assign_exits(val, th, criterion)
    assert ee.val_accuracy == round(float((policy_predictions(val, where) == splits.y_val).mean()), 6)
    assert ee.exits[-1].policy_val_accuracy == ee.val_accuracy
    assert ee.exits[-1].policy_accuracy == ee.accuracy
    # per exit k: stand-alone exit k and the policy capped at k, recomputed from the exit logits
    for logits, y, suffix in ((test, splits.y_test, ""), (val, splits.y_val, "val_")):
        capped = capped_policy_accuracies(logits, y, th, criterion)
        for e in ee.exits:
            k = e.index
            assert getattr(e, f"policy_{suffix}accuracy") == round(capped[k], 6)
            assert getattr(e, f"{suffix}accuracy") == round(float((logits[k].argmax(1) == y).mean()), 6)
            where = assign_exits(logits[:k + 1], [*th[:k], last_threshold(criterion, 10)], criterion)
            assert getattr(e, f"policy_{suffix}accuracy") == round(
                float((policy_predictions(logits[:k + 1], where) == y).mean()), 6)
