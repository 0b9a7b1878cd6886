"""`AdaptiveClient`: send images with a latency budget, get logits and the routing decision back.

Speaks the KServe v2 protocol (any KServe v2 server answers `infer`; the variant and exit fields
are filled by ours). gRPC failures become the typed errors of `server.errors` (``NotFound``,
``InvalidArgument``, ``BudgetExceeded``, ``Unavailable``, …), matched by status code.

Budget and deadline: ``budget_ms`` travels as the `protos.wire.BUDGET_PARAM` request parameter
and is what the router plans for. The gRPC deadline follows it: ``timeout`` if given, else twice the
budget plus 50 ms, so a best-effort answer that misses its budget still arrives (and is reported
as missed) instead of being cut off; without a budget the deadline is ``timeout`` or none.

Security: ``root_certificates`` (the server's CA, PEM bytes or a path) turns TLS on; adding
``client_cert`` and ``client_key`` presents a client certificate (mutual TLS); ``token`` sends
``authorization: Bearer <token>`` on every call. Several servers: a ``dns:///name:port`` target (a
headless Service) or ``ipv4:HOST1:P1,HOST2:P2`` with ``load_balancing="round_robin"`` spreads
requests over all of them; calls refused with UNAVAILABLE (a replica shutting down, or gone) are
retried on the next one by gRPC's retry policy (inference is idempotent). One server with
``serve --workers N``: ``connections=M`` opens M TCP connections and sends round-robin over them
(the workers share the port and the kernel spreads connections, not requests, over them).

Overload: ``infer`` throttles itself (`client.throttle`: on by default, ``throttle=None`` turns
it off). While more than 5 % of its recent requests were refused by the server (shed, late,
overloaded or unreachable), it refuses a share of new ones locally with `Throttled` (an
`Overloaded`) instead of sending them — Envoy's admission control, steered further on the
refusals the server says were load's (trailer ``adaptive-refusal``) until about 5 % of what it
sends is refused: a refusal costs the server nearly what an answer does, and refusals nobody
sends leave it the cycles to answer the rest. A budget the server says no idle server could meet
(``adaptive-refusal: budget``, `AdaptiveError.refusal`) never throttles. Streams
(``infer_stream``) are one call each and are not throttled.
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.throttle import AdaptiveThrottle, ThrottleConfig
from protos import wire
from protos.generated import adaptive_pb2 as apb
from protos.generated import adaptive_pb2_grpc, grpc_service_pb2_grpc
from protos.generated import grpc_service_pb2 as pb
from server.errors import AdaptiveError, InvalidArgument, from_code

_ids = itertools.count(1)
DEFAULT_THROTTLE = ThrottleConfig()  # frozen: one shared default is safe


@dataclass(frozen=True)
class InferResult:
    """One answered request."""

    outputs: np.ndarray  # logits [N, classes]
    classes: np.ndarray  # predicted class index per sample [N]
    variant: str  # the variant that answered
    exit: int | None  # deepest early exit used (early-exit network), else None
    latency_ms: float  # round trip seen by the client
    queue_ms: float | None  # server side: time in the batch queue
    compute_ms: float | None  # server side: the batch's compute time
    budget_ms: float | None  # the budget the server planned for
    exits: tuple[int, ...] | None = None  # per-sample exits when N > 1
    retried_from: str | None = None  # the server retried this request after that variant failed
    device: str = wire.CPU  # where it ran: "cpu", or "cuda" when a GPU lane answered

    @property
    def candidate(self) -> str:
        """Who answered, as the server names its routing candidates: ``variant``,
        ``variant@exit``, and on a GPU lane ``cuda:variant``."""
        return wire.placed_name(wire.candidate_name(self.variant, self.exit), self.device)

    @property
    def probabilities(self) -> np.ndarray:
        """Softmax of the logits [N, classes]."""
        z = np.exp(self.outputs - self.outputs.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    @property
    def met(self) -> bool | None:
        """Did the answer arrive inside the requested budget (None without a budget)?"""
        return None if self.budget_ms is None else self.latency_ms <= self.budget_ms


@dataclass(frozen=True)
class VariantInfo:
    """One row of the server's variant table."""

    name: str
    variant: str
    method: str
    exit: int | None
    accuracy: float
    predicted_p50_ms: float
    predicted_p95_ms: float
    queue_ms: float


def as_batch(images: np.ndarray) -> np.ndarray:
    """[C, H, W] or [N, C, H, W] → contiguous float32 [N, C, H, W]; uint8 pixels scaled to [0, 1]."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InvalidArgument(f"batch shape {list(x.shape)!r}: expected [N, C, H, W] or [C, H, W]")
    return np.ascontiguousarray(x, dtype=np.float32)


def build_request(model: str, x: np.ndarray, *, budget_ms: float | None = None,
                  variant: str | None = None, input_name: str = "input",
                  request_id: str | None = None) -> pb.ModelInferRequest:
    """A ModelInferRequest with ``x`` as raw FP32 and the budget as a request parameter."""
    req = pb.ModelInferRequest(model_name=model, model_version=variant or "",
                               id=request_id or str(next(_ids)))
    t = req.inputs.add()
    t.name, t.datatype = input_name, "FP32"
    t.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    if budget_ms is not None:
        req.parameters[wire.BUDGET_PARAM].double_param = float(budget_ms)
    return req


def parse_response(resp: pb.ModelInferResponse, latency_ms: float) -> InferResult:
    out = resp.outputs[0]
    shape = tuple(out.shape)
    if resp.raw_output_contents:
        logits = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(shape)
    else:
        logits = np.asarray(out.contents.fp32_contents, np.float32).reshape(shape)
    p = resp.parameters

    def num(key: str) -> float | None:
        return p[key].double_param if key in p else None

    def text(key: str) -> str | None:
        return p[key].string_param if key in p else None

    exits, variant = text(wire.EXITS_PARAM), text(wire.VARIANT_PARAM)
    return InferResult(
        outputs=logits, classes=logits.argmax(axis=1),
        # any KServe v2 server names the answering version; ours also sets the parameter
        variant=resp.model_version if variant is None else variant,
        exit=int(p[wire.EXIT_PARAM].int64_param) if wire.EXIT_PARAM in p else None,
        latency_ms=latency_ms, queue_ms=num(wire.QUEUE_MS_PARAM),
        compute_ms=num(wire.COMPUTE_MS_PARAM), budget_ms=num(wire.BUDGET_PARAM),
        exits=None if exits is None else tuple(int(e) for e in exits.split(",")),
        retried_from=text(wire.RETRIED_FROM_PARAM), device=text(wire.DEVICE_PARAM) or wire.CPU)


def deadline_s(budget_ms: float | None, timeout: float | None) -> float | None:
    """The gRPC deadline for a request (see the module docstring)."""
    if timeout is not None:
        return timeout
    return None if budget_ms is None else 2 * budget_ms / 1e3 + 0.05


# What gRPC's core says when it refuses a call before any handler ran: the server's backlog was
# full (serve --backlog), or the server was stopping.
REFUSED_DETAILS = "CANCELLED"


def error_from(exc: grpc.RpcError) -> AdaptiveError:
    """The typed error for a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.CANCELLED and details == REFUSED_DETAILS:
        details = ("the server refused the call before reading it: its backlog of unread calls "
                   "was full (serve --backlog) or it was stopping; retry after a back-off or on "
                   "another replica")
    return from_code(code.name, details or code.name, refusal_of(exc))


def refusal_of(exc: grpc.RpcError) -> str | None:
    """The cause a refused call's trailers give (`wire.REFUSAL_KEY`: load or the budget); None
    when it gave none (not a refusal, or a server that does not say)."""
    trailers = getattr(exc, "trailing_metadata", None)
    for key, value in (trailers() if callable(trailers) else None) or ():
        if key == wire.REFUSAL_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def service_config(load_balancing: str | None, retry_unavailable: bool = True) -> str:
    """The channel's gRPC service config: balancing policy and a retry policy for UNAVAILABLE."""
    cfg: dict[str, Any] = {}
    if load_balancing:
        cfg["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry_unavailable:
        cfg["methodConfig"] = [{
            "name": [{"service": "inference.GRPCInferenceService"},
                     {"service": "adaptive.v1.AdaptiveService"}],
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]
    return json.dumps(cfg)


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class AdaptiveClient:
    """A blocking client for an adaptive inference server (or several, see the module docstring).

    ``tls=True`` without ``root_certificates`` trusts the system's CAs.
    """

    def __init__(self, target: str, *, model: str | None = None,
                 options: list[tuple[str, Any]] | None = None,
                 root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None,
                 token: str | None = None, tls: bool | None = None,
                 load_balancing: str | None = None, retry_unavailable: bool = True,
                 connections: int = 1,
                 throttle: ThrottleConfig | None = DEFAULT_THROTTLE) -> None:
        if connections < 1:
            raise InvalidArgument(f"connections {connections!r}: at least 1")
        self.target = target
        if load_balancing is None and target.startswith("dns:"):
            load_balancing = "round_robin"  # a headless Service resolves to every replica
        opts: list[tuple[str, Any]] = [
            # Answers up to the wire limit. No send cap: what a request may weigh is the
            # server's to say (serve --max-message-mb), and it answers RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
            ("grpc.service_config", service_config(load_balancing, retry_unavailable)),
            # Channels with equal arguments share one subchannel, so one TCP connection: each
            # of several connections needs a subchannel pool of its own.
            *([("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []),
            *(options or [])]
        if (client_cert is None) != (client_key is None):
            raise InvalidArgument("client_cert and client_key go together (mutual TLS)")
        if tls or root_certificates is not None or client_cert is not None:
            creds = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(client_key),
                                                 _pem(client_cert))
            self._channels = [grpc.secure_channel(target, creds, options=opts)
                              for _ in range(connections)]
        else:
            self._channels = [grpc.insecure_channel(target, options=opts)
                              for _ in range(connections)]
        self._channel = self._channels[0]  # discovery and health
        # Sent as plain metadata (not call credentials, which gRPC sends only over TLS), so a
        # token also works over a loopback plaintext channel.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())
        self._infers = [grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch) for ch in self._channels]
        self._infer = self._infers[0]
        self._turn = itertools.count()  # next() on it is atomic: threads may share the client
        self._adaptive = adaptive_pb2_grpc.AdaptiveServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._model = model
        self._input_name = "input"
        self.throttle = AdaptiveThrottle(throttle) if throttle is not None else None

    # --- the main call -------------------------------------------------------------------------

    def infer(self, batch: np.ndarray, budget_ms: float | None = None, variant: str | None = None,
              timeout: float | None = None) -> InferResult:
        """Classify ``batch`` ([N, C, H, W] or [C, H, W]) inside ``budget_ms`` if given;
        ``variant`` pins a variant (or ``variant@exit``) instead of letting the server choose."""
        if budget_ms is not None and not budget_ms > 0:
            raise InvalidArgument(f"budget_ms {budget_ms!r}: must be positive")
        x = as_batch(batch)
        req = build_request(self.model, x, budget_ms=budget_ms, variant=variant,
                            input_name=self._input_name)
        throttle = self.throttle
        sent_at = None
        if throttle is not None:
            if not throttle.admit():
                raise throttle.refusal()
            sent_at = throttle.now()
        t0 = time.perf_counter()
        try:
            resp = self._next().ModelInfer(req, timeout=deadline_s(budget_ms, timeout),
                                           metadata=self._metadata)
        except grpc.RpcError as exc:
            err = error_from(exc)
            if throttle is not None:
                throttle.record_status(err.code, err.refusal, sent_at=sent_at)
            raise err from None
        if throttle is not None:
            throttle.record(True, sent_at=sent_at)
        return parse_response(resp, (time.perf_counter() - t0) * 1e3)

    def infer_stream(self, batches: Iterable[np.ndarray], budget_ms: float | None = None,
                     variant: str | None = None, timeout: float | None = None
                     ) -> Iterator[InferResult | AdaptiveError]:
        """Classify each of ``batches`` over one ``ModelStreamInfer`` stream; one answer per
        batch, in order.

        For throughput: the requests go out as fast as gRPC's flow control lets them, without
        waiting for answers; the server reads ahead, batches them and answers in order, for
        less than half the server CPU of a unary call each (docs/serving.md, "Streams"). One
        stream is served by one server process: to spread over ``--workers``, open several (one
        per thread) on a client with ``connections`` (each takes the next connection). A
        request that fails (shed: `BudgetExceeded`, a bad batch: `InvalidArgument`) yields its
        typed error in its place and the stream goes on; a failure of the stream itself is
        raised, and so is a batch the client cannot send (wrong rank) or an error of
        ``batches`` itself, after the answers to the batches before it.

        ``budget_ms`` applies to each request from when the server reads it (time queued in the
        stream before that does not count); ``timeout``: the deadline of the whole stream;
        ``latency_ms`` of an answer: from its request's send to its arrival.
        """
        if budget_ms is not None and not budget_ms > 0:
            raise InvalidArgument(f"budget_ms {budget_ms!r}: must be positive")
        sent: collections.deque[float] = collections.deque()  # send times, oldest first
        failed: list[Exception] = []  # what stopped the requests, raised after their answers

        def requests() -> Iterator[pb.ModelInferRequest]:
            # Consumed on gRPC's own thread, where an exception would only cancel the stream:
            # keep it for the caller and end the requests here instead.
            try:
                for batch in batches:
                    req = build_request(self.model, as_batch(batch), budget_ms=budget_ms,
                                        variant=variant, input_name=self._input_name)
                    sent.append(time.perf_counter())
                    yield req
            except Exception as exc:
                failed.append(exc)

        try:
            for answer in self._next().ModelStreamInfer(requests(), timeout=timeout,
                                                        metadata=self._metadata):
                latency_ms = (time.perf_counter() - sent.popleft()) * 1e3
                resp = answer.infer_response
                if answer.error_message:
                    p = resp.parameters
                    code = p[wire.STATUS_PARAM].string_param if wire.STATUS_PARAM in p else ""
                    refusal = p[wire.REFUSAL_KEY].string_param if wire.REFUSAL_KEY in p else None
                    yield from_code(code or "UNKNOWN", answer.error_message, refusal)
                else:
                    yield parse_response(resp, latency_ms)
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        if failed:
            raise failed[0]

    # --- discovery -----------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The model (family) name, asked from the server once."""
        if self._model is None:
            self._model = self._call(self._adaptive.ModelVariants,
                                     apb.ModelVariantsRequest()).name
        return self._model

    def metadata(self) -> pb.ModelMetadataResponse:
        return self._call(self._infer.ModelMetadata, pb.ModelMetadataRequest(name=self.model))

    def variants(self, batch_size: int = 1) -> list[VariantInfo]:
        """The server's variant table with predicted latencies now."""
        resp = self._call(self._adaptive.ModelVariants,
                          apb.ModelVariantsRequest(name=self.model, batch_size=batch_size))
        return [VariantInfo(c.name, c.variant, c.method, None if c.exit < 0 else c.exit,
                            c.accuracy, c.predicted_p50_ms, c.predicted_p95_ms, c.queue_ms)
                for c in resp.candidates]

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, … or UNREACHABLE."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def ready(self) -> bool:
        """Health SERVING (loaded, warmed up, re-measured)?"""
        return self.health() == "SERVING"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server reports SERVING (streams health, no polling loop)."""
        try:
            for channel in self._channels:  # every connection, so each worker has its share
                grpc.channel_ready_future(channel).result(timeout=timeout)
            stream = self._health.Watch(health_pb2.HealthCheckRequest(service=""),
                                        timeout=timeout, metadata=self._metadata)
            for resp in stream:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    stream.cancel()
                    return
        except grpc.FutureTimeoutError:
            raise from_code("UNAVAILABLE", f"{self.target}: not reachable in {timeout} s"
                            ) from None
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        raise from_code("UNAVAILABLE", f"{self.target}: health stream ended before SERVING")

    # --- plumbing ------------------------------------------------------------------------------

    def _next(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
        """The next connection's stub, round-robin."""
        return self._infers[next(self._turn) % len(self._infers)]

    def _call(self, method: Any, request: Any, timeout: float = 10.0) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> AdaptiveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
