"""Health-check node ports: load balancers ask each node whether to send it traffic.

Theory of operation
-------------------
A LoadBalancer Service with ``externalTrafficPolicy: Local`` gets a
``healthCheckNodePort``. Every node serves HTTP on that port (upstream's service health
server, pkg/proxy/healthcheck/service_health.go); the cloud load balancer probes it and
sends traffic only to nodes that answer 200, i.e. that have a local endpoint for the
service and a healthy proxy. The answer, to any path::

    200 / 503, X-Load-Balancing-Endpoint-Weight: N
    {"service": {"namespace": ..., "name": ...}, "localEndpoints": N,
     "serviceProxyHealthy": true|false}

Pure part: :func:`health_check_ports` reads the node view (which already decided the
health-check port and the local endpoints) and :func:`desired_servers` adds where to
listen: the node's addresses in the family (those selected by nodePortAddresses when
set), or the addresses a caller passes (tests: 127.0.0.1). I/O part:
:class:`HealthCheckServers` keeps one ``http.server`` per (address, port) in step with
that desired state after each sync: it opens new ones, closes departed ones, and only
swaps the numbers for the rest. A port that cannot be bound is logged and tried again
at the next update, as upstream retries on its next sync. Opening a server does no name
lookup (``LocalHTTPServer``): ``update`` runs on the daemon's main loop, and the stock
``HTTPServer`` would wait seconds for reverse DNS in a namespace without a resolver.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from kubeproxy.health.server import LocalHTTPServer
from kubeproxy.model import NamespacedName
from kubeproxy.nodeview import NodeView

log = logging.getLogger("kubeproxy.healthcheck")
Address = tuple[str, int]  # (IP, port)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    service: NamespacedName
    local_endpoints: int

    def answer(self, proxy_healthy: bool) -> tuple[int, dict[str, str], bytes]:
        """Status, headers, body, as upstream's hcHandler writes them."""
        ok = self.local_endpoints > 0 and proxy_healthy
        body = {"service": {"namespace": self.service.namespace, "name": self.service.name},
                "localEndpoints": self.local_endpoints, "serviceProxyHealthy": proxy_healthy}
        headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
                   "X-Load-Balancing-Endpoint-Weight": str(self.local_endpoints)}
        return (200 if ok else 503), headers, json.dumps(body, indent="\t").encode()


def health_check_ports(view: NodeView) -> dict[int, HealthCheck]:
    """{healthCheckNodePort: (service, local endpoints)} for one family.

    Only ready local endpoints count, as upstream's LocalReadyEndpoints: a node left
    with terminating endpoints only answers 503 so load balancers drain it.
    The local endpoints of a service are counted once per address over all its ports
    (a pod serving two ports weighs one). Should two services claim one port (the API
    server forbids it), the first by name keeps it.
    """
    ports: dict[int, NamespacedName] = {}
    local: dict[NamespacedName, set[int]] = {}
    for spv in view.services:  # sorted by name
        if not spv.health_check_node_port:
            continue
        ports.setdefault(spv.health_check_node_port, spv.name.service)
        local.setdefault(spv.name.service, set()).update(
            int(e.ip) for e in spv.local_endpoints if e.ready)
    return {port: HealthCheck(svc, len(local[svc])) for port, svc in ports.items()}


def listen_addresses(view: NodeView) -> tuple[str, ...]:
    """The node's addresses in the view's family; only the nodePortAddresses ones if set."""
    ips = view.node_ips if view.nodeports.match_all else view.nodeports.addresses
    return tuple(str(ip) for ip in ips)


def desired_servers(views: Iterable[NodeView], addresses: Sequence[str] | None = None
                    ) -> dict[Address, HealthCheck]:
    """Every (address, port) to serve. ``addresses`` overrides where to listen; each
    family's health checks go to the given addresses of that family."""
    out: dict[Address, HealthCheck] = {}
    for view in views:
        if addresses is None:
            where = listen_addresses(view)
        else:
            where = tuple(a for a in addresses if (":" in a) == (view.family == 6))
        for port, check in health_check_ports(view).items():
            for address in where:
                out.setdefault((address, port), check)
    return out


# --- serving ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        status, headers, body = self.server.owner.answer(self.server.key)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        del format, args  # load balancers probe every few seconds


class _Server(LocalHTTPServer):  # binds without a name lookup: see LocalHTTPServer
    def __init__(self, key: Address, owner: HealthCheckServers) -> None:
        self.key = key
        self.owner = owner
        super().__init__(key, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthCheckServers:
    """The running health-check servers; update() from the main thread, answers from
    the servers' threads, under one lock."""

    def __init__(self, proxy_healthy: Callable[[], bool]) -> None:
        self._healthy = proxy_healthy
        self._lock = threading.Lock()
        self._checks: dict[Address, HealthCheck] = {}
        self._servers: dict[Address, tuple[_Server, threading.Thread]] = {}

    @property
    def serving(self) -> frozenset[Address]:
        return frozenset(self._servers)

    def answer(self, key: Address) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            check = self._checks.get(key)
        if check is None:  # closing: the service went away
            return 503, {"Content-Type": "text/plain"}, b"no such service\n"
        return check.answer(self._healthy())

    def update(self, desired: Mapping[Address, HealthCheck]) -> list[str]:
        """Open, close and refresh servers to match ``desired``; the bind errors."""
        with self._lock:
            self._checks = dict(desired)
        for key in sorted(set(self._servers) - set(desired)):
            self._close(key)
        errors: list[str] = []
        for key in sorted(set(desired) - set(self._servers)):
            try:
                server = (_Server6 if ":" in key[0] else _Server)(key, self)
            except OSError as err:
                errors.append(f"health check {desired[key].service} on "
                              f"{key[0]}:{key[1]}: {err}")
                continue
            thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True,
                                      name=f"healthcheck-{key[0]}:{key[1]}")
            thread.start()
            self._servers[key] = (server, thread)
            log.info("health check for %s on %s:%d", desired[key].service, *key)
        return errors

    def close(self) -> None:
        for key in sorted(self._servers):
            self._close(key)

    def _close(self, key: Address) -> None:
        server, thread = self._servers.pop(key)
        server.shutdown()
        server.server_close()
        thread.join(5)
        log.info("health check on %s:%d closed", *key)
