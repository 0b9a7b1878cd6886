"""Injected runtime faults, to test the failure path (`server.quarantine` handles real ones).

``--inject-fault VARIANT:raise|hang[:RATE]`` wraps a variant's runner so that a share ``RATE``
(default 1) of its batches raise `InjectedFault` or hang (block their worker thread until
``hang_s`` passes or the server stops). It exists to test the failure path; never use it in
production. Faults are armed only after warm-up, so the server still starts.
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


class _FaultyStages:
    """An early-exit network (`compression.core.exits.Stages`) that fails as a whole: its first
    stage trips the fault before running."""

    def __init__(self, chain: Any, fault: Fault, injector: FaultInjector) -> None:
        self.chain = chain
        self.fault = fault
        self.injector = injector

    def __len__(self) -> int:
        return len(self.chain)

    def stage(self, i: int, x: Any) -> tuple[np.ndarray, Any]:
        if i == 0:
            self.injector.trip(self.fault)
        return self.chain.stage(i, x)

    def __getattr__(self, name: str) -> Any:  # warm, backend, … of the wrapped chain
        return getattr(self.chain, name)


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
        from compression.core.exits import Stages  # imports onnxruntime: keep this light

        unknown = sorted(set(self.faults) - set(runners))
        if unknown:
            raise ValueError(f"--inject-fault: no variant {unknown[0]!r}; variants: "
                             f"{sorted(runners)}")
        out = dict(runners)
        for name, fault in self.faults.items():
            r = runners[name]
            out[name] = (_FaultyStages(r, fault, self) if isinstance(r, Stages)
                         else _Faulty(r, fault, self))
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
