"""A real server on 127.0.0.1:0 and the real client: routing, results, errors, streaming, health."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import AdaptiveClient, BudgetExceeded, InvalidArgument, NotFound, Unavailable
from client.client import build_request
from compression.core.family import load_family
from protos.generated import grpc_service_pb2 as pb
from protos.generated import grpc_service_pb2_grpc
from protos.wire import channel_options
from server.app import GRPC_LOGGER
from server.latency import Load, QueueState
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer, serve_in_thread

CHEAPEST = {("fast", None), ("early-exit", 0)}  # (variant, exit) of the ~0.03 ms candidates


def _reference_logits(family_dir: Path, variant: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(load_family(family_dir).graph(variant).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_budget_routes_and_results_match_the_variant(client: AdaptiveClient, images: np.ndarray,
                                                     serving_family: Path) -> None:
    tight = client.infer(images[:1], budget_ms=0.3)
    # The two cheap candidates (~0.03 ms): on a busy host either may be predicted to fit first.
    assert (tight.variant, tight.exit) in CHEAPEST
    loose = client.infer(images[:1], budget_ms=500)
    assert loose.variant == "slow" and loose.met
    unbounded = client.infer(images)
    assert unbounded.variant == "slow" and unbounded.budget_ms is None
    assert unbounded.outputs.shape == (4, 10) and unbounded.classes.shape == (4,)
    np.testing.assert_allclose(unbounded.outputs, _reference_logits(serving_family, "slow", images),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(unbounded.classes, unbounded.outputs.argmax(1))
    assert unbounded.compute_ms is not None and unbounded.compute_ms > 0
    assert unbounded.queue_ms is not None and unbounded.queue_ms >= 0


def test_pinned_variant_is_served(client: AdaptiveClient, images: np.ndarray,
                                  serving_family: Path) -> None:
    r = client.infer(images[:2], variant="mid", budget_ms=0.01)  # pinned wins over the budget
    assert r.variant == "mid"
    np.testing.assert_allclose(r.outputs, _reference_logits(serving_family, "mid", images[:2]),
                               rtol=1e-4, atol=1e-5)


def test_early_exit_depth_follows_budget_and_confidence(client: AdaptiveClient) -> None:
    dark = np.zeros((1, 1, 28, 28), np.float32)  # never confident: depth follows the budget
    bright = np.ones((1, 1, 28, 28), np.float32)  # confident at exit 0
    table = {v.name: v for v in client.variants()}
    shallow, deeper = (table[f"early-exit@{k}"].predicted_p95_ms for k in (0, 1))
    assert shallow < deeper
    # between the two exits' predictions, not a fixed figure: both move with the host's load
    assert client.infer(dark, variant="early-exit", budget_ms=(shallow + deeper) / 2).exit == 0
    assert client.infer(dark, variant="early-exit", budget_ms=5000).exit == 2
    assert client.infer(dark, variant="early-exit").exit == 2
    assert client.infer(bright, variant="early-exit").exit == 0
    assert client.infer(dark, variant="early-exit@1").exit == 1
    mixed = client.infer(np.concatenate([bright, dark]), variant="early-exit")
    assert mixed.exits == (0, 2) and mixed.exit == 2


def test_variant_table_lists_every_candidate(client: AdaptiveClient) -> None:
    table = {v.name: v for v in client.variants()}
    assert set(table) == {"fast", "mid", "slow", "early-exit@0", "early-exit@1", "early-exit@2"}
    assert table["slow"].accuracy == pytest.approx(0.99)
    assert table["fast"].predicted_p50_ms < table["mid"].predicted_p50_ms \
        < table["slow"].predicted_p50_ms
    assert table["early-exit@1"].exit == 1 and table["fast"].exit is None


@pytest.mark.parametrize(("mutate", "code", "fragment"), [
    (lambda r: r.inputs[0].shape.__setitem__(1, 3), grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].shape [1, 3, 28, 28]"),
    (lambda r: setattr(r.inputs[0], "datatype", "INT8"), grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].datatype 'INT8'"),
    (lambda r: setattr(r.inputs[0], "name", "pixels"), grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].name 'pixels'"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT,
     "raw_input_contents[0]: 12 bytes"),
    (lambda r: r.parameters["latency_budget_ms"].MergeFrom(pb.InferParameter(string_param="soon")),
     grpc.StatusCode.INVALID_ARGUMENT, "parameters['latency_budget_ms'] 'soon'"),
    (lambda r: r.parameters["latency_budget_ms"].MergeFrom(pb.InferParameter(double_param=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "parameters['latency_budget_ms'] -1.0"),
    (lambda r: setattr(r, "model_name", "resnet"), grpc.StatusCode.NOT_FOUND,
     "model_name 'resnet'"),
    (lambda r: setattr(r, "model_version", "huge"), grpc.StatusCode.NOT_FOUND,
     "model_version 'huge'"),
])
def test_bad_requests_get_clear_status(server: RunningServer, images: np.ndarray, mutate: object,
                                       code: grpc.StatusCode, fragment: str) -> None:
    req = build_request("servetest", images[:1])
    mutate(req)  # type: ignore[operator]
    with grpc.insecure_channel(server.target) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=10)
        assert err.value.code() == code
        assert fragment in err.value.details()
        ok = stub.ModelInfer(build_request("servetest", images[:1]), timeout=10)  # still serving
        assert ok.outputs[0].shape == [1, 10]


def test_client_raises_typed_errors(client: AdaptiveClient, images: np.ndarray) -> None:
    with pytest.raises(NotFound, match="'huge'"):
        client.infer(images[:1], variant="huge")
    with pytest.raises(InvalidArgument, match=r"\[1, 28, 28\]|\[28, 28\]"):
        client.infer(images[0, 0])  # [28, 28]: no channel axis
    with pytest.raises(InvalidArgument, match="budget_ms -1"):
        client.infer(images[:1], budget_ms=-1)


def test_typed_contents_and_triton_timeout_parameter(server: RunningServer,
                                                     images: np.ndarray) -> None:
    req = pb.ModelInferRequest(model_name="servetest")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 1, 28, 28])
    t.contents.fp32_contents.extend(images[:2].ravel().tolist())
    req.parameters["timeout"].int64_param = 300  # Triton's µs: 0.3 ms → the fast variant
    with grpc.insecure_channel(server.target) as ch:
        resp = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    answered = (resp.model_version, resp.parameters["exit"].int64_param
                if "exit" in resp.parameters else None)
    assert answered in CHEAPEST and resp.model_version == resp.parameters["variant"].string_param
    assert resp.parameters["latency_budget_ms"].double_param == pytest.approx(0.3)
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 10)
    assert np.isfinite(logits).all()


def test_stream_infer_answers_each_request_and_reports_errors(server: RunningServer,
                                                              images: np.ndarray) -> None:
    good = build_request("servetest", images[:1], request_id="a")
    bad = build_request("servetest", images[:1], request_id="b")
    bad.inputs[0].datatype = "FP16"
    with grpc.insecure_channel(server.target) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        out = list(stub.ModelStreamInfer(iter([good, bad, good]), timeout=10))
    assert [o.infer_response.id for o in out] == ["a", "b", "a"]
    assert [bool(o.error_message) for o in out] == [False, True, False]
    assert "inputs[0].datatype 'FP16'" in out[1].error_message
    # the code a unary call would have failed with, for clients to type the error
    assert out[1].infer_response.parameters["status"].string_param == "INVALID_ARGUMENT"
    assert "status" not in out[0].infer_response.parameters


def test_client_stream_answers_every_batch_in_order_with_typed_failures(
        server: RunningServer, client: AdaptiveClient, images: np.ndarray) -> None:
    poisoned = images[:2].copy()
    poisoned[1, 0, 0, 0] = np.nan  # the client sends it; the server refuses it
    batches = [images[:1], poisoned, images[1:4], images[3:4]]
    out = list(client.infer_stream(batches, variant="slow", timeout=30))
    assert [type(o).__name__ for o in out] == ["InferResult", "InvalidArgument", "InferResult",
                                               "InferResult"]
    assert "NaN" in str(out[1])
    for batch, answer in zip(batches, out, strict=True):  # in order: each answer is its batch's
        if not isinstance(answer, InvalidArgument):
            unary = client.infer(batch, variant="slow", timeout=30)
            assert answer.variant == "slow" and answer.latency_ms > 0
            np.testing.assert_allclose(answer.outputs, unary.outputs, rtol=1e-5, atol=1e-6)
    # a pin the server does not have: every request refused, each typed, the stream unharmed
    refused = list(client.infer_stream([images[:1]] * 3, variant="huge", timeout=30))
    assert len(refused) == 3 and all(isinstance(o, NotFound) for o in refused), refused
    assert "'huge'" in str(refused[0])
    # a batch the client cannot even send ends the stream after the answers before it
    stream = client.infer_stream([images[:1], images[0, 0], images[:1]], variant="slow")
    assert isinstance(next(stream), type(out[0]))
    with pytest.raises(InvalidArgument, match=r"batch shape \[28, 28\]"):
        next(stream)


def _sample_sum(metric: Any, suffix: str, **labels: str) -> float:
    """The sum of ``metric``'s samples named ``…suffix`` that carry these label values."""
    return sum(s.value for m in metric.collect() for s in m.samples
               if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items()))


def _batches(server: RunningServer, variant: str) -> float:
    """How many batches the server has run on ``variant`` (its batch-size histogram's count)."""
    return _sample_sum(server.server.engine.metrics.batch_size, "_count", variant=variant)


def test_one_stream_reads_ahead_so_its_requests_batch_together(
        server: RunningServer, client: AdaptiveClient, images: np.ndarray) -> None:
    """A stream's requests are computed while the next ones are read (in order all the same):
    a client pipelining one stream gets them batched, fewer batches than requests."""
    before = _batches(server, "slow")
    out = list(client.infer_stream([images[:1]] * 200, variant="slow", timeout=60))
    assert len(out) == 200 and all(r.variant == "slow" for r in out)  # type: ignore[union-attr]
    batches = _batches(server, "slow") - before
    assert 0 < batches < 200, batches


def test_a_stream_of_large_batches_reads_ahead_within_the_queue_limit(
        client: AdaptiveClient, images: np.ndarray) -> None:
    """The read-ahead holds a batch's worth of samples, not 32 requests of any size: a client
    pipelining 256-sample batches must get every one answered, as it would sending them one
    by one, not RESOURCE_EXHAUSTED for the 8,192 samples its own read-ahead queued."""
    batch = np.repeat(images[:1], 256, axis=0)
    out = list(client.infer_stream([batch] * 40, variant="slow", timeout=120))
    errors = [r for r in out if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of 40 failed, first: {errors[0]!r}"
    assert len(out) == 40 and all(r.outputs.shape[0] == 256 for r in out)  # type: ignore[union-attr]


def test_a_stream_cancelled_midway_leaves_nothing_counted_in_flight(
        server: RunningServer, images: np.ndarray) -> None:
    """Requests read ahead and not answered when the client cancels are dropped and uncounted:
    a drain waiting for in-flight answers would otherwise wait for ever."""
    req = build_request("servetest", images[:1], variant="slow")
    with grpc.insecure_channel(server.target) as ch:
        stream = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(
            iter([req] * 500), timeout=30)
        assert not next(stream).error_message
        stream.cancel()
    deadline = time.monotonic() + 10
    while server.server.state.answering and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.server.state.answering == 0


def test_an_answer_to_an_abandoned_call_is_one_debug_line_not_a_traceback(
        server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    """gRPC's own report of an answer it could not send (the client's deadline passed while it
    was computed), as gRPC logs it: routine under overload, so no ERROR and no traceback."""
    grpc_log = logging.getLogger(GRPC_LOGGER)
    with caplog.at_level(logging.DEBUG):
        try:
            raise RuntimeError("Failed \"execute_batch\"")  # gRPC logs from an except block
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]",
                               "/inference.GRPCInferenceService/ModelInfer")
        grpc_log.error("something else")  # other gRPC errors still get through
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["something else"]
    assert any("its client had given up" in r.getMessage() and "ModelInfer" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)


def _requests(server: RunningServer, variant: str, status: str) -> float:
    """Requests the server counted as answered by ``variant`` with ``status``."""
    return _sample_sum(server.server.engine.metrics.requests, "_total", variant=variant,
                       status=status)


def test_a_call_whose_deadline_passed_before_it_was_read_is_refused_uncomputed(
        serving_family: Path, images: np.ndarray) -> None:
    """Past saturation calls reach the handler with their deadline spent: each is refused
    DEADLINE_EXCEEDED and counted, never routed or computed (its caller has gone), even where
    late answers are wanted (best-effort). A 1 s reply margin makes a 0.3 s deadline one that
    is spent on arrival (and leaves a slow machine 0.3 s to read the call)."""
    opts = ServeOptions(threads=2, settings=Settings(deadline_margin_ms=1000.0,
                                                     on_miss="best-effort"))
    with serve_in_thread(serving_family, options=opts, metrics=False) as running, \
            grpc.insecure_channel(running.target) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = build_request("servetest", images[:1], variant="slow")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 5  # the client's own deadline may have ended it first
        while not _requests(running, "none", "DEADLINE_EXCEEDED") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _requests(running, "none", "DEADLINE_EXCEEDED") == 1
        assert _batches(running, "slow") == 0  # not computed
        assert stub.ModelInfer(req, timeout=10).model_version == "slow"  # with time to spare
        assert _batches(running, "slow") == 1


def test_reflection_lists_the_services(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "adaptive.v1.AdaptiveService"} <= names


def test_health_is_not_serving_until_warm(serving_family: Path, images: np.ndarray) -> None:
    gate = asyncio.Event()
    with serve_in_thread(serving_family, metrics=False, wait_ready=False,
                         startup_gate=gate) as running, \
            grpc.insecure_channel(running.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert not inference.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert inference.ServerLive(pb.ServerLiveRequest(), timeout=5).live
        with pytest.raises(grpc.RpcError) as err:
            inference.ModelInfer(build_request("servetest", images[:1]), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        running.loop.call_soon_threadsafe(gate.set)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert inference.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        with AdaptiveClient(running.target) as c:
            assert c.ready()


def test_nothing_that_fits_is_shed_at_once(serving_family: Path, images: np.ndarray) -> None:
    with serve_in_thread(serving_family, metrics=False) as running, \
            AdaptiveClient(running.target) as c:
        with pytest.raises(BudgetExceeded,
                           match=r"fastest candidate '(fast|early-exit@0)' would need .*shed"):
            c.infer(images[:1], budget_ms=0.001)
        assert c.infer(images[:1], budget_ms=1000).variant == "slow"
        assert c.infer(images[:1]).variant == "slow"  # no budget: never shed


def test_a_busy_queue_buys_a_cheaper_candidate_for_the_same_budget(
        serving_family: Path, images: np.ndarray) -> None:
    """The router reads the live queues; here ``slow``'s queue is replaced by a fake one holding
    a second of work, since a real backlog of a known size cannot be built reliably in a test."""
    with serve_in_thread(serving_family, metrics=False) as running, \
            AdaptiveClient(running.target) as c:
        engine = running.server.engine
        assert c.infer(images[:1], budget_ms=200).variant == "slow"
        real = engine.load

        def busy() -> Load:
            load = real()
            return replace(load, queues={**load.queues, "slow": QueueState(queued=256, running=32)})

        engine.load = busy
        try:
            cheaper = c.infer(images[:1], budget_ms=200)
            assert cheaper.variant != "slow"
            assert {v.name: v for v in c.variants()}["slow"].queue_ms > 200
        finally:
            engine.load = real
        assert c.infer(images[:1], budget_ms=200).variant == "slow"


def test_stopped_server_is_unavailable(serving_family: Path, images: np.ndarray) -> None:
    with serve_in_thread(serving_family, metrics=False) as running:
        target = running.target
    with AdaptiveClient(target) as c, pytest.raises(Unavailable):
        c.infer(images[:1], timeout=2)


# --- hostile requests: sized by the attacker, refused by size, range or ambiguity ----------------

def _huge_rank(r: pb.ModelInferRequest) -> None:
    r.inputs[0].shape.extend(itertools.repeat(1, 4_000_000))  # a 4 MB message


def _huge_outputs(r: pb.ModelInferRequest) -> None:
    for _ in range(200_000):
        r.outputs.add(name="logits")


def _huge_parameters(r: pb.ModelInferRequest) -> None:
    for k in range(100_000):
        r.parameters[f"p{k}"].double_param = 1.0


def _pixel(value: float) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(r: pb.ModelInferRequest) -> None:
        x = np.frombuffer(r.raw_input_contents[0], "<f4").copy()
        x[100] = value
        r.raw_input_contents[0] = x.tobytes()
    return mutate


def _both_payloads(r: pb.ModelInferRequest) -> None:
    r.inputs[0].contents.fp32_contents.extend(
        np.frombuffer(r.raw_input_contents[0], "<f4").tolist())


def _output_parameter(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name="logits").parameters["classification"].int64_param = 3


def _beyond_the_queue(r: pb.ModelInferRequest) -> None:
    n = Settings().max_queue + 1  # the session server's --max-queue, on an idle server
    r.inputs[0].shape[0] = n
    r.raw_input_contents[0] = np.full((n, 1, 28, 28), 0.5, np.float32).tobytes()


@pytest.mark.parametrize(("mutate", "fragments"), [
    (_huge_rank, ["inputs[0].shape [1, 1, 28, 28, 1, 1, 1, 1, …] (4000004 dims)",
                  "expected [N, 1, 28, 28]"]),
    (_huge_outputs, ["outputs: 200000 entries, at most 16"]),
    (_huge_parameters, ["parameters: 100001 entries, at most 64"]),  # + the budget
    (_pixel(3.4e38), ["outside the input range [0, 1]", "first at flat index 100: 3.4e+38"]),
    (_pixel(-7.0), ["outside the input range [0, 1]", "first at flat index 100: -7.0"]),
    (lambda r: r.raw_input_contents.__setitem__(0, np.full(784, 3.4e38, np.float32).tobytes()),
     ["784 values outside the input range [0, 1]"]),  # NaN/inf logits with status OK before
    (_both_payloads, ["both raw_input_contents and inputs[0].contents.fp32_contents are set",
                      "send one"]),
    (_output_parameter, ["outputs[0].parameters['classification']: unknown output parameter"]),
    (_beyond_the_queue, [f"inputs[0].shape[0] {Settings().max_queue + 1}",
                         f"--max-queue {Settings().max_queue}", "can never run"]),
], ids=["huge-rank", "huge-outputs", "huge-parameters", "pixel-3.4e38", "pixel-negative",
        "saturated-image", "two-payloads", "output-parameter", "batch-beyond-max-queue"])
def test_hostile_requests_are_invalid_and_cheap(server: RunningServer, images: np.ndarray,
                                                 mutate: Callable[[pb.ModelInferRequest], None],
                                                 fragments: list[str]) -> None:
    req = build_request("servetest", images[:1], budget_ms=1000)
    mutate(req)
    with grpc.insecure_channel(server.target, options=channel_options()) as ch:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        elapsed = time.perf_counter() - t
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        details = err.value.details()
        assert len(details) < 400, details[:400]
        for f in fragments:
            assert f in details, details
        assert elapsed < 10, f"refusing it took {elapsed:.1f} s"
        ok = stub.ModelInfer(build_request("servetest", images[:1]), timeout=10)  # still serving
        assert np.isfinite(np.frombuffer(ok.raw_output_contents[0], "<f4")).all()
