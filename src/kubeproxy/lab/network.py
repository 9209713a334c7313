"""A layout plan -> iproute2 calls (through the Netns adapter), and back to nothing.

``lab up`` builds the base network (``build_base``: switch, nodes, external client); the
lab agent adds and removes Pods one by one (``add_pod``; a Pod's veth goes away with its
namespace) and keeps the external client's routes to Service external/LB IPs current
(``set_external_routes``). ``build`` does all of it at once for a static plan.

Sysctls, all set inside lab namespaces only (they are per network namespace):

- node: ``net.ipv4.ip_forward=1`` (nodes route for their pods and for Services);
  ``net.bridge.bridge-nf-call-iptables=1`` so bridged pod-to-pod replies on ``cbr0``
  pass conntrack and get their DNAT undone (a pod calling a ClusterIP whose endpoint is
  a pod on the same bridge). br_netfilter is built into this kernel; where it is a
  module, it must be loaded (``modprobe br_netfilter``) before ``lab up``.
- switch: ``bridge-nf-call-iptables=0``: the lab network's bridge is a plain wire.

Hairpin mode is on for every pod's port on ``cbr0`` (as kubenet does): with
br_netfilter, a pod's packet to its own Service is DNATed back to the pod while still in
the bridge (``bridged_dnat``), and the bridge must send it out of the port it came in
on; the masquerade rule gives it the node's cbr0 address as source.
"""

from __future__ import annotations

from kubeproxy.errors import LabError
from kubeproxy.lab.errors import CommandError
from kubeproxy.lab.layout import (
    BRIDGE,
    LAB_CIDR,
    SWITCH_BRIDGE,
    ExternalPlan,
    NodePlan,
    Plan,
    PodPlan,
)
from kubeproxy.lab.netns import Netns

LAB_IF = "eth0"

NODE_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
)
SWITCH_SYSCTLS = (
    ("net.bridge.bridge-nf-call-iptables", "0"),
    ("net.bridge.bridge-nf-call-ip6tables", "0"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
)


def build(net: Netns, plan: Plan) -> None:
    """Create every namespace, link, address and route of the plan."""
    build_base(net, plan)
    for pod in plan.pods:
        add_pod(net, plan.node(pod.node), pod)


def build_base(net: Netns, plan: Plan) -> None:
    """The lab network without its Pods: switch, nodes, external client and its routes."""
    for ns in (plan.switch_ns, plan.external.ns, *(n.ns for n in plan.nodes)):
        net.add(ns)
    sw = plan.switch_ns
    net.add_bridge(sw, SWITCH_BRIDGE)
    for key, value in SWITCH_SYSCTLS:
        net.sysctl(sw, key, value)
    for node in plan.nodes:
        _wire_to_switch(net, sw, node.switch_port, node.ns)
        net.add_address(node.ns, LAB_IF, f"{node.lab_ip}/{LAB_CIDR.prefixlen}")
        net.up(node.ns, LAB_IF)
        prefixlen = node.pod_cidr.split("/")[1]
        net.add_bridge(node.ns, BRIDGE, node.bridge_mac)
        net.add_address(node.ns, BRIDGE, f"{node.gateway}/{prefixlen}")
        for key, value in NODE_SYSCTLS:
            try:
                net.sysctl(node.ns, key, value)
            except CommandError as exc:
                if key.startswith("net.bridge."):
                    raise LabError(
                        f"{key} is missing: the kernel's br_netfilter is not loaded "
                        "(the lab does not load modules itself: run `modprobe br_netfilter`)"
                    ) from exc
                raise
        for other in plan.nodes:
            if other.name != node.name:
                net.add_route(node.ns, other.pod_cidr, via=other.lab_ip)
        # Everything else is on the lab network, which ends at its bridge.
        net.add_route(node.ns, "default", dev=LAB_IF)
    ext = plan.external
    _wire_to_switch(net, sw, ext.switch_port, ext.ns)
    for client in ext.clients:
        net.add_address(ext.ns, LAB_IF, f"{client}/32")
    net.up(ext.ns, LAB_IF)
    net.add_route(ext.ns, str(LAB_CIDR), dev=LAB_IF, src=ext.clients[0])
    for dst in ext.routes:
        net.add_route(ext.ns, dst, via=ext.via, src=ext.clients[0])


def add_pod(net: Netns, node: NodePlan, pod: PodPlan) -> None:
    """A Pod's namespace, its veth to the node's cbr0 (hairpin on), address and route."""
    net.add(pod.ns)
    net.flush_neighbor(node.ns, pod.ip, BRIDGE)
    net.add_veth(node.ns, pod.host_if, pod.ns, LAB_IF)
    net.set_master(node.ns, pod.host_if, BRIDGE)
    net.set_hairpin(node.ns, pod.host_if)
    net.up(node.ns, pod.host_if)
    net.add_address(pod.ns, LAB_IF, f"{pod.ip}/{pod.prefixlen}")
    net.up(pod.ns, LAB_IF)
    net.add_route(pod.ns, "default", via=pod.gateway)


def forget_pod(net: Netns, node: NodePlan, pod: PodPlan) -> None:
    """Drop the node's neighbour entry of a Pod that went away, so that a new Pod given
    the same address later is reached at its own MAC address, not the old one's."""
    net.flush_neighbor(node.ns, pod.ip, BRIDGE)


def external_routes(net: Netns, ext: ExternalPlan) -> set[str]:
    """The Service external/LB IP routes the external namespace has now (x.x.x.x/32)."""
    out = set()
    for line in net.routes(ext.ns):
        words = line.split()
        if len(words) >= 3 and words[1:3] == ["via", ext.via] and "/" not in words[0]:
            out.add(f"{words[0]}/32")
    return out


def set_external_routes(net: Netns, ext: ExternalPlan, want: set[str]) -> bool:
    """Route exactly ``want`` (x.x.x.x/32) to the external node; True if anything changed."""
    have = external_routes(net, ext)
    for dst in sorted(have - want):
        net.del_route(ext.ns, dst)
    for dst in sorted(want - have):
        net.add_route(ext.ns, dst, via=ext.via, src=ext.clients[0])
    return have != want


def _wire_to_switch(net: Netns, switch: str, port: str, ns: str) -> None:
    net.add_veth(switch, port, ns, LAB_IF)
    net.set_master(switch, port, SWITCH_BRIDGE)
    net.up(switch, port)


def teardown(net: Netns, prefix: str) -> list[str]:
    """Delete every namespace whose name starts with prefix (a lab's ``kpl-<lab>-``)."""
    gone = net.list_namespaces(prefix)
    for ns in gone:
        net.delete(ns)
    return gone
