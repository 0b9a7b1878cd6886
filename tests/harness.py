"""A real server in a background thread of the test process (`serve_in_thread`), and where tests
keep what they measured for the docs (`write_measurement`).

The server is the product's own (`server.app.create_server` on 127.0.0.1, any free port), with its
event loop in a daemon thread, so a test talks to it through the real client library over real
gRPC and stops it on exit. `scraped_total` reads a counter off any server's /metrics over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from compression.core.family import Family
from server.app import AdaptiveServer, create_server
from server.loop import new_event_loop
from server.settings import ServeOptions

ROOT = Path(__file__).resolve().parents[1]
# Where `record` writes; bench/docs.py renders docs/*.md's measured blocks from it.
MEASURED = Path(os.environ.get("ADAPTIVE_MEASURED_DIR", ROOT / "results" / "measured"))


def write_measurement(key: str, **figures: Any) -> None:
    """What a test measured, as results/measured/KEY.json with the machine it ran on."""
    from client.results import host_info

    MEASURED.mkdir(parents=True, exist_ok=True)
    (MEASURED / f"{key}.json").write_text(
        json.dumps({**figures, "host": host_info()}, indent=2, default=str) + "\n")


def scraped_total(metrics_port: int, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``, from the /metrics of the
    server on 127.0.0.1:``metrics_port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclass
class RunningServer:
    server: AdaptiveServer
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def handled(self) -> float:
        """Inference requests its handler has counted, whatever their status."""
        return scraped_total(self.server.metrics_port, "adaptive_requests_total")

    def call(self, coro: Any, timeout: float | None = 30) -> Any:
        """Run a coroutine on the server's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_in_thread(family: str | Path | Family, *, options: ServeOptions = ServeOptions(),
                    metrics: bool = True, wait_ready: bool = True, ready_timeout: float = 120,
                    startup_gate: asyncio.Event | None = None) -> Iterator[RunningServer]:
    """A server on 127.0.0.1, any free ports, its event loop in a daemon thread; stopped on exit.
    The loop is the kind `serve` runs on (``options.event_loop``: uvloop where installed)."""
    loop = new_event_loop(options.event_loop)
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()
    running: RunningServer | None = None
    try:
        srv, port = asyncio.run_coroutine_threadsafe(create_server(
            family, "127.0.0.1:0", options=options,
            metrics_address="127.0.0.1:0" if metrics else None,
            startup_gate=startup_gate), loop).result(60)
        running = RunningServer(srv, port, loop)
        if wait_ready:
            running.call(srv.wait_ready(ready_timeout), timeout=ready_timeout + 5)
        yield running
    finally:
        if running is not None:
            running.call(running.server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
