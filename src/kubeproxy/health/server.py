"""Health and metrics over HTTP: /healthz, /livez (10256); /metrics, /proxyMode, /configz,
/healthz (10249).

Theory of operation
-------------------
The daemon's main thread owns all proxy state; the HTTP servers run on their own threads
and read only what the main thread *publishes*, under a lock: :class:`Health` gets
(oldest unapplied change, last successful sync, node eligibility) after every loop turn,
:class:`~kubeproxy.health.metrics.Metrics` (metrics.py: upstream's families, exposed with
prometheus-client) gets one ``record_sync`` per sync. Each answer is computed from a
consistent snapshot, so a request never sees half an update.

Health is upstream's ProxierHealthServer: unhealthy when a change was queued but not
written within ``2 x syncPeriod``; ``/healthz`` is also 503 when this Node is being
deleted or is tainted ToBeDeletedByClusterAutoscaler (``nodeEligible: false``), so load
balancers drain it; ``/livez`` ignores the node. Each answer is counted
(``kubeproxy_proxy_healthz_total{code}`` / ``proxy_livez_total``). ``/configz`` is
upstream's: ``{"kubeproxy.config.k8s.io": <the effective KubeProxyConfiguration>}``.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubeproxy.health.metrics import Metrics

__all__ = ["Health", "HealthState", "HttpEndpoint", "LocalHTTPServer", "Metrics",
           "go_time", "health_endpoint", "metrics_endpoint", "parse_bind_address"]

Clock = Callable[[], float]
Answer = tuple[int, str, bytes]  # status, content type, body


# --- health -----------------------------------------------------------------------


def go_time(wall: float | None) -> str:
    """A timestamp as Go's time.Time.String() prints it (upstream's JSON shows that)."""
    if wall is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    stamp = datetime.fromtimestamp(wall, UTC)
    text = stamp.strftime("%Y-%m-%d %H:%M:%S")
    if stamp.microsecond:
        text += f".{stamp.microsecond:06d}".rstrip("0")
    return text + " +0000 UTC"


@dataclass(frozen=True)
class HealthState:
    oldest_pending: float | None = None  # monotonic time of the first unwritten change
    last_updated: float | None = None  # wall time of the last successful sync
    node_eligible: bool = True


class Health:
    def __init__(self, timeout: float, clock: Clock = time.monotonic,
                 wall: Clock = time.time) -> None:
        self.timeout = timeout  # upstream: 2 x syncPeriod
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._state = HealthState()

    def publish(self, state: HealthState) -> None:
        with self._lock:
            self._state = state

    def healthy(self) -> bool:
        with self._lock:
            pending = self._state.oldest_pending
        return pending is None or self._clock() - pending < self.timeout

    def answer(self, *, node: bool) -> Answer:
        with self._lock:
            state = self._state
        ok = state.oldest_pending is None or self._clock() - state.oldest_pending < self.timeout
        body: dict[str, object] = {"lastUpdated": go_time(state.last_updated),
                                   "currentTime": go_time(self._wall())}
        if node:
            body["nodeEligible"] = state.node_eligible
            ok = ok and state.node_eligible
        return (200 if ok else 503), "application/json", json.dumps(body).encode()


# --- HTTP -------------------------------------------------------------------------


def parse_bind_address(text: str, default_port: int) -> tuple[str, int]:
    """"IP:PORT", "[IPv6]:PORT" or a bare IP (upstream's default port then)."""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default_port
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        if not raw.isdigit():
            raise ValueError(f"bind address {text!r}: bad port")
        port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError(f"bind address {text!r}: bad port")
    return host or "0.0.0.0", port


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        status, ctype, body = (route() if route is not None
                               else (404, "text/plain", b"404 page not found\n"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        del format, args  # probes every few seconds: not worth a log line


class LocalHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that binds without any name lookup.

    ``HTTPServer.server_bind`` sets ``server_name = socket.getfqdn(host)``, a reverse
    DNS lookup that blocks for seconds where no resolver answers (a node's namespace,
    the lab); the caller's thread (the daemon's main loop) waits with it. Nothing we
    serve reads ``server_name``, so it is just the bound address.
    """

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Server(LocalHTTPServer):
    routes: dict[str, Callable[[], Answer]]


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpEndpoint:
    """One HTTP server on its own thread, answering fixed paths."""

    def __init__(self, address: tuple[str, int], routes: dict[str, Callable[[], Answer]]
                 ) -> None:
        server_class = _Server6 if ":" in address[0] else _Server
        self._server = server_class(address, _Handler)
        self._server.routes = routes
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        daemon=True,
                                        name=f"http-{address[0]}:{address[1]}")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HttpEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def health_endpoint(address: tuple[str, int], health: Health,
                    metrics: Metrics | None = None) -> HttpEndpoint:
    def probe(name: str, node: bool) -> Callable[[], Answer]:
        def answer() -> Answer:
            got = health.answer(node=node)
            if metrics is not None:
                metrics.record_probe(name, got[0])
            return got
        return answer

    return HttpEndpoint(address, {"/healthz": probe("proxy_healthz_total", True),
                                  "/livez": probe("proxy_livez_total", False)})


def metrics_endpoint(address: tuple[str, int], metrics: Metrics, health: Health
                     ) -> HttpEndpoint:
    def healthz() -> Answer:
        return (200, "text/plain", b"ok") if health.healthy() else (503, "text/plain", b"")

    return HttpEndpoint(address, {
        "/metrics": metrics.answer,
        "/proxyMode": lambda: (200, "text/plain; charset=utf-8", metrics.mode.encode()),
        "/healthz": healthz,
        "/configz": lambda: (200, "application/json", metrics.configz),
    })
