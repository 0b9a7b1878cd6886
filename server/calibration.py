"""Closed-loop calibration of the router: how wrong are its predictions, and what margin holds
the target miss rate?

Every answered request reports how long it took against what the router predicted when it chose
(`Calibration.observe`). Two estimates follow from that stream:

- the **safety margin**: a running estimate of the ``1 - target`` quantile of the prediction error
  (actual − predicted, ms), by stochastic approximation — each late answer raises it by
  ``step·(1 - target)``, each timely one lowers it by ``step·target``, so it settles where a share
  ``target`` of errors exceeds it. The step scales with the typical error size, so the same
  default converges on a 2-core laptop (errors of milliseconds) and a 16-core server (tenths);
- the **observed miss rate**: an exponentially weighted share of budgeted requests answered late,
  the figure an operator compares with the target.

The router adds the margin to every prediction, so the share of chosen candidates that finish
late tracks the target without a hand-tuned flag. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Calibration:
    """The router's safety margin and observed miss rate; see the module docstring."""

    target: float = 0.01  # share of requests allowed to finish later than predicted
    gain: float = 0.5  # step = gain × typical |error|
    min_step_ms: float = 0.002
    max_margin_ms: float = 1_000.0
    miss_alpha: float = 0.01  # EWMA weight of the miss-rate estimate (~100 requests)
    margin_ms: float = 0.0
    error_scale_ms: float = 0.0  # EWMA of |actual − predicted|
    miss_rate: float = 0.0
    observed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target miss rate must lie in (0, 1), got {self.target!r}")

    def observe(self, predicted_ms: float, actual_ms: float, *, missed: bool | None = None) -> None:
        """One answered request: its predicted and actual completion (ms from the decision), and
        whether it missed its budget (None: it had none)."""
        err = actual_ms - predicted_ms
        self.observed += 1
        self.error_scale_ms += 0.05 * (abs(err) - self.error_scale_ms)
        step = max(self.gain * self.error_scale_ms, self.min_step_ms)
        if err > self.margin_ms:
            self.margin_ms += step * (1.0 - self.target)
        else:
            self.margin_ms -= step * self.target
        self.margin_ms = min(max(self.margin_ms, 0.0), self.max_margin_ms)
        if missed is not None:
            self.miss_rate += self.miss_alpha * (float(missed) - self.miss_rate)


@dataclass
class Overhead:
    """Per-request time outside the model (routing, queue hand-offs, event-loop wake-ups, the
    reply), ms: a smoothed mean learned from every answer, added to every prediction."""

    alpha: float = 0.05
    ms: float = 0.0

    def observe(self, ms: float) -> None:
        self.ms += self.alpha * (max(ms, 0.0) - self.ms)
