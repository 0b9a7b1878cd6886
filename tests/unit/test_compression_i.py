"""Compression I: weight/channel pruning, distillation, int8, clustering + Huffman, binary.

Small models and tensors throughout; one slow test builds a tiny family with all six methods and
loads it back exactly as the server does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression import export, report
from compression.build import _base_model, load_config
from compression.core import encoding, stats
from compression.core.family import load_family
from compression.core.ort import session
from compression.data import Splits, load, split
from compression.methods import (
    binary,
    clustered,
    distilled,
    int8,
    pruned_neurons,
    pruned_weights,
)
from compression.models import DEFAULT_CNN, build_model, fold_batchnorm
from compression.registry import BuildContext, Built
from compression.train import TrainConfig, TrainResult, accuracy, logits, seed_everything, train
from tests.build_configs import build_family, config_toml, one_torch_thread, variant

ROOT = Path(__file__).resolve().parents[2]
TINY = {**DEFAULT_CNN, "stages": [{"channels": 8, "depth": 1, "pool": False},
                                  {"channels": 16, "depth": 2, "pool": True}]}


def _splits(n: int = 160, seed: int = 0) -> Splits:
    """Noise images whose label is their brightness level: learnable in a few epochs by a CNN
    with a global-average-pool head."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.3 + 0.22 * y[:, None, None, None]
    x = x.astype(np.float32)
    k = n // 8
    return Splits(x[2 * k:], y[2 * k:], x[:k], y[:k], x[k:2 * k], y[k:2 * k], num_classes=4)


def _ctx(splits: Splits, epochs: int = 1) -> BuildContext:
    return BuildContext(splits=splits, seed=0, built={}, progress=False,
                        train=TrainConfig(epochs=epochs, lr=3e-3, batch_size=32, augment_shift=0))


def _tiny(num_classes: int = 4) -> nn.Module:
    seed_everything(0)
    return build_model({**TINY, "num_classes": num_classes})


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Splits]:
    """A tiny CNN trained for a few epochs: confident enough that int8 must agree with it."""
    splits = _splits(240)
    model = _tiny()
    train(model, splits, TrainConfig(epochs=5, lr=1e-2, batch_size=32, augment_shift=0), seed=0,
          progress=False)
    assert accuracy(model, splits.x_test, splits.y_test) > 0.9
    return model, splits


# --- pruned-weights ----------------------------------------------------------------------------

def test_pruning_reaches_the_sparsity_and_masks_hold_through_fine_tuning() -> None:
    ctx = _ctx(_splits())
    model = _tiny()
    config = pruned_weights.PrunedWeightsConfig(sparsity=0.8, steps=2, epochs_per_step=1,
                                         final_epochs=1, lr=1e-2, min_layer_weights=0)
    before = copy.deepcopy(model)
    masks = pruned_weights.prune_iteratively(ctx, model, config, desc="t")
    assert pruned_weights.sparsity(model) == pytest.approx(0.8, abs=0.005)
    weights = pruned_weights.prunable(model)
    for name, mask in masks.items():
        assert not weights[name][~mask].any(), f"{name}: a pruned weight came back"
    # and the survivors were really fine-tuned (a frozen model would pass the mask check too)
    kept = pruned_weights.prunable(before)["stages.1.1.0.weight"][masks["stages.1.1.0.weight"]]
    assert not torch.equal(kept, weights["stages.1.1.0.weight"][masks["stages.1.1.0.weight"]])


def test_small_layers_stay_dense_and_the_others_make_up_for_them() -> None:
    model = _tiny()
    masks = pruned_weights.magnitude_masks(model, 0.5, min_layer_weights=100)
    assert masks["stages.0.0.0.weight"].all()  # 72 weights: kept dense
    pruned_weights.apply_masks(model, masks)
    assert pruned_weights.sparsity(model) == pytest.approx(0.5, abs=0.002)


def test_sparsity_schedule_ramps_up_to_the_target() -> None:
    s = pruned_weights.schedule(0.9, 3)
    assert s == sorted(s) and s[-1] == pytest.approx(0.9) and s[0] > 0.5


def test_rewind_to_init_reproduces_the_builders_initial_weights(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The builder trains the base from build_model under its seed: capture those weights."""
    cfg = load_config(ROOT / "configs" / "quick.toml", seed=7)
    captured: dict[str, torch.Tensor] = {}

    def fake_train(model: nn.Module, *args: object, **kwargs: object) -> TrainResult:
        captured.update({k: v.clone() for k, v in model.state_dict().items()})
        return TrainResult(best_val_accuracy=0.0, epochs_run=0)

    monkeypatch.setattr("compression.build.train", fake_train)
    spec = {**cfg.arch, "num_classes": 10}
    _base_model(cfg, spec, _splits(), "fp", None, tmp_path, False)
    rebuilt = pruned_weights.initial_weights(spec, 7).state_dict()
    assert captured.keys() == rebuilt.keys()
    for k, v in captured.items():
        torch.testing.assert_close(rebuilt[k], v, rtol=0, atol=0)
    other = pruned_weights.initial_weights(spec, 8).state_dict()
    assert not torch.equal(other["stages.0.0.0.weight"], captured["stages.0.0.0.weight"])


# --- pruned-neurons ----------------------------------------------------------------------------

def test_channel_pruning_shrinks_channels_and_keeps_output_shape() -> None:
    model = _tiny(num_classes=7).eval()
    before = pruned_neurons.conv_widths(model)
    pruned_neurons.prune_channels(model, (1, 28, 28), ratio=0.5, steps=2)
    after = pruned_neurons.conv_widths(model)
    assert after == [[4], [8, 8]] and before == [[8], [16, 16]]
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 7)
    # the spec rebuilds exactly the pruned network
    spec = pruned_neurons.pruned_spec({**TINY, "num_classes": 7}, model)
    clean = build_model(spec)
    clean.load_state_dict(model.state_dict())
    torch.testing.assert_close(clean.eval()(x), model(x))
    assert clean.head.fc.out_features == 7


# --- distilled ---------------------------------------------------------------------------------

def test_kd_loss_matches_a_hand_computation() -> None:
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    temp, alpha = 3.0, 0.6

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    sn, tn = s.numpy().astype(np.float64), t.numpy().astype(np.float64)
    p_t, p_s = softmax(tn / temp), softmax(sn / temp)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    ce = np.mean(-np.log(softmax(sn)[np.arange(2), y.numpy()]))
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = distilled.kd_loss(s, t, y, temperature=temp, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kd_loss_averages_the_ensembles_soft_targets() -> None:
    g = torch.Generator().manual_seed(0)
    s, t1, t2 = (torch.randn(4, 5, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3])
    temp = 2.0
    avg = (F.softmax(t1 / temp, -1) + F.softmax(t2 / temp, -1)) / 2
    expected = F.kl_div(F.log_softmax(s / temp, -1), avg, reduction="batchmean") * temp ** 2
    got = distilled.kd_loss(s, torch.stack([t1, t2]), y, temperature=temp, alpha=1.0)
    torch.testing.assert_close(got, expected)


def test_kd_training_loss_is_kd_loss_against_a_frozen_teacher() -> None:
    teacher, student = _tiny().train(), _tiny()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss = distilled.kd_training_loss(teacher, temperature=2.0, alpha=0.7)(student, x, y)
    assert not teacher.training  # the teacher answers in eval mode (BN running statistics)
    with torch.no_grad():
        expected = distilled.kd_loss(student(x), teacher(x), y, temperature=2.0, alpha=0.7)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_student_inherits_input_and_classes_and_bad_student_fails_at_parse() -> None:
    spec = distilled.student_spec({**TINY, "num_classes": 3, "input": [1, 14, 14]},
                                     {"stages": [{"channels": 4, "depth": 1}]})
    assert spec["num_classes"] == 3 and spec["input"] == [1, 14, 14]
    with pytest.raises(ValueError, match="student"):
        distilled.DistilledConfig(student={"stages": [{"width": 4}]})


def test_memoised_teacher_matches_the_model() -> None:
    model = _tiny().eval()
    teachers = distilled.Teachers([model])
    x = torch.rand(5, 1, 28, 28)
    first = teachers(x)
    with torch.no_grad():
        torch.testing.assert_close(first[0], model(x))
    assert teachers(x.clone()) is first  # same content → memoised
    assert teachers(x + 1e-3) is not first


def test_a_variants_served_graph_teaches_like_its_model() -> None:
    model = _tiny().eval()
    graph_teacher = distilled.GraphTeacher(export.to_onnx(model, (1, 28, 28)))
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(graph_teacher(x), model(x), atol=1e-4, rtol=1e-4)
    splits = _splits(80)
    both = distilled.Teachers([model, graph_teacher])
    assert both(x).shape == (2, 6, 4)
    assert both.accuracy(splits.x_test, splits.y_test) == accuracy(model, splits.x_test,
                                                                   splits.y_test)


# --- int8 --------------------------------------------------------------------------------------

def test_int8_graph_has_qdq_nodes_and_agrees_with_fp32(trained: tuple[nn.Module, Splits]) -> None:
    model, splits = trained
    graph = export.to_onnx(model, (1, 28, 28))
    q = int8.quantize(graph, splits.x_train[:64], int8.Int8Config())
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    int8_inits = [t for t in q.graph.initializer if t.data_type == 3]  # INT8 weights
    assert int8_inits
    x = splits.x_test
    fp32 = export.run(session(graph), x).argmax(1)
    quantized = export.run(session(q), x).argmax(1)
    assert (fp32 == quantized).mean() >= 0.95


# --- Huffman + kmeans-huffman codec ------------------------------------------------------------

def test_huffman_lengths_are_optimal_for_dyadic_probabilities() -> None:
    counts = {0: 32, 1: 16, 2: 8, 3: 4, 4: 2, 5: 2}  # p = 1/2, 1/4, … : lengths = −log2 p
    lengths = encoding.huffman_code_lengths(counts)
    n = sum(counts.values())
    assert lengths == {s: int(-math.log2(c / n)) for s, c in counts.items()}


def test_huffman_average_length_is_within_one_bit_of_entropy() -> None:
    rng = np.random.default_rng(1)
    counts = {s: int(c) for s, c in enumerate(rng.integers(1, 1000, 40))}
    lengths = encoding.huffman_code_lengths(counts)
    n = sum(counts.values())
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    avg = sum(counts[s] * lengths[s] for s in counts) / n
    assert entropy <= avg < entropy + 1
    assert sum(2.0 ** -ln for ln in lengths.values()) == pytest.approx(1.0)  # a complete code


def test_canonical_codes_are_prefix_free() -> None:
    lengths = encoding.huffman_code_lengths({0: 5, 1: 9, 2: 12, 3: 13, 4: 16, 5: 45})
    codes = encoding.canonical_codes(lengths)
    words = [format(codes[s], f"0{lengths[s]}b") for s in codes]
    for a in words:
        assert not any(b != a and b.startswith(a) for b in words)


@pytest.mark.parametrize("counts", [{3: 100}, {0: 1, 1: 1}, {0: 500, 7: 3, 9: 1, 200: 40}])
def test_huffman_round_trips(counts: dict[int, int]) -> None:
    rng = np.random.default_rng(0)
    symbols = rng.permutation(np.repeat(list(counts), list(counts.values())))
    lengths = encoding.huffman_code_lengths(counts)
    data = encoding.huffman_encode(symbols, lengths)
    assert len(data) == math.ceil(sum(counts[s] * lengths[s] for s in counts) / 8)
    np.testing.assert_array_equal(encoding.huffman_decode(data, lengths, len(symbols)), symbols)


def test_kmeans_huffman_codec_round_trips_exactly() -> None:
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=16).astype(np.float32)
    w = codebook[rng.integers(0, 16, (64, 32, 3, 3))]
    w[rng.random(w.shape) < 0.93] = 0
    w[3] = 0  # a run of zeros longer than max_gap
    tensors = {"w": w, "one": np.full((1, 1, 1, 1), 0.1307, np.float32),
               "empty": np.zeros((4, 4), np.float32), "dense": codebook.reshape(4, 4)}
    for huffman in (True, False):
        out = encoding.decode(encoding.encode("kmeans-huffman", tensors, huffman=huffman))
        for k, v in tensors.items():
            np.testing.assert_array_equal(out[k], v)
    huff = len(encoding.encode("kmeans-huffman", {"w": w}))
    assert huff < len(encoding.encode("kmeans-huffman", {"w": w}, huffman=False))
    assert huff < len(encoding.encode("sparse", {"w": w})) / 3


def test_kmeans_huffman_codec_refuses_unclustered_weights() -> None:
    w = np.random.default_rng(0).normal(size=(20, 20)).astype(np.float32)
    with pytest.raises(ValueError, match="400 distinct non-zero values"):
        encoding.encode("kmeans-huffman", {"w": w})


# --- clustered ---------------------------------------------------------------------------------

def test_kmeans_1d_finds_well_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    values = centres.repeat_interleave(50) + 0.01 * torch.randn(150, generator=g)
    c, idx = clustered.kmeans_1d(values, 3)
    torch.testing.assert_close(c, centres, atol=0.01, rtol=0)
    assert torch.equal(idx, torch.arange(3).repeat_interleave(50))


def test_shared_weights_gradient_is_the_sum_over_the_cluster() -> None:
    seed_everything(0)
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[conv.weight.abs() < 0.05] = 0
    plain = copy.deepcopy(conv)
    mask = conv.weight != 0
    codebooks = clustered.share_weights(conv, bits=2)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)  # the shared weights, as a plain tensor
    x = torch.rand(2, 3, 6, 6)
    conv(x).square().sum().backward()
    plain(x).square().sum().backward()
    index = conv.parametrizations.weight[0].index
    expected = torch.zeros(len(codebooks[0])).index_add_(0, index[mask], plain.weight.grad[mask])
    torch.testing.assert_close(codebooks[0].grad, expected)
    clustered.bake(conv)
    assert clustered.distinct_values(conv) == [len(codebooks[0])] and len(codebooks[0]) <= 4
    assert torch.equal(conv.weight == 0, ~mask)


def test_fold_batchnorm_matches_and_clustered_graph_stores_shared_values(
        trained: tuple[nn.Module, Splits]) -> None:
    model, _ = trained
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-4, rtol=1e-4)
    clustered.share_weights(folded, bits=3)
    clustered.bake(folded)
    tensors = clustered.weight_tensors(folded, (1, 28, 28))  # exactly what ONNX serves
    convs = [v for v in tensors.values() if v.size > 1]
    assert convs and all(len(np.unique(v[v != 0])) <= 8 for v in convs)
    blob = encoding.encode("kmeans-huffman", tensors)
    for k, v in encoding.decode(blob).items():
        np.testing.assert_array_equal(v, tensors[k])


# --- binary ------------------------------------------------------------------------------------

def test_binarised_layers_hold_exactly_two_values_per_output_channel() -> None:
    ctx = _ctx(_splits())
    model = _tiny()
    layers = binary.binarized_layers(model, (1, 28, 28))
    binary.attach(layers)
    real = copy.deepcopy(model.stages[1][1][0].parametrizations.weight.original)
    train(model, ctx.splits, ctx.train, seed=0, progress=False,
          after_step=lambda m: binary.clip_weights(m, 1.0))
    # straight-through gradients reached the real-valued weights
    assert not torch.equal(real, model.stages[1][1][0].parametrizations.weight.original)
    binary.bake(layers)
    for m in layers:
        for row in m.weight.detach().reshape(m.weight.shape[0], -1):
            a = row.abs().max()
            assert set(row.unique().tolist()) <= {a.item(), -a.item()}
            assert torch.equal(row.abs(), a.expand_as(row))
    # BN folding by the exporter keeps ±a per channel: the codec accepts and round-trips it
    graph = export.to_onnx(model, (1, 28, 28))
    tensors = {k: v for k, v in export.initializers(graph).items() if v.ndim >= 2}
    blob = encoding.encode("binary", tensors)
    for k, v in encoding.decode(blob).items():
        np.testing.assert_array_equal(v, tensors[k])
    assert len(blob) < sum(v.nbytes for v in tensors.values()) / 8


def test_binary_ends_keeps_first_and_last_layers_float_and_the_served_graph_round_trips(
        tmp_path: Path) -> None:
    """``full_precision = "ends"`` (the search's milder binary setting): the first conv and the
    classifier stay float32 and dense in the graph, every other weight goes to the codec."""
    from compression.build import _read_back, _write_graph

    ctx = _ctx(_splits())
    model = _tiny()
    base = Built("full", model, {**TINY, "num_classes": 4}, export.to_onnx(model, (1, 28, 28)),
                 accuracy=0.0)
    out = binary.apply(ctx, base, binary.BinaryConfig(epochs=0, full_precision="ends"))
    layers = [m for m in out.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == 4 and out.details["float32_weights"] == (
        layers[0].weight.numel() + layers[-1].weight.numel())
    for m in (layers[0], layers[-1]):  # real-valued: many magnitudes per output channel
        assert len(m.weight[0].abs().unique()) > 2
    for m in layers[1:-1]:  # binary: one magnitude per output channel
        assert len(m.weight[0].abs().unique()) == 1
    graph = export.to_onnx(out.model, (1, 28, 28))
    assert out.codec_tensors is not None and len(out.codec_tensors) == 2
    artifacts = _write_graph(tmp_path, "binary", graph, out)
    served = _read_back(tmp_path, artifacts)
    x = ctx.splits.x_val
    np.testing.assert_array_equal(export.run(session(served), x), export.run(session(graph), x))


def test_binary_on_rgb_stores_only_layer_weights_not_the_normalisation(tmp_path: Path) -> None:
    """A 3-channel model's normalisation mean and std ([1, 3, 1, 1], three values each) are
    ≥2-D constants but no layer's weights: binary must leave them dense (it used to hand them to
    the binary codec, which refused them, failing every RGB build)."""
    from compression.build import _read_back, _write_graph

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 64)
    x = (rng.random((64, 3, 16, 16), dtype=np.float32) * 0.5
         + 0.2 * y[:, None, None, None]).astype(np.float32)
    splits = Splits(x[16:], y[16:], x[:8], y[:8], x[8:16], y[8:16], num_classes=3)
    spec = {**TINY, "input": [3, 16, 16], "num_classes": 3, "normalize": splits.normalization()}
    seed_everything(0)
    model = build_model(spec)
    ctx = _ctx(splits)
    base = Built("full", model, spec, export.to_onnx(model, (3, 16, 16)), accuracy=0.0)
    for full_precision in binary.FULL_PRECISION:
        out = binary.apply(ctx, base, binary.BinaryConfig(epochs=1, full_precision=full_precision))
        graph = export.to_onnx(out.model, (3, 16, 16))
        assert out.codec_tensors and not any("normalize" in k for k in out.codec_tensors)
        served = _read_back(tmp_path, _write_graph(tmp_path, "binary", graph, out))
        dense = {k for k, v in export.initializers(served).items() if v.size > 0}
        assert {"normalize.mean", "normalize.std"} <= dense  # in the graph, as they were
        np.testing.assert_array_equal(export.run(session(served), x), export.run(session(graph), x))


def test_binary_codec_refuses_a_real_valued_tensor() -> None:
    w = np.array([[0.5, -0.5, 0.5], [0.2, -0.3, 0.2]], dtype=np.float32)
    with pytest.raises(ValueError, match="output channel 1 holds 2 distinct magnitudes"):
        encoding.encode("binary", {"w": w})


# --- the methods' report sections: intervals and paired tests ----------------------------------

# an accuracy as the sections print it ("91.80%") that no 95 % interval follows
BARE_ACCURACY = re.compile(r"\d+\.\d\d%(?! \[\d)")


def _full(model: nn.Module, splits: Splits) -> Built:
    graph = export.to_onnx(model, (1, 28, 28))
    acc = float((export.run(session(graph), splits.x_test).argmax(1) == splits.y_test).mean())
    return Built(name="full", model=model, spec={**TINY, "num_classes": 4}, graph=graph,
                 accuracy=acc)


def _section_rows(md: str) -> list[list[str]]:
    """The cells of every body row of the markdown tables in a section."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| model |")]


@pytest.mark.parametrize("method, config", [(binary, binary.BinaryConfig(epochs=0)),
                                            (clustered, clustered.ClusteredConfig(epochs=0))],
                         ids=["binary", "clustered"])
def test_test_accuracy_in_a_section_carries_its_wilson_interval(
        trained: tuple[nn.Module, Splits], method: Any, config: Any) -> None:
    model, splits = trained
    out = method.apply(_ctx(splits), _full(model, splits), config)
    served = accuracy(out.model, splits.x_test, splits.y_test)
    n = len(splits.y_test)
    assert f"after fine-tuning {stats.format_rate(served, n)}" in out.report_md
    assert "Test accuracy [95% Wilson]" in out.report_md
    assert not BARE_ACCURACY.findall(out.report_md), out.report_md


def test_int8_agreement_carries_its_interval_over_the_calibration_images(
        trained: tuple[nn.Module, Splits]) -> None:
    model, splits = trained
    ctx, base = _ctx(splits), _full(model, splits)
    config = int8.Int8Config(calibration_images=64)
    out = int8.apply(ctx, base, config)
    images = ctx.calibration_images(64)
    assert out.graph is not None
    agree = (export.run(session(base.graph), images).argmax(1)
             == export.run(session(out.graph), images).argmax(1))
    assert (f"on the 64 calibration images (a sample of the training split) "
            f"{stats.format_bits(agree)} (95% Wilson)") in out.report_md


def test_lottery_ticket_rows_pair_each_model_with_the_base_on_the_test_images(
        trained: tuple[nn.Module, Splits]) -> None:
    model, splits = trained
    config = pruned_weights.PrunedWeightsConfig(sparsity=0.5, steps=1, epochs_per_step=0,
                                                rewind_epochs=1, min_layer_weights=0)
    out = pruned_weights.apply(_ctx(splits), _full(model, splits), config)
    x, y = splits.x_test, splits.y_test
    base = logits(model, x).argmax(1) == y
    served = logits(out.model, x).argmax(1) == y
    md = out.report_md
    assert "| model | sparsity | test accuracy [95% Wilson] | Δ vs `full` | McNemar |" in md
    assert f"Δ vs `full` at {stats.format_bits(base)}" in md
    rows = _section_rows(md)
    assert [r[0] for r in rows] == ["fine-tuned (iterative prune + fine-tune) (served)",
                                    "rewound to init, retrained 1 epochs",
                                    "random re-init, retrained 1 epochs"]
    assert rows[0][2:] == report.paired_cells(base, served)
    for row in rows:  # every model: its interval, its Δ and the McNemar p of that Δ
        assert re.fullmatch(r"\d+\.\d\d% \[\d+\.\d\d, \d+\.\d\d\]", row[2]), row
        assert row[3].endswith(" pt") and re.fullmatch(r"p[=<][\d.]+", row[4]), row
    assert not BARE_ACCURACY.findall(md), md


def test_distilled_table_pairs_every_student_with_the_served_teacher(
        trained: tuple[nn.Module, Splits]) -> None:
    model, splits = trained
    config = distilled.DistilledConfig(epochs=1, compare_labels=True,
                                       student={"stages": [{"channels": 4, "depth": 1}]})
    base = _full(model, splits)
    out = distilled.apply(_ctx(splits), base, config)
    x, y = splits.x_test, splits.y_test
    teacher = export.run(session(base.graph), x).argmax(1) == y
    student = logits(out.model, x).argmax(1) == y
    rows = _section_rows(out.report_md)
    assert rows[0] == ["teacher: `full`", stats.format_bits(teacher), "—", "—"]
    assert rows[1][0].endswith("(served)")
    assert rows[1][1:] == report.paired_cells(teacher, student)
    assert rows[2][0] == "student, labels only" and re.fullmatch(r"p[=<][\d.]+", rows[2][3])
    # the recorded accuracies are the ones the rows show
    assert out.details["accuracy"]["T=4"] == round(float(student.mean()), 6)
    assert not BARE_ACCURACY.findall(out.report_md), out.report_md


# --- configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, field, value", [
    (pruned_weights.PrunedWeightsConfig, "sparsity", 1.0),
    (pruned_weights.PrunedWeightsConfig, "rewind", "later"),
    (pruned_neurons.PrunedNeuronsConfig, "ratio", 0.0),
    (distilled.DistilledConfig, "alpha", 1.5),
    (int8.Int8Config, "calibrate_method", "magic"),
    (clustered.ClusteredConfig, "bits", 9),
    (binary.BinaryConfig, "clip", 0.0),
])
def test_configs_reject_bad_values_naming_them(cls: type, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}.*{value!r}"):
        cls(**{field: value})
    assert dataclasses.asdict(cls())  # defaults are valid and JSON-able


# --- every method end to end -------------------------------------------------------------------

def tiny_family(npz: Path) -> str:
    return config_toml(
        family="tiny", seed=0,
        max_drop=100,  # the methods are tested here; the accuracy target in test_max_drop.py
        data=f"npz:{npz}",
        arch={"kind": "cnn", "stages": [{"channels": 8, "depth": 1},
                                        {"channels": 16, "depth": 1, "pool": True}]},
        train={"epochs": 2, "lr": 5e-3, "batch_size": 32, "augment_shift": 0},
        variants=[
            variant("pruned-weights", sparsity=0.8, steps=2, rewind_epochs=1, min_layer_weights=0,
                    rewind="init"),
            variant("pruned-neurons", ratio=0.5, steps=1, final_epochs=0),
            variant("distilled", epochs=1, ensemble=2, member_epochs=1,
                    teachers=["pruned-neurons"], sweep=[4.0],
                    student={"stages": [{"channels": 4, "depth": 1},
                                        {"channels": 8, "depth": 1, "pool": True}]}),
            variant("int8", calibration_images=32),
            variant("int8-neurons", "int8", base="pruned-neurons", calibration_images=32),
            variant("clustered", base="pruned-weights", bits=3, epochs=1),
            variant("binary", epochs=1),
        ])


@pytest.mark.slow
def test_every_method_builds_verifies_and_loads(tmp_path: Path) -> None:
    splits = _splits(240, seed=3)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x=np.concatenate([splits.x_train, splits.x_val, splits.x_test]),
             y=np.concatenate([splits.y_train, splits.y_val, splits.y_test]))
    out = build_family(tmp_path, tiny_family(npz))
    fam = load_family(out)  # verifies every sha256
    methods = {v.method for v in fam.variants.values()}
    assert methods >= {"pruned-weights", "pruned-neurons", "distilled", "int8", "clustered",
                       "binary"}
    codecs = {v.name: {a.codec for a in v.artifacts if a.role == "weights"}
              for v in fam.variants.values()}
    assert codecs["pruned-weights"] == {"sparse"} and codecs["binary"] == {"binary"}
    assert codecs["clustered"] == {"kmeans-huffman"}
    x = splits.x_test[:8]
    # validation accuracy of what is served, graph-only variants (int8, clustered, binary) included
    cfg = fam.manifest["build"]["config"]
    built = split(load(cfg["data_spec"]), seed=cfg["seed"], val_fraction=cfg["val_fraction"],
                  test_fraction=cfg["test_fraction"])
    for name, v in fam.variants.items():
        logits = export.run(session(fam.graph(name)), x)
        assert logits.shape == (8, 4), name
        val = export.run(session(fam.graph(name)), built.x_val).argmax(1) == built.y_val
        assert v.val_accuracy == round(float(val.mean()), 6), name
        assert v.size_bytes > 0 and v.latency_ms["1"]["p50"] > 0 and v.params_count > 0
    assert fam.variant("pruned-weights").details["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert fam.variant("pruned-weights").details["lottery_ticket"].keys() == {
        "none", "init", "random"}
    assert fam.variant("pruned-neurons").macs < fam.variant("full").macs / 2
    assert Counter(n.op_type for n in fam.graph("int8").graph.node)["QuantizeLinear"] > 0
    report = (out / "report.md").read_text()
    assert "Lottery ticket" in report and "labels only" in report and "Huffman" in report
