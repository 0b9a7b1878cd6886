"""Client-side adaptive throttling: stop sending what an overloaded server would refuse anyway.

Past saturation a server that refuses what it cannot answer in time still pays gRPC's per-call
path for every refusal: here 0.25 ms of CPU against 0.45 ms for an answer (`bench/ceiling.py`).
At twice its peak rate the refusals alone take the capacity, and goodput collapses however well
the router sheds. The remedy is the one Google's SRE book gives for servers whose refusals are
not much cheaper than their answers ("Handling Overload", client-side throttling), and that
Envoy's admission-control filter implements: each client counts, over a sliding window, the
requests it sent and those the server accepted, and refuses new ones locally — before anything
goes on the wire — with probability

    p = max(0, (requests - accepts / threshold) / (requests + 1)),  at most ``max_reject``.

While at least ``threshold`` of the requests are accepted ``p`` is 0: a healthy server never sees
the throttle, nor does a client with fewer than ``min_requests`` outcomes in the window. Under
overload ``p`` follows the refused share (half refused: 47 % kept back), so what reaches the
server falls from the offered rate towards what it can answer (at twice its capacity, to about
1.45 times it): its cycles go to answers, not to refusals. ``max_reject`` keeps some requests
going out so the client sees the server recover. The defaults are Envoy's (success-rate
threshold 95 %, 30 s window, rejection at most 80 %), not fitted to any figure here;
``min_requests`` (100) is ours: Envoy's filter sits in a proxy that sees many clients' traffic,
a client library may send three requests.

That formula settles where a refused share remains: at twice the server's capacity a third of
what is sent, ~0.45 of an answer's CPU each, so the server answers ~80 % of its peak. So the
client also *steers* on the refusals that are load's: once per ``interval_s`` (with at least
`STEP_OUTCOMES` outcomes since the last step) it moves the logarithm of the share it sends by
``gain`` × (the share refused for load − (1 − ``threshold``)), so what it sends follows what the
server answers whatever the overload (settling above the 5 %: docs/serving.md, Overload). A step
counts only the outcomes of what was sent since the step before (once per round trip, as TCP
cuts its window): at an overload's onset the server still drains what came before, and those
refusals must not cut again; ``max_reject`` bounds it too. Load's refusals are those the server
marks so (trailer `wire.REFUSAL_KEY`) and deadlines that passed without a word from it (the call
waited unread, or was answered too late): an integral controller fed every failure — one dead
replica of ten answering UNAVAILABLE, budgets no server could meet — would throttle to
``max_reject`` where the formula above keeps back at most the refused share. The client refuses
the larger of the two shares.

*Accepted* means the server answered. DEADLINE_EXCEEDED (shed by the router, or past the
caller's deadline), RESOURCE_EXHAUSTED, UNAVAILABLE and CANCELLED (refused by ``serve
--backlog``) are the refusals — unless the server says the budget was at fault (`wire.BUDGET`:
below every variant's compute on an idle server), which no throttling would mend; any other
status (a malformed request, a bug) says nothing about load and counts as accepted. Pure Python
with an injectable clock and random source, so tests drive it without a server or time passing.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protos.wire import BUDGET, LOAD
from server.errors import InvalidArgument, Throttled

# Status code names that say the server is overloaded or gone.
REFUSALS = frozenset({"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"})


@dataclass(frozen=True)
class ThrottleConfig:
    """How eagerly a client stops sending to a server that refuses (defaults: Envoy's)."""

    threshold: float = 0.95  # the accepted share below which the client starts refusing locally
    window_s: float = 30.0  # requests and accepts are counted over this sliding window
    max_reject: float = 0.8  # the highest share of requests refused locally
    # Outcomes the window must hold before the client refuses anything: a few errors of a client
    # that sends little say nothing about load (and such a client cannot overload a server).
    min_requests: int = 100
    # Steering on the refusals the server marks as load's: at most one step per interval, each
    # moving log(share sent) by gain × (load-refused share − (1 − threshold)).
    interval_s: float = 0.1
    gain: float = 0.5

    def __post_init__(self) -> None:
        for name, value, ok, rule in (
                ("threshold", self.threshold, 0 < self.threshold <= 1, "a share in (0, 1]"),
                ("window_s", self.window_s, self.window_s > 0, "seconds, more than 0"),
                ("max_reject", self.max_reject, 0 <= self.max_reject <= 1, "a share in [0, 1]"),
                ("min_requests", self.min_requests, self.min_requests >= 0, "0 or more"),
                ("interval_s", self.interval_s, self.interval_s > 0, "seconds, more than 0"),
                ("gain", self.gain, self.gain >= 0, "0 (no steering) or more")):
            if not ok:
                raise InvalidArgument(f"throttle {name} {value!r}: {rule}")


class AdaptiveThrottle:
    """The counts of one client over ``config.window_s`` and the local refusal they imply.

    ``admit()`` before each request says whether to send it; ``record(accepted)`` counts each sent
    request once it is answered or refused. Only outcomes are counted, as Envoy does: requests
    still in flight would read as refusals, and requests refused locally would keep the
    throttle engaged long after the server recovered (the SRE book counts those, with a
    threshold of 0.5). The window is kept as ``BUCKETS`` slices of equal length, so a count costs
    O(1) and old slices fall out whole.
    """

    BUCKETS = 30
    STEP_OUTCOMES = 20  # a steering step needs this many outcomes since the last one
    # A step on fewer refusals than the target also takes this share of the way back to sending
    # everything: the cut at an overload's onset is too deep (the server still drains what came
    # before it), and gain × 5 % a step alone would take seconds to undo it.
    RECOVERY = 0.1

    def __init__(self, config: ThrottleConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.config = config or ThrottleConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._slice_s = self.config.window_s / self.BUCKETS
        # [slice index, requests, accepts], oldest first; the totals are kept beside them.
        self._slices: collections.deque[list[int]] = collections.deque()
        self.requests = 0
        self.accepts = 0
        self.rejected = 0  # refused locally since the throttle was made (not windowed)
        # Steering: log of the share sent, and the outcomes since its last step.
        floor = 1.0 - self.config.max_reject
        self._log_floor = math.log(floor) if floor > 0 else -math.inf
        self.log_share = 0.0
        self._steered_at = -math.inf
        self._outcomes = 0
        self._load_refused = 0
        self._lock = threading.Lock()  # `AdaptiveClient` may be shared by threads

    def _current(self) -> list[int]:
        now = int(self._clock() // self._slice_s)
        while self._slices and self._slices[0][0] <= now - self.BUCKETS:
            _, requests, accepts = self._slices.popleft()
            self.requests -= requests
            self.accepts -= accepts
        if not self._slices or self._slices[-1][0] != now:
            self._slices.append([now, 0, 0])
        return self._slices[-1]

    def now(self) -> float:
        """This throttle's clock: what ``sent_at`` is read from."""
        return self._clock()

    def reject_probability(self) -> float:
        """The share of new requests refused locally now."""
        with self._lock:
            return self._probability()

    def _probability(self) -> float:
        self._current()
        cfg = self.config
        if self.requests < cfg.min_requests:
            return 0.0
        p = (self.requests - self.accepts / cfg.threshold) / (self.requests + 1)
        if self.log_share < 0.0 and self._clock() - self._steered_at <= cfg.window_s:
            p = max(p, 1.0 - math.exp(self.log_share))  # a step older than the window is moot
        return min(max(p, 0.0), cfg.max_reject)

    def admit(self) -> bool:
        """False when the next request is to be refused locally instead of sent."""
        with self._lock:
            p = self._probability()
            if p > 0.0 and self._rng.random() < p:
                self.rejected += 1
                return False
            return True

    def record(self, accepted: bool, *, load: bool = False, sent_at: float | None = None
               ) -> None:
        """The outcome of one sent request: answered (True) or refused by the server; ``load``:
        refused, and the server said load refused it (what steering follows). ``sent_at``: when
        it was sent, on this throttle's clock: steering ignores what was sent before its last
        step (None: counts it)."""
        with self._lock:
            current = self._current()
            current[1] += 1
            self.requests += 1
            if accepted:
                current[2] += 1
                self.accepts += 1
            if sent_at is not None and sent_at < self._steered_at:
                return  # sent before the last step: its outcome says nothing about that step
            self._outcomes += 1
            self._load_refused += load and not accepted
            now = self._clock()
            if self._outcomes >= self.STEP_OUTCOMES and now - self._steered_at >= self.config.interval_s:
                self._steer(now)

    def _steer(self, now: float) -> None:
        """One step of the share sent towards (1 − threshold) refused for load."""
        cfg = self.config
        if now - self._steered_at > cfg.window_s:
            self.log_share = 0.0  # the last step is older than the window: start afresh
        error = self._load_refused / self._outcomes - (1.0 - cfg.threshold)
        log_share = self.log_share - cfg.gain * error
        if error < 0.0:
            log_share *= 1.0 - self.RECOVERY
        self.log_share = min(max(log_share, self._log_floor), 0.0)
        self._steered_at = now
        self._outcomes = self._load_refused = 0

    def record_status(self, code_name: str, refusal: str | None = None, *,
                      sent_at: float | None = None) -> None:
        """``record`` from a gRPC status code name (``"OK"``, ``"DEADLINE_EXCEEDED"``, …) and
        the cause the server gave for a refusal (`wire.REFUSAL_KEY`; None: it gave none). A
        budget no server could meet says nothing about load: it counts as accepted; a deadline
        that passed without a word from the server is load's."""
        refused = code_name in REFUSALS and refusal != BUDGET
        self.record(not refused, load=refused and (
            refusal == LOAD or (refusal is None and code_name == "DEADLINE_EXCEEDED")),
            sent_at=sent_at)

    def refusal(self) -> Throttled:
        """The error for a request ``admit`` kept back: what the server did, what the client does."""
        with self._lock:
            p, requests, accepts = self._probability(), self.requests, self.accepts
        return Throttled(
            f"not sent: the server refused {requests - accepts} of this client's last {requests} "
            f"requests (the last {self.config.window_s:g} s), so the client refuses "
            f"{100 * p:.0f} % of new ones until it answers again (client-side adaptive "
            "throttling; AdaptiveClient(throttle=None) sends every request)")
