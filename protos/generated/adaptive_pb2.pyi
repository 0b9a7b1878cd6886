from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelVariantsRequest(_message.Message):
    __slots__ = ("name", "batch_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    batch_size: int
    def __init__(self, name: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("name", "variant", "method", "exit", "accuracy", "predicted_p50_ms", "predicted_p95_ms", "queue_ms", "size_bytes", "macs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P50_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    name: str
    variant: str
    method: str
    exit: int
    accuracy: float
    predicted_p50_ms: float
    predicted_p95_ms: float
    queue_ms: float
    size_bytes: int
    macs: int
    def __init__(self, name: _Optional[str] = ..., variant: _Optional[str] = ..., method: _Optional[str] = ..., exit: _Optional[int] = ..., accuracy: _Optional[float] = ..., predicted_p50_ms: _Optional[float] = ..., predicted_p95_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., size_bytes: _Optional[int] = ..., macs: _Optional[int] = ...) -> None: ...

class ModelVariantsResponse(_message.Message):
    __slots__ = ("name", "candidates", "load_factor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    load_factor: float
    def __init__(self, name: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., load_factor: _Optional[float] = ...) -> None: ...
