"""KServe v2 messages ↔ numpy arrays and routing parameters.

Decoding validates everything a client controls and raises `InvalidArgument` naming the field
and showing the bad value, so bad input never reaches a runner. Request parameters:
``latency_budget_ms`` (double, integer or numeric string) and Triton's ``timeout`` (µs); the effective budget
is the smallest of those and the gRPC deadline's time remaining minus a safety margin. Client-supplied
text is echoed cut short (`shown`): error messages travel in gRPC trailers.

Decoding runs on the event loop, so a request must not cost more than its bytes' worth of work
before it is refused: repeated fields a client sizes (the input's shape, ``outputs``,
``parameters``) are checked by length first (`MAX_OUTPUTS`, `MAX_PARAMETERS`, the model's rank)
and only then looked at, and messages show a few entries plus the count, never a whole field.
Pixels must lie in the model's input range (the manifest's ``input.range``, else [0, 1]):
a finite value far outside it (3.4e38) gives NaN logits otherwise.

The image input is accepted as ``FP32`` (pixels in the input range; ``raw_input_contents`` or
``contents.fp32_contents``) or as ``UINT8`` (pixels 0..255; ``raw_input_contents`` one byte per
value or ``contents.uint_contents``), which becomes float32 ``/ 255`` before the range check — the
very values the build scaled its 8-bit images to. ModelMetadata still advertises FP32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos import wire
from protos.generated import grpc_service_pb2 as pb
from protos.wire import BUDGET_PARAM, MAX_BUDGET_MS, MAX_REQUEST_BATCH, TIMEOUT_PARAM
from server.engine import Call, Outcome
from server.errors import InvalidArgument, NotFound, shown

# The model has one output and routing reads two parameters: more entries than these are an
# attack or a bug, refused by count before anything iterates over them.
MAX_OUTPUTS = 16
MAX_PARAMETERS = 64
SHOWN_DIMS = 8  # dims of a wrong shape shown in a message (then "…" and the count)
DEFAULT_INPUT_RANGE = (0.0, 1.0)  # pixels; the graphs normalize inside
# The input's datatypes: bytes per value in raw_input_contents, and the typed contents field.
DATATYPES = {"FP32": (4, "fp32_contents"), "UINT8": (1, "uint_contents")}
_UINT8_SCALE = np.float32(255.0)
# Little-endian, as KServe's raw contents are; the unsigned view of FP32 is for the range check.
_F4, _U4, _U1 = np.dtype("<f4"), np.dtype("<u4"), np.dtype(np.uint8)


@dataclass(frozen=True)
class ModelSpec:
    """What requests are checked against."""

    name: str
    input_name: str
    input_shape: tuple[int, ...]  # [C, H, W]
    output_name: str
    num_classes: int
    input_range: tuple[float, float] = DEFAULT_INPUT_RANGE  # inclusive bounds of every value

    @property
    def expected_shape(self) -> str:
        """The input shape as error messages show it: ``[N, 1, 28, 28]``."""
        return f"[N, {', '.join(map(str, self.input_shape))}]"

    @classmethod
    def for_family(cls, manifest: Mapping[str, Any], name: str) -> ModelSpec:
        """The spec of a family's manifest (``input.range`` when recorded, else [0, 1])."""
        inp, out = manifest["input"], manifest["output"]
        lo, hi = inp.get("range") or DEFAULT_INPUT_RANGE
        return cls(name=name, input_name=inp["name"], input_shape=tuple(inp["shape"]),
                   output_name=out["name"], num_classes=len(out["classes"]),
                   input_range=(float(lo), float(hi)))


def dims(shape: Sequence[int]) -> str:
    """A shape for a message: all of a short one, else the first `SHOWN_DIMS` and the count.
    Slices only those few (a hostile shape has millions of dims: never build its whole repr)."""
    n = len(shape)
    if n <= SHOWN_DIMS:
        return repr([int(d) for d in shape[:n]])
    head = ", ".join(str(int(d)) for d in shape[:SHOWN_DIMS])
    return f"[{head}, …] ({n} dims)"


def decode_infer(req: pb.ModelInferRequest, spec: ModelSpec, *,
                 time_remaining_s: float | None, margin_ms: float,
                 received: float | None = None, max_queue: int | None = None) -> Call:
    """Validate and decode a ModelInferRequest.

    ``max_queue``: the most samples a variant queue ever holds (``--max-queue``); a larger
    request could never be queued, so it is invalid rather than a reason to retry later.
    """
    if req.model_name != spec.name:
        raise NotFound(f"model_name {shown(req.model_name)}: this server hosts {spec.name!r}")
    # Counts first: each is O(1) on a protobuf container, and bounds every loop below.
    if len(req.parameters) > MAX_PARAMETERS:
        raise InvalidArgument(f"parameters: {len(req.parameters)} entries, at most "
                              f"{MAX_PARAMETERS} are accepted (this server reads "
                              f"{BUDGET_PARAM!r} and {TIMEOUT_PARAM!r})")
    outputs = req.outputs
    if len(outputs) > MAX_OUTPUTS:
        raise InvalidArgument(f"outputs: {len(outputs)} entries, at most {MAX_OUTPUTS} are "
                              f"accepted (the model's only output is {spec.output_name!r})")
    if len(req.inputs) != 1:
        raise InvalidArgument(f"inputs: expected exactly 1 input tensor {spec.input_name!r}, "
                              f"got {len(req.inputs)}")
    t = req.inputs[0]
    if t.name != spec.input_name:
        raise InvalidArgument(f"inputs[0].name {shown(t.name)}: the model's input is "
                              f"{spec.input_name!r}")
    datatype = t.datatype
    if datatype not in DATATYPES:
        raise InvalidArgument(f"inputs[0].datatype {shown(datatype)}: expected 'FP32' "
                              f"(pixels in [0, 1]) or 'UINT8' (pixels 0..255)")
    # The rank before anything else: a 60 MB request can carry 63 million dims.
    dims_in = t.shape
    if len(dims_in) != 1 + len(spec.input_shape):
        raise InvalidArgument(f"inputs[0].shape {dims(dims_in)}: expected {spec.expected_shape} "
                              f"({1 + len(spec.input_shape)} dims)")
    shape = tuple(dims_in)  # int64s already; short now
    if shape[1:] != spec.input_shape:
        raise InvalidArgument(f"inputs[0].shape {dims(shape)}: expected {spec.expected_shape}")
    if not 1 <= shape[0] <= MAX_REQUEST_BATCH:
        raise InvalidArgument(f"inputs[0].shape[0] {shape[0]!r}: batch must lie in "
                              f"[1, {MAX_REQUEST_BATCH}]")
    if max_queue is not None and shape[0] > max_queue:
        raise InvalidArgument(f"inputs[0].shape[0] {shape[0]!r}: larger than this server ever "
                              f"queues for a variant (--max-queue {max_queue} samples), so it "
                              f"can never run; send at most {max_queue} samples per request")
    for i, o in enumerate(outputs):
        if o.name != spec.output_name:
            raise InvalidArgument(f"outputs[{i}].name {shown(o.name)}: the model's only output "
                                  f"is {spec.output_name!r}")
        if o.parameters:  # none is supported: ignoring one (e.g. classification) would mislead
            key = min(o.parameters) if len(o.parameters) <= MAX_PARAMETERS else "…"
            raise InvalidArgument(f"outputs[{i}].parameters[{shown(key)}]: unknown output "
                                  f"parameter ({len(o.parameters)} given); this server supports "
                                  f"none: the output is always the FP32 logits")
    x = _tensor(req, t, datatype, shape)
    _in_range(x, spec.input_range)
    budget = stated = _stated(req)
    if time_remaining_s is not None:  # the gRPC deadline, less the margin for the reply
        left = time_remaining_s * 1e3 - margin_ms
        budget = left if budget is None else min(budget, left)
    return Call(x=x, budget_ms=budget, pin=req.model_version or None, request_id=req.id,
                received=received, stated_ms=stated)


def _tensor(req: pb.ModelInferRequest, t: pb.ModelInferRequest.InferInputTensor,
            datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The input ``t`` of ``req`` as float32 (UINT8 scaled to [0, 1]); payload sizes checked
    against ``shape``."""
    count = math.prod(shape)
    size, typed = DATATYPES[datatype]
    if t.HasField("contents"):  # typed contents (the usual raw payload skips all of this)
        contents = t.contents
        # Typed contents of another type than the datatype's would be ignored: say so instead.
        other = sorted(f.name for f, _v in contents.ListFields() if f.name != typed)
        if other:
            raise InvalidArgument(f"inputs[0].contents.{other[0]} is set: datatype {datatype} "
                                  f"takes inputs[0].contents.{typed} or raw_input_contents")
        values = getattr(contents, typed)
    else:
        values = ()
    raws = req.raw_input_contents
    if raws and len(values):
        raise InvalidArgument(f"both raw_input_contents and inputs[0].contents.{typed} "
                              f"are set ({len(raws[0])} bytes, {len(values)} values): send one")
    if raws:
        if len(raws) != 1:
            raise InvalidArgument(f"raw_input_contents: expected 1 entry, got {len(raws)}")
        raw = raws[0]
        if len(raw) != count * size:
            raise InvalidArgument(f"raw_input_contents[0]: {len(raw)} bytes, shape "
                                  f"{dims(shape)} {datatype} needs {count * size}")
        # An array over the payload's bytes, shaped in the same call (no copy, no reshape).
        if datatype == "FP32":
            return np.ndarray(shape, _F4, raw)
        return _from_uint8(np.ndarray(shape, _U1, raw))
    if len(values) != count:
        raise InvalidArgument(f"inputs[0].contents.{typed}: {len(values)} values, shape "
                              f"{dims(shape)} needs {count}")
    if datatype == "FP32":
        return np.asarray(values, dtype=np.float32).reshape(shape)
    ints = np.asarray(values, dtype=np.uint32)  # uint_contents holds uint32s: 0..255 only
    if count and int(ints.max()) > 255:
        first = int(np.flatnonzero(ints > 255)[0])
        raise InvalidArgument(f"inputs[0].contents.uint_contents: value {int(ints[first])} at "
                              f"flat index {first} is not a UINT8 pixel (0..255)")
    return _from_uint8(ints.reshape(shape))


@functools.cache
def _pattern_at_most(hi: float) -> int:
    """The bit pattern, as an unsigned integer, of the largest float32 not above ``hi`` (≥ 0)."""
    top = np.float32(hi)
    if float(top) > hi:  # rounded up to the next float32: take the one below
        top = np.nextafter(top, np.float32(0.0))
    return int(top.view(_U4))


def _from_uint8(pixels: np.ndarray) -> np.ndarray:
    """0..255 → float32 [0, 1] in one pass: the division rather than a multiply by 1/255, so the
    values equal the build's ``uint8 / 255`` (and a client's own FP32 scaling) bit for bit."""
    return np.divide(pixels, _UINT8_SCALE, dtype=np.float32)


def _in_range(x: np.ndarray, bounds: tuple[float, float]) -> None:
    """NaN and ±Inf poison softmax confidences and the early-exit test, and a finite value far
    outside the pixel range (3.4e38) overflows the graph into NaN logits: refuse them all."""
    lo, hi = bounds
    if x.size:  # the common case passes without a boolean array
        if lo == 0.0 <= hi and x.dtype == _F4:
            # One pass: non-negative float32s order as their bit patterns do, and every negative
            # (sign bit), infinite or NaN value has a larger pattern than any value in [0, hi]
            # (-0.0 too, which the exact checks below then let through).
            if int(np.maximum.reduce(x.view(_U4), axis=None)) <= _pattern_at_most(hi):
                return
        elif lo <= float(x.min()) and float(x.max()) <= hi:  # a NaN fails both comparisons
            return
    flat = x.ravel()
    bad = ~np.isfinite(flat)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"inputs[0]: {int(bad.sum())} values are NaN or infinite (first at "
                              f"flat index {first}: {float(flat[first])!r})")
    bad = (flat < lo) | (flat > hi)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        count = int(bad.sum())
        raise InvalidArgument(f"inputs[0]: {count} value{'s' if count > 1 else ''} outside the "
                              f"input range [{lo:g}, {hi:g}] (first at flat index {first}: "
                              f"{flat[first]!s}); send pixels scaled to that range")


def _stated(req: pb.ModelInferRequest) -> float | None:
    """The budget the request's parameters state, ms (None: none): unlike its gRPC deadline,
    not shortened by time it waited before the server read it."""
    params = req.parameters
    if not params:
        return None
    budgets: list[float] = []
    if BUDGET_PARAM in params:
        budgets.append(_positive(params[BUDGET_PARAM], BUDGET_PARAM))
    if TIMEOUT_PARAM in params:
        budgets.append(_positive(params[TIMEOUT_PARAM], TIMEOUT_PARAM) / 1e3)
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
    if out.device != wire.CPU:
        params[wire.DEVICE_PARAM].string_param = out.device
    return resp
