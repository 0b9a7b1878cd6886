"""What a load generator offers: the rates (``--rate 50,100``) and where each request's budget
comes from (``--budget-ms uniform:5:20``), parsed from the commands' text. No gRPC here: the CLI
parses its arguments before it decides how gRPC reads its sockets (``--grpc-io``), which gRPC
reads once, when it loads."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSpec:
    """Where each request's budget (ms) comes from: ``none``, ``5``, ``uniform:A:B``, or a weighted
    mixture ``2:0.5,10:0.3,50:0.2`` (``value:weight``; ``none`` is a value too)."""

    text: str
    values: tuple[float | None, ...] = ()  # fixed / mixture points
    weights: tuple[float, ...] = ()  # normalised to sum 1
    uniform: tuple[float, float] | None = None

    @classmethod
    def parse(cls, text: str) -> BudgetSpec:
        s = text.strip().lower()
        if s.startswith("uniform:"):
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError(f"budget spec {text!r}: expected uniform:A:B (milliseconds)")
            a, b = _positive(text, parts[1]), _positive(text, parts[2])
            if a > b:
                raise ValueError(f"budget spec {text!r}: A={a!r} is above B={b!r}")
            return cls(text, uniform=(a, b))
        if "," in s or ":" in s:
            values: list[float | None] = []
            weights: list[float] = []
            for item in s.split(","):
                value, sep, weight = item.partition(":")
                if not sep:
                    raise ValueError(f"budget spec {text!r}: mixture item {item!r} is not "
                                     "VALUE:WEIGHT")
                values.append(None if value.strip() == "none" else _positive(text, value))
                weights.append(_positive(text, weight))
            total = sum(weights)
            return cls(text, tuple(values), tuple(w / total for w in weights))
        return cls(text, (None if s == "none" else _positive(text, s),), (1.0,))

    @classmethod
    def choice(cls, values: Iterable[float | None]) -> BudgetSpec:
        """Each of ``values`` equally likely (one value: always that budget)."""
        names = ["none" if v is None else repr(float(v)) for v in values]
        if not names:
            raise ValueError("budget choice: no values")
        return cls.parse(names[0] if len(names) == 1 else ",".join(f"{n}:1" for n in names))

    def sample(self, rng: random.Random) -> float | None:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if len(self.values) == 1:
            return self.values[0]
        return rng.choices(self.values, weights=self.weights)[0]

    @property
    def discrete(self) -> bool:
        return self.uniform is None

    def __str__(self) -> str:
        return self.text


def _positive(spec: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"budget spec {spec!r}: {value.strip()!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"budget spec {spec!r}: {v!r} must be positive and finite")
    return v


def parse_rates(text: str) -> list[float]:
    """``"50"`` or ``"50,100,200"`` → offered rates (requests/s), each positive."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"rate {text!r}: expected R or R1,R2,... (requests per second)") from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rate {text!r}: every rate must be positive")
    return rates
