"""Packets the node sends to its own addresses: both tracers, one answer.

A node talking to itself is the journey where iptables and nftables tracers used to
disagree: the packet takes OUTPUT and POSTROUTING, and if its destination (after any
DNAT) is local it comes back in on ``lo`` through INPUT, where the rules guarding the
node's own addresses (NodePorts without endpoints) apply. Both tracers now share that
journey (``kubeproxy.trace.netfilter``), so for the same node view they must give the
same verdict, endpoints and masquerade. Each case renders one cluster in both modes,
traces one node-originated packet through each, and holds both to the case's one expected
outcome; a case whose modes differ declares it in ``only``, where upstream's data planes
differ too.

Declared differences, both upstream's own:

* ``127.0.0.1:NODEPORT`` works only in iptables (localhost NodePorts, IPv4, with
  route_localnet); upstream's nftables mode offers no localhost NodePorts, so the packet
  there is simply delivered to whatever listens on the loopback port.
* An external or load-balancer IP with no usable endpoints: nftables jumps to
  ``service-endpoints-check`` from filter-output too (before DNAT), so what the node
  sends there is dropped / rejected; iptables' ``KUBE-EXTERNAL-SERVICES`` hangs off
  INPUT and FORWARD only, so the node's packet takes the short-circuit to the cluster
  endpoints (eTP Local) or leaves untouched (no endpoints at all).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.nodeview import build_node_view
from kubeproxy.render import iptables as render_iptables
from kubeproxy.render import nftables as render_nftables
from kubeproxy.trace.iptables import trace_iptables
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import Packet, TraceResult
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

MODES = ("iptables", "nftables")
LOCALHOST = "127.0.0.1"
CIP = "172.30.0.41"
EXT_IP = "192.168.99.11"
LB_IP = "5.6.7.8"
NODEPORT = 3001

Expect = tuple[str, tuple[str, ...], bool]  # verdict, endpoints, masquerade
ACCEPTED: Expect = ("ACCEPT", (), False)


def cluster(etp: str, *endpoints: Obj) -> list[Obj]:
    """ns1/svc1: ClusterIP 172.30.0.41:80, NodePort 3001, external IP 192.168.99.11 and
    load balancer 5.6.7.8, with this externalTrafficPolicy and these endpoints."""
    return [node(), service("svc1", type="LoadBalancer", ports=[("p80", 80, "TCP", NODEPORT)],
                            externalIPs=[EXT_IP], lb_ips=[LB_IP], externalTrafficPolicy=etp),
            endpoint_slice("svc1", list(endpoints))]


HERE = endpoint("10.180.0.1")  # a pod on this node
THERE = endpoint("10.180.1.1", node="node2")
HOST = endpoint(NODE_IP)  # a hostNetwork pod: the endpoint is the node's own address
BOTH = ("10.180.0.1:80", "10.180.1.1:80")
REMOTE = ("10.180.1.1:80",)


@dataclass(frozen=True)
class Case:
    id: str
    objects: list[Obj]
    dst: str
    port: int
    verdict: str
    endpoints: tuple[str, ...] = ()
    masquerade: bool = False
    src: str = NODE_IP  # the node's own address: a packet this node sends
    only: dict[str, Expect] = field(default_factory=dict)  # a declared mode difference


CASES = [
    # --- the node IP's NodePort: DNAT in OUTPUT, or back in on lo to INPUT ----------------
    Case("nodeport-node-ip-etp-cluster", cluster("Cluster", HERE, THERE), NODE_IP, NODEPORT,
         "DNAT", BOTH, True),
    Case("nodeport-node-ip-etp-local-short-circuits", cluster("Local", HERE, THERE), NODE_IP,
         NODEPORT, "DNAT", BOTH, True),
    Case("nodeport-node-ip-etp-local-no-local-endpoints", cluster("Local", THERE), NODE_IP,
         NODEPORT, "DNAT", REMOTE, True),
    Case("nodeport-node-ip-etp-cluster-no-endpoints-rejected-on-lo", cluster("Cluster"),
         NODE_IP, NODEPORT, "REJECT"),
    Case("nodeport-node-ip-etp-local-no-endpoints-rejected-on-lo", cluster("Local"),
         NODE_IP, NODEPORT, "REJECT"),
    Case("nodeport-node-ip-host-network-endpoint-loops-back", cluster("Cluster", HOST),
         NODE_IP, NODEPORT, "DNAT", (f"{NODE_IP}:80",), True),
    Case("node-ip-other-port-delivered-on-lo", cluster("Cluster", HERE), NODE_IP, 22, "ACCEPT"),
    # --- 127.0.0.1's NodePort: iptables' localhost NodePorts --------------------------------
    Case("nodeport-localhost-etp-cluster", cluster("Cluster", HERE, THERE), LOCALHOST,
         NODEPORT, "DNAT", BOTH, True, src=LOCALHOST, only={"nftables": ACCEPTED}),
    Case("nodeport-localhost-etp-local", cluster("Local", HERE, THERE), LOCALHOST, NODEPORT,
         "DNAT", BOTH, True, src=LOCALHOST, only={"nftables": ACCEPTED}),
    Case("nodeport-localhost-no-endpoints", cluster("Cluster"), LOCALHOST, NODEPORT, "REJECT",
         src=LOCALHOST, only={"nftables": ACCEPTED}),
    Case("localhost-other-port-delivered-on-lo", cluster("Cluster", HERE), LOCALHOST, 22,
         "ACCEPT", src=LOCALHOST),
    # --- the ClusterIP ------------------------------------------------------------------------
    Case("clusterip-etp-cluster", cluster("Cluster", HERE, THERE), CIP, 80, "DNAT", BOTH, True),
    Case("clusterip-etp-local", cluster("Local", HERE, THERE), CIP, 80, "DNAT", BOTH, True),
    Case("clusterip-no-endpoints", cluster("Cluster"), CIP, 80, "REJECT"),
    Case("clusterip-host-network-endpoint-loops-back", cluster("Local", HOST), CIP, 80, "DNAT",
         (f"{NODE_IP}:80",), True),
    # --- external and load-balancer IPs ---------------------------------------------------
    Case("external-ip-etp-cluster", cluster("Cluster", HERE, THERE), EXT_IP, 80, "DNAT", BOTH,
         True),
    Case("external-ip-etp-local-short-circuits", cluster("Local", HERE, THERE), EXT_IP, 80,
         "DNAT", BOTH, True),
    Case("external-ip-etp-local-no-local-endpoints", cluster("Local", THERE), EXT_IP, 80,
         "DNAT", REMOTE, True, only={"nftables": ("DROP", (), False)}),
    Case("external-ip-no-endpoints", cluster("Cluster"), EXT_IP, 80, "ACCEPT",
         only={"nftables": ("REJECT", (), False)}),
    Case("lb-ip-etp-cluster", cluster("Cluster", HERE, THERE), LB_IP, 80, "DNAT", BOTH, True),
    Case("lb-ip-etp-local-short-circuits", cluster("Local", HERE, THERE), LB_IP, 80, "DNAT",
         BOTH, True),
    Case("lb-ip-etp-local-no-local-endpoints", cluster("Local", THERE), LB_IP, 80, "DNAT",
         REMOTE, True, only={"nftables": ("DROP", (), False)}),
]


def trace_both(case: Case) -> dict[str, TraceResult]:
    """Render the case's cluster in both modes and trace its packet through each."""
    objects = decode_objects(case.objects)
    assert not objects.errors, objects.errors
    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
    view = build_node_view(objects, config, 4)
    node_obj = objects.node(NODE)
    assert node_obj is not None
    local = frozenset(ip for ip in node_obj.addresses if ip.version == 4)
    packet = Packet(src=ipaddress.ip_address(case.src), dst=ipaddress.ip_address(case.dst),
                    port=case.port, proto="tcp")
    return {
        "iptables": trace_iptables(render_iptables.render(view).save_text(), packet, local),
        "nftables": trace_nftables(render_nftables.render([view]).script(), packet, local),
    }


def outcome(result: TraceResult) -> Expect:
    return (result.verdict, result.endpoints, result.masquerade)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_node_to_itself(case: Case) -> None:
    got = trace_both(case)
    for mode in MODES:
        want = case.only.get(mode, (case.verdict, case.endpoints, case.masquerade))
        assert outcome(got[mode]) == want, f"{mode}:\n{got[mode].to_text()}"


def test_loop_back_on_lo_is_explained() -> None:
    case = next(c for c in CASES if c.id.endswith("no-endpoints-rejected-on-lo"))
    for mode, result in trace_both(case).items():
        assert any("comes back in on lo" in line for line in result.explanation), mode


def test_case_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def test_declared_differences_name_only_known_modes() -> None:
    assert {mode for c in CASES for mode in c.only} <= set(MODES)
    assert all(len(c.only) < len(MODES) for c in CASES)  # someone keeps the main answer

