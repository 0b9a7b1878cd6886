"""What users import and run: the `AdaptiveClient` library and the `adaptive-inference` CLI.

``from client import AdaptiveClient, InferResult, ThrottleConfig`` and the typed errors
(``NotFound``, ``InvalidArgument``, ``BudgetExceeded``, ``Overloaded``, ``Throttled``,
``Unavailable``, ``Unauthenticated``, ``AdaptiveError``).
Imported lazily, so the CLI's ``build`` never loads grpc.

The modules: ``client`` (the library), ``cli`` (the command), ``images`` (reading image files),
``throttle`` (client-side adaptive throttling),
``process`` (``serve`` as a child process), ``loadgen`` (every load the bench, demo and benchmark
scripts send), ``results`` (figures, tables, CSV and host info of that load), ``bench`` and
``demo`` (those two subcommands), ``bench_plots`` (their PNGs), ``synthetic`` (a tiny untrained
family of very different variant costs, for tests and the soak benchmark).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AdaptiveClient": "client.client", "InferResult": "client.client",
    "VariantInfo": "client.client", "ThrottleConfig": "client.throttle",
    "AdaptiveError": "server.errors", "InvalidArgument": "server.errors",
    "NotFound": "server.errors", "BudgetExceeded": "server.errors",
    "Overloaded": "server.errors", "Throttled": "server.errors", "Unavailable": "server.errors",
    "InternalError": "server.errors", "Unauthenticated": "server.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
