"""The torch form of a served graph (`compression.core.torch_form`) and the torch runners
(`server.torch_runner`, `server.runtime.torch_runners`).

The contract: a variant's torch form, derived from its served ONNX graph, answers like ONNX
Runtime (fp32: logits within 1e-4, identical top-1), through the runners too, whose buckets pad
and chunk every batch; the early-exit network walks to the same exits; int8 (QDQ) graphs are
CPU-only and say so; any other op without a torch form is refused by name.

CI has no GPU. The CUDA case of the runner test exists where torch sees a GPU (a skip would fail
CI, tests/conftest.py); everywhere else the same runner code runs eagerly on the CPU.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression import data as datasets
from compression.build import build, load_config
from compression.core.exits import StageChain, confidence, walk
from compression.core.family import Family, load_family
from compression.core.ort import run, session
from compression.core.torch_form import UnsupportedGraph, output_names, supported, to_torch
from compression.export import to_onnx
from server.runtime import OrtRunner, load_runners, torch_runners
from server.torch_runner import TorchGraphRunner, TorchStageChain, buckets, cuda_problem

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # fp32: torch and ONNX Runtime sum in different orders, nothing more

# configs/quick.toml (its cached base model) plus the two variants whose graphs are special here:
# int8's QDQ graph, and the early-exit network's stage graphs.
EXTRA_VARIANTS = """
[[variants]]
name = "int8"
method = "int8"
max_drop = 100.0

[[variants]]
name = "early-exit"
method = "early-exit"
max_drop = 100.0
[variants.params]
frozen_epochs = 1
joint_epochs = 0
serve = "frozen"
"""


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """200 real MNIST digits, read-only like the request bytes a runner gets."""
    x = np.ascontiguousarray(datasets.load("mnist5k").x[-200:], dtype=np.float32)
    x.setflags(write=False)
    return x


@pytest.fixture(scope="module")
def exits_family(quick_family: Path, build_cache: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Family:
    """The quick family plus int8 and early-exit (~15 s: the base model comes from the cache
    the quick family's build filled)."""
    config = tmp_path_factory.mktemp("config") / "exits.toml"
    config.write_text((ROOT / "configs" / "quick.toml").read_text() + EXTRA_VARIANTS)
    out = tmp_path_factory.mktemp("families") / "exits"
    build(load_config(config), out, cache_dir=build_cache, progress=False)
    return load_family(out)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """`torch_runners` on the CPU sets torch's process-wide thread count: put it back after."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _ort(graph: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = session(graph)
    return dict(zip(output_names(graph), run(sess, {sess.get_inputs()[0].name: x}, rows=len(x)),
                    strict=True))


def _eager(graph: onnx.ModelProto, x: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    feed = torch.from_numpy(x.copy()) if isinstance(x, np.ndarray) else x
    with torch.inference_mode():
        return dict(zip(output_names(graph), to_torch(graph)(feed), strict=True))


def _assert_same(got: np.ndarray, want: np.ndarray, what: str, atol: float = ATOL) -> None:
    """Within ``atol``, and for logits ([N, classes]) the same top-1 per sample."""
    assert got.shape == want.shape and got.dtype == np.float32, what
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)
    if got.ndim == 2:
        assert (got.argmax(1) == want.argmax(1)).all(), what


def _graphs(family: Family, name: str) -> list[onnx.ModelProto]:
    v = family.variant(name)
    return family.stage_graphs(name) if v.exits else [family.graph(name)]


# --- the torch form ---------------------------------------------------------------------------

def test_every_quick_family_variant_has_a_torch_form_that_answers_like_onnx_runtime(
        quick_family: Path, digits: np.ndarray) -> None:
    """to_torch of each served graph (each stage, fed the previous stage's features): every
    output, in graph-output order, within 1e-4 of ONNX Runtime, with the same top-1."""
    family = load_family(quick_family)
    for name in family.variants:
        feed: np.ndarray = digits
        for i, graph in enumerate(_graphs(family, name)):
            assert supported(graph) is None, name
            want = _ort(graph, feed)
            got = _eager(graph, feed)
            assert list(got) == output_names(graph)
            for out, value in got.items():
                _assert_same(value.numpy(), want[out], f"{name} stage {i} {out}")
            feed = want.get("features", feed)


def _node(op: str, ins: list[str], outs: list[str], name: str = "", **attrs: object
          ) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs, name=name or outs[0], **attrs)


def _model(nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray], shape: list[int],
           outputs: dict[str, int]) -> onnx.ModelProto:
    """A graph of ``nodes`` on input ``x`` [N, *shape]; ``outputs``: name → rank."""
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"{o}{i}" for i in range(rank)])
         for o, rank in outputs.items()],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _attribute_zoo() -> onnx.ModelProto:
    """Attributes our families do not use, each against ONNX Runtime: asymmetric conv pads,
    strides, dilations and groups; a conv without bias (auto_pad VALID); max pools with ceil_mode
    and with asymmetric pads; broadcasting Mul/Add/Sub/Div; Gemm with alpha, beta, transA and no
    transB; Flatten at axes 0, 1 and -1; several outputs, returned in graph order."""
    r = np.random.default_rng(0)
    consts = {"w1": r.normal(size=(6, 2, 3, 3)), "b1": r.normal(size=6),
              "w2": r.normal(size=(3, 4, 1, 1)), "s": r.normal(size=(1, 6, 1, 1)),
              "t": r.normal(size=(6, 1, 1)), "u": np.array(0.25), "v": np.array([1.5]),
              "wg": r.normal(size=(6, 5)), "cg": r.normal(size=5)}
    nodes = [
        _node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 0, 2, 1], strides=[2, 1],
              dilations=[1, 2], group=2),
        _node("Relu", ["c1"], ["r1"]),
        _node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              ceil_mode=1),
        _node("MaxPool", ["r1"], ["p2"], kernel_shape=[2, 2], pads=[0, 1, 1, 0]),
        _node("Mul", ["p1", "s"], ["m"]), _node("Add", ["m", "t"], ["a"]),
        _node("Sub", ["a", "u"], ["d0"]), _node("Div", ["d0", "v"], ["d"]),
        _node("GlobalAveragePool", ["d"], ["g"]),
        _node("Flatten", ["g"], ["f"]),
        _node("Gemm", ["f", "wg", "cg"], ["y"], alpha=0.5, beta=2.0),
        _node("Gemm", ["f", "f"], ["gram"], transA=1),
        _node("Conv", ["x", "w2"], ["c2"], auto_pad="VALID"),
        _node("Flatten", ["c2"], ["flat0"], axis=0),
        _node("Flatten", ["p2"], ["flat_last"], axis=-1),
    ]
    return _model(nodes, consts, [4, 11, 11], {"y": 2, "p2": 4, "gram": 2, "flat0": 2,
                                                "flat_last": 2})


def test_onnx_semantics_the_families_do_not_use_yet_are_kept_too() -> None:
    graph = _attribute_zoo()
    x = np.random.default_rng(1).normal(size=(5, 4, 11, 11)).astype(np.float32)
    want = _ort(graph, x)
    got = _eager(graph, x)
    assert list(got) == ["y", "p2", "gram", "flat0", "flat_last"]
    for out, value in got.items():
        assert value.shape == want[out].shape, out
        np.testing.assert_allclose(value.numpy(), want[out], rtol=0, atol=ATOL, err_msg=out)


def test_the_torch_form_moves_and_casts_like_any_module() -> None:
    """Weights are buffers: .half() casts them, state_dict holds them, forward returns a tuple."""
    graph = _attribute_zoo()
    module = to_torch(graph)
    assert {b.dtype for b in module.buffers()} == {torch.float32}
    assert len(module.state_dict()) == 9
    half = to_torch(graph).half()
    assert {b.dtype for b in half.buffers()} == {torch.float16}
    out = module(torch.zeros(2, 4, 11, 11))
    assert isinstance(out, tuple) and len(out) == 5


def _with(node: onnx.NodeProto) -> onnx.ModelProto:
    conv = _node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    return _model([conv, node], {"w": np.ones((2, 1, 3, 3))}, [1, 8, 8], {node.output[0]: 4})


@pytest.mark.parametrize(("node", "why"), [
    (_node("Sigmoid", ["c"], ["y"], name="gate"), "no torch form"),
    (_node("Conv", ["c", "w"], ["y"], name="same", auto_pad="SAME_UPPER"), "auto_pad"),
    (_node("Conv", ["c", "w"], ["y"], name="conv3d", kernel_shape=[3, 3, 3]), "2-D"),
    (_node("MaxPool", ["c"], ["y", "idx"], name="pool", kernel_shape=[2, 2]), "Indices"),
])
def test_what_has_no_torch_form_is_refused_naming_the_op_and_node(node: onnx.NodeProto,
                                                                    why: str) -> None:
    graph = _with(node)
    with pytest.raises(UnsupportedGraph) as err:
        to_torch(graph)
    assert err.value.op_type == node.op_type and err.value.node == node.name
    assert isinstance(err.value, ValueError)
    message = supported(graph)
    assert message == str(err.value)
    assert message.startswith(f"{node.op_type} node {node.name!r}: ") and why in message


def test_int8_graphs_are_cpu_only(exits_family: Family) -> None:
    """QDQ has no torch form: the int8 variant is refused naming its first Q/DQ node and why."""
    graph = exits_family.graph("int8")
    with pytest.raises(UnsupportedGraph) as err:
        to_torch(graph)
    assert err.value.op_type in ("QuantizeLinear", "DequantizeLinear")
    assert err.value.node in {n.name for n in graph.graph.node}
    assert "CPU-only" in str(err.value) and supported(graph) == str(err.value)


# --- the runners ---------------------------------------------------------------------------------

def test_buckets_are_the_powers_of_two_below_max_batch_and_max_batch() -> None:
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(37) == [1, 2, 4, 8, 16, 32, 37]
    assert buckets(1) == [1]
    with pytest.raises(ValueError, match="max_batch"):
        buckets(0)


def test_graph_runner_pads_and_chunks_and_answers_like_onnx_runtime(
        quick_family: Path, digits: np.ndarray) -> None:
    """max_batch 16: 1 row runs in bucket 1, 3 rows padded to 4, 37 rows as 16 + 16 + 5 (→ 8);
    each within 1e-4 of an OrtRunner with the same top-1, float32, input left untouched."""
    family = load_family(quick_family)
    for name, v in family.variants.items():
        if v.exits:
            continue
        graph = family.graph(name)
        ort_runner = OrtRunner(graph, provider_list=["CPUExecutionProvider"])
        runner = TorchGraphRunner(graph, max_batch=16)
        assert (runner.backend, runner.device) == ("torch", "cpu")
        before = digits.copy()
        for n in (1, 3, 37):
            got, want = runner(digits[:n]), ort_runner(digits[:n])
            assert list(got) == list(want) == ["logits"]
            _assert_same(got["logits"], want["logits"], f"{name} at {n} rows")
        assert np.array_equal(digits, before)


def _median_threshold(logits: np.ndarray) -> float:
    """A max_prob threshold halfway between two neighbouring confidences: half the samples
    leave, and none sits within a rounding error of it."""
    c = np.sort(confidence(logits, "max_prob"))
    return float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2)


def test_early_exit_walks_on_torch_to_the_same_exits_and_logits(exits_family: Family,
                                                                 digits: np.ndarray) -> None:
    """TorchStageChain (max_batch 16: stages pad and chunk) + walk against StageChain + walk:
    the same exit per sample and logits within 1e-4, with thresholds that send samples to every
    exit, per-sample depth caps and a keep_going that stops some; features stay tensors."""
    graphs = exits_family.stage_graphs("early-exit")
    torch_chain = TorchStageChain(graphs, max_batch=16)
    ort_chain = StageChain.from_graphs(graphs)
    assert len(torch_chain) == len(ort_chain) == 3
    logits, features = torch_chain.stage(0, digits[:3])
    assert isinstance(features, torch.Tensor) and logits.dtype == np.float32
    assert torch_chain.stage(2, torch_chain.stage(1, features)[1])[1] is None

    exit_logits = ort_chain.run(digits)
    thresholds = [_median_threshold(exit_logits[0]), _median_threshold(exit_logits[1]), 0.0]
    caps = np.random.default_rng(0).integers(0, 3, len(digits))
    stop_at_2 = np.arange(len(digits)) % 5 == 0

    def keep_going(stage: int, samples: np.ndarray) -> np.ndarray:
        return ~stop_at_2[samples] if stage == 2 else np.ones(len(samples), dtype=bool)

    for n, kwargs in [(37, {}), (200, {}), (200, {"max_exit": caps}),
                      (200, {"keep_going": keep_going})]:
        got = walk(torch_chain, digits[:n], thresholds, "max_prob", **kwargs)
        want = walk(ort_chain, digits[:n], thresholds, "max_prob", **kwargs)
        assert np.array_equal(got.exits, want.exits), (n, kwargs)
        _assert_same(got.logits, want.logits, f"walk of {n} rows {list(kwargs)}")
    assert set(walk(torch_chain, digits, thresholds, "max_prob").exits) == {0, 1, 2}


@pytest.mark.usefixtures("torch_threads")
def test_torch_backend_runs_every_variant_with_a_torch_form_and_int8_on_onnx_runtime(
        exits_family: Family, digits: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    runners, skipped = torch_runners(exits_family, device="cpu", max_batch=16)
    assert isinstance(runners["full"], TorchGraphRunner)
    assert isinstance(runners["early-exit"], TorchStageChain)
    assert list(skipped) == ["int8"] and "CPU-only" in skipped["int8"]
    assert torch.get_num_threads() == 1  # threads=1: one per call, like the ORT sessions

    with caplog.at_level(logging.WARNING, logger="server.runtime"):
        served = load_runners(exits_family, backend="torch", device="cpu", max_batch=16)
    assert isinstance(served["full"], TorchGraphRunner)
    assert isinstance(served["early-exit"], TorchStageChain)
    assert isinstance(served["int8"], OrtRunner)
    assert "int8" in caplog.text and "onnxruntime" in caplog.text
    ort = load_runners(exits_family)
    full, int8, ort_full, ort_int8 = served["full"], served["int8"], ort["full"], ort["int8"]
    assert isinstance(full, TorchGraphRunner) and isinstance(ort_full, OrtRunner)
    assert isinstance(int8, OrtRunner) and isinstance(ort_int8, OrtRunner)
    _assert_same(full(digits)["logits"], ort_full(digits)["logits"], "full")
    assert np.array_equal(int8(digits)["logits"], ort_int8(digits)["logits"])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_the_cpu_answers_in_float32_with_the_same_top1(
        quick_family: Path, digits: np.ndarray, dtype: str) -> None:
    graph = load_family(quick_family).graph("full")
    runner = TorchGraphRunner(graph, dtype=dtype, max_batch=64)
    x = digits[:128]
    got = runner(x)["logits"]
    want = OrtRunner(graph, provider_list=["CPUExecutionProvider"])(x)["logits"]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    with pytest.raises(ValueError, match="fp8"):
        TorchGraphRunner(graph, dtype="fp8")


def test_cuda_problem_is_one_line_naming_cuda_and_never_raises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """None exactly where a runner can be built on CUDA; else one line, which device="cuda"
    raises as its error. Without torch, or with a CUDA probe that fails, still one line."""
    problem = cuda_problem()
    graph = _attribute_zoo()
    if torch.cuda.is_available():
        assert problem is None
        assert TorchGraphRunner(graph, device="cuda").device.startswith("cuda:")
    else:
        assert problem is not None and "CUDA" in problem and "\n" not in problem
        assert torch.__version__ in problem
        with pytest.raises(RuntimeError, match=r"CPU build|sees no GPU"):
            TorchGraphRunner(graph, device="cuda")

    def broken() -> bool:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    line = cuda_problem()
    assert line is not None and "driver exploded" in line and "\n" not in line
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    line = cuda_problem()
    assert line is not None and "adaptive-inference[gpu]" in line and "CUDA" in line


def _small_cnn(seed: int) -> onnx.ModelProto:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return to_onnx(model, (1, 28, 28))


DEVICES = ["cpu"] if cuda_problem() is not None else ["cpu", "cuda"]


@pytest.mark.parametrize("device", DEVICES)
def test_runners_on_a_device_answer_like_onnx_runtime_also_from_concurrent_threads(
        device: str) -> None:
    """On CUDA: the captured graphs' replays (every bucket, via padding and chunking) against
    ONNX Runtime; then two runners called at once from two threads, each owning its stream and
    buffers, answer exactly what each answers alone. On the CPU the same, eagerly."""
    graphs = [_small_cnn(0), _small_cnn(1)]
    x = np.random.default_rng(0).random((70, 1, 28, 28), dtype=np.float32)
    runners = [TorchGraphRunner(g, device=device, max_batch=32) for g in graphs]
    for r in runners:
        r.warm()
    sizes = (1, 2, 3, 5, 16, 31, 32, 33, 70)
    alone = [{n: r(x[:n])["logits"] for n in sizes} for r in runners]
    for g, answers in zip(graphs, alone, strict=True):
        want = _ort(g, x)["logits"]
        for n, got in answers.items():
            assert got.dtype == np.float32 and got.shape == (n, 10)
            np.testing.assert_allclose(got, want[:n], rtol=0, atol=ATOL)
            clear = np.sort(want[:n], axis=1)
            decided = clear[:, -1] - clear[:, -2] > 2 * ATOL  # top-1 not within rounding
            assert (got.argmax(1) == want[:n].argmax(1))[decided].all()

    mismatches: list[tuple[int, int]] = []

    def hammer(k: int) -> None:
        for _ in range(5):
            for n in sizes:  # a shared buffer would mix the two models' rows: far off, not 1e-6
                if not np.allclose(runners[k](x[:n])["logits"], alone[k][n], rtol=0, atol=1e-6):
                    mismatches.append((k, n))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []
