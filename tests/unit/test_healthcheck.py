"""Health-check node ports: which ports a node view asks for, and real servers on
127.0.0.1 answering as upstream's service health server (and the daemon opening and
closing them as services come and go)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from kubeproxy.app.daemon import Daemon
from kubeproxy.config.types import ProxyConfig
from kubeproxy.health.server import Health, Metrics, health_endpoint, metrics_endpoint
from kubeproxy.health.service_health import (
    HealthCheck,
    HealthCheckServers,
    desired_servers,
    health_check_ports,
    listen_addresses,
)
from kubeproxy.k8s import decode_objects
from kubeproxy.model import Cluster, Family, NamespacedName, parse_cidr
from kubeproxy.nodeview import NodeView, build_node_view
from kubeproxy.sources.informer import Replace
from kubeproxy.sync import SyncReport
from kubeproxy.tracker import Update
from tests.builders import Obj, endpoint, endpoint_slice, node, service

T = TypeVar("T")
CONFIG = ProxyConfig(hostname="node1")
WEB = NamespacedName("ns1", "web")


def lb(name: str = "web", hc_port: int = 32000, etp: str = "Local", ns: str = "ns1",
       **extra: Any) -> Obj:
    extra = {"type": "LoadBalancer", "lb_ips": ["198.51.100.7"], **extra}
    return service(name, ns, ports=[("http", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)],
                   externalTrafficPolicy=etp, healthCheckNodePort=hc_port, **extra)


def pods(name: str, *eps: Obj) -> Obj:
    return endpoint_slice(name, list(eps), ports=[("http", 8080, "TCP"), ("dns", 53, "UDP")])


def view(objs: list[Obj], config: ProxyConfig = CONFIG) -> NodeView:
    return build_node_view(decode_objects([node(), *objs]), config, 4)


@dataclass(frozen=True)
class Case:
    name: str
    objs: list[Obj]
    want: dict[int, tuple[str, int]]


CASES = [
    Case("local endpoints counted once per pod over all ports",
         [lb(), pods("web", endpoint("10.180.0.1"), endpoint("10.180.0.2"),
                     endpoint("10.180.1.1", "node2"))],
         {32000: ("ns1/web", 2)}),
    Case("no local endpoints: port open, count 0",
         [lb(), pods("web", endpoint("10.180.1.1", "node2"))], {32000: ("ns1/web", 0)}),
    Case("no endpoints at all", [lb()], {32000: ("ns1/web", 0)}),
    Case("externalTrafficPolicy Cluster: no health check",
         [lb(etp="Cluster", hc_port=0), pods("web", endpoint("10.180.0.1"))], {}),
    Case("externalTrafficPolicy Cluster: a leftover healthCheckNodePort is not served",
         [lb(etp="Cluster"), pods("web", endpoint("10.180.0.1"))], {}),
    Case("NodePort with externalTrafficPolicy Local: only load balancers are checked",
         [lb(type="NodePort", lb_ips=None), pods("web", endpoint("10.180.0.1"))], {}),
    Case("not-ready local endpoint does not count",
         [lb(), pods("web", endpoint("10.180.0.1", ready=False),
                     endpoint("10.180.1.1", "node2"))], {32000: ("ns1/web", 0)}),
    Case("terminating local endpoints only: 0, so the load balancer drains the node",
         [lb(), pods("web", endpoint("10.180.0.1", ready=False, serving=True,
                                     terminating=True),
                     endpoint("10.180.1.1", "node2"))], {32000: ("ns1/web", 0)}),
    Case("two services",
         [lb(), pods("web", endpoint("10.180.0.1")), lb("api", 32001)],
         {32000: ("ns1/web", 1), 32001: ("ns1/api", 0)}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_health_check_ports(case: Case) -> None:
    got = {port: (str(hc.service), hc.local_endpoints)
           for port, hc in health_check_ports(view(case.objs)).items()}
    assert got == case.want


def test_listen_addresses_follow_node_and_nodeport_addresses() -> None:
    objs = [lb()]
    assert listen_addresses(view(objs)) == ("192.168.0.2",)
    lo = ProxyConfig(hostname="node1", nodeport_addresses=("127.0.0.0/8",))
    assert listen_addresses(view(objs, lo)) == ("127.0.0.1",)
    want = {("192.168.0.2", 32000): HealthCheck(WEB, 0)}
    assert desired_servers([view(objs)]) == want
    assert desired_servers([view(objs)], ["127.0.0.1", "::1"]) == {
        ("127.0.0.1", 32000): HealthCheck(WEB, 0)}


def test_answer_format() -> None:
    status, headers, body = HealthCheck(WEB, 2).answer(True)
    assert status == 200 and headers["X-Load-Balancing-Endpoint-Weight"] == "2"
    assert body.decode() == ('{\n\t"service": {\n\t\t"namespace": "ns1",\n\t\t"name": "web"'
                             '\n\t},\n\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert HealthCheck(WEB, 2).answer(False)[0] == 503
    assert HealthCheck(WEB, 0).answer(True)[0] == 503


# --- real servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/") -> tuple[int, dict[str, str], Any] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    except OSError:
        return None
    finally:
        conn.close()


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_servers_open_refresh_and_close() -> None:
    healthy = [True]
    servers = HealthCheckServers(lambda: healthy[0])
    port = free_port()
    try:
        assert servers.update({("127.0.0.1", port): HealthCheck(WEB, 1)}) == []
        answer = get(port, "/anything")
        assert answer is not None
        status, headers, body = answer
        assert status == 200
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
        assert headers["Content-Type"] == "application/json"
        assert body == {"service": {"namespace": "ns1", "name": "web"}, "localEndpoints": 1,
                        "serviceProxyHealthy": True}

        servers.update({("127.0.0.1", port): HealthCheck(WEB, 0)})  # same server, new count
        answer = get(port)
        assert answer is not None and answer[0] == 503 and answer[2]["localEndpoints"] == 0

        servers.update({("127.0.0.1", port): HealthCheck(WEB, 3)})
        healthy[0] = False
        answer = get(port)
        assert answer is not None and answer[0] == 503
        assert answer[2]["serviceProxyHealthy"] is False

        servers.update({})
        assert servers.serving == frozenset() and refused(port)
    finally:
        servers.close()


def test_port_in_use_is_reported_and_retried() -> None:
    servers = HealthCheckServers(lambda: True)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = int(blocker.getsockname()[1])
        errors = servers.update({("127.0.0.1", port): HealthCheck(WEB, 1)})
        assert len(errors) == 1 and "ns1/web on 127.0.0.1" in errors[0]
    try:
        assert servers.update({("127.0.0.1", port): HealthCheck(WEB, 1)}) == []
        assert servers.serving == {("127.0.0.1", port)}
    finally:
        servers.close()


def _no_name_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every name lookup fail loudly (and record it): where no resolver answers,
    the stock ``HTTPServer.server_bind`` (``socket.getfqdn``) blocks the caller for
    seconds, so a server that starts must not look anything up."""
    calls: list[str] = []

    def lookup(name: str = "", *args: object) -> Any:
        calls.append(name)
        raise AssertionError(f"name lookup of {name!r} while opening a server")

    for fn in ("getfqdn", "gethostbyaddr", "gethostbyname", "gethostbyname_ex",
               "getnameinfo"):
        monkeypatch.setattr(socket, fn, lookup)
    return calls


def test_health_check_server_opens_without_name_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_name_lookups(monkeypatch)
    servers = HealthCheckServers(lambda: True)
    port = free_port()
    try:
        assert servers.update({("127.0.0.1", port): HealthCheck(WEB, 1)}) == []
        answer = get(port)
        assert answer is not None and answer[0] == 200
    finally:
        servers.close()
    assert calls == []


def test_health_and_metrics_endpoints_open_without_name_lookup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_name_lookups(monkeypatch)
    health = Health(10.0)
    endpoints = [health_endpoint(("127.0.0.1", 0), health).start(),
                 metrics_endpoint(("127.0.0.1", 0), Metrics("iptables"), health).start()]
    try:
        for endpoint_, path in zip(endpoints, ("/livez", "/proxyMode"), strict=True):
            conn = http.client.HTTPConnection("127.0.0.1", endpoint_.port, timeout=5)
            conn.request("GET", path)
            assert conn.getresponse().status == 200
            conn.close()
    finally:
        for endpoint_ in endpoints:
            endpoint_.stop()
    assert calls == []


# --- wired into the daemon ------------------------------------------------------------


class ViewProxier:
    """Builds the node views as the real proxiers do; writes nothing."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.views: dict[Family, NodeView] = {}

    def sync(self, cluster: Cluster, changed: frozenset[NamespacedName] | None, *,
             write_all: bool = False) -> SyncReport:
        self.views = {4: build_node_view(cluster, self.config, 4)}
        return SyncReport(views=self.views)  # the daemon follows the views a sync wrote


def replaces(objs: list[Obj]) -> list[Replace]:
    cluster = decode_objects(objs)
    return [
        Replace("Node", tuple(Update("Node", NamespacedName("", n.name), n)
                              for n in cluster.nodes)),
        Replace("Service", tuple(Update("Service", s.ref, s) for s in cluster.services)),
        Replace("EndpointSlice", tuple(
            Update("EndpointSlice", NamespacedName(e.namespace, e.name), e)
            for e in cluster.slices)),
    ]


def eventually(what: Callable[[], T | None], message: str) -> T:
    deadline = time.monotonic() + 10
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within 10s: {message}")
        time.sleep(0.02)  # polling interval, bounded by the deadline above


def test_daemon_opens_and_closes_health_check_ports() -> None:
    config = ProxyConfig(hostname="node1", min_sync_period=0.01, sync_period=5.0,
                         cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
    port = free_port()
    daemon = Daemon(config, ViewProxier(config), health=Health(10.0),
                    metrics=Metrics("iptables"), healthcheck_addresses=["127.0.0.1"])
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        for item in replaces([node(), lb(hc_port=port),
                              pods("web", endpoint("10.180.0.1"))]):
            daemon.emit(item)
        answer = eventually(lambda: get(port), "health check port opened")
        assert answer[0] == 200 and answer[2]["localEndpoints"] == 1

        for item in replaces([node(), lb(hc_port=port)]):
            daemon.emit(item)
        eventually(lambda: (a := get(port)) is not None and a[0] == 503,
                   "503 once the local endpoint is gone")

        for item in replaces([node()]):
            daemon.emit(item)
        eventually(lambda: refused(port), "port closed with the service")
    finally:
        daemon.stop()
        thread.join(5)
    assert not thread.is_alive() and daemon.health_checks.serving == frozenset()
