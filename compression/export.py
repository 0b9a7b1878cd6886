"""ONNX export of a variant's inference graph, its check against torch, and weightless skeletons.

Every graph takes ``input`` FP32 [N, C, H, W] (pixels in [0, 1]) with a dynamic batch axis and
returns ``logits`` FP32 [N, classes]; the names are `compression.core.ort`'s, and so are the ORT
sessions that check and run the graphs (the server opens them the same way). We use the
TorchScript exporter (``dynamo=False``): on these small CNNs it exports in ~0.2 s against ~7 s
for the dynamo exporter, with identical graphs for ORT.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

# The module, not its names: `export` re-exports nothing of the core (callers import it there).
from compression.core import ort as core_ort

if TYPE_CHECKING:
    import onnxruntime as ort

OPSET = 17


def to_onnx(model: nn.Module, input_shape: Sequence[int], *,
            output_names: Sequence[str] = (core_ort.OUTPUT_NAME,),
            input_name: str = core_ort.INPUT_NAME) -> onnx.ModelProto:
    """Export ``model`` (eval mode) for inputs [N, *input_shape]; every axis 0 is dynamic."""
    model = model.eval()
    example = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in (input_name, *output_names)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, input_names=[input_name],
                          output_names=list(output_names), dynamic_axes=dynamic,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    return graph


def run(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """First output of ``sess`` (a `compression.core.ort.session`) over ``x`` in batches,
    concatenated."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def check_against_torch(model: nn.Module, graph: onnx.ModelProto, input_shape: Sequence[int],
                        *, batch: int = 8, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    """`torch.testing.assert_close` between torch and ORT logits on a random batch."""
    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
    got = torch.from_numpy(run(core_ort.session(graph), x.numpy()))
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


def skeleton(graph: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``graph`` whose named initializers keep dims and dtype but no data; an encoded
    weights artifact fills them back in at load time (`compression.core.family.fill_initializers`)."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    wanted = set(names)
    for init in out.graph.initializer:
        if init.name in wanted:
            name, dims, dtype = init.name, list(init.dims), init.data_type
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
    return out


def initializers(graph: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer name → array, for codecs to encode."""
    return {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}


# The ops whose second input is a conv kernel or a linear layer's weight matrix.
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def layer_weights(graph: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The conv and linear weights among the float32 initializers, by name: what the weight codecs
    store. Other ≥2-D constants (the input normalisation's mean and std [1, C, 1, 1], a user
    model's own buffers) are not layer weights, and stay dense in the graph."""
    names = {n.input[1] for n in graph.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1}
    return {k: v for k, v in initializers(graph).items()
            if k in names and v.dtype == np.float32 and v.ndim >= 2}
