"""The gRPC services, kept thin: decode → engine → encode.

`InferenceServicer` is the KServe v2 ``inference.GRPCInferenceService``; `AdaptiveServicer` adds
the variant table. Every `AdaptiveError` becomes its gRPC status in one place (`_status`), with
the error's message as the details; anything else is an INTERNAL error and is logged.

`add_services` registers both with tolerant request decoding: bytes that are not a valid protobuf
of the method's type reach the handler as `Malformed` and are answered INVALID_ARGUMENT (gRPC's own
deserializer would answer INTERNAL, which tells the client nothing). While the server drains for
shutdown (`ServingState.draining`) new inference requests are refused with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import grpc

from protos import wire
from protos.generated import adaptive_pb2 as apb
from protos.generated import adaptive_pb2_grpc, grpc_service_pb2_grpc
from protos.generated import grpc_service_pb2 as pb
from server.codec import ModelSpec, decode_infer, encode_infer
from server.engine import Engine
from server.errors import AdaptiveError, InvalidArgument, NotFound, Unavailable, shown
from server.streams import ordered

log = logging.getLogger(__name__)

SERVER_NAME = "adaptive-inference"
# How far ModelStreamInfer reads ahead of its answers: at most this many requests, and payload
# bytes for a batch's worth of samples (`_stream_window_bytes`; beyond it, one at a time).
STREAM_WINDOW = 32
STREAM_ENVELOPE_BYTES = 512  # a request's bytes besides its pixels: names, id, shape, parameters
EXTENSIONS = ["model_metadata", "adaptive_latency_budget"]

try:
    SERVER_VERSION = version("adaptive-inference")
except PackageNotFoundError:  # running from a checkout that is not installed
    SERVER_VERSION = "0+unknown"


@dataclass
class ServingState:
    """What the services share; ``engine`` is set once the family is loaded and warmed up."""

    engine: Engine | None = None
    spec: ModelSpec | None = None
    margin_ms: float = 0.5
    versions: list[str] = field(default_factory=list)  # variants, then variant@exit depths
    draining: bool = False  # SIGTERM received: refuse new requests, finish in-flight ones
    # Calls admitted before the drain whose answer is not on the wire yet: the drain waits for
    # them before the process ends (refusals need no waiting: a lost one reads UNAVAILABLE too).
    answering: int = 0
    _answered: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def admit(self) -> bool:
        """Count a call whose answer the drain must wait for; False (not counted) once the
        drain began: such a call is refused, and a refusal needs no waiting."""
        if self.draining:
            return False
        self.answering += 1
        self._answered.clear()
        return True

    def answered_one(self, *_context: object) -> None:
        self.answering -= 1
        if not self.answering:
            self._answered.set()

    async def answered(self) -> None:
        """Return once every admitted call's answer has been sent."""
        if self.answering:
            await self._answered.wait()

    def ready_engine(self) -> tuple[Engine, ModelSpec]:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.engine is None or self.spec is None:
            raise Unavailable("the server is still loading and warming up its model family")
        return self.engine, self.spec


@dataclass(frozen=True)
class Malformed:
    """A request body that did not parse as the method's protobuf message."""

    message: str  # the expected message type
    size: int
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request body: {self.size} bytes are not a valid {self.message} "
                               f"protobuf ({shown(self.reason)})")


def _tolerant(deserialize: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything else a hostile body provokes
            return Malformed(message, len(data), f"{type(exc).__name__}: {exc}")
    return parse


class _Capture:
    """Stands in for a server to catch the handlers a generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_services(server: grpc.aio.Server, state: ServingState) -> list[str]:
    """Register the inference and adaptive services with tolerant decoding; returns their names."""
    names = []
    for add, servicer, messages in (
            (grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
             InferenceServicer(state), pb),
            (adaptive_pb2_grpc.add_AdaptiveServiceServicer_to_server, AdaptiveServicer(state),
             apb)):
        cap = _Capture()
        add(servicer, cap)
        service = messages.DESCRIPTOR.services_by_name[cap.service.rsplit(".", 1)[-1]]
        handlers = {}
        for method, h in cap.handlers.items():
            expected = service.methods_by_name[method].input_type.full_name
            handlers[method] = h._replace(
                request_deserializer=_tolerant(h.request_deserializer, expected))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(cap.service, handlers),))
        server.add_registered_method_handlers(cap.service, handlers)
        names.append(cap.service)
    return names


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to gRPC status codes."""
    if isinstance(exc, AdaptiveError):
        return grpc.StatusCode[exc.code] if exc.code in grpc.StatusCode.__members__ \
            else grpc.StatusCode.UNKNOWN, str(exc)
    log.error("unhandled error in a handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _refusal(exc: BaseException) -> str | None:
    """What refused the call, load or its budget (`wire.REFUSAL_KEY`); None: not a refusal."""
    return exc.refusal if isinstance(exc, AdaptiveError) else None


T = TypeVar("T")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[T]]


def _mapped(fn: Handler[T]) -> Handler[T]:
    """Run a unary handler; abort with the mapped status on any error."""
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            if self.state.admit():  # runs on the loop, so no drain starts in between
                context.add_done_callback(self.state.answered_one)  # once the status is sent
            if isinstance(request, Malformed):
                raise request.error()
            return await fn(self, request, context)
        except Exception as exc:  # AbortError passes through context.abort below unchanged
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, details = _status(exc)
            refusal = _refusal(exc)
            await context.abort(code, details, () if refusal is None else
                                ((wire.REFUSAL_KEY, refusal),))
            raise AssertionError("unreachable") from None  # abort() always raises
    return wrapper


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Triton inference protocol over the adaptive engine."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    @_mapped
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_mapped
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.engine is not None and not self.state.draining)

    @_mapped
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        s = self.state
        ready = (s.engine is not None and s.spec is not None and not s.draining
                 and request.name == s.spec.name
                 and (not request.version or _known_version(request.version, s.versions)))
        return pb.ModelReadyResponse(ready=ready)

    @_mapped
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    @_mapped
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        _engine, spec = self.state.ready_engine()
        _check_model(request.name, request.version, spec, self.state.versions)
        return pb.ModelMetadataResponse(
            name=spec.name, versions=self.state.versions, platform="onnxruntime_onnx",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=spec.input_name, datatype="FP32", shape=[-1, *spec.input_shape])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=spec.output_name, datatype="FP32", shape=[-1, spec.num_classes])])

    @_mapped
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining(), alone=True)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Triton's convention: a failed request is an error_message in the stream, not the end
        # (its status code rides along as the `status` parameter). Answers come in request
        # order; the requests are read ahead and computed concurrently (`server.streams`), so a
        # client pipelining one stream gets them batched together.
        async def answer(request: pb.ModelInferRequest | Malformed) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context.time_remaining()))
            except Exception as exc:
                code, details = _status(exc)
                echo = (pb.ModelInferResponse() if isinstance(request, Malformed) else
                        pb.ModelInferResponse(model_name=request.model_name, id=request.id))
                echo.parameters[wire.STATUS_PARAM].string_param = code.name
                if (refusal := _refusal(exc)) is not None:
                    echo.parameters[wire.REFUSAL_KEY].string_param = refusal
                return pb.ModelStreamInferResponse(error_message=details, infer_response=echo)

        async with contextlib.aclosing(ordered(
                request_iterator, answer, window=STREAM_WINDOW,
                max_bytes=_stream_window_bytes(self.state),
                size=_size, admit=self.state.admit, done=self.state.answered_one)) as answers:
            async for response in answers:
                yield response

    async def _infer(self, request: pb.ModelInferRequest | Malformed,
                     time_remaining: float | None, *, alone: bool = False
                     ) -> pb.ModelInferResponse:
        # alone: a unary call (one per loop turn), not one of a stream's read-ahead requests
        received = time.monotonic()  # the engine's clock: the budget runs from here
        engine, spec = self.state.ready_engine()
        if isinstance(request, Malformed):
            engine.rejected(request.error())
            raise request.error()
        try:
            # --max-queue bounds a variant's queue, so a larger request could never be queued:
            # the router would answer RESOURCE_EXHAUSTED "retry later" forever; decoding says why.
            call = decode_infer(request, spec, time_remaining_s=time_remaining,
                                margin_ms=self.state.margin_ms, received=received,
                                max_queue=engine.settings.max_queue)
        except AdaptiveError as exc:
            engine.rejected(exc)
            raise
        return encode_infer(request, spec, await engine.infer(call, alone=alone))


class AdaptiveServicer(adaptive_pb2_grpc.AdaptiveServiceServicer):
    """The variant table: what the router can choose from and what it predicts now."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    @_mapped
    async def ModelVariants(self, request: apb.ModelVariantsRequest,
                            context: grpc.aio.ServicerContext) -> apb.ModelVariantsResponse:
        engine, spec = self.state.ready_engine()
        if request.name and request.name != spec.name:
            raise NotFound(f"name {shown(request.name)}: this server hosts {spec.name!r}")
        batch = min(max(int(request.batch_size), 1), wire.MAX_REQUEST_BATCH)
        resp = apb.ModelVariantsResponse(name=spec.name)
        for c, d, p95 in engine.table(batch):
            v = engine.family.variant(c.variant)
            resp.candidates.add(
                name=c.name, variant=c.variant, method=v.method,
                exit=-1 if c.exit is None else c.exit, accuracy=c.accuracy,
                predicted_p50_ms=d.compute_ms, predicted_p95_ms=p95, queue_ms=d.queue_ms,
                size_bytes=v.size_bytes, macs=v.macs)
            resp.load_factor = d.slowdown
        return resp


def _stream_window_bytes(state: ServingState) -> int:
    """One stream's read-ahead in payload bytes: ``--max-batch`` FP32 samples (UINT8 ones are a
    quarter the size), so that a pipelining client fills a batch but never a variant's queue on
    its own: 32 requests of 256 samples would put 8,192 samples against ``--max-queue``'s 1,024,
    and the client would be refused RESOURCE_EXHAUSTED for its own read-ahead."""
    engine, spec = state.engine, state.spec
    if engine is None or spec is None:  # still loading: every request is answered UNAVAILABLE
        return wire.MAX_MESSAGE_BYTES
    pixels = engine.settings.max_batch * math.prod(spec.input_shape) * 4
    return min(pixels + STREAM_WINDOW * STREAM_ENVELOPE_BYTES, wire.MAX_MESSAGE_BYTES)


def _size(request: pb.ModelInferRequest | Malformed) -> int:
    return request.size if isinstance(request, Malformed) else request.ByteSize()


def _known_version(version_: str, versions: list[str]) -> bool:
    return version_ in versions


def _check_model(name: str, version_: str, spec: ModelSpec, versions: list[str]) -> None:
    if name != spec.name:
        raise NotFound(f"name {shown(name)}: this server hosts {spec.name!r}")
    if version_ and not _known_version(version_, versions):
        raise NotFound(f"version {shown(version_)}: no such variant; versions: {versions}")
