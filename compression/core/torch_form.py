"""The torch form of a served ONNX graph: the graph is the architecture, its initializers the weights.

`to_torch(graph)` turns a variant's served, sha256-verified ONNX graph (`Family.graph`, or one of
`Family.stage_graphs`) into a `torch.fx.GraphModule`: one torch call per ONNX node, every
initializer a registered buffer (so ``.to(device)``, ``.half()`` and ``.to(torch.bfloat16)``
work), ``forward(x)`` returning the graph outputs as a tuple in graph-output order. There is no
second copy of the weights on disk and nothing is unpickled: the clustered, binary and sparse
codecs are decoded into the graph before it gets here.

The ops are the ones our families are made of, with ONNX semantics kept exactly in fp32: Conv
(2-D, grouped, any pads/strides/dilations), MaxPool (2-D, ceil_mode, pads), GlobalAveragePool,
Relu, Flatten (any axis), Gemm (alpha, beta, transA, transB), and the elementwise Add, Sub, Mul,
Div with numpy broadcasting. `supported(graph)` says, without importing torch, whether a graph
converts, and if not why; `to_torch` raises `UnsupportedGraph` naming the op type and the node.

int8 (QDQ) graphs are CPU-only: QuantizeLinear/DequantizeLinear have no torch form here, so an int8
variant stays on ONNX Runtime, whose CPU provider fuses them into real int8 kernels. Emulating them
(fake-quant: x → clamp(round(x / scale) + zero_point) → (q − zero_point) · scale, per channel for
the weights) was tried on the mnist5k family: top-1 identical to ORT on 2,000 images, logits within
one quantisation step of the output (0.093). It was left out all the same: there are no CUDA int8
kernels in this stack, so on the GPU such a graph does the fp32 base's convolutions plus a handful
of elementwise ops per layer — slower than the fp32 base, and less accurate.

torch is imported only when `to_torch` runs: ``compression.core`` stays importable without it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:
    import torch
    from torch import fx


class UnsupportedGraph(ValueError):
    """A graph `to_torch` cannot convert; ``op_type`` and ``node`` name the culprit (None when the
    problem is the graph's inputs or outputs rather than one node)."""

    def __init__(self, why: str, *, op_type: str | None = None, node: str | None = None) -> None:
        self.op_type = op_type
        self.node = node
        where = f"{op_type} node {node!r}: " if op_type is not None else ""
        super().__init__(where + why)


# --- the plan: every check, no torch -------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    """One ONNX node, its attributes checked and normalised for its torch call."""

    op: str
    inputs: tuple[str, ...]  # "" where an optional input is absent
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class _Plan:
    input: str
    steps: list[_Step]
    constants: dict[str, np.ndarray]  # the initializers the steps read
    outputs: list[str]


_QDQ_WHY = ("int8 (QDQ) graphs are CPU-only: served on ONNX Runtime's int8 kernels; there are no "
            "CUDA int8 kernels in this stack, and on the GPU the fp32 base is faster and more "
            "accurate")
_CPU_ONLY = {"QuantizeLinear": _QDQ_WHY, "DequantizeLinear": _QDQ_WHY,
             "QLinearConv": _QDQ_WHY, "QLinearMatMul": _QDQ_WHY}


def _pairs(name: str, vals: Sequence[int], default: int) -> tuple[int, int]:
    if not vals:
        return default, default
    if len(vals) != 2:
        raise ValueError(f"{name} {list(vals)}: only 2-D (two values) is supported")
    return int(vals[0]), int(vals[1])


def _padding(a: dict[str, Any], kernel: tuple[int, int], dilation: tuple[int, int],
             fits_in_call: bool) -> dict[str, Any]:
    """ONNX pads [top, left, bottom, right] → the call's symmetric ``padding``, or a ``prepad``
    for F.pad (left, right, top, bottom) when they are asymmetric or too large for the call."""
    auto_pad = a.pop("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        raise ValueError(f"auto_pad {auto_pad}: only NOTSET and VALID are supported")
    pads = [int(p) for p in a.pop("pads", [])] if auto_pad == "NOTSET" else []
    pads = pads or [0, 0, 0, 0]
    if len(pads) != 4:
        raise ValueError(f"pads {pads}: only 2-D (four values) is supported")
    top, left, bottom, right = pads
    largest = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dilation, strict=True)]
    if top == bottom and left == right and (fits_in_call or (top <= largest[0]
                                                             and left <= largest[1])):
        return {"padding": (top, left), "prepad": None}
    return {"padding": (0, 0), "prepad": (left, right, top, bottom)}


def _conv_attrs(a: dict[str, Any], weight_dims: Sequence[int] | None) -> dict[str, Any]:
    if "kernel_shape" in a:
        kernel = _pairs("kernel_shape", a.pop("kernel_shape"), 1)
    elif weight_dims is not None and len(weight_dims) == 4:
        kernel = (int(weight_dims[2]), int(weight_dims[3]))
    else:
        raise ValueError("only 2-D convolutions are supported (no kernel_shape, and the weight "
                         "is not a 4-D initializer)")
    dilation = _pairs("dilations", a.pop("dilations", []), 1)
    out = {"stride": _pairs("strides", a.pop("strides", []), 1), "dilation": dilation,
           "groups": int(a.pop("group", 1))}
    return out | _padding(a, kernel, dilation, fits_in_call=True)


def _maxpool_attrs(a: dict[str, Any], outputs: int) -> dict[str, Any]:
    if outputs != 1:
        raise ValueError("the Indices output is not supported")
    if "kernel_shape" not in a:
        raise ValueError("kernel_shape is required")
    kernel = _pairs("kernel_shape", a.pop("kernel_shape"), 1)
    dilation = _pairs("dilations", a.pop("dilations", []), 1)
    a.pop("storage_order", None)  # the layout of the Indices output, which is refused above
    out = {"kernel_size": kernel, "stride": _pairs("strides", a.pop("strides", []), 1),
           "dilation": dilation, "ceil_mode": bool(a.pop("ceil_mode", 0))}
    # F.max_pool2d takes at most half the (dilated) kernel as padding; beyond that, pad with -inf
    return out | _padding(a, kernel, dilation, fits_in_call=False)


def _gemm_attrs(a: dict[str, Any]) -> dict[str, Any]:
    return {"alpha": float(a.pop("alpha", 1.0)), "beta": float(a.pop("beta", 1.0)),
            "trans_a": bool(a.pop("transA", 0)), "trans_b": bool(a.pop("transB", 0))}


def _flatten_attrs(a: dict[str, Any]) -> dict[str, Any]:
    return {"axis": int(a.pop("axis", 1))}


# The ops with a torch form → how many inputs they take (least, most).
_ARITY: dict[str, tuple[int, int]] = {
    "Conv": (2, 3), "MaxPool": (1, 1), "GlobalAveragePool": (1, 1), "Relu": (1, 1),
    "Flatten": (1, 1), "Gemm": (2, 3), "Add": (2, 2), "Sub": (2, 2), "Mul": (2, 2), "Div": (2, 2)}


def _plan(graph: onnx.ModelProto) -> _Plan:
    g = graph.graph
    inits = {t.name: t for t in g.initializer}
    source = input_name(graph)
    input_shape(graph)  # a static sample shape: the runners allocate their buffers from it
    known = {source}
    used: set[str] = set()
    steps: list[_Step] = []
    for i, node in enumerate(g.node):
        name = node.name or f"#{i}"
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedGraph(f"domain {node.domain!r} is not supported", op_type=op,
                                   node=name)
        if op in _CPU_ONLY:
            raise UnsupportedGraph(_CPU_ONLY[op], op_type=op, node=name)
        if op not in _ARITY:
            raise UnsupportedGraph(f"no torch form; the ops with one are {', '.join(sorted(_ARITY))}",
                                   op_type=op, node=name)
        lo, hi = _ARITY[op]
        ins = tuple(node.input)
        if not lo <= len(ins) <= hi or any(not s for s in ins[:lo]):
            raise UnsupportedGraph(f"{len(ins)} inputs {list(ins)}; expected {lo} to {hi}",
                                   op_type=op, node=name)
        for s in ins:
            if s and s not in known and s not in inits:
                raise UnsupportedGraph(f"reads {s!r} before anything produces it", op_type=op,
                                       node=name)
        used.update(s for s in ins if s in inits)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        try:
            if op == "Conv":
                norm = _conv_attrs(attrs, inits[ins[1]].dims if ins[1] in inits else None)
            elif op == "MaxPool":
                norm = _maxpool_attrs(attrs, len(node.output))
            elif op == "Gemm":
                norm = _gemm_attrs(attrs)
            elif op == "Flatten":
                norm = _flatten_attrs(attrs)
            else:
                norm = {}
        except ValueError as exc:
            raise UnsupportedGraph(str(exc), op_type=op, node=name) from exc
        if attrs:
            raise UnsupportedGraph(f"attributes {sorted(attrs)} are not supported", op_type=op,
                                   node=name)
        steps.append(_Step(op, ins, tuple(node.output), norm))
        known.update(node.output)
    outputs = output_names(graph)
    missing = [o for o in outputs if o not in known and o not in inits]
    if missing:
        raise UnsupportedGraph(f"outputs {missing} are produced by no node")
    used.update(o for o in outputs if o in inits)
    # copies: numpy_helper may hand back read-only views of the protobuf's bytes
    constants = {n: np.array(numpy_helper.to_array(inits[n])) for n in sorted(used)}
    return _Plan(source, steps, constants, outputs)


def supported(graph: onnx.ModelProto) -> str | None:
    """None if `to_torch` converts ``graph``; else why not (the `UnsupportedGraph` message).
    Needs no torch."""
    try:
        _plan(graph)
    except UnsupportedGraph as exc:
        return str(exc)
    return None


def output_names(graph: onnx.ModelProto) -> list[str]:
    """The graph's output names, in the order `to_torch`'s forward returns them."""
    return [o.name for o in graph.graph.output]


def _input(graph: onnx.ModelProto) -> onnx.ValueInfoProto:
    g = graph.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]  # old exporters list weights as inputs
    if len(inputs) != 1:
        raise UnsupportedGraph(f"the graph has {len(inputs)} inputs "
                               f"({', '.join(i.name for i in inputs)}); expected 1")
    return inputs[0]


def input_name(graph: onnx.ModelProto) -> str:
    """The name of the graph's single input (its initializers aside)."""
    return _input(graph).name


def input_shape(graph: onnx.ModelProto) -> tuple[int, ...]:
    """The single input's shape past the batch axis, e.g. (1, 28, 28): static in every served
    graph (only the batch axis is dynamic), and what a runner sizes its buffers by."""
    value = _input(graph)
    dims = value.type.tensor_type.shape.dim
    if not dims or any(d.dim_value <= 0 for d in dims[1:]):
        raise UnsupportedGraph(f"input {value.name!r} has shape "
                               f"{[d.dim_value or d.dim_param for d in dims]}: every axis but the "
                               f"batch must be static")
    return tuple(int(d.dim_value) for d in dims[1:])


# --- the torch form ------------------------------------------------------------------------------

def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Flatten: [d0 … d(axis-1), d(axis) …] → [prod(d0 … d(axis-1)), prod(d(axis) …)];
    no reshape to a computed size, so a batch of 0 rows flattens too."""
    axis = axis + x.dim() if axis < 0 else axis
    outer = x.flatten(0, axis - 1) if axis > 0 else x.unsqueeze(0)
    return outer.flatten(1) if outer.dim() > 1 else outer.unsqueeze(1)


def _global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """ONNX GlobalAveragePool: the mean over every axis past N and C, kept as size-1 axes."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


Emit = Callable[["fx.Graph", list["fx.Node | None"], dict[str, Any]], "fx.Node"]


def _emit_conv(g: fx.Graph, ins: list[fx.Node | None], a: dict[str, Any]) -> fx.Node:
    import torch.nn.functional as F

    x, w, *bias = ins
    if a["prepad"] is not None:
        x = g.call_function(F.pad, (x, a["prepad"]))
    return g.call_function(F.conv2d, (x, w, bias[0] if bias else None),
                           {"stride": a["stride"], "padding": a["padding"],
                            "dilation": a["dilation"], "groups": a["groups"]})


def _emit_maxpool(g: fx.Graph, ins: list[fx.Node | None], a: dict[str, Any]) -> fx.Node:
    import torch.nn.functional as F

    x = ins[0]
    if a["prepad"] is not None:  # padding never wins a max: -inf, as ONNX defines it
        x = g.call_function(F.pad, (x, a["prepad"]), {"value": float("-inf")})
    return g.call_function(F.max_pool2d, (x,),
                           {"kernel_size": a["kernel_size"], "stride": a["stride"],
                            "padding": a["padding"], "dilation": a["dilation"],
                            "ceil_mode": a["ceil_mode"]})


def _emit_gemm(g: fx.Graph, ins: list[fx.Node | None], a: dict[str, Any]) -> fx.Node:
    """alpha · A' · B' + beta · C, as F.linear(A', B'ᵀ, C) — torch's Linear — when alpha = beta
    = 1 (every exported classifier head)."""
    import torch.nn.functional as F

    x, w, *rest = ins
    c = rest[0] if rest else None
    if a["trans_a"]:
        x = g.call_method("t", (x,))
    weight = w if a["trans_b"] else g.call_method("t", (w,))  # F.linear multiplies by its ᵀ
    fused = a["alpha"] == 1.0 and a["beta"] == 1.0
    y = g.call_function(F.linear, (x, weight, c if fused else None))
    if fused:
        return y
    if a["alpha"] != 1.0:
        y = g.call_function(operator.mul, (y, a["alpha"]))
    if c is not None and a["beta"] != 0.0:
        scaled = c if a["beta"] == 1.0 else g.call_function(operator.mul, (c, a["beta"]))
        y = g.call_function(operator.add, (y, scaled))
    return y


def _call(fn: Callable[..., Any], *names: str) -> Emit:
    """An op that is one call of ``fn`` on its inputs and the named attributes."""
    def emit(g: fx.Graph, ins: list[fx.Node | None], a: dict[str, Any]) -> fx.Node:
        return g.call_function(fn, (*ins, *(a[n] for n in names)))
    return emit


def _emitters() -> dict[str, Emit]:
    import torch.nn.functional as F

    return {"Conv": _emit_conv, "MaxPool": _emit_maxpool, "Gemm": _emit_gemm,
            "GlobalAveragePool": _call(_global_average_pool), "Relu": _call(F.relu),
            "Flatten": _call(_flatten, "axis"), "Add": _call(operator.add),
            "Sub": _call(operator.sub), "Mul": _call(operator.mul), "Div": _call(operator.truediv)}


def _buffer_name(onnx_name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", onnx_name).strip("_") or "constant"
    base = f"c_{base}" if base[0].isdigit() else base
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def to_torch(graph: onnx.ModelProto) -> torch.nn.Module:
    """``graph`` as a torch module: forward(x) → tuple of the graph outputs, in graph-output
    order. Raises `UnsupportedGraph` naming the first op type and node it cannot convert."""
    import torch
    from torch import fx

    plan = _plan(graph)
    emitters = _emitters()
    root = torch.nn.Module()
    g = fx.Graph()
    env: dict[str, fx.Node] = {plan.input: g.placeholder("x")}
    taken: set[str] = set()
    for onnx_name, value in plan.constants.items():
        attr = _buffer_name(onnx_name, taken)
        root.register_buffer(attr, torch.from_numpy(value))
        env[onnx_name] = g.get_attr(attr)
    for step in plan.steps:
        ins = [env[s] if s else None for s in step.inputs]
        env[step.outputs[0]] = emitters[step.op](g, ins, step.attrs)
    g.output(tuple(env[o] for o in plan.outputs))
    module = fx.GraphModule(root, g, class_name="OnnxGraph")
    return module.eval()
