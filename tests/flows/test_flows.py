"""The packet-flow table: every REFERENCE.md scenario, through the rendered rules.

Each case builds a small cluster, renders the node's rules in a mode, and follows one
packet through them with that mode's tracer (which interprets the rule text and knows
nothing of the policy code). The expected outcome is upstream kube-proxy's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from kubeproxy import modes
from kubeproxy.config.types import DetectLocalMode, LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.nodeview import node_views
from kubeproxy.trace.result import Packet, TraceResult
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

MODES = modes.NAMES  # every registered mode runs the whole table
POD = "10.180.0.9"  # a pod on this node that is not an endpoint
EXTERNAL = "203.0.113.2"
BLOCKED = "203.0.113.130"
CIDR = "10.0.0.0/8"

Expect = tuple[str, tuple[str, ...], bool]  # verdict, endpoints, masquerade


@dataclass(frozen=True)
class Case:
    id: str
    objects: list[Obj]
    src: str
    dst: str
    port: int
    verdict: str
    endpoints: tuple[str, ...] = ()
    masquerade: bool = False
    proto: Literal["tcp", "udp", "sctp"] = "tcp"
    in_interface: str = "eth0"
    config: dict[str, Any] = field(default_factory=dict)
    only: dict[str, Expect] = field(default_factory=dict)  # mode-specific outcome


def eps(*ips: str, port: int = 80) -> tuple[str, ...]:
    return tuple(sorted(f"{ip}:{port}" for ip in ips))


def basic(**svc: Any) -> list[Obj]:
    """ns1/svc1 172.30.0.41:80 -> 10.180.0.1 (this node) and 10.180.1.1 (node2)."""
    return [node(), service("svc1", **svc), endpoint_slice("svc1", [
        endpoint("10.180.0.1"), endpoint("10.180.1.1", node="node2")])]


def one_port(name: str, port: int, proto: str) -> list[Obj]:
    """ns1/svc1 with one port of the given protocol, one local endpoint."""
    return [node(), service("svc1", ports=[(name, port, proto, 0)]),
            endpoint_slice("svc1", [endpoint("10.180.0.1")], ports=[(name, port, proto)])]


NODEPORT: dict[str, Any] = {"type": "NodePort", "ports": [("p80", 80, "TCP", 3001)]}
LOCAL_NP: dict[str, Any] = {**NODEPORT, "externalTrafficPolicy": "Local"}
BOTH = eps("10.180.0.1", "10.180.1.1")
LOCAL_ONLY = eps("10.180.0.1")
# ebpf: in-node sockets are connected to the backend itself (no NAT, so no masquerade).
SOCKET_LB: Expect = ("DNAT", BOTH, False)
# ipvs: KUBE-IPVS-FILTER rejects new connections to a port of a kube-ipvs0 address that
# is no virtual server (upstream issue 72236).
IPVS_UNKNOWN_PORT: Expect = ("REJECT", (), False)
# ipvs: one virtual server per external frontend serves every client, so under eTP=Local
# it holds only the local endpoints (no short-circuit of pod / node traffic) and its
# traffic is not marked for masquerade (KUBE-NODE-PORT-LOCAL-TCP returns).
IPVS_LOCAL_VS: Expect = ("DNAT", LOCAL_ONLY, False)
# ipvs: a Local policy without local endpoints falls back to the cluster endpoints
# (upstream syncEndpoint, PR 97081: local pods keep access); there is no DROP.
IPVS_LOCAL_FALLBACK: Expect = ("DNAT", ("10.180.1.1:80",), False)
REMOTE_ONLY = [node(), service("svc1", **LOCAL_NP),
               endpoint_slice("svc1", [endpoint("10.180.1.1", node="node2")])]
LB: dict[str, Any] = {"type": "LoadBalancer", "ports": [("p80", 80, "TCP", 3001)],
                      "lb_ips": ["5.6.7.8"]}
EMPTY = [node(), service("svc1", type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
                         lb_ips=["5.6.7.8"], externalIPs=["192.168.99.11"]),
         endpoint_slice("svc1", [])]
V6 = [node(ips=[NODE_IP, "fd00::2"]),
      service("svc6", cluster_ip=["172.30.0.46", "fd00:30::46"],
              ipFamilyPolicy="PreferDualStack"),
      endpoint_slice("svc6", [endpoint("10.180.0.6")], name="svc6-v4"),
      endpoint_slice("svc6", [endpoint("fd00:180::6")], name="svc6-v6", family="IPv6")]

CASES = [
    # --- ClusterIP -------------------------------------------------------------------
    Case("clusterip-from-pod", basic(), POD, "172.30.0.41", 80, "DNAT", BOTH),
    Case("clusterip-from-outside-is-masqueraded", basic(), EXTERNAL, "172.30.0.41", 80,
         "DNAT", BOTH, True),
    Case("clusterip-from-node-is-masqueraded", basic(), NODE_IP, "172.30.0.41", 80,
         "DNAT", BOTH, True, only={"ebpf": SOCKET_LB}),
    Case("clusterip-wrong-port", basic(), POD, "172.30.0.41", 81, "ACCEPT",
         only={"nftables": ("REJECT", (), False), "ebpf": ("REJECT", (), False),
               "ipvs": IPVS_UNKNOWN_PORT}),
    Case("hairpin-is-masqueraded", basic(), "10.180.0.1", "172.30.0.41", 80, "DNAT", BOTH,
         True, only={"ebpf": SOCKET_LB}),
    Case("udp", one_port("dns", 53, "UDP"), POD, "172.30.0.41", 53, "DNAT",
         eps("10.180.0.1", port=53), proto="udp"),
    Case("udp-port-not-tcp", one_port("dns", 53, "UDP"), POD, "172.30.0.41", 53, "ACCEPT",
         only={"nftables": ("REJECT", (), False), "ebpf": ("REJECT", (), False),
               "ipvs": IPVS_UNKNOWN_PORT}),
    Case("sctp", one_port("s", 9000, "SCTP"), POD, "172.30.0.41", 9000, "DNAT",
         eps("10.180.0.1", port=9000), proto="sctp"),
    Case("masquerade-all", basic(), POD, "172.30.0.41", 80, "DNAT", BOTH, True,
         config={"masquerade_all": True}, only={"ebpf": SOCKET_LB}),
    Case("session-affinity-reaches-all", basic(sessionAffinity="ClientIP"), POD,
         "172.30.0.41", 80, "DNAT", BOTH),
    Case("round-robin-reaches-all", basic(), POD, "172.30.0.41", 80, "DNAT", BOTH,
         config={"lb_algorithm": LBAlgorithm.ROUND_ROBIN}),
    Case("named-ports-over-two-slices", [
        node(), service("svc1", ports=[("http", 80, "TCP", 0)]),
        endpoint_slice("svc1", [endpoint("10.180.0.1")], name="a",
                       ports=[("http", 8080, "TCP")]),
        endpoint_slice("svc1", [endpoint("10.180.1.1", node="node2")], name="b",
                       ports=[("http", 8081, "TCP"), ("other", 9, "TCP")])],
        POD, "172.30.0.41", 80, "DNAT", ("10.180.0.1:8080", "10.180.1.1:8081")),
    # --- endpoint usability ---------------------------------------------------------
    Case("no-endpoints-rejects", [node(), service("svc1"), endpoint_slice("svc1", [])],
         POD, "172.30.0.41", 80, "REJECT"),
    Case("no-slice-rejects", [node(), service("svc1")], POD, "172.30.0.41", 80, "REJECT"),
    Case("not-ready-only-rejects", [node(), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1", ready=False, serving=False)])],
        POD, "172.30.0.41", 80, "REJECT"),
    Case("terminating-fallback", [node(), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1", ready=False, serving=True, terminating=True),
        endpoint("10.180.0.2", ready=False, serving=False, terminating=True)])],
        POD, "172.30.0.41", 80, "DNAT", eps("10.180.0.1")),
    Case("ready-wins-over-terminating", [node(), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1", ready=False, serving=True, terminating=True),
        endpoint("10.180.0.2")])],
        POD, "172.30.0.41", 80, "DNAT", eps("10.180.0.2")),
    # --- topology ---------------------------------------------------------------------
    Case("zone-hints-used", [node(zone="zone-a"), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1", zone_hints=["zone-a"]),
        endpoint("10.180.1.1", node="node2", zone_hints=["zone-b"])])],
        POD, "172.30.0.41", 80, "DNAT", eps("10.180.0.1")),
    Case("zone-hints-ignored-if-one-missing", [node(zone="zone-a"), service("svc1"),
        endpoint_slice("svc1", [endpoint("10.180.0.1", zone_hints=["zone-a"]),
                                endpoint("10.180.1.1", node="node2")])],
        POD, "172.30.0.41", 80, "DNAT", BOTH),
    Case("zone-hints-ignored-if-none-match", [node(zone="zone-c"), service("svc1"),
        endpoint_slice("svc1", [endpoint("10.180.0.1", zone_hints=["zone-a"]),
                                endpoint("10.180.1.1", node="node2", zone_hints=["zone-b"])])],
        POD, "172.30.0.41", 80, "DNAT", BOTH),
    Case("prefer-close-traffic-distribution", [node(zone="zone-a"),
        service("svc1", trafficDistribution="PreferClose"), endpoint_slice("svc1", [
            endpoint("10.180.0.1", zone_hints=["zone-a"]),
            endpoint("10.180.0.3", zone_hints=["zone-a"]),
            endpoint("10.180.1.1", node="node2", zone_hints=["zone-b"])])],
        POD, "172.30.0.41", 80, "DNAT", eps("10.180.0.1", "10.180.0.3")),
    Case("node-hints-used", [node(zone="zone-a"), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1", zone_hints=["zone-a"], node_hints=[NODE]),
        endpoint("10.180.1.1", node="node2", zone_hints=["zone-a"], node_hints=["node2"])])],
        POD, "172.30.0.41", 80, "DNAT", eps("10.180.0.1")),
    # --- internal traffic policy ------------------------------------------------------
    Case("itp-local-uses-local", basic(internalTrafficPolicy="Local"), POD, "172.30.0.41",
         80, "DNAT", LOCAL_ONLY),
    Case("itp-local-without-local-drops", [node(), service(
        "svc1", internalTrafficPolicy="Local"), endpoint_slice("svc1", [
            endpoint("10.180.1.1", node="node2")])], POD, "172.30.0.41", 80, "DROP",
         # ipvs: the ClusterIP virtual server has no real servers: ICMP port unreachable.
         only={"ipvs": ("REJECT", (), False)}),
    # --- NodePort ---------------------------------------------------------------------
    Case("nodeport-from-outside", basic(**NODEPORT), EXTERNAL, NODE_IP, 3001, "DNAT", BOTH,
         True),
    Case("nodeport-wrong-port", basic(**NODEPORT), EXTERNAL, NODE_IP, 3002, "ACCEPT"),
    Case("nodeport-from-localhost", basic(**NODEPORT), "127.0.0.1", "127.0.0.1", 3001,
         "DNAT", BOTH, True, only={"nftables": ("ACCEPT", (), False), "ebpf": SOCKET_LB,
                                   # ipvs: no virtual servers on loopback (as upstream)
                                   "ipvs": ("ACCEPT", (), False)}),
    Case("nodeport-etp-local-from-outside", basic(**LOCAL_NP), EXTERNAL, NODE_IP, 3001,
         "DNAT", LOCAL_ONLY, False),
    Case("nodeport-etp-local-from-pod-short-circuits", basic(**LOCAL_NP), POD, NODE_IP, 3001,
         "DNAT", BOTH, False, only={"ipvs": IPVS_LOCAL_VS}),
    Case("nodeport-etp-local-from-node-is-masqueraded", basic(**LOCAL_NP), NODE_IP, NODE_IP,
         3001, "DNAT", BOTH, True, only={"ebpf": SOCKET_LB, "ipvs": IPVS_LOCAL_VS}),
    Case("nodeport-etp-local-no-local-endpoints-drops", REMOTE_ONLY, EXTERNAL, NODE_IP,
         3001, "DROP", only={"ipvs": IPVS_LOCAL_FALLBACK}),
    Case("nodeport-etp-local-no-local-from-pod-short-circuits", REMOTE_ONLY, POD, NODE_IP,
         3001, "DNAT", eps("10.180.1.1")),
    Case("nodeport-no-endpoints-rejects", EMPTY, EXTERNAL, NODE_IP, 3001, "REJECT"),
    Case("nodeport-addresses-primary", basic(**NODEPORT), EXTERNAL, NODE_IP, 3001, "DNAT",
         BOTH, True, config={"nodeport_addresses": ("primary",)}),
    Case("nodeport-addresses-other-cidr", basic(**NODEPORT), EXTERNAL, NODE_IP, 3001,
         "ACCEPT", config={"nodeport_addresses": ("192.168.5.0/24",)}),
    # --- external IPs -----------------------------------------------------------------
    Case("external-ip", basic(externalIPs=["192.168.99.11"]), EXTERNAL, "192.168.99.11",
         80, "DNAT", BOTH, True),
    Case("external-ip-etp-local", basic(externalIPs=["192.168.99.11"],
                                        externalTrafficPolicy="Local"),
         EXTERNAL, "192.168.99.11", 80, "DNAT", LOCAL_ONLY, False),  # as upstream's code
    Case("external-ip-etp-local-nodeport", basic(externalIPs=["192.168.99.11"], **LOCAL_NP),
         EXTERNAL, "192.168.99.11", 80, "DNAT", LOCAL_ONLY, False),
    Case("external-ip-etp-local-no-local-drops", [node(), service(
        "svc1", externalIPs=["192.168.99.11"], **LOCAL_NP), endpoint_slice("svc1", [
            endpoint("10.180.1.1", node="node2")])], EXTERNAL, "192.168.99.11", 80, "DROP",
         only={"ipvs": IPVS_LOCAL_FALLBACK}),
    Case("external-ip-no-endpoints-rejects", EMPTY, EXTERNAL, "192.168.99.11", 80,
         "REJECT"),
    # --- load balancers ---------------------------------------------------------------
    Case("lb-ip", basic(**LB), EXTERNAL, "5.6.7.8", 80, "DNAT", BOTH, True),
    Case("lb-ip-etp-local", basic(**LB, externalTrafficPolicy="Local"), EXTERNAL, "5.6.7.8",
         80, "DNAT", LOCAL_ONLY, False),
    Case("lb-ip-mode-proxy-not-captured", basic(
        type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
        lb_ips=[{"ip": "5.6.7.8", "ipMode": "Proxy"}]), EXTERNAL, "5.6.7.8", 80, "ACCEPT"),
    Case("lb-source-range-allowed", basic(**LB, loadBalancerSourceRanges=["203.0.113.0/25"]),
         EXTERNAL, "5.6.7.8", 80, "DNAT", BOTH, True),
    Case("lb-source-range-blocked", basic(**LB, loadBalancerSourceRanges=["203.0.113.0/25"]),
         BLOCKED, "5.6.7.8", 80, "DROP"),
    Case("lb-source-range-not-applied-to-nodeport",
         basic(**LB, loadBalancerSourceRanges=["203.0.113.0/25"]),
         BLOCKED, NODE_IP, 3001, "DNAT", BOTH, True),
    Case("lb-source-range-node-allowed", basic(**LB, loadBalancerSourceRanges=[
        "192.168.0.0/24"]), NODE_IP, "5.6.7.8", 80, "DNAT", BOTH, True),
    Case("lb-no-endpoints-rejects", EMPTY, EXTERNAL, "5.6.7.8", 80, "REJECT"),
    # --- objects kube-proxy ignores -----------------------------------------------------
    Case("service-proxy-name-ignored", basic(
        labels={"service.kubernetes.io/service-proxy-name": "other"}),
        POD, "172.30.0.41", 80, "ACCEPT"),
    Case("headless-ignored", [node(), service("svc1", cluster_ip="None"),
                              endpoint_slice("svc1", [endpoint("10.180.0.1")])],
         POD, "172.30.0.41", 80, "ACCEPT"),
    Case("headless-label-slice-ignored", [node(), service("svc1"), endpoint_slice(
        "svc1", [endpoint("10.180.0.1")], labels={"service.kubernetes.io/headless": ""})],
        POD, "172.30.0.41", 80, "REJECT"),
    Case("external-name-ignored", [node(), {"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "svc1", "namespace": "ns1"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}],
        POD, "172.30.0.41", 80, "ACCEPT"),
    # --- detect-local modes -------------------------------------------------------------
    Case("node-cidr-local-pod", basic(), "10.180.0.9", "172.30.0.41", 80, "DNAT", BOTH,
         False, config={"detect_local_mode": DetectLocalMode.NODE_CIDR}),
    Case("node-cidr-other-node-pod", basic(), "10.180.1.9", "172.30.0.41", 80, "DNAT", BOTH,
         True, config={"detect_local_mode": DetectLocalMode.NODE_CIDR}),
    Case("bridge-interface-local", basic(), "10.180.0.9", "172.30.0.41", 80, "DNAT", BOTH,
         False, in_interface="cbr0", config={
             "detect_local_mode": DetectLocalMode.BRIDGE_INTERFACE,
             "bridge_interface": "cbr0"}),
    Case("bridge-interface-remote", basic(), "10.180.0.9", "172.30.0.41", 80, "DNAT", BOTH,
         True, in_interface="eth0", config={
             "detect_local_mode": DetectLocalMode.BRIDGE_INTERFACE,
             "bridge_interface": "cbr0"}),
    Case("interface-prefix-local", basic(), "10.180.0.9", "172.30.0.41", 80, "DNAT", BOTH,
         False, in_interface="veth1234", config={
             "detect_local_mode": DetectLocalMode.INTERFACE_NAME_PREFIX,
             "interface_name_prefix": "veth"}),
    Case("interface-prefix-remote", basic(), "10.180.0.9", "172.30.0.41", 80, "DNAT", BOTH,
         True, in_interface="eth0", config={
             "detect_local_mode": DetectLocalMode.INTERFACE_NAME_PREFIX,
             "interface_name_prefix": "veth"}),
    Case("no-cluster-cidr-no-masquerade", basic(), EXTERNAL, "172.30.0.41", 80, "DNAT",
         BOTH, False, config={"cluster_cidrs": ()}),
    # --- IP families ----------------------------------------------------------------------
    Case("dual-stack-ipv4", V6, POD, "172.30.0.46", 80, "DNAT", eps("10.180.0.6")),
    Case("dual-stack-ipv6", V6, "fd00:180::9", "fd00:30::46", 80, "DNAT",
         ("[fd00:180::6]:80",), False, config={"cluster_cidrs": (
             parse_cidr(CIDR, "t"), parse_cidr("fd00:180::/64", "t"))}),
    Case("ipv6-from-outside-is-masqueraded", V6, "2001:db8::2", "fd00:30::46", 80, "DNAT",
         ("[fd00:180::6]:80",), True, config={"cluster_cidrs": (
             parse_cidr(CIDR, "t"), parse_cidr("fd00:180::/64", "t"))}),
]


def trace(mode: str, case: Case) -> TraceResult:
    cluster = decode_objects(case.objects)
    assert not cluster.errors, cluster.errors
    settings: dict[str, Any] = {"hostname": NODE, "cluster_cidrs": (parse_cidr(CIDR, "t"),)}
    settings.update(case.config)
    config = ProxyConfig(mode=mode, **settings)
    src, dst = ipaddress.ip_address(case.src), ipaddress.ip_address(case.dst)
    node_obj = cluster.node(NODE)
    assert node_obj is not None
    local = frozenset(ip for ip in node_obj.addresses if ip.version == dst.version)
    packet = Packet(src=src, dst=dst, port=case.port, proto=case.proto,
                    in_interface=case.in_interface)
    proxy_mode = modes.get(mode)
    return proxy_mode.trace(proxy_mode.render(node_views(cluster, config)), packet, local)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_flow(mode: str, case: Case) -> None:
    want: Expect = case.only.get(mode, (case.verdict, case.endpoints, case.masquerade))
    got = trace(mode, case)
    assert (got.verdict, tuple(got.endpoints), got.masquerade) == want, got.to_text()


def test_case_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
