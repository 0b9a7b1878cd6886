"""KServe v2 messages ↔ numpy arrays and routing parameters.

Decoding validates everything a client controls and raises `InvalidArgument` naming the field
and showing the bad value, so bad input never reaches a runner. Request parameters:
``latency_budget_ms`` (double, integer or numeric string) and Triton's ``timeout`` (µs); the effective budget
is the smallest of those and the gRPC deadline's time remaining minus a safety margin. Client-supplied
text is echoed cut short (`shown`): error messages travel in gRPC trailers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protos import wire
from protos.generated import grpc_service_pb2 as pb
from protos.wire import BUDGET_PARAM, MAX_BUDGET_MS, MAX_REQUEST_BATCH, TIMEOUT_PARAM
from server.engine import Call, Outcome
from server.errors import InvalidArgument, NotFound, shown


@dataclass(frozen=True)
class ModelSpec:
    """What requests are checked against."""

    name: str
    input_name: str
    input_shape: tuple[int, ...]  # [C, H, W]
    output_name: str
    num_classes: int


def decode_infer(req: pb.ModelInferRequest, spec: ModelSpec, *,
                 time_remaining_s: float | None, margin_ms: float,
                 received: float | None = None) -> Call:
    """Validate and decode a ModelInferRequest."""
    if req.model_name != spec.name:
        raise NotFound(f"model_name {shown(req.model_name)}: this server hosts {spec.name!r}")
    if len(req.inputs) != 1:
        raise InvalidArgument(f"inputs: expected exactly 1 input tensor {spec.input_name!r}, "
                              f"got {len(req.inputs)}")
    t = req.inputs[0]
    if t.name != spec.input_name:
        raise InvalidArgument(f"inputs[0].name {shown(t.name)}: the model's input is "
                              f"{spec.input_name!r}")
    if t.datatype != "FP32":
        raise InvalidArgument(f"inputs[0].datatype {shown(t.datatype)}: expected 'FP32'")
    shape = tuple(t.shape)  # int64s already
    if len(shape) != 1 + len(spec.input_shape) or shape[1:] != spec.input_shape:
        raise InvalidArgument(f"inputs[0].shape {shown(list(shape))}: expected "
                              f"[N, {', '.join(map(str, spec.input_shape))}]")
    if not 1 <= shape[0] <= MAX_REQUEST_BATCH:
        raise InvalidArgument(f"inputs[0].shape[0] {shape[0]!r}: batch must lie in "
                              f"[1, {MAX_REQUEST_BATCH}]")
    for o in req.outputs:
        if o.name != spec.output_name:
            raise InvalidArgument(f"outputs name {shown(o.name)}: the model's only output is "
                                  f"{spec.output_name!r}")
    x = _tensor(req, shape)
    _finite(x)
    return Call(x=x, budget_ms=_budget(req, time_remaining_s, margin_ms),
                pin=req.model_version or None, request_id=req.id, received=received)


def _tensor(req: pb.ModelInferRequest, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    if req.raw_input_contents:
        if len(req.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents: expected 1 entry, got "
                                  f"{len(req.raw_input_contents)}")
        raw = req.raw_input_contents[0]
        if len(raw) != count * 4:
            raise InvalidArgument(f"raw_input_contents[0]: {len(raw)} bytes, shape "
                                  f"{list(shape)!r} FP32 needs {count * 4}")
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    values = req.inputs[0].contents.fp32_contents
    if len(values) != count:
        raise InvalidArgument(f"inputs[0].contents.fp32_contents: {len(values)} values, shape "
                              f"{list(shape)!r} needs {count}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _finite(x: np.ndarray) -> None:
    """NaN and ±Inf poison softmax confidences and the early-exit test: refuse them."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        raise InvalidArgument(f"inputs[0]: {int(bad.sum())} values are NaN or infinite (first at "
                              f"flat index {first}: {float(x.ravel()[first])!r})")


def _budget(req: pb.ModelInferRequest, time_remaining_s: float | None,
            margin_ms: float) -> float | None:
    budgets: list[float] = []
    if BUDGET_PARAM in req.parameters:
        budgets.append(_positive(req.parameters[BUDGET_PARAM], BUDGET_PARAM))
    if TIMEOUT_PARAM in req.parameters:
        us = _positive(req.parameters[TIMEOUT_PARAM], TIMEOUT_PARAM)
        budgets.append(us / 1e3)
    if time_remaining_s is not None:
        budgets.append(time_remaining_s * 1e3 - margin_ms)
    return min(budgets) if budgets else None


def _positive(p: pb.InferParameter, name: str) -> float:
    """A positive number from a double, an integer or a numeric string (clients such as
    tritonclient can send only int64 or string parameters)."""
    kind = p.WhichOneof("parameter_choice")
    raw = getattr(p, kind) if kind else None
    try:
        if kind not in ("double_param", "int64_param", "uint64_param", "string_param"):
            raise ValueError
        value = float(getattr(p, kind))
    except ValueError:
        raise InvalidArgument(f"parameters[{name!r}] {shown(raw)}: expected a number "
                              f"(got {kind or 'no value'})") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"parameters[{name!r}] {shown(raw)}: must be a positive finite number")
    limit = MAX_BUDGET_MS * (1e3 if name == TIMEOUT_PARAM else 1.0)
    if value > limit:
        raise InvalidArgument(f"parameters[{name!r}] {shown(raw)}: above the limit of {limit:g} "
                              f"({'µs' if name == TIMEOUT_PARAM else 'ms'})")
    return value


def encode_infer(req: pb.ModelInferRequest, spec: ModelSpec, out: Outcome
                 ) -> pb.ModelInferResponse:
    """The response: logits as raw FP32, the variant as model_version, routing in parameters."""
    resp = pb.ModelInferResponse(model_name=spec.name, model_version=out.variant, id=req.id)
    tensor = resp.outputs.add()
    tensor.name, tensor.datatype = spec.output_name, "FP32"
    tensor.shape.extend(out.logits.shape)
    resp.raw_output_contents.append(np.ascontiguousarray(out.logits, dtype="<f4").tobytes())
    params = resp.parameters
    params[wire.VARIANT_PARAM].string_param = out.variant
    params[wire.QUEUE_MS_PARAM].double_param = out.queue_ms
    params[wire.COMPUTE_MS_PARAM].double_param = out.compute_ms
    if out.budget_ms is not None:
        params[BUDGET_PARAM].double_param = out.budget_ms
    if out.exit is not None:
        params[wire.EXIT_PARAM].int64_param = out.exit
    if out.exits is not None and len(out.exits) > 1:
        params[wire.EXITS_PARAM].string_param = ",".join(str(int(e)) for e in out.exits)
    if out.retried_from is not None:  # the variant that failed first; this answer is its retry
        params[wire.RETRIED_FROM_PARAM].string_param = out.retried_from
    return resp
