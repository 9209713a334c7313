"""Health and metrics over HTTP: /healthz, /livez, /metrics, /proxyMode.

Theory of operation
-------------------
The daemon's main thread owns all proxy state; the HTTP servers run on their own threads
and read only what the main thread *publishes* here, under a lock: :class:`Health` gets
(oldest unapplied change, last successful sync, node eligibility) after every loop turn,
:class:`Metrics` gets one :meth:`Metrics.record_sync` per sync. Each answer is computed
from a consistent snapshot, so a request never sees half an update.

Health is upstream's ProxierHealthServer: unhealthy when a change was queued but not
written within ``2 x syncPeriod``; ``/healthz`` is also 503 when this Node is being
deleted or is tainted ToBeDeletedByClusterAutoscaler (``nodeEligible: false``), so load
balancers drain it; ``/livez`` ignores the node. Metric names are upstream's, under the
``kubeproxy_`` prefix, in the Prometheus text format (version 0.0.4).
"""

from __future__ import annotations

import json
import math
import platform
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubeproxy import __version__, modes
from kubeproxy.sync import SyncResult

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


# --- metrics ----------------------------------------------------------------------

# Upstream's buckets (pkg/proxy/metrics): sync durations 1 ms .. 16 s, doubling;
# network programming 0.25 s .. 5 min.
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                        strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# (name without the kubeproxy_ prefix, type, help): the families /metrics serves.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("sync_proxy_rules_duration_seconds", "histogram", "SyncProxyRules latency in seconds"),
    ("sync_full_proxy_rules_duration_seconds", "histogram",
     "SyncProxyRules latency in seconds for full resyncs"),
    ("sync_partial_proxy_rules_duration_seconds", "histogram",
     "SyncProxyRules latency in seconds for partial resyncs"),
    ("network_programming_duration_seconds", "histogram",
     "In Cluster Network Programming Latency in seconds"),
    ("sync_proxy_rules_last_timestamp_seconds", "gauge",
     "The last time proxy rules were successfully synced"),
    ("sync_proxy_rules_endpoint_changes_total", "counter",
     "Cumulative proxy rules Endpoint changes"),
    ("sync_proxy_rules_service_changes_total", "counter",
     "Cumulative proxy rules Service changes"),
    ("sync_proxy_rules_endpoint_changes_pending", "gauge",
     "Pending proxy rules Endpoint changes"),
    ("sync_proxy_rules_service_changes_pending", "gauge", "Pending proxy rules Service changes"),
    ("sync_proxy_rules_iptables_restore_failures_total", "counter",
     "Cumulative proxy iptables restore failures"),
    ("sync_proxy_rules_nftables_sync_failures_total", "counter",
     "Cumulative proxy nftables sync failures"),
    ("sync_proxy_rules_no_local_endpoints_total", "gauge",
     "Number of services with a Local traffic policy and no endpoints"),
    # Ours, not upstream's (upstream only logs): rules found changed or removed from
    # outside (a flushed chain, a deleted table) by the data plane's intact() check; each
    # one triggers a full sync.
    ("sync_proxy_rules_flush_detected_total", "counter",
     "Cumulative times the proxy's rules were found changed or removed from outside"),
    ("sync_proxy_rules_last_queued_timestamp_seconds", "gauge",
     "The last time a sync of proxy rules was queued"),
    ("proxy_healthz_total", "counter", "Cumulative proxy healthz HTTP status"),
    ("proxy_livez_total", "counter", "Cumulative proxy livez HTTP status"),
)
# Labelled counters: family name -> label name (one sample per label value seen).
LABELLED = {"proxy_healthz_total": "code", "proxy_livez_total": "code"}


class Metrics:
    """kube-proxy's sync metrics; written by the main thread, read by /metrics."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._failures = modes.get(mode).sync_failures_metric
        self._lock = threading.Lock()
        self._hist = {name: Histogram(PROGRAMMING_BUCKETS
                                      if name.startswith("network") else SYNC_BUCKETS)
                      for name, kind, _ in FAMILIES if kind == "histogram"}
        self._values: dict[str, float] = {name: 0.0 for name, kind, _ in FAMILIES
                                          if kind != "histogram"}
        self._no_local = {"internal": 0, "external": 0}
        self._labelled: dict[str, dict[str, float]] = {name: {} for name in LABELLED}
        self.configz = b"{}"  # the effective KubeProxyConfiguration, as JSON (/configz)

    def record_probe(self, name: str, code: int) -> None:
        """An answer of /healthz (``proxy_healthz_total``) or /livez."""
        with self._lock:
            counts = self._labelled[name]
            counts[str(code)] = counts.get(str(code), 0) + 1

    def set_queued(self, wall: float) -> None:
        """The wall time the oldest unsynced change was queued (0: none pending)."""
        with self._lock:
            self._values["sync_proxy_rules_last_queued_timestamp_seconds"] = wall

    def record_sync(self, result: SyncResult, wall_now: float) -> None:
        with self._lock:
            v = self._values
            v["sync_proxy_rules_service_changes_total"] += result.changes.service_changes
            v["sync_proxy_rules_endpoint_changes_total"] += result.changes.endpoint_changes
            if not result.ok:
                v[self._failures] += 1
                return
            v["sync_proxy_rules_last_timestamp_seconds"] = wall_now
            if result.skipped:
                return
            self._hist["sync_proxy_rules_duration_seconds"].observe(result.duration)
            kind = "full" if result.full else "partial"
            self._hist[f"sync_{kind}_proxy_rules_duration_seconds"].observe(result.duration)
            for trigger in result.changes.trigger_times:
                self._hist["network_programming_duration_seconds"].observe(
                    max(0.0, wall_now - trigger))
            if result.report is not None:
                self._no_local = {"internal": result.report.no_local_internal,
                                  "external": result.report.no_local_external}

    def record_flush(self) -> None:
        """The data plane found its rules changed from outside (a full sync follows)."""
        with self._lock:
            self._values["sync_proxy_rules_flush_detected_total"] += 1

    def set_pending(self, services: int, endpoints: int) -> None:
        with self._lock:
            self._values["sync_proxy_rules_service_changes_pending"] = services
            self._values["sync_proxy_rules_endpoint_changes_pending"] = endpoints

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name, kind, help_text in FAMILIES:
                full = f"kubeproxy_{name}"
                out += [f"# HELP {full} [ALPHA] {help_text}", f"# TYPE {full} {kind}"]
                if kind == "histogram":
                    out += self._hist[name].lines(full)
                elif name in LABELLED:
                    out += [f'{full}{{{LABELLED[name]}="{k}"}} {_num(n)}'
                            for k, n in sorted(self._labelled[name].items())]
                elif name == "sync_proxy_rules_no_local_endpoints_total":
                    out += [f'{full}{{traffic_policy="{p}"}} {n}'
                            for p, n in sorted(self._no_local.items())]
                else:
                    out.append(f"{full} {_num(self._values[name])}")
        out += ["# HELP kubernetes_build_info [ALPHA] A metric with a constant '1' value "
                "labeled by the build's version",
                "# TYPE kubernetes_build_info gauge",
                f'kubernetes_build_info{{gitVersion="v{__version__}",'
                f'platform="{sys.platform}",pythonVersion="{platform.python_version()}"}} 1']
        return "\n".join(out) + "\n"

    def answer(self) -> Answer:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.render().encode()


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
