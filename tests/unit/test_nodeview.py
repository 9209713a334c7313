"""The node view's decisions, as tables: "given this cluster and config, the view says".

Three tables:

* ``PORT_CASES``: one service port ("ns1/svc1:p80") -> its ServicePortView. Every row
  is checked on every decision (routes, external chain, firewall, health-check node
  port, endpoints); a row lists only where it differs from a plain ClusterIP Service
  with one endpoint on this node and one on node2 (``DEFAULT``).
* ``NODE_CASES``: the proxy configuration -> the node-wide decisions (where NodePorts
  answer, localhost NodePorts, which ClusterIP traffic is masqueraded, how local
  traffic is detected).
* ``LOOPBACK_FLOWS``: the localhost NodePort decisions as the renderers spell them,
  followed through the rendered rules by the packet tracers (which know nothing of
  the policy code), per data plane.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubeproxy.config.types import DetectLocalMode, ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import Family, parse_cidr
from kubeproxy.nodeview import (
    ClusterIPMasquerade,
    NodeView,
    Route,
    ServicePortView,
    build_node_view,
)
from kubeproxy.render import iptables, nftables
from kubeproxy.trace.iptables import trace_iptables
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import Packet
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

NODE_IP6 = "fd00::2"
LOCAL_EP, REMOTE_EP = "10.180.0.1", "10.180.1.1"  # on this node / on node2
LOCAL, REMOTE = f"{LOCAL_EP}:80", f"{REMOTE_EP}:80"


def config(**kw: Any) -> ProxyConfig:
    """node1's configuration; ClusterCIDR detect-local over 10.0.0.0/8 unless told."""
    kw.setdefault("cluster_cidrs", (parse_cidr("10.0.0.0/8", "test"),))
    return ProxyConfig(hostname=NODE, **kw)


def view(objects: list[Obj], family: Family = 4, **kw: Any) -> NodeView:
    return build_node_view(decode_objects(objects), config(**kw), family)


# --- one service port ----------------------------------------------------------------


def svc(*eps: Obj, **spec: Any) -> list[Obj]:
    """ns1/svc1 (172.30.0.41:80) with the given endpoints (default: one here, one on node2)."""
    endpoints = list(eps) if eps else [endpoint(LOCAL_EP), endpoint(REMOTE_EP, node="node2")]
    return [node(), service("svc1", **spec), endpoint_slice("svc1", endpoints)]


def here(**kw: Any) -> Obj:
    return endpoint(LOCAL_EP, **kw)


def there(**kw: Any) -> Obj:
    return endpoint(REMOTE_EP, node="node2", **kw)


TERMINATING: dict[str, Any] = {"ready": False, "serving": True, "terminating": True}
NODEPORT: dict[str, Any] = {"type": "NodePort", "ports": [("p80", 80, "TCP", 3001)]}
LB: dict[str, Any] = {"type": "LoadBalancer", "ports": [("p80", 80, "TCP", 3001)],
                      "lb_ips": ["5.6.7.8"]}
LOCAL_POLICY: dict[str, Any] = {"externalTrafficPolicy": "Local"}
HC: dict[str, Any] = {"healthCheckNodePort": 30000}
DUAL: dict[str, Any] = {"cluster_ip": ["172.30.0.41", "fd00:30::41"],
                        "ipFamilyPolicy": "PreferDualStack"}


def observe(spv: ServicePortView) -> dict[str, object]:
    """Every decision of a port view, in plain values."""
    return {
        "cluster_ip": str(spv.cluster_ip),
        "node_port": spv.node_port,
        "external_ips": tuple(str(ip) for ip in spv.external_ips),
        "lb_ips": tuple(str(ip) for ip in spv.load_balancer_ips),
        "source_ranges": tuple(str(r) for r in spv.source_ranges),
        "internal": spv.internal,
        "external": spv.external,
        "has_endpoints": spv.has_endpoints,
        "external_policy_local": spv.external_policy_local,
        "uses_external_chain": spv.uses_external_chain,
        "firewall": spv.firewall,
        "firewall_allows_node": spv.firewall_allows_node,
        "health_check_node_port": spv.health_check_node_port,
        "affinity_timeout": spv.affinity_timeout,
        "cluster": tuple(e.target for e in spv.cluster_endpoints),
        "local": tuple(e.target for e in spv.local_endpoints),
        "not_ready": tuple(e.target for e in spv.all_endpoints if not e.ready),
    }


DEFAULT: dict[str, object] = {
    "cluster_ip": "172.30.0.41", "node_port": 0, "external_ips": (), "lb_ips": (),
    "source_ranges": (), "internal": Route.CLUSTER, "external": Route.CLUSTER,
    "has_endpoints": True, "external_policy_local": False, "uses_external_chain": False,
    "firewall": False, "firewall_allows_node": False, "health_check_node_port": 0,
    "affinity_timeout": None, "cluster": (LOCAL, REMOTE), "local": (), "not_ready": (),
}
NO_ENDPOINTS: dict[str, object] = {"internal": Route.REJECT, "external": Route.REJECT,
                                   "has_endpoints": False, "cluster": ()}


@dataclass(frozen=True)
class PortCase:
    name: str
    objects: list[Obj]
    want: dict[str, object]  # differences from DEFAULT
    family: Family = 4
    config: dict[str, Any] = field(default_factory=dict)


PORT_CASES = [
    # --- ClusterIP and endpoint usability ---------------------------------------------
    PortCase("clusterip", svc(), {}),
    PortCase("clusterip-empty-slice", [node(), service("svc1"), endpoint_slice("svc1", [])],
             NO_ENDPOINTS),
    PortCase("clusterip-no-slice", [node(), service("svc1")], NO_ENDPOINTS),
    PortCase("clusterip-unready-only", svc(here(ready=False), there(ready=False)),
             NO_ENDPOINTS),
    PortCase("clusterip-serving-terminating-fallback",
             svc(here(**TERMINATING), there(**TERMINATING)), {"not_ready": (LOCAL, REMOTE)}),
    PortCase("clusterip-ready-wins-over-terminating", svc(here(**TERMINATING), there()),
             {"cluster": (REMOTE,)}),
    PortCase("session-affinity", svc(sessionAffinity="ClientIP"), {"affinity_timeout": 10800}),
    PortCase("port-protocol-mismatch-is-no-endpoint", [
        node(), service("svc1"),
        endpoint_slice("svc1", [here()], ports=[("p80", 80, "UDP")])], NO_ENDPOINTS),
    PortCase("named-port-resolved-per-slice", [
        node(), service("svc1"),
        endpoint_slice("svc1", [here()], name="a", ports=[("p80", 8080, "TCP")]),
        endpoint_slice("svc1", [there()], name="b", ports=[("p80", 8081, "TCP")])],
        {"cluster": (f"{LOCAL_EP}:8080", f"{REMOTE_EP}:8081")}),
    PortCase("address-in-two-slices-ready-copy-wins", [
        node(), service("svc1"),
        endpoint_slice("svc1", [here(ready=False)], name="a"),
        endpoint_slice("svc1", [here()], name="b")], {"cluster": (LOCAL,)}),
    PortCase("zone-hints-narrow-cluster-endpoints", [
        node(zone="zone-a"), service("svc1"), endpoint_slice("svc1", [
            here(zone_hints=["zone-b"]), there(zone_hints=["zone-a"])])],
        {"cluster": (REMOTE,)}),
    # --- internalTrafficPolicy=Local ----------------------------------------------------
    PortCase("itp-local", svc(internalTrafficPolicy="Local"),
             {"internal": Route.LOCAL, "cluster": (), "local": (LOCAL,)}),
    PortCase("itp-local-remote-only-drops", svc(there(), internalTrafficPolicy="Local"),
             {"internal": Route.DROP, "cluster": ()}),
    PortCase("itp-local-no-endpoints-rejects", [
        node(), service("svc1", internalTrafficPolicy="Local"), endpoint_slice("svc1", [])],
        {**NO_ENDPOINTS}),
    PortCase("itp-local-local-terminating-fallback",
             svc(here(**TERMINATING), there(), internalTrafficPolicy="Local"),
             {"internal": Route.LOCAL, "cluster": (), "local": (LOCAL,),
              "not_ready": (LOCAL,)}),
    PortCase("itp-local-etp-cluster-nodeport",
             svc(internalTrafficPolicy="Local", **NODEPORT),
             {"internal": Route.LOCAL, "node_port": 3001, "uses_external_chain": True,
              "local": (LOCAL,)}),
    # --- NodePort and externalTrafficPolicy --------------------------------------------
    PortCase("nodeport", svc(**NODEPORT), {"node_port": 3001, "uses_external_chain": True}),
    PortCase("nodeport-etp-local", svc(**NODEPORT, **LOCAL_POLICY),
             {"node_port": 3001, "uses_external_chain": True, "external": Route.LOCAL,
              "external_policy_local": True, "local": (LOCAL,)}),
    PortCase("nodeport-etp-local-remote-only-drops", svc(there(), **NODEPORT, **LOCAL_POLICY),
             {"node_port": 3001, "uses_external_chain": True, "external": Route.DROP,
              "external_policy_local": True, "cluster": (REMOTE,)}),
    PortCase("nodeport-etp-local-no-endpoints-rejects",
             [node(), service("svc1", **NODEPORT, **LOCAL_POLICY)],
             {**NO_ENDPOINTS, "node_port": 3001, "external_policy_local": True}),
    PortCase("nodeport-etp-local-local-terminating-fallback",
             svc(here(**TERMINATING), there(), **NODEPORT, **LOCAL_POLICY),
             {"node_port": 3001, "uses_external_chain": True, "external": Route.LOCAL,
              "external_policy_local": True, "cluster": (REMOTE,), "local": (LOCAL,),
              "not_ready": (LOCAL,)}),
    PortCase("both-local-remote-only-drops-both",
             svc(there(), internalTrafficPolicy="Local", **NODEPORT, **LOCAL_POLICY),
             {"node_port": 3001, "uses_external_chain": True, "internal": Route.DROP,
              "external": Route.DROP, "external_policy_local": True, "cluster": (REMOTE,)}),
    PortCase("etp-local-ignored-without-external-destinations", svc(**LOCAL_POLICY), {}),
    PortCase("external-ip-etp-local", svc(externalIPs=["192.168.99.11"], **LOCAL_POLICY),
             {"external_ips": ("192.168.99.11",), "uses_external_chain": True,
              "external": Route.LOCAL, "external_policy_local": True, "local": (LOCAL,)}),
    PortCase("nodeport-etp-local-has-no-health-check",
             svc(**NODEPORT, **LOCAL_POLICY, **HC),
             {"node_port": 3001, "uses_external_chain": True, "external": Route.LOCAL,
              "external_policy_local": True, "local": (LOCAL,)}),
    # --- LoadBalancer: health checks and source ranges -----------------------------------
    PortCase("lb-etp-local-health-check", svc(**LB, **LOCAL_POLICY, **HC),
             {"node_port": 3001, "lb_ips": ("5.6.7.8",), "uses_external_chain": True,
              "external": Route.LOCAL, "external_policy_local": True, "local": (LOCAL,),
              "health_check_node_port": 30000}),
    PortCase("lb-etp-cluster-has-no-health-check", svc(**LB, **HC),
             {"node_port": 3001, "lb_ips": ("5.6.7.8",), "uses_external_chain": True}),
    PortCase("lb-etp-local-no-endpoints-keeps-health-check",
             [node(), service("svc1", **LB, **LOCAL_POLICY, **HC)],
             {**NO_ENDPOINTS, "node_port": 3001, "lb_ips": ("5.6.7.8",),
              "external_policy_local": True, "health_check_node_port": 30000}),
    PortCase("lb-source-ranges-firewall", svc(**LB, loadBalancerSourceRanges=["203.0.113.0/25"]),
             {"node_port": 3001, "lb_ips": ("5.6.7.8",), "uses_external_chain": True,
              "source_ranges": ("203.0.113.0/25",), "firewall": True}),
    PortCase("lb-source-range-holding-node-ip", svc(**LB, loadBalancerSourceRanges=[
        "192.168.0.0/24"]), {"node_port": 3001, "lb_ips": ("5.6.7.8",),
                             "uses_external_chain": True, "source_ranges": ("192.168.0.0/24",),
                             "firewall": True, "firewall_allows_node": True}),
    PortCase("lb-source-ranges-no-endpoints-no-firewall",
             [node(), service("svc1", **LB, loadBalancerSourceRanges=["203.0.113.0/25"])],
             {**NO_ENDPOINTS, "node_port": 3001, "lb_ips": ("5.6.7.8",),
              "source_ranges": ("203.0.113.0/25",)}),
    PortCase("lb-source-ranges-without-lb-ip-no-firewall",
             svc(type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
                 loadBalancerSourceRanges=["203.0.113.0/25"]),
             {"node_port": 3001, "uses_external_chain": True,
              "source_ranges": ("203.0.113.0/25",)}),
    # --- IP families --------------------------------------------------------------------
    PortCase("ipv6-view-of-dual-stack", [
        node(ips=[NODE_IP, NODE_IP6]), service("svc1", **DUAL, **LB,
                                               loadBalancerSourceRanges=["203.0.113.0/25"]),
        endpoint_slice("svc1", [here(), there()]),
        endpoint_slice("svc1", [endpoint("fd00:180::1")], name="v6", family="IPv6")],
        {"cluster_ip": "fd00:30::41", "node_port": 3001, "uses_external_chain": True,
         "cluster": ("[fd00:180::1]:80",)}, family=6),
    PortCase("ipv4-view-of-dual-stack", [
        node(ips=[NODE_IP, NODE_IP6]), service("svc1", **DUAL),
        endpoint_slice("svc1", [here(), there()]),
        endpoint_slice("svc1", [endpoint("fd00:180::1")], name="v6", family="IPv6")], {}),
]


@pytest.mark.parametrize("case", PORT_CASES, ids=lambda c: c.name)
def test_service_port_view(case: PortCase) -> None:
    nv = view(case.objects, case.family, **case.config)
    assert [str(s.name) for s in nv.services] == ["ns1/svc1:p80"]
    assert observe(nv.services[0]) == {**DEFAULT, **case.want}


def test_service_without_a_cluster_ip_in_the_family_has_no_view() -> None:
    assert view(svc(), 6).services == ()


# --- node-wide decisions ---------------------------------------------------------------


def observe_node(nv: NodeView) -> dict[str, object]:
    np = nv.nodeports
    det = nv.local_detector
    return {
        "match_all": np.match_all,
        "addresses": tuple(str(ip) for ip in np.addresses),
        "destinations": tuple(str(ip) for ip in np.destinations),
        "routable": tuple(str(ip) for ip in np.routable),
        # What the "every local address" match excludes (only meaningful with match_all).
        "guard": str(np.guard) if np.match_all and np.guard is not None else None,
        "localhost": np.localhost,
        "masquerade": nv.cluster_ip_masquerade,
        "detector": (tuple(str(c) for c in det.cidrs), det.interface, det.prefix),
    }


NODE_DEFAULT: dict[str, object] = {
    "match_all": True, "addresses": (), "destinations": (), "routable": (), "guard": None,
    "localhost": True, "masquerade": ClusterIPMasquerade.NOT_LOCAL,
    "detector": (("10.0.0.0/8",), "", False),
}
V6_DEFAULT: dict[str, object] = {"guard": "::1/128", "localhost": False,
                                 "masquerade": ClusterIPMasquerade.NONE,
                                 "detector": ((), "", False)}
DUAL_NODE = [node(ips=[NODE_IP, NODE_IP6], pod_cidrs=["10.180.0.0/24", "fd00:180::/64"])]
CIDRS = (parse_cidr("10.0.0.0/8", "t"), parse_cidr("fd00:180::/48", "t"))


@dataclass(frozen=True)
class NodeCase:
    name: str
    config: dict[str, Any]
    want: dict[str, object]  # differences from NODE_DEFAULT
    family: Family = 4
    objects: list[Obj] = field(default_factory=lambda: DUAL_NODE)


NODE_CASES = [
    # --- where NodePorts answer, and localhost NodePorts -------------------------------
    NodeCase("defaults-localhost-nodeports", {}, {}),
    NodeCase("localhost-nodeports-off", {"localhost_nodeports": False},
             {"guard": "127.0.0.0/8", "localhost": False}),
    NodeCase("ipv6-never-localhost", {}, V6_DEFAULT, family=6),
    NodeCase("primary", {"nodeport_addresses": ("primary",)},
             {"match_all": False, "addresses": (NODE_IP,), "destinations": (NODE_IP,),
              "routable": (NODE_IP,), "localhost": False}),
    NodeCase("primary-ipv6", {"nodeport_addresses": ("primary",)},
             {**V6_DEFAULT, "match_all": False, "addresses": (NODE_IP6,), "guard": None,
              "destinations": (NODE_IP6,), "routable": (NODE_IP6,)}, family=6),
    NodeCase("cidr-with-node-ip", {"nodeport_addresses": ("192.168.0.0/16",)},
             {"match_all": False, "addresses": (NODE_IP,), "destinations": (NODE_IP,),
              "routable": (NODE_IP,), "localhost": False}),
    NodeCase("cidr-without-node-ip", {"nodeport_addresses": ("192.168.5.0/24",)},
             {"match_all": False, "localhost": False}),
    NodeCase("loopback-cidr-localhost-on", {"nodeport_addresses": ("127.0.0.0/8",)},
             {"match_all": False, "addresses": ("127.0.0.1",),
              "destinations": ("127.0.0.1",)}),
    NodeCase("loopback-cidr-localhost-off",
             {"nodeport_addresses": ("127.0.0.0/8",), "localhost_nodeports": False},
             {"match_all": False, "addresses": ("127.0.0.1",), "localhost": False}),
    NodeCase("node-and-loopback-cidrs",
             {"nodeport_addresses": ("192.168.0.0/16", "127.0.0.1/32")},
             {"match_all": False, "addresses": (NODE_IP, "127.0.0.1"),
              "destinations": (NODE_IP, "127.0.0.1"), "routable": (NODE_IP,)}),
    NodeCase("ipv6-loopback-cidr-is-never-a-destination",
             {"nodeport_addresses": ("fd00::/16", "::1/128")},
             {**V6_DEFAULT, "match_all": False, "addresses": (NODE_IP6, "::1"), "guard": None,
              "destinations": (NODE_IP6,), "routable": (NODE_IP6,)}, family=6),
    NodeCase("zero-cidr-is-every-address", {"nodeport_addresses": ("0.0.0.0/0",)}, {}),
    NodeCase("zero-cidr-of-the-other-family", {"nodeport_addresses": ("0.0.0.0/0",)},
             {**V6_DEFAULT, "match_all": False, "guard": None}, family=6),
    NodeCase("ipv6-zero-cidr", {"nodeport_addresses": ("::/0",)}, V6_DEFAULT, family=6),
    # --- ClusterIP masquerade: --masquerade-all wins -------------------------------------
    NodeCase("masquerade-all-wins-over-detect-local", {"masquerade_all": True},
             {"masquerade": ClusterIPMasquerade.ALL}),
    NodeCase("masquerade-all-without-detector",
             {"masquerade_all": True, "cluster_cidrs": ()},
             {"masquerade": ClusterIPMasquerade.ALL, "detector": ((), "", False)}),
    NodeCase("no-cluster-cidr-no-masquerade", {"cluster_cidrs": ()},
             {"masquerade": ClusterIPMasquerade.NONE, "detector": ((), "", False)}),
    # --- detect-local modes ----------------------------------------------------------------
    NodeCase("cluster-cidr-per-family", {"cluster_cidrs": CIDRS},
             {**V6_DEFAULT, "masquerade": ClusterIPMasquerade.NOT_LOCAL,
              "detector": (("fd00:180::/48",), "", False)}, family=6),
    NodeCase("node-cidr", {"detect_local_mode": DetectLocalMode.NODE_CIDR},
             {"detector": (("10.180.0.0/24",), "", False)}),
    NodeCase("node-cidr-ipv6", {"detect_local_mode": DetectLocalMode.NODE_CIDR},
             {**V6_DEFAULT, "masquerade": ClusterIPMasquerade.NOT_LOCAL,
              "detector": (("fd00:180::/64",), "", False)}, family=6),
    NodeCase("node-cidr-without-pod-cidrs", {"detect_local_mode": DetectLocalMode.NODE_CIDR},
             {"masquerade": ClusterIPMasquerade.NONE, "detector": ((), "", False)},
             objects=[node(pod_cidrs=[])]),
    NodeCase("bridge-interface", {"detect_local_mode": DetectLocalMode.BRIDGE_INTERFACE,
                                  "bridge_interface": "cbr0"},
             {"detector": ((), "cbr0", False)}),
    NodeCase("interface-name-prefix",
             {"detect_local_mode": DetectLocalMode.INTERFACE_NAME_PREFIX,
              "interface_name_prefix": "veth"}, {"detector": ((), "veth", True)}),
    NodeCase("unknown-node-primary-has-no-address", {"nodeport_addresses": ("primary",)},
             {"match_all": False, "localhost": False}, objects=[]),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: c.name)
def test_node_view(case: NodeCase) -> None:
    nv = view(case.objects, case.family, **case.config)
    assert observe_node(nv) == {**NODE_DEFAULT, **case.want}


def test_case_names_are_unique() -> None:
    for cases in (PORT_CASES, NODE_CASES, LOOPBACK_FLOWS):
        assert len({c.name for c in cases}) == len(cases)


# --- loopback NodePorts, through the rendered rules ------------------------------------

LOCAL_ADDRESSES = frozenset({ipaddress.ip_address(NODE_IP), ipaddress.ip_address(NODE_IP6)})
NODEPORT_SERVICE = [
    *DUAL_NODE,
    service("svc1", **DUAL, **NODEPORT),
    endpoint_slice("svc1", [here()]),
    endpoint_slice("svc1", [endpoint("fd00:180::1")], name="v6", family="IPv6"),
]


@dataclass(frozen=True)
class LoopbackFlow:
    """The node itself connects from ``dst`` to ``dst``:3001 (svc1's NodePort)."""

    name: str
    dst: str
    iptables: str  # the verdict in each data plane
    nftables: str
    config: dict[str, Any] = field(default_factory=dict)


LOOPBACK_FLOWS = [
    LoopbackFlow("ipv4-localhost-nodeport", "127.0.0.1", "DNAT", "ACCEPT"),
    LoopbackFlow("ipv4-localhost-nodeports-off", "127.0.0.1", "ACCEPT", "ACCEPT",
                 {"localhost_nodeports": False}),
    LoopbackFlow("ipv4-node-ip", NODE_IP, "DNAT", "DNAT"),
    LoopbackFlow("ipv6-loopback-never", "::1", "ACCEPT", "ACCEPT"),
    LoopbackFlow("ipv6-node-ip", NODE_IP6, "DNAT", "DNAT"),
    LoopbackFlow("ipv4-loopback-listed", "127.0.0.1", "DNAT", "ACCEPT",
                 {"nodeport_addresses": ("127.0.0.0/8",)}),
    LoopbackFlow("ipv4-loopback-listed-localhost-off", "127.0.0.1", "ACCEPT", "ACCEPT",
                 {"nodeport_addresses": ("127.0.0.0/8",), "localhost_nodeports": False}),
    LoopbackFlow("ipv4-node-ip-not-listed", NODE_IP, "ACCEPT", "ACCEPT",
                 {"nodeport_addresses": ("127.0.0.0/8",)}),
    LoopbackFlow("ipv6-loopback-listed", "::1", "ACCEPT", "ACCEPT",
                 {"nodeport_addresses": ("::1/128", "127.0.0.0/8")}),
    LoopbackFlow("ipv6-node-ip-listed-with-loopback", NODE_IP6, "DNAT", "DNAT",
                 {"nodeport_addresses": ("::1/128", "fd00::/16")}),
]


@pytest.mark.parametrize("case", LOOPBACK_FLOWS, ids=lambda c: c.name)
def test_loopback_nodeport_flow(case: LoopbackFlow) -> None:
    cluster = decode_objects(NODEPORT_SERVICE)
    cfg = config(cluster_cidrs=CIDRS, **case.config)
    views = [build_node_view(cluster, cfg, f) for f in (4, 6)]
    addr = ipaddress.ip_address(case.dst)
    packet = Packet(addr, addr, 3001, "tcp")
    save = iptables.render(views[0 if addr.version == 4 else 1]).save_text()
    got = (trace_iptables(save, packet, LOCAL_ADDRESSES).verdict,
           trace_nftables(nftables.render(views).script(), packet, LOCAL_ADDRESSES).verdict)
    assert got == (case.iptables, case.nftables)


@pytest.mark.parametrize(("family", "config_kw", "guard"), [
    (4, {}, ""),
    (4, {"localhost_nodeports": False}, "! -d 127.0.0.0/8 "),
    (6, {}, "! -d ::1/128 "),
])
def test_nodeports_rule_spells_the_guard(family: Family, config_kw: dict[str, Any],
                                         guard: str) -> None:
    """The last rule of nat KUBE-SERVICES, as upstream writes it."""
    nv = build_node_view(decode_objects(NODEPORT_SERVICE), config(**config_kw), family)
    rules = iptables.render(nv).tables["nat"][iptables.KUBE_SERVICES]
    assert rules[-1] == (
        f'-A KUBE-SERVICES {guard}-m comment --comment "{iptables.NODEPORTS_COMMENT}" '
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
