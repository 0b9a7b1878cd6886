"""Runtime faults: injecting them (for tests) and quarantining the variants they hit.

``--inject-fault VARIANT:raise|hang[:RATE]`` wraps a variant's runner so that a share ``RATE``
(default 1) of its batches raise `InjectedFault` or hang (block their worker thread until
``hang_s`` passes or the server stops). It exists to test the failure path; never use it in
production. Faults are armed only after warm-up, so the server still starts.

`Quarantine` is the circuit breaker's bookkeeping: a variant that failed is *open* (the router
skips it) until a background probe succeeds; probes are spaced by a back-off that doubles per
failed probe, from ``base_s`` up to ``max_s``. Pure: the engine runs the probes.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODES = ("raise", "hang")


class InjectedFault(RuntimeError):
    """Raised by a runner that ``--inject-fault`` told to fail."""


@dataclass(frozen=True)
class Fault:
    """One ``--inject-fault`` spec."""

    variant: str
    mode: str
    rate: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``VARIANT:raise|hang[:RATE]``, e.g. ``slow:raise`` or ``int8:hang:0.25``."""
        parts = text.rsplit(":", 2)
        if len(parts) == 3 and parts[1] in MODES:
            variant, mode, rate_text = parts
        else:
            variant, _, mode = text.rpartition(":")
            rate_text = "1"
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not variant or mode not in MODES or not 0.0 < rate <= 1.0:
            raise ValueError(f"--inject-fault {text!r}: expected VARIANT:raise|hang[:RATE] with "
                             f"RATE in (0, 1]")
        return cls(variant, mode, rate)


class _Faulty:
    """A runner (or an early-exit stage runner) that trips its fault before running."""

    def __init__(self, runner: Any, fault: Fault, injector: FaultInjector) -> None:
        self.runner = runner
        self.fault = fault
        self.injector = injector

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.injector.trip(self.fault)
        return self.runner(x)

    def __getattr__(self, name: str) -> Any:  # backend, output_names, … of the wrapped runner
        return getattr(self.runner, name)


class FaultInjector:
    """Wraps the runners named by ``faults``; `arm` after warm-up, `release` on stop."""

    def __init__(self, faults: Iterable[Fault], *, hang_s: float = 60.0, seed: int = 0) -> None:
        self.faults = {f.variant: f for f in faults}
        self.hang_s = hang_s
        self.armed = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # trips come from several worker threads
        self._release = threading.Event()
        self.trips = 0

    def wrap(self, runners: Mapping[str, Any]) -> dict[str, Any]:
        from server.runtime import Stages  # runtime imports onnxruntime; keep this module light

        unknown = sorted(set(self.faults) - set(runners))
        if unknown:
            raise ValueError(f"--inject-fault: no variant {unknown[0]!r}; variants: "
                             f"{sorted(runners)}")
        out = dict(runners)
        for name, fault in self.faults.items():
            r = runners[name]
            # the early-exit network fails as a whole: its first stage trips
            out[name] = (Stages([_Faulty(r.runners[0], fault, self), *r.runners[1:]])
                         if isinstance(r, Stages) else _Faulty(r, fault, self))
            log.warning("fault injection on variant %s: %s at rate %g (testing only)", name,
                        fault.mode, fault.rate)
        return out

    def arm(self, armed: bool = True) -> None:
        self.armed = armed

    def release(self) -> None:
        """Let every hung call return (server stop), and hang no more."""
        self.armed = False
        self._release.set()

    def trip(self, fault: Fault) -> None:
        if not self.armed:
            return
        with self._lock:
            hit = self._rng.random() < fault.rate
            self.trips += hit
        if not hit:
            return
        if fault.mode == "hang":
            self._release.wait(self.hang_s)
            raise InjectedFault(f"injected hang on {fault.variant!r} ended")
        raise InjectedFault(f"injected fault on {fault.variant!r}")


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
