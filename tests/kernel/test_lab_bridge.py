"""The lab's pod bridge keeps its MAC address when a Pod goes away.

A Linux bridge whose address was never set takes the lowest MAC address of its ports and
changes it when that port goes. Before cbr0's address was fixed (NodePlan.bridge_mac),
deleting the Pod whose veth had the lowest MAC left every other Pod with a neighbour
entry for its gateway that no port answers: their packets were flooded to the bridge's
ports and never reached the node until the entry expired (tens of seconds). iptables and
nftables modes hid it (br_netfilter DNATs those bridged packets and re-routes them);
IPVS mode, which only sees packets the node receives, showed it as connections that
time out right after a Pod is deleted (issue 9). kubenet fixed its cbr0 the same way.

Real packets: a Pod connects to its gateway, the Pod with the lowest MAC goes away, the
same Pod connects again at once (its neighbour entry is still the cached one).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from kubeproxy.lab import layout, network
from kubeproxy.lab.layout import BRIDGE
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.processes import python_env
from tests.kernel.conftest import session_lab, skip_reason

pytestmark = pytest.mark.kernel

LAB = """
kind: Node
metadata: {name: n1}
---
kind: Pod
metadata: {name: lowest}
spec: {nodeName: n1, containers: [{name: c}]}
---
kind: Pod
metadata: {name: other}
spec: {nodeName: n1, containers: [{name: c}]}
"""
LOWEST_MAC = "02:00:00:00:00:01"  # below any random (locally administered) veth MAC


def mac(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", dev], capture_output=True,
                         text=True, check=True).stdout
    return out.split("link/ether ")[1].split()[0]


def reach(ns: str, ip: str) -> str:
    """One connect (the lab's probe) to a port nothing listens on: "refused" when the
    SYN reached the node (it answers with a reset), "timeout" when it was flooded."""
    argv = [sys.executable, "-m", "kubeproxy.lab.probe", "--to", ip, "--port", "9", "-n", "1",
            "--timeout", "2"]
    out = subprocess.run(Netns().exec_argv(ns, argv), env=python_env(), capture_output=True,
                         text=True, check=True).stdout
    failed = [kind for kind, n in ProbeResult.from_json(json.loads(out)).failures().items() if n]
    return failed[0] if failed else "ok"


def test_a_deleted_pod_does_not_change_the_gateways_mac() -> None:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    name = session_lab(f"ktbr{secrets.choice('abcdefghij')}")
    plan = layout.plan(name, parse_objects(load_documents([("bridge", LAB)])))
    net = Netns()
    node = plan.nodes[0]
    lowest, other = (next(p for p in plan.pods if p.name == n) for n in ("lowest", "other"))
    try:
        network.build(net, plan)
        subprocess.run(["ip", "-n", node.ns, "link", "set", lowest.host_if, "address",
                        LOWEST_MAC], check=True)
        assert mac(node.ns, BRIDGE) == node.bridge_mac
        assert reach(other.ns, other.gateway) == "refused"  # "other" caches its MAC

        net.delete(lowest.ns)  # its veth, the bridge's lowest port, goes with it

        assert mac(node.ns, BRIDGE) == node.bridge_mac
        assert reach(other.ns, other.gateway) == "refused"
    finally:
        network.teardown(net, layout.ns_prefix(name))
