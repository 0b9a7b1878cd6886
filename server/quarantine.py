"""The circuit breaker for variants whose batches fail: skip them, probe them, route to them again.

A variant whose batch raised or hung is *quarantined*: the router skips it until a background
probe (one zero image through its batcher) runs cleanly. Probes are spaced by a back-off that
doubles per failed probe, from ``base_s`` up to ``max_s``, so a broken variant costs little.
`Quarantine` is the pure bookkeeping; `Breaker` runs the probes on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from server.errors import AdaptiveError, VariantFailed

if TYPE_CHECKING:  # prometheus_client is imported only after --workers set its multiprocess dir
    from server.metrics import Metrics

log = logging.getLogger(__name__)


class Quarantine:
    """Which variants the router must skip, and when to probe each again."""

    def __init__(self, *, base_s: float = 2.0, max_s: float = 60.0) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._backoff: dict[str, float] = {}  # variant → seconds before its next probe
        self.variants: frozenset[str] = frozenset()  # read on every request: a cheap snapshot

    def fail(self, variant: str) -> bool:
        """Record a failure; True when this opens the breaker (the caller starts probing)."""
        if variant in self.variants:
            return False
        self._backoff[variant] = self.base_s
        self.variants = self.variants | {variant}
        return True

    def next_probe_s(self, variant: str) -> float:
        return self._backoff.get(variant, self.base_s)

    def probe_failed(self, variant: str) -> float:
        """Back off; returns the delay before the next probe."""
        self._backoff[variant] = min(self.next_probe_s(variant) * 2, self.max_s)
        return self._backoff[variant]

    def recovered(self, variant: str) -> None:
        self._backoff.pop(variant, None)
        self.variants = self.variants - {variant}


Probe = Callable[[str], Awaitable[object]]  # run one probe request through a variant


class Breaker:
    """Opens `Quarantine` on a failed batch and re-probes in the background until it passes."""

    def __init__(self, quarantine: Quarantine, probe: Probe, metrics: Metrics) -> None:
        self.quarantine = quarantine
        self._probe = probe
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def variants(self) -> frozenset[str]:
        return self.quarantine.variants

    def failed(self, exc: VariantFailed) -> None:
        """A batch of ``exc.variant`` failed (on the event loop, once per batch)."""
        m = self._metrics
        m.child(m.variant_failures, exc.variant).inc()
        if not self.quarantine.fail(exc.variant):
            return
        delay = self.quarantine.next_probe_s(exc.variant)
        log.warning("variant %s quarantined (%s); re-probing in %.1f s", exc.variant, exc, delay)
        m.child(m.quarantined, exc.variant).set(1)
        task = asyncio.get_running_loop().create_task(self._reprobe(exc.variant, delay),
                                                      name=f"reprobe-{exc.variant}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def _reprobe(self, variant: str, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)  # the back-off itself: a broken variant is tried rarely
            try:
                await self._probe(variant)
            except AdaptiveError as exc:
                delay = self.quarantine.probe_failed(variant)
                log.warning("variant %s failed its probe (%s); next in %.1f s", variant, exc, delay)
                continue
            self.quarantine.recovered(variant)
            self._metrics.child(self._metrics.quarantined, variant).set(0)
            log.info("variant %s passed its probe; routed to again", variant)
            return
