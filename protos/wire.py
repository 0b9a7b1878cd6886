"""The wire contract beyond the .proto files: parameter names, candidate names, message limits.

KServe v2 carries routing in free-form ``parameters`` maps; both the server (decoding, encoding)
and the client library (building, parsing) import the names from here, so they cannot drift.
gRPC-free and protobuf-free: importing this module costs nothing.
"""

from __future__ import annotations

# --- request parameters --------------------------------------------------------------------------
BUDGET_PARAM = "latency_budget_ms"  # double, integer or numeric string: the latency budget
TIMEOUT_PARAM = "timeout"  # Triton's per-request timeout, microseconds

# --- response parameters ------------------------------------------------------------------------
VARIANT_PARAM = "variant"  # the variant that answered (also the response's model_version)
EXIT_PARAM = "exit"  # int64: the deepest early exit used
EXITS_PARAM = "exits"  # "0,2,1": per-sample exits, when the request had more than one sample
QUEUE_MS_PARAM = "queue_ms"  # double: time the request waited for its batch
COMPUTE_MS_PARAM = "compute_ms"  # double: time its batch computed
RETRIED_FROM_PARAM = "retried_from"  # the variant that failed first; this answer is its retry
DEVICE_PARAM = "device"  # where it ran, when not the CPU: "cuda" (a GPU lane)
# On a ModelStreamInfer response that carries an error_message: the gRPC status code name the same
# request would have failed with as a unary call ("DEADLINE_EXCEEDED"), so clients can type it.
STATUS_PARAM = "status"

# --- trailing metadata --------------------------------------------------------------------------
# On a refused unary call: why, so a client steers its sending by what load refuses and not by
# budgets no candidate could meet on an idle server (`client.throttle`). LOAD: shed for the wait
# it would have had, expired queued or unread, or a full queue; BUDGET: below the fastest
# candidate's own compute with nothing else running.
REFUSAL_KEY = "adaptive-refusal"
LOAD, BUDGET = "load", "budget"

# --- limits -------------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 64 << 20  # gRPC send/receive limit on both sides
MAX_REQUEST_BATCH = 4096  # samples in one request
MAX_BUDGET_MS = 3_600_000.0  # an hour: anything longer is a unit mistake, not a budget

# --- names -------------------------------------------------------------------------------------
EXIT_SEPARATOR = "@"
DEVICE_SEPARATOR = ":"
CPU = "cpu"  # the default placement: candidates on it carry no device prefix


def candidate_name(variant: str, exit_index: int | None = None) -> str:
    """A routing candidate as clients see it: ``full``, or ``early-exit@1`` for an exit depth."""
    return variant if exit_index is None else f"{variant}{EXIT_SEPARATOR}{exit_index}"


def placed_name(name: str, device: str = CPU) -> str:
    """A candidate or queue on a device: ``full`` on the CPU, ``cuda:full`` on a GPU lane."""
    return name if device == CPU else f"{device}{DEVICE_SEPARATOR}{name}"


def device_of(name: str) -> str:
    """The device a candidate or lane name is placed on: ``cuda:full`` → ``cuda``; a name
    without a device prefix (``full``, ``early-exit@1``) is on the CPU. `placed_name` inverted."""
    prefix, sep, _ = name.partition(DEVICE_SEPARATOR)
    return prefix if sep else CPU


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options for our message size limit."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
