"""Stale UDP conntrack entries are really deleted: one namespace, real entries.

The test creates its own namespace (``kpc-<random>``, deleted in a finally) with a veth
pair and iptables DNAT rules that play a UDP service: 172.30.0.10:53 and NodePort 30053
to endpoints 10.0.0.2:5353 and 10.0.0.3:5353 (which one depends on the client's source
port, so both have a flow). Python sends one datagram per flow inside the namespace;
then endpoint 10.0.0.2 leaves the service, the cleaner runs the deletes the pure
function computes, and ``conntrack -L`` shows only the flows to 10.0.0.3 left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.conntrack import stale_udp_flows
from kubeproxy.dataplane.base import NetnsRunner, check
from kubeproxy.dataplane.conntrack import ConntrackCleaner
from kubeproxy.k8s import decode_objects
from kubeproxy.nodeview import NodeView, build_node_view
from tests.builders import Obj, endpoint, endpoint_slice, node, service


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to create a network namespace"
    for tool in ("ip", "iptables", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

SETUP = [
    "ip link set lo up",
    "ip link add v0 type veth peer name v1",
    "ip link set v0 up",
    "ip link set v1 up",
    "ip addr add 10.0.0.1/24 dev v0",
    "ip route add default dev v0",
    # client source port 40002 goes to 10.0.0.3, everything else to 10.0.0.2
    "iptables -t nat -A OUTPUT -p udp --sport 40002 -d 172.30.0.10 --dport 53 "
    "-j DNAT --to-destination 10.0.0.3:5353",
    "iptables -t nat -A OUTPUT -p udp -d 172.30.0.10 --dport 53 "
    "-j DNAT --to-destination 10.0.0.2:5353",
    "iptables -t nat -A OUTPUT -p udp --sport 40002 --dport 30053 "
    "-j DNAT --to-destination 10.0.0.3:5353",
    "iptables -t nat -A OUTPUT -p udp --dport 30053 -j DNAT --to-destination 10.0.0.2:5353",
]
SEND = """
import socket
for sport in (40001, 40002):
    for dst in (("172.30.0.10", 53), ("10.0.0.9", 30053)):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("10.0.0.1", sport))
            s.sendto(b"x", dst)
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = "kpc-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str) -> str:
    return check(NetnsRunner(ns, timeout=30), argv)


def udp_flows(ns: str) -> list[tuple[str, str]]:
    """(original destination ip:port, reply source) of every UDP entry."""
    out = []
    for line in in_ns(ns, "conntrack", "-L", "-p", "udp").splitlines():
        words = [f.split("=", 1) for f in line.split() if "=" in f]
        dst = next(v for k, v in words if k == "dst")  # the first: original direction
        dport = next(v for k, v in words if k == "dport")
        reply_src = [v for k, v in words if k == "src"][1]
        out.append((f"{dst}:{dport}", reply_src))
    return sorted(out)


def view(*endpoints: str) -> NodeView:
    objs: list[Obj] = [
        node(),
        service("dns", cluster_ip="172.30.0.10", type="NodePort",
                ports=[("dns", 53, "UDP", 30053)]),
        endpoint_slice("dns", [endpoint(ip) for ip in endpoints],
                       ports=[("dns", 5353, "UDP")]),
    ]
    return build_node_view(decode_objects(objs), ProxyConfig(hostname="node1"), 4)


def test_stale_udp_entries_are_deleted(netns: str) -> None:
    for command in SETUP:
        in_ns(netns, *command.split())
    in_ns(netns, sys.executable, "-c", SEND)
    assert udp_flows(netns) == [
        ("10.0.0.9:30053", "10.0.0.2"), ("10.0.0.9:30053", "10.0.0.3"),
        ("172.30.0.10:53", "10.0.0.2"), ("172.30.0.10:53", "10.0.0.3")]

    flows = stale_udp_flows(view("10.0.0.2", "10.0.0.3"), view("10.0.0.3"))
    assert [str(f) for f in flows] == [
        "udp 172.30.0.10:53 -> 10.0.0.2 (ns1/dns:dns, endpoint-gone)",
        "udp *:30053 -> 10.0.0.2 (ns1/dns:dns, endpoint-gone)"]
    cleaner = ConntrackCleaner(NetnsRunner(netns, timeout=30))
    assert cleaner.delete(flows) == 2
    assert udp_flows(netns) == [("10.0.0.9:30053", "10.0.0.3"), ("172.30.0.10:53", "10.0.0.3")]
    assert cleaner.delete(flows) == 0  # nothing left to match: not an error
