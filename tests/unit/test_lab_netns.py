"""The iproute2 adapter: what it runs for a plan, and what it refuses to touch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kubeproxy.lab import layout, network
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.netns import Netns


class Recorder:
    def __init__(self, netns_list: str = "") -> None:
        self.calls: list[list[str]] = []
        self.netns_list = netns_list

    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> str:
        self.calls.append(list(argv))
        return self.netns_list if list(argv) == ["ip", "netns", "list"] else ""


LAB = """
kind: Node
metadata: {name: n1}
---
kind: Node
metadata: {name: n2}
---
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {nodeName: n2, containers: [{ports: [{containerPort: 8080}]}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, externalIPs: [192.168.99.10], ports: [{port: 80}]}
"""


def build_commands() -> list[list[str]]:
    plan = layout.plan("u", parse_objects(load_documents([("t", LAB)])))
    rec = Recorder()
    network.build(Netns(rec), plan)
    return rec.calls


def test_every_command_targets_a_lab_namespace() -> None:
    calls = build_commands()
    assert calls
    for argv in calls:
        assert argv[0] == "ip"
        if argv[1] == "netns":
            assert argv[2] in ("add", "exec") and argv[3].startswith("kpl-u-"), argv
        else:
            assert argv[1] == "-n" and argv[2].startswith("kpl-u-"), argv
        if "netns" in argv[3:]:  # a veth peer moved on creation
            assert argv[argv.index("netns", 3) + 1].startswith("kpl-u-")


def test_plan_wiring() -> None:
    calls = [" ".join(c) for c in build_commands()]
    assert "ip -n kpl-u-node-n1 addr add 192.168.0.2/24 dev eth0" in calls
    assert "ip -n kpl-u-node-n1 route add 10.244.2.0/24 via 192.168.0.3" in calls
    assert "ip -n kpl-u-node-n1 route add default dev eth0" in calls
    # cbr0's MAC is fixed (from 10.244.1.1), so it does not change when a Pod goes away
    assert "ip -n kpl-u-node-n1 link add cbr0 address 0a:58:0a:f4:01:01 type bridge" in calls
    assert "ip netns exec kpl-u-node-n2 sysctl -q -w net.ipv4.ip_forward=1" in calls
    assert "ip netns exec kpl-u-node-n2 sysctl -q -w net.bridge.bridge-nf-call-iptables=1" in calls
    assert "ip -n kpl-u-pod-default.web addr add 10.244.2.2/24 dev eth0" in calls
    assert "ip -n kpl-u-pod-default.web route add default via 10.244.2.1" in calls
    assert "ip -n kpl-u-external addr add 203.0.113.2/32 dev eth0" in calls
    assert (
        "ip -n kpl-u-external route add 192.168.99.10/32 via 192.168.0.2 src 203.0.113.2" in calls
    )
    assert any("hairpin on" in c and c.startswith("ip -n kpl-u-node-n2 ") for c in calls)


@pytest.mark.parametrize("ns", ["default", "kpt-other", "kpl-", "", "kpl-a/../b", "root"])
def test_refuses_foreign_namespaces(ns: str) -> None:
    net = Netns(Recorder())
    with pytest.raises(ValueError, match="not a lab namespace"):
        net.add(ns)
    with pytest.raises(ValueError):
        net.delete(ns)
    with pytest.raises(ValueError):
        net.exec_argv(ns, ["true"])


def test_teardown_deletes_only_the_labs_namespaces() -> None:
    rec = Recorder("kpl-u-net\nkpl-u-node-n1 (id: 3)\nkpl-uu-net\nkpt-x-node\nother\n")
    gone = network.teardown(Netns(rec), layout.ns_prefix("u"))
    assert gone == ["kpl-u-net", "kpl-u-node-n1"]
    assert [c for c in rec.calls if c[2] == "delete"] == [
        ["ip", "netns", "delete", "kpl-u-net"],
        ["ip", "netns", "delete", "kpl-u-node-n1"],
    ]
