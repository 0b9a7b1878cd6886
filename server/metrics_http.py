"""The Prometheus ``/metrics`` endpoint: one selector thread, bounded so that whoever can reach the
port cannot starve inference.

prometheus_client's own server spends a thread per connection with no timeout: 1,000 half-open
connections held 1,000 threads, and closing them at once stalled inference for seconds. Here:

* one thread serves every connection (non-blocking sockets, `selectors`), so the thread count
  does not depend on the peers;
* at most ``max_connections`` are open; past that a new connection evicts the oldest one still
  sending its request (a scraper sends its request at once, a half-open peer never does), or is
  closed at once when none is;
* a request head must arrive whole within ``read_timeout_s`` and fit in ``max_request_bytes``
  (431 otherwise), a response must be taken within ``write_timeout_s``; then the connection
  closes (``Connection: close``, no keep-alive to hold);
* only ``GET``/``HEAD /metrics`` is answered (404 elsewhere, 405 for other methods, 400 for
  garbage);
* building the exposition is the one costly step and runs on this thread under the GIL that
  inference needs too: it may take at most ``max_busy_share`` of the wall time (after a build of
  t seconds the next waits t·(1/share − 1)), and requests waiting meanwhile share the next build,
  so a flood of scrapes is throttled, never served stale.

The format follows the Accept header as prometheus_client's server does (`choose_encoder`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import selectors
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192
MAX_BUSY_SHARE = 0.1
_ACCEPTS_PER_WAKE = 64  # the other connections get their turn between batches of accepts
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


@dataclass(eq=False)
class _Conn:
    """One connection: reading its request head, waiting for an exposition, or writing."""

    sock: socket.socket
    deadline: float  # monotonic; reading: the whole head by then, writing: the whole response
    inbuf: bytearray = field(default_factory=bytearray)
    accept: str | None = None  # set once a GET/HEAD /metrics head is read: waiting
    head_only: bool = False
    out: memoryview | None = None  # the response, while writing

    @property
    def reading(self) -> bool:
        return self.accept is None and self.out is None


class MetricsHTTPServer:
    """``/metrics`` for ``registry`` on ``host:port`` (port 0: any free one), served by one
    daemon thread between `start` and `stop`. Binds in the constructor, so a bad address or a
    port in use raises OSError before anything runs."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 max_connections: int = MAX_CONNECTIONS, read_timeout_s: float = READ_TIMEOUT_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_busy_share: float = MAX_BUSY_SHARE) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections {max_connections!r}: must be at least 1")
        if not 0 < max_busy_share <= 1:
            raise ValueError(f"max_busy_share {max_busy_share!r}: must be in (0, 1]")
        self._registry = registry
        self._max_connections = max_connections
        self._read_timeout_s = read_timeout_s
        self._write_timeout_s = write_timeout_s
        self._max_request_bytes = max_request_bytes
        self._max_busy_share = max_busy_share
        self._listener = _listen(host, port)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._conns: dict[_Conn, None] = {}  # insertion-ordered: the oldest first
        self._waiting: list[_Conn] = []
        self._build_after = 0.0  # monotonic: the next exposition may be built then
        self._accept_paused_until = 0.0
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Counters for tests and logs (read from other threads: plain ints, no invariants).
        self.served = 0
        self.evicted = 0  # closed to make room (still sending their request)
        self.refused = 0  # closed at once: every slot busy answering
        self.timed_out = 0
        # A process forked from this one (``--workers`` restarts a worker after this started)
        # must not keep these sockets: the port would stay bound and a scraper's connection
        # open after this process let them go.
        os.register_at_fork(after_in_child=functools.partial(_forget_in_child,
                                                             weakref.ref(self)))

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the port and every connection; waits up to ``timeout`` for the thread."""
        self._stopping = True
        with contextlib.suppress(OSError):  # already closed: the loop has ended
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close_all()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                events = self._sel.select(self._timeout())
                for key, mask in events:
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        _drain(self._wake_r)
                    else:
                        conn: _Conn = key.data
                        if conn.reading and mask & selectors.EVENT_READ:
                            self._read(conn)
                        elif conn.out is not None and mask & selectors.EVENT_WRITE:
                            self._write(conn)
                now = time.monotonic()
                self._expire(now)
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._sel.register(self._listener, selectors.EVENT_READ, None)
                if self._waiting and now >= self._build_after:
                    self._answer_waiting()
        except Exception:  # a bug here must not pass silently: the endpoint would just vanish
            log.exception("metrics endpoint failed; /metrics is no longer served")
        finally:
            self._close_all()

    def _timeout(self) -> float:
        """Seconds until the next deadline, exposition build or accept resumption (≤ 1 s)."""
        now = time.monotonic()
        wake = now + 1.0
        for conn in self._conns:
            if conn.reading or conn.out is not None:  # waiting ones have no deadline
                wake = min(wake, conn.deadline)
        if self._waiting:
            wake = min(wake, self._build_after)
        if self._accept_paused_until:
            wake = min(wake, self._accept_paused_until)
        return max(wake - now, 0.0)

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: retry shortly, do not spin
                log.warning("metrics endpoint: accept failed (%s); pausing accepts for 0.1 s", exc)
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            sock.setblocking(False)
            if len(self._conns) >= self._max_connections:
                victim = next((c for c in self._conns if c.reading), None)
                if victim is None:
                    self.refused += 1
                    sock.close()
                    continue
                self.evicted += 1
                self._close(victim)
            conn = _Conn(sock, time.monotonic() + self._read_timeout_s)
            self._conns[conn] = None
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)  # a scraper's request is usually there already: take it before
            # a later accept in this batch could evict the connection

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:  # the peer closed before finishing its request
            self._close(conn)
            return
        conn.inbuf += data
        end = _HEAD_END.search(conn.inbuf)
        if end is None:
            if len(conn.inbuf) > self._max_request_bytes:
                self._respond(conn, 431, b"request head too large\n")
            return
        if end.end() > self._max_request_bytes:
            self._respond(conn, 431, b"request head too large\n")
            return
        self._route(conn, bytes(conn.inbuf[:end.start()]))

    def _route(self, conn: _Conn, head: bytes) -> None:
        lines = head.decode("latin-1").splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._respond(conn, 400, b"bad request line\n")
            return
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            self._respond(conn, 405, b"only GET /metrics\n", extra="Allow: GET, HEAD\r\n")
            return
        if target.split("?", 1)[0] != "/metrics":
            self._respond(conn, 404, b"only /metrics is served here\n",
                          head_only=method == "HEAD")
            return
        accept = ""
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == "accept":
                accept = value.strip()
        conn.accept = accept
        conn.head_only = method == "HEAD"
        self._sel.unregister(conn.sock)  # nothing more to read; it waits for the next build
        self._waiting.append(conn)

    def _answer_waiting(self) -> None:
        """Build the exposition once per format for every waiting request; throttle the next."""
        waiting, self._waiting = self._waiting, []
        t0 = time.perf_counter()
        built: dict[str, bytes | None] = {}
        for conn in waiting:
            if conn not in self._conns:
                continue
            encoder, content_type = choose_encoder(conn.accept or "")
            if content_type not in built:
                try:
                    built[content_type] = encoder(self._registry)
                except Exception:
                    log.exception("building the metrics exposition failed")
                    built[content_type] = None
            body = built[content_type]
            if body is None:
                self._respond(conn, 500, b"building the exposition failed\n")
            else:
                self.served += 1
                self._respond(conn, 200, body, content_type=content_type,
                              head_only=conn.head_only)
        elapsed = time.perf_counter() - t0
        self._build_after = time.monotonic() + elapsed * (1 / self._max_busy_share - 1)

    def _respond(self, conn: _Conn, code: int, body: bytes, *,
                 content_type: str = "text/plain; charset=utf-8", extra: str = "",
                 head_only: bool = False) -> None:
        head = (f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode()
        conn.out = memoryview(head if head_only else head + body)
        conn.deadline = time.monotonic() + self._write_timeout_s
        if conn.accept is None:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        else:
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not len(conn.out):
            # Read what the peer sent beyond the head first: closing with unread bytes makes the
            # kernel answer RST, which can cut the response short on the peer's side.
            _drain(conn.sock)
            self._close(conn)

    def _expire(self, now: float) -> None:
        late = [c for c in self._conns  # waiting ones wait on us, not on the peer
                if (c.reading or c.out is not None) and now >= c.deadline]
        for conn in late:
            self.timed_out += 1
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn not in self._conns:
            return
        del self._conns[conn]
        with contextlib.suppress(KeyError, ValueError):  # waiting ones are not registered
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns):
            self._close(conn)
        self._waiting.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._sel.close()


def _forget_in_child(ref: weakref.ref[MetricsHTTPServer]) -> None:
    """In a forked child: close this process's copies of the server's descriptors. Only close:
    unregistering would edit the epoll set that the parent's copy of the selector still uses."""
    srv = ref()
    if srv is None or srv._closed:
        return
    srv._closed = True
    for conn in srv._conns:
        conn.sock.close()
    for sock in (srv._listener, srv._wake_r, srv._wake_w):
        sock.close()
    srv._sel.close()  # closes the child's epoll descriptor; no epoll_ctl on the shared set
    srv._conns = {}
    srv._waiting = []


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (an OSError names the address)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"--metrics-host {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve /metrics on {host!r} port {port}: "
                      f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> None:
    """Read and drop what is readable now, without blocking."""
    for _ in range(16):
        try:
            if not sock.recv(65536):
                return
        except OSError:  # BlockingIOError included: nothing more now
            return
