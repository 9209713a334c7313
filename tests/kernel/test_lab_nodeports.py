"""Where NodePorts answer when nodePortAddresses is not given: the mode's default.

Upstream's nftables mode opens NodePorts only on the node's primary IPs (the Node
object's addresses, ``primary``); its iptables mode on every local address. The lab's
Node objects list the address external clients use (InternalIP = the node's lab address),
so a NodePort from outside works in both; the node's other local addresses (its pod
bridge cbr0) answer a NodePort only where every local address is a NodePort address.
"""

from __future__ import annotations

import time

import pytest

from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab, lab_yaml, mode_tag

pytestmark = pytest.mark.kernel

WEB = ["web-1", "web-2"]
NODE_GW = "10.244.1.1"  # node-1's cbr0: a local address of the node, not in its Node object

LAB = lab_yaml(["node-1"], [("web-1", "node-1", "web", 8080), ("web-2", "node-1", "web", 8080),
                           ("client", "node-1", "client", None)]) + """
---
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"""


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    lab = make_lab(f"ktnpa{mode_tag(mode)}", LAB, mode=mode)
    # A proxy may sync once before its Node's first list is folded in (the sync loop
    # waits for Services and EndpointSlices only); the primary IPs come from the Node,
    # so nftables' NodePorts can be missing for that moment after start, and the lab's
    # settle does not see it. Wait (bounded) until the Node's address answers.
    deadline = time.monotonic() + 10
    while lab.probe("external", "node-1", 30080, n=1).ok != 1:
        assert time.monotonic() < deadline, "the NodePort never answered on node-1"
        time.sleep(0.2)
    return lab


@pytest.mark.parametrize("mode", ["iptables", "nftables"], indirect=True)
def test_nodeport_from_outside_on_the_nodes_address(lab: Lab, mode: str) -> None:
    del mode
    result = lab.probe("external", "node-1", 30080, n=20)
    assert (result.ok, sorted(result.backends)) == (20, WEB), result


# Whether a NodePort answers on a local address the Node object does not list, by mode
# (upstream's defaults): nftables "primary", iptables every local address.
ON_OTHER_ADDRESSES = {"iptables": True, "nftables": False}


@pytest.mark.parametrize("mode", sorted(ON_OTHER_ADDRESSES), indirect=True)
def test_nodeport_on_another_local_address(lab: Lab, mode: str) -> None:
    result = lab.probe("client", NODE_GW, 30080, n=20)
    if ON_OTHER_ADDRESSES[mode]:
        assert (result.ok, sorted(result.backends)) == (20, WEB), result
    else:  # not a NodePort address: nothing on the node listens on 30080
        assert (result.ok, result.refused) == (0, 20), result
