"""--bind-address / bindAddress: upstream's primary-IP override (detectNodeIPs).

Upstream (cmd/kube-proxy/app/server.go): a bindAddress that is not 0.0.0.0 / :: is the
node's IP of its family, ahead of what the Node object lists, and makes that family
the primary one; it is used for nodePortAddresses ``primary`` and for matching
loadBalancerSourceRanges against the node. No socket is bound to it. Each case here
is checked on what the proxy then does (the node view, the nftables rules), not only
on the parsed value.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest
import yaml

from kubeproxy.app.cli import build_parser
from kubeproxy.config import flags
from kubeproxy.config.flags import build_config
from kubeproxy.config.types import (
    ProxyConfig,
    cluster_with_bind_address,
    primary_ip_override,
    with_bind_address,
)
from kubeproxy.errors import ConfigError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import Cluster, Family, Node
from kubeproxy.nodeview import NodeView, build_node_view
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

BIND = "192.168.9.9"  # not one of the Node's addresses
NODEPORT_LB: dict[str, object] = {
    "type": "LoadBalancer", "ports": [("p80", 80, "TCP", 30080)], "lb_ips": ["5.6.7.8"]}


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


@pytest.mark.parametrize(("text", "want"), [
    ("0.0.0.0", None),  # the default: no override
    ("::", None),
    ("192.168.9.9", "192.168.9.9"),
    ("fd00::9", "fd00::9"),
    ("010.001.002.003", "10.1.2.3"),  # ParseIPSloppy: leading zeros are decimal
])
def test_primary_ip_override(text: str, want: str | None) -> None:
    got = primary_ip_override(text)
    assert (str(got) if got is not None else None) == want


@pytest.mark.parametrize("text", ["node1", "192.168.0.2:80", "10.0.0.0/8", "300.1.1.1"])
def test_bad_bind_address_is_an_error_naming_the_field(text: str) -> None:
    with pytest.raises(ConfigError, match="bindAddress"):
        primary_ip_override(text)
    with pytest.raises(ConfigError, match=r"bindAddress.*\(from --bind-address\)"):
        build_config(run_args("--bind-address", text))


@pytest.mark.parametrize(("addresses", "bind", "want"), [
    # (the Node's addresses, bindAddress, the addresses the proxy uses)
    (("192.168.0.2", "fd00::2"), None, ("192.168.0.2", "fd00::2")),
    (("192.168.0.2", "fd00::2"), BIND, (BIND, "192.168.0.2", "fd00::2")),
    (("192.168.0.2", "10.1.0.2"), "10.1.0.2", ("10.1.0.2", "192.168.0.2")),  # reordered
    (("192.168.0.2",), "fd00::9", ("fd00::9", "192.168.0.2")),  # the primary family is v6
    ((), BIND, (BIND,)),  # a Node with no address: upstream's nodeIPs[family] = bind
])
def test_with_bind_address(addresses: tuple[str, ...], bind: str | None,
                           want: tuple[str, ...]) -> None:
    n = Node(NODE, addresses=tuple(ipaddress.ip_address(a) for a in addresses))
    got = with_bind_address(n, ipaddress.ip_address(bind) if bind else None)
    assert tuple(str(a) for a in got.addresses) == want
    assert got.name == n.name and got.pod_cidrs == n.pod_cidrs


def test_the_flag_and_the_file_set_it(tmp_path: Path) -> None:
    assert build_config(run_args()).bind_address is None
    assert str(build_config(run_args("--bind-address", BIND)).bind_address) == BIND
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "bindAddress": "fd00::9"}))
    args = run_args("--config", str(conf))
    assert str(build_config(args).bind_address) == "fd00::9"
    assert flags.effective(args).fields["bindAddress"] == "fd00::9"  # /configz shows it
    assert not any("--bind-address" in n for n in flags.effective(
        run_args("--bind-address", BIND)).notes), "honoured: no 'has no effect' note"


def cluster(*objects: Obj) -> Cluster:
    return decode_objects(list(objects))


def objects() -> list[Obj]:
    svc = service("svc1", **NODEPORT_LB,  # type: ignore[arg-type]
                  loadBalancerSourceRanges=[f"{BIND}/32"])
    return [node(ips=[NODE_IP]), svc, endpoint_slice("svc1", [endpoint("10.180.0.1")])]


def view_of(config: ProxyConfig, family: Family = 4) -> NodeView:
    return build_node_view(cluster_with_bind_address(cluster(*objects()), config), config,
                           family)


@pytest.mark.parametrize(("bind", "primary", "allows_node"), [
    # Without the flag the Node's InternalIP is primary, and a source range naming
    # the bind address does not cover the node.
    (None, [NODE_IP], False),
    (BIND, [BIND], True),
    ("0.0.0.0", [NODE_IP], False),
])
def test_primary_nodeports_and_source_ranges_follow_the_bind_address(
        bind: str | None, primary: list[str], allows_node: bool) -> None:
    config = ProxyConfig(hostname=NODE, mode="nftables", nodeport_addresses=("primary",),
                         bind_address=primary_ip_override(bind) if bind else None)
    v = view_of(config)
    assert [str(a) for a in v.nodeports.addresses] == primary
    (spv,) = v.services
    assert spv.firewall and spv.firewall_allows_node is allows_node


def test_only_this_node_is_overridden() -> None:
    config = ProxyConfig(hostname=NODE, bind_address=ipaddress.ip_address(BIND))
    other = decode_objects([node("node2", ips=["192.168.0.3"]), node(ips=[NODE_IP])])
    got = {n.name: [str(a) for a in n.addresses]
           for n in cluster_with_bind_address(other, config).nodes}
    assert got == {"node2": ["192.168.0.3"], NODE: [BIND, NODE_IP]}


def test_the_daemon_folds_its_node_with_the_bind_address() -> None:
    """`kubeproxy run`: every version of this node's Node (list, watch, resync) is folded
    with the bind address as its primary IP."""
    from kubeproxy import modes
    from kubeproxy.app.daemon import Daemon
    from kubeproxy.health.server import Health, Metrics
    from kubeproxy.model import NamespacedName
    from kubeproxy.proxier import Proxier
    from kubeproxy.sources.informer import Replace
    from kubeproxy.tracker import Update
    from kubeproxy.util.queues import drain

    config = ProxyConfig(hostname=NODE, bind_address=ipaddress.ip_address(BIND))
    mode = modes.get(config.mode)
    d = Daemon(config, Proxier(mode, config, mode.fake()), health=Health(60.0),
               metrics=Metrics(config.mode))
    key = NamespacedName("", NODE)

    def node_at(*ips: str) -> Update:
        return Update("Node", key, Node(NODE, addresses=tuple(
            ipaddress.ip_address(ip) for ip in ips)))

    d.emit(Replace("Node", (node_at(NODE_IP),)))
    d.step(drain(d.queue, 0))
    assert d.tracker.node is not None
    assert [str(a) for a in d.tracker.node.addresses] == [BIND, NODE_IP]
    d.emit(node_at("192.168.0.7", "fd00::7"))
    d.step(drain(d.queue, 0))
    assert [str(a) for a in d.tracker.node.addresses] == [BIND, "192.168.0.7", "fd00::7"]
    d.emit(Update("Node", key, None))  # deleted: nothing to override
    d.step(drain(d.queue, 0))
    assert d.tracker.node is None
