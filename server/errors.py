"""Serving errors: one shallow tree, each class bound to the gRPC status code it travels as.

The server raises these; the servicer turns any of them into its status code and message, and
the client turns a status code back into the same class, so a user catches
`client.InvalidArgument` for what the server rejected as INVALID_ARGUMENT. The code names live
here only (as strings: this module stays free of grpc so the pure router can raise them).
Messages name the field and show the bad value with ``!r``.
"""

from __future__ import annotations

from protos.wire import LOAD


class AdaptiveError(Exception):
    """Base class: a request failed for a reason the caller can act on."""

    code = "UNKNOWN"
    # A refusal's cause as the server tells clients (`wire.REFUSAL_KEY`): LOAD or BUDGET; None for
    # what is not a refusal.
    refusal: str | None = None


class InvalidArgument(AdaptiveError):
    """A request field is malformed: wrong shape, datatype, size or parameter value."""

    code = "INVALID_ARGUMENT"


class NotFound(AdaptiveError):
    """The request names a model or variant this server does not host."""

    code = "NOT_FOUND"


class BudgetExceeded(AdaptiveError):
    """No candidate can finish inside the latency budget, or the deadline has passed."""

    code = "DEADLINE_EXCEEDED"
    refusal: str | None = LOAD  # the deadline passed while it waited to be read or computed


class Shed(BudgetExceeded):
    """Refused at once: under the current load not even the fastest candidate can finish inside
    the budget, so computing it would only delay requests that can."""

    def __init__(self, remaining_ms: float, candidate: str, wait_ms: float, compute_ms: float,
                 overhead_ms: float, margin_ms: float, *, least_ms: float = 0.0) -> None:
        # The message is written only when read: under overload most requests are shed, and
        # formatting six numbers costs more than the routing decision itself.
        super().__init__()
        self.remaining_ms, self.candidate = remaining_ms, candidate
        self.parts = (wait_ms, compute_ms, overhead_ms, margin_ms)
        # The least compute of any candidate it could have had, uncontended: a budget the
        # request stated below this is its own fault (the engine then says BUDGET), not load's.
        self.least_ms = least_ms

    def __str__(self) -> str:
        wait, compute, overhead, margin = self.parts
        return (f"latency budget: {max(self.remaining_ms, 0.0):.3f} ms left, the fastest "
                f"candidate {self.candidate!r} would need {wait + compute + overhead + margin:.3f} "
                f"ms now (wait {wait:.3f} + compute {compute:.3f} + overhead {overhead:.3f} + "
                f"safety margin {margin:.3f}); shed at once rather than queued")


class Overloaded(AdaptiveError):
    """A queue is full; retry later or with a larger budget."""

    code = "RESOURCE_EXHAUSTED"
    refusal: str | None = LOAD


class Throttled(Overloaded):
    """Refused by the client itself, never sent: the server has been refusing this client's
    requests, and the client's adaptive throttle (`client.throttle`) keeps a share of new ones
    off the wire until it answers again."""

    refusal = None  # the client's own, not the server's word


class Unavailable(AdaptiveError):
    """The server is not ready yet, is shutting down, or cannot be reached."""

    code = "UNAVAILABLE"


class Unauthenticated(AdaptiveError):
    """The request carries no valid credentials (``--auth-token-file``: a bearer token)."""

    code = "UNAUTHENTICATED"


class Cancelled(AdaptiveError):
    """The caller cancelled the request."""

    code = "CANCELLED"


class InternalError(AdaptiveError):
    """The server failed on a valid request (a bug or a runtime failure); see its log."""

    code = "INTERNAL"


class VariantFailed(InternalError, RuntimeError):
    """A variant's runner raised or hung on a batch; the engine retries the request elsewhere.
    (Also a RuntimeError: that is what a runner failure surfaced as before retries existed.)"""

    def __init__(self, variant: str, reason: str) -> None:
        super().__init__(f"variant {variant!r} failed: {reason}")
        self.variant = variant


_BY_CODE: dict[str, type[AdaptiveError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, BudgetExceeded, Overloaded, Unavailable,
                              Unauthenticated, Cancelled, InternalError)
}


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages travel in gRPC trailers, so a
    megabyte of client-supplied text must not be echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def from_code(code_name: str, message: str, refusal: str | None = None) -> AdaptiveError:
    """The error class for a gRPC status code name (e.g. ``"NOT_FOUND"``), carrying ``message``
    and ``refusal``, the cause the server gave for a refusal (None: it gave none)."""
    err = _BY_CODE.get(code_name, AdaptiveError)(message)
    err.refusal = refusal  # the server's word only, never the class's default
    return err
