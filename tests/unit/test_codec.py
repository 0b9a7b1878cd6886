"""`server.codec.decode_infer` against hostile requests, without a server: every refusal names the
field and shows a short value, and attacker-sized fields (millions of shape dims, outputs or
parameters) are refused from their length alone, before anything iterates over them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from protos.generated import grpc_service_pb2 as pb
from server.codec import ModelSpec, decode_infer
from server.errors import InvalidArgument

MAX_OUTPUTS, MAX_PARAMETERS = 16, 64  # the limits the server documents (server.codec)
SPEC = ModelSpec(name="m", input_name="input", input_shape=(1, 28, 28), output_name="logits",
                 num_classes=10)


def _request(x: np.ndarray | None = None, *, raw: bool = True) -> pb.ModelInferRequest:
    x = np.full((1, 1, 28, 28), 0.5, np.float32) if x is None else x
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    return req


def _decode(req: Any, spec: ModelSpec = SPEC, **kw: Any) -> Any:
    return decode_infer(req, spec, time_remaining_s=None, margin_ms=0.5, **kw)


def _refused(req: Any, *fragments: str, spec: ModelSpec = SPEC, **kw: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        _decode(req, spec, **kw)
    message = str(info.value)
    for f in fragments:
        assert f in message, message
    assert len(message) < 400, message
    return message


# --- attacker-sized containers, simulated: their length is huge, touching them all fails --------

class Huge:
    """A stand-in for a protobuf repeated field of ``n`` entries that fails the test if anything
    iterates over it or slices more than a few entries (what a 60 MB request would cost)."""

    def __init__(self, n: int, item: Any) -> None:
        self.n, self.item = n, item

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError(f"iterated over all {self.n} entries")

    def __contains__(self, key: object) -> bool:
        raise AssertionError("looked a key up before checking the size")

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            picked = range(*i.indices(self.n))
            assert len(picked) <= 64, f"sliced {len(picked)} of {self.n} entries"
            return [self.item] * len(picked)
        return self.item


class Proxy:
    """A real request with some fields replaced."""

    def __init__(self, req: pb.ModelInferRequest, **fields: Any) -> None:
        self._req, self._fields = req, fields

    def __getattr__(self, name: str) -> Any:
        return self._fields[name] if name in self._fields else getattr(self._req, name)


def test_a_shape_of_millions_of_dims_is_refused_from_its_length() -> None:
    req = _request()
    tensor = Proxy(req.inputs[0], shape=Huge(63_000_000, 1))
    t = time.perf_counter()
    message = _refused(Proxy(req, inputs=[tensor]), "inputs[0].shape", "63000000 dims",
                       "expected [N, 1, 28, 28]")
    assert time.perf_counter() - t < 0.5
    assert "[1, 1, 1, 1, 1, 1, 1, 1, …]" in message  # the first few dims, not all of them


def test_a_real_long_shape_shows_a_few_dims_and_the_length() -> None:
    req = _request()
    req.inputs[0].shape.extend([7] * 200_000)
    _refused(req, "inputs[0].shape [1, 1, 28, 28, 7, 7, 7, 7, …] (200004 dims)")
    short = _request()
    short.inputs[0].shape[2] = 27
    _refused(short, "inputs[0].shape [1, 1, 27, 28]: expected [N, 1, 28, 28]")


def test_millions_of_outputs_or_parameters_are_refused_by_count() -> None:
    req = _request()
    _refused(Proxy(req, outputs=Huge(5_000_000, pb.ModelInferRequest.InferRequestedOutputTensor(
        name="logits"))), "outputs: 5000000 entries", f"at most {MAX_OUTPUTS}")
    _refused(Proxy(req, parameters=Huge(2_000_000, pb.InferParameter(double_param=1.0))),
             "parameters: 2000000 entries", f"at most {MAX_PARAMETERS}")


def test_output_and_parameter_limits_on_real_messages() -> None:
    req = _request()
    for _ in range(MAX_OUTPUTS):
        req.outputs.add(name="logits")
    for i in range(MAX_PARAMETERS - 1):
        req.parameters[f"p{i}"].string_param = "x"
    req.parameters["latency_budget_ms"].double_param = 50.0
    assert _decode(req).budget_ms == 50.0
    req.outputs.add(name="logits")
    _refused(req, f"outputs: {MAX_OUTPUTS + 1} entries")
    del req.outputs[-1]
    req.parameters["one-too-many"].bool_param = True
    _refused(req, f"parameters: {MAX_PARAMETERS + 1} entries")


def test_the_budget_is_the_tighter_of_the_stated_one_and_the_deadline_the_stated_one_is_kept(
        ) -> None:
    """The budget parameter states the client's budget; the gRPC deadline has been spent on the
    way (less the margin for the reply). The engine routes by the tighter, and tells a budget no
    idle server could meet by the stated one, which waiting never shortens."""
    req = _request()
    req.parameters["latency_budget_ms"].double_param = 5.0
    call = decode_infer(req, SPEC, time_remaining_s=0.002, margin_ms=0.5)
    assert call.budget_ms == pytest.approx(1.5) and call.stated_ms == 5.0
    call = decode_infer(req, SPEC, time_remaining_s=1.0, margin_ms=0.5)
    assert call.budget_ms == 5.0 and call.stated_ms == 5.0
    req.parameters["timeout"].int64_param = 2000  # Triton's, in µs: the tighter statement
    assert _decode(req).stated_ms == 2.0
    deadline_only = decode_infer(_request(), SPEC, time_remaining_s=0.01, margin_ms=0.5)
    assert deadline_only.budget_ms == pytest.approx(9.5) and deadline_only.stated_ms is None
    assert _decode(_request()).budget_ms is None


def test_out_of_range_pixels_are_refused_with_index_and_value() -> None:
    x = np.full((2, 1, 28, 28), 0.25, np.float32)
    x[1, 0, 0, 3] = 3.4e38
    _refused(_request(x), "inputs[0]", "outside the input range [0, 1]",
             "first at flat index 787: 3.4", "1 value")
    x[1, 0, 0, 3] = -0.5
    _refused(_request(x, raw=False), "first at flat index 787: -0.5")
    x[1, 0, 0, 3] = np.nan  # NaN keeps its own message
    _refused(_request(x), "NaN or infinite (first at flat index 787: nan)")
    x[1, 0, 0, 3] = 1.0  # the bounds themselves are pixels
    x[0, 0, 0, 0] = 0.0
    assert _decode(_request(x)).x.shape == (2, 1, 28, 28)


def test_a_recorded_input_range_is_used() -> None:
    spec = ModelSpec(name="m", input_name="input", input_shape=(1, 28, 28),
                     output_name="logits", num_classes=10, input_range=(0.0, 255.0))
    x = np.full((1, 1, 28, 28), 200.0, np.float32)
    assert _decode(_request(x), spec).x.max() == 200.0
    x[0, 0, 5, 5] = 256.0
    _refused(_request(x), "outside the input range [0, 255]", "first at flat index 145: 256.0",
             spec=spec)
    assert ModelSpec.for_family({"input": {"name": "input", "shape": [1, 28, 28],
                                           "range": [-1, 1]},
                                 "output": {"name": "logits", "classes": list("ab")}},
                                "m").input_range == (-1.0, 1.0)
    assert ModelSpec.for_family({"input": {"name": "input", "shape": [1, 28, 28]},
                                 "output": {"name": "logits", "classes": list("ab")}},
                                "m").input_range == (0.0, 1.0)


def test_two_payloads_are_ambiguous() -> None:
    req = _request()
    req.inputs[0].contents.fp32_contents.extend([0.5] * 784)
    _refused(req, "both raw_input_contents and inputs[0].contents.fp32_contents are set",
             "send one")
    other = _request()
    other.inputs[0].contents.int_contents.extend([1, 2])
    _refused(other, "inputs[0].contents.int_contents")


def test_unknown_output_parameters_are_refused() -> None:
    req = _request()
    out = req.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 3
    _refused(req, "outputs[0].parameters['classification']", "unknown")


def test_a_request_larger_than_the_queue_is_invalid_not_overloaded() -> None:
    x = np.full((9, 1, 28, 28), 0.5, np.float32)
    _refused(_request(x), "inputs[0].shape[0] 9", "--max-queue 8", max_queue=8)
    assert _decode(_request(x), max_queue=9).x.shape[0] == 9
    assert _decode(_request(x), max_queue=None).x.shape[0] == 9


# --- UINT8 pixels ------------------------------------------------------------------------------

def _uint8_request(u: np.ndarray, *, raw: bool = True) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input", datatype="UINT8", shape=list(u.shape))
    if raw:
        req.raw_input_contents.append(u.astype(np.uint8).tobytes())
    else:
        t.contents.uint_contents.extend(u.ravel().tolist())
    return req


@pytest.mark.parametrize("raw", [True, False])
def test_uint8_pixels_become_the_fp32_a_client_would_send(raw: bool) -> None:
    u = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    u[0, 0, 0, :2] = (0, 255)  # both ends of the range
    x = _decode(_uint8_request(u, raw=raw)).x
    assert x.dtype == np.float32 and x.shape == (3, 1, 28, 28)
    scaled = u.astype(np.float32) / 255  # what the build and an FP32 client compute
    np.testing.assert_array_equal(x, scaled)  # bit for bit: the same logits either way
    np.testing.assert_array_equal(_decode(_request(scaled)).x, x)


def test_uint8_payload_errors_name_the_field_and_value() -> None:
    u = np.zeros((2, 1, 28, 28), np.uint8)
    short = _uint8_request(u)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    _refused(short, "raw_input_contents[0]: 1567 bytes", "UINT8 needs 1568")
    as_fp32 = _uint8_request(u)
    as_fp32.raw_input_contents[0] = np.zeros(u.shape, np.float32).tobytes()  # 4x the bytes
    _refused(as_fp32, "raw_input_contents[0]: 6272 bytes", "UINT8 needs 1568")
    big = _uint8_request(u, raw=False)
    big.inputs[0].contents.uint_contents[1000] = 256
    _refused(big, "inputs[0].contents.uint_contents: value 256 at flat index 1000",
             "not a UINT8 pixel (0..255)")
    few = _uint8_request(u[:1], raw=False)
    few.inputs[0].shape[0] = 2
    _refused(few, "inputs[0].contents.uint_contents: 784 values", "needs 1568")
    wrong_field = _uint8_request(u, raw=False)
    wrong_field.inputs[0].contents.ClearField("uint_contents")
    wrong_field.inputs[0].contents.fp32_contents.extend([0.5] * u.size)
    _refused(wrong_field, "inputs[0].contents.fp32_contents is set: datatype UINT8 takes "
             "inputs[0].contents.uint_contents or raw_input_contents")
    both = _uint8_request(u)
    both.inputs[0].contents.uint_contents.extend([1] * u.size)
    _refused(both, "both raw_input_contents and inputs[0].contents.uint_contents are set")


@pytest.mark.parametrize("datatype", ["INT8", "FP16", "UINT16", "uint8", "BYTES"])
def test_other_datatypes_are_refused_naming_the_accepted_ones(datatype: str) -> None:
    req = _uint8_request(np.zeros((1, 1, 28, 28), np.uint8))
    req.inputs[0].datatype = datatype
    _refused(req, f"inputs[0].datatype {datatype!r}", "expected 'FP32'", "or 'UINT8'")
