"""Stale UDP conntrack flows after a sync: a table of (before, after) clusters.

Each case names the cluster before and after a sync (node1 at 192.168.0.2) and the
``conntrack -D`` filters that must run, spelled as StaleFlow's str():
``udp FRONTEND[ -> ENDPOINT] (SERVICE, REASON)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.conntrack import Frontend, Reason, StaleFlow, stale_udp_flows
from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.conntrack import ConntrackCleaner, delete_argv
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, ServicePortName, parse_ip
from kubeproxy.nodeview import NodeView, build_node_view
from tests.builders import Obj, endpoint, endpoint_slice, node, service

CONFIG = ProxyConfig(hostname="node1")
DNS_PORTS = [("dns", 53, "UDP", 0)]
DNS_SLICE_PORTS = [("dns", 5353, "UDP")]


def view(objs: list[Obj], family: int = 4) -> NodeView:
    return build_node_view(decode_objects([node(), *objs]), CONFIG, 4 if family == 4 else 6)


def dns(*ips: str, ports: list[tuple[str, int, str, int]] | None = None, **spec: Any
        ) -> list[Obj]:
    objs: list[Obj] = [service("dns", cluster_ip="172.30.0.10", ports=ports or DNS_PORTS,
                               **spec)]
    if ips:
        objs.append(endpoint_slice("dns", [endpoint(ip) for ip in ips],
                                   ports=DNS_SLICE_PORTS))
    return objs


@dataclass(frozen=True)
class Case:
    name: str
    before: list[Obj] | None  # None: no previous view (first sync)
    after: list[Obj]
    want: list[str]


NODEPORT: dict[str, Any] = {"type": "NodePort"}
EXTERNAL: dict[str, Any] = {"externalIPs": ["203.0.113.5"]}
CASES = [
    Case("nothing changed", dns("10.180.0.1"), dns("10.180.0.1"), []),
    Case("endpoint removed: entries to it, per frontend",
         dns("10.180.0.1", "10.180.0.2"), dns("10.180.0.1"),
         ["udp 172.30.0.10:53 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)"]),
    Case("endpoint added: nothing stale", dns("10.180.0.1"), dns("10.180.0.1", "10.180.0.2"),
         []),
    Case("endpoint replaced", dns("10.180.0.1"), dns("10.180.0.2"),
         ["udp 172.30.0.10:53 -> 10.180.0.1 (ns1/dns:dns, endpoint-gone)"]),
    Case("endpoint not ready any more", dns("10.180.0.1", "10.180.0.2"),
         [*dns(), endpoint_slice("dns", [endpoint("10.180.0.1"),
                                         endpoint("10.180.0.2", ready=False)],
                                 ports=DNS_SLICE_PORTS)],
         ["udp 172.30.0.10:53 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)"]),
    Case("endpoint's port changed: its IP is flushed",
         dns("10.180.0.1"),
         [*dns(), endpoint_slice("dns", [endpoint("10.180.0.1")], ports=[("dns", 53, "UDP")])],
         ["udp 172.30.0.10:53 -> 10.180.0.1 (ns1/dns:dns, endpoint-gone)"]),
    Case("every frontend: external IP, LB IP, NodePort on any address",
         dns("10.180.0.1", "10.180.0.2", type="LoadBalancer", lb_ips=["198.51.100.7"],
             ports=[("dns", 53, "UDP", 30053)], **EXTERNAL),
         dns("10.180.0.1", type="LoadBalancer", lb_ips=["198.51.100.7"],
             ports=[("dns", 53, "UDP", 30053)], **EXTERNAL),
         ["udp 172.30.0.10:53 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)",
          "udp 198.51.100.7:53 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)",
          "udp 203.0.113.5:53 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)",
          "udp *:30053 -> 10.180.0.2 (ns1/dns:dns, endpoint-gone)"]),
    Case("TCP ports are left alone",
         dns("10.180.0.1", "10.180.0.2", ports=[("dns", 53, "TCP", 0)]),
         dns("10.180.0.1", ports=[("dns", 53, "TCP", 0)]), []),
    Case("no endpoints -> some: every entry to every frontend",
         dns(ports=[("dns", 53, "UDP", 30053)], **NODEPORT, **EXTERNAL),
         dns("10.180.0.1", ports=[("dns", 53, "UDP", 30053)], **NODEPORT, **EXTERNAL),
         ["udp 172.30.0.10:53 (ns1/dns:dns, newly-active)",
          "udp 203.0.113.5:53 (ns1/dns:dns, newly-active)",
          "udp *:30053 (ns1/dns:dns, newly-active)"]),
    Case("first sync: services with endpoints are newly active", None, dns("10.180.0.1"),
         ["udp 172.30.0.10:53 (ns1/dns:dns, newly-active)"]),
    Case("first sync: a service without endpoints has nothing cached", None, dns(), []),
    Case("all endpoints gone: entries to the last one", dns("10.180.0.1"), dns(),
         ["udp 172.30.0.10:53 -> 10.180.0.1 (ns1/dns:dns, endpoint-gone)"]),
    Case("eTP=Local gains its first local endpoint: external frontends only",
         [*dns(type="NodePort", externalTrafficPolicy="Local",
               ports=[("dns", 53, "UDP", 30053)]),
          endpoint_slice("dns", [endpoint("10.180.1.1", "node2")], ports=DNS_SLICE_PORTS)],
         [*dns(type="NodePort", externalTrafficPolicy="Local",
               ports=[("dns", 53, "UDP", 30053)]),
          endpoint_slice("dns", [endpoint("10.180.1.1", "node2"), endpoint("10.180.0.1")],
                         ports=DNS_SLICE_PORTS)],
         ["udp *:30053 (ns1/dns:dns, newly-active)"]),
    Case("service deleted: every entry to its frontends",
         dns("10.180.0.1", ports=[("dns", 53, "UDP", 30053)], **NODEPORT), [],
         ["udp 172.30.0.10:53 (ns1/dns:dns, frontend-gone)",
          "udp *:30053 (ns1/dns:dns, frontend-gone)"]),
    Case("external IP removed: that frontend is flushed",
         dns("10.180.0.1", **EXTERNAL), dns("10.180.0.1"),
         ["udp 203.0.113.5:53 (ns1/dns:dns, frontend-gone)"]),
    Case("a flushed frontend gets no per-endpoint deletes",
         [*dns(), endpoint_slice("dns", [endpoint("10.180.0.1", ready=False)],
                                 ports=DNS_SLICE_PORTS)],
         dns("10.180.0.2"),
         ["udp 172.30.0.10:53 (ns1/dns:dns, newly-active)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_stale_udp_flows(case: Case) -> None:
    before = view(case.before) if case.before is not None else None
    after = view(case.after)
    got = [str(f) for f in stale_udp_flows(before, after)]
    assert got == case.want
    # A partial sync's cleanup looks only at the changed services: the same answer.
    old = before.by_service() if before is not None else {}
    changed = {ref for ref in {*old, *after.by_service()}
               if old.get(ref, []) != list(after.ports_of(ref))}
    assert [str(f) for f in stale_udp_flows(before, after, changed)] == case.want


def test_a_frontend_another_unchanged_service_still_serves_is_not_flushed() -> None:
    """Two services on one external IP:port; one of them goes: the other keeps it."""
    other = [service("dns2", cluster_ip="172.30.0.11", ports=DNS_PORTS, **EXTERNAL),
             endpoint_slice("dns2", [endpoint("10.180.0.2")], ports=DNS_SLICE_PORTS)]
    before = view([*dns("10.180.0.1", **EXTERNAL), *other])
    after = view(other)
    gone = NamespacedName("ns1", "dns")
    assert [str(f) for f in stale_udp_flows(before, after, {gone})] == \
        [str(f) for f in stale_udp_flows(before, after)]
    assert "udp 203.0.113.5:53 (ns1/dns:dns, frontend-gone)" not in \
        [str(f) for f in stale_udp_flows(before, after, {gone})]


def test_ipv6_family() -> None:
    def v6(*ips: str) -> list[Obj]:
        objs: list[Obj] = [service("dns", cluster_ip="fd00::10", ports=DNS_PORTS,
                                   ipFamilies=["IPv6"])]
        objs.append(endpoint_slice("dns", [endpoint(ip) for ip in ips], family="IPv6",
                                   ports=DNS_SLICE_PORTS))
        return objs

    flows = stale_udp_flows(view(v6("fd00:1::1", "fd00:1::2"), 6),
                            view(v6("fd00:1::1"), 6))
    assert [str(f) for f in flows] == [
        "udp [fd00::10]:53 -> fd00:1::2 (ns1/dns:dns, endpoint-gone)"]
    assert delete_argv(flows[0]) == [
        "conntrack", "-D", "-f", "ipv6", "-p", "udp", "--orig-dst", "fd00::10",
        "--orig-port-dst", "53", "--reply-src", "fd00:1::2"]


def test_families_must_match() -> None:
    with pytest.raises(ValueError):
        stale_udp_flows(view([], 6), view([]))
    name = ServicePortName(NamespacedName("ns1", "dns"), "dns", "UDP")
    with pytest.raises(ValueError):
        StaleFlow(4, Frontend(53, parse_ip("fd00::1", "t")), None, name, Reason.NEWLY_ACTIVE)
    with pytest.raises(ValueError):
        Frontend(0)


# --- executing them -------------------------------------------------------------------


class FakeConntrack:
    """Answers like conntrack -D: stderr counts, exit 1 when nothing matched."""

    def __init__(self, counts: list[int], fail: bool = False) -> None:
        self.counts = counts
        self.fail = fail
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        assert stdin is None
        self.calls.append(list(argv))
        if self.fail:
            return Result(2, "", "conntrack v1.4.7 (conntrack-tools): Operation not permitted")
        n = self.counts.pop(0)
        msg = f"conntrack v1.4.7 (conntrack-tools): {n} flow entries have been deleted.\n"
        return Result(0 if n else 1, "", msg)


def _flows() -> tuple[StaleFlow, ...]:
    return stale_udp_flows(view(dns("10.180.0.1", "10.180.0.2", type="NodePort",
                                    ports=[("dns", 53, "UDP", 30053)])),
                           view(dns("10.180.0.1", type="NodePort",
                                    ports=[("dns", 53, "UDP", 30053)])))


def test_cleaner_runs_one_delete_per_flow_and_counts() -> None:
    fake = FakeConntrack([2, 0])  # "0 flow entries" (exit 1) is not an error
    assert ConntrackCleaner(fake).delete(_flows()) == 2
    assert fake.calls == [
        ["conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-dst", "172.30.0.10",
         "--orig-port-dst", "53", "--reply-src", "10.180.0.2"],
        ["conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-port-dst", "30053",
         "--reply-src", "10.180.0.2"],
    ]


def test_cleaner_reports_failures_after_trying_all() -> None:
    fake = FakeConntrack([], fail=True)
    with pytest.raises(DataPlaneError, match=r"exit 2.*Operation not permitted"):
        ConntrackCleaner(fake).delete(_flows())
    assert len(fake.calls) == 2
