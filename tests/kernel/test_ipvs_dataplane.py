"""The IPVS data plane against a kernel with IPVS, inside namespaces the test makes.

This host's kernel has no ip_vs module, so these tests skip here (saying so) and run in
a throwaway guest: ``tools/vmrun .venv/bin/pytest -q tests/kernel/test_ipvs_*.py``
(tests/vm/test_ipvs_in_guest.py does that in one boot). Each test builds a node
namespace with a pod namespace and a client namespace on veth pairs, syncs the real
data plane into the node namespace and sends real packets:

    client kpc-* 192.168.0.100 --- 192.168.0.2 node kpt-* 10.180.0.254 --- 10.180.0.1 pod kpn-*

The pod runs a TCP and a UDP server that answer with the address they see the client
as, which shows whether the packet was masqueraded.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.config.types import IpvsConfig, ProxyConfig
from kubeproxy.dataplane.base import NetnsRunner, SubprocessRunner
from kubeproxy.dataplane.ipvs_netlink import NetlinkIpvs, Timeouts
from kubeproxy.dataplane.netlink import find_netns
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.modes.ipvs import MODE, IpvsPlane, configure
from kubeproxy.nodeview import node_views
from kubeproxy.proxier import Proxier
from kubeproxy.render.ipvs import RealServer, VirtualServer
from kubeproxy.trace.ipvs import parse_state, state_of
from kubeproxy.trace.result import Packet
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.kernel.conftest import CLIENT_IP, NODE_POD_SIDE, pod_net, sh

SKIP = ("needs root" if os.geteuid() != 0 else MODE.kernel_support(SubprocessRunner()))
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(SKIP is not None, reason=str(SKIP))]
CLIENT, POD = CLIENT_IP, "10.180.0.1"
A = NamespacedName("ns1", "svc1")
SERVER = """
import socket, sys, threading
def answer(c, peer):
    c.sendall(peer[0].encode() + b"\\n"); c.settimeout(0.3)
    try:  # a client that says "hold" keeps the connection established until it closes
        if c.recv(4) == b"hold":
            c.settimeout(None); c.recv(1)
    except OSError:
        pass
    c.close()
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen(64)
    while True:
        c, peer = s.accept(); threading.Thread(target=answer, args=(c, peer), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
    while True:
        data, peer = u.recvfrom(100); u.sendto(peer[0].encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True); tcp()
"""
CLIENT_CODE = """
import socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=5); print(s.recv(100).decode().strip())
    else:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
        u.sendto(b"x", (host, port)); print(u.recvfrom(100)[0].decode())
except ConnectionRefusedError:
    print("refused")
except OSError as err:
    print("error", err)
"""


@dataclass
class Net:
    node: str
    pod: str
    client: str
    server: subprocess.Popen[str]

    def ask(self, ns: str, host: str, port: int, proto: str = "tcp") -> str:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT_CODE,
                              host, str(port), proto], capture_output=True, text=True,
                             timeout=60, check=False)
        return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def net() -> Iterator[Net]:
    with pod_net([POD], SERVER) as made:
        yield Net(made.node, made.pod, made.client, made.server)


def objects(**svc: Any) -> list[Obj]:
    ports = [("p80", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)]
    return [node(), service("svc1", cluster_ip="172.30.0.41", type="NodePort", ports=ports,
                           **svc),
            endpoint_slice("svc1", [endpoint(POD)], ports=[("p80", 8080, "TCP"),
                                                           ("dns", 5353, "UDP")])]


CONFIG = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))


def views(objs: list[Obj]) -> Any:
    cluster = decode_objects(objs)
    assert not cluster.errors
    return node_views(cluster, CONFIG)


def plane(net: Net) -> IpvsPlane:
    dp = MODE.data_plane(NetnsRunner(net.node), PlaneOptions(iptables_backend="legacy"))
    assert isinstance(dp, IpvsPlane)
    return dp


def test_what_is_written_reads_back_as_rendered(net: Net) -> None:
    dp = plane(net)
    ruleset = MODE.render(views(objects(sessionAffinity="ClientIP")))
    dp.sync(ruleset)
    back, want = parse_state(dp.rules()), state_of(ruleset)
    assert back.addresses == want.addresses
    assert dict(back.services) == dict(want.services)
    assert {k: v[1] for k, v in back.sets.items()} == {k: v[1] for k, v in want.sets.items()}
    local = frozenset({ipaddress.ip_address(NODE_IP)})
    for dst, port in (("172.30.0.41", 80), (NODE_IP, 30080), ("172.30.0.41", 81)):
        packet = Packet(ipaddress.ip_address(CLIENT), ipaddress.ip_address(dst), port, "tcp")
        assert MODE.trace_rules(dp.rules(), packet, local).to_json() == \
            MODE.trace(ruleset, packet, local).to_json(), (dst, port)
    assert dp.intact()


# (what, from which namespace, destination, port, protocol, the pod sees, service fields)
TRAFFIC = [
    ("ClusterIP from the node (LOCAL_OUT)", "node", "172.30.0.41", 80, "tcp",
     NODE_POD_SIDE, {}),
    ("ClusterIP from outside is masqueraded", "client", "172.30.0.41", 80, "tcp",
     NODE_POD_SIDE, {}),
    ("NodePort from outside is masqueraded", "client", NODE_IP, 30080, "tcp",
     NODE_POD_SIDE, {}),
    ("NodePort eTP=Local keeps the client address", "client", NODE_IP, 30080, "tcp",
     CLIENT, {"externalTrafficPolicy": "Local"}),
    ("UDP through the ClusterIP", "client", "172.30.0.41", 53, "udp", NODE_POD_SIDE, {}),
    ("hairpin: the pod reaching itself is masqueraded", "pod", "172.30.0.41", 80, "tcp",
     "10.180.0.254", {}),
    ("unknown port on a service address is refused", "client", "172.30.0.41", 81, "tcp",
     "refused", {}),
]


@pytest.mark.parametrize("case", TRAFFIC, ids=[c[0] for c in TRAFFIC])
def test_traffic(net: Net, case: tuple[Any, ...]) -> None:
    _, where, dst, port, proto, seen, svc = case
    plane(net).sync(MODE.render(views(objects(**svc))))
    ns = {"node": net.node, "client": net.client, "pod": net.pod}[where]
    assert net.ask(ns, dst, port, proto) == seen


def test_no_endpoints_is_refused_and_partial_sync_matches_full(net: Net) -> None:
    dp = plane(net)
    dp.sync(MODE.render(views(objects())))
    empty = [node(), service("svc1", cluster_ip="172.30.0.41", type="NodePort",
                             ports=[("p80", 80, "TCP", 30080)]), endpoint_slice("svc1", [])]
    ruleset = MODE.render(views(empty))
    dp.sync(ruleset, frozenset({A}))
    assert net.ask(net.client, "172.30.0.41", 80) == "refused"
    partial = dp.rules()
    dp.sync(ruleset)
    assert dp.rules() == partial


def test_graceful_termination_keeps_open_connections(net: Net) -> None:
    dp = plane(net)
    dp.sync(MODE.render(views(objects())))
    code = ("import socket,time; s=socket.create_connection(('172.30.0.41',80)); "
            "s.sendall(b'hold'); print('open',flush=True); time.sleep(60)")
    holder = subprocess.Popen(["ip", "netns", "exec", net.client, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        gone = [node(), service("svc1", cluster_ip="172.30.0.41", type="NodePort",
                                ports=[("p80", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)]),
                endpoint_slice("svc1", [endpoint("10.180.0.2")], ports=[
                    ("p80", 8080, "TCP"), ("dns", 5353, "UDP")])]
        dp.sync(MODE.render(views(gone)), frozenset({A}))
        text = dp.rules()
        assert f"-a -t 172.30.0.41:80 -r {POD}:8080 -m -w 0" in text  # draining
        assert "-a -t 172.30.0.41:80 -r 10.180.0.2:8080 -m -w 1" in text
        dp.sync(MODE.render(views(gone)), frozenset())  # still established: kept
        assert f"-r {POD}:8080 -m -w 0" in dp.rules()
        holder.kill()
        holder.wait()
        # Closed: TIME_WAIT in IPVS for 2 minutes, and that holds it too (as upstream).
        for _ in range(50):
            if (0, 1) in counts(net):
                break
            time.sleep(0.2)
        dp.sync(MODE.render(views(gone)), frozenset())
        assert f"-r {POD}:8080 -m -w 0" in dp.rules(), ipvs_state(net)
    finally:
        holder.kill()
        holder.wait()


def test_intact_and_cleanup(net: Net) -> None:
    dp = plane(net)
    dp.sync(MODE.render(views(objects())))
    assert dp.intact()
    sh("ip", "-n", net.node, "link", "del", "kube-ipvs0")
    assert not dp.intact()
    dp.sync(MODE.render(views(objects())))
    assert dp.intact()
    dp.cleanup()
    runner = NetnsRunner(net.node)
    assert runner.run(["ip", "link", "show", "kube-ipvs0"]).returncode != 0
    assert "KUBE-" not in runner.run(["ipset", "list", "-n"]).stdout
    assert "KUBE-" not in runner.run(["iptables-legacy-save"]).stdout
    text = dp.rules()
    assert "-A -t" not in text and "create KUBE" not in text


def test_the_ipvs_settings_reach_the_kernel(net: Net) -> None:
    """wrr, strict ARP, the timeouts; a virtual server in excludeCIDRs that someone else
    wrote survives a full sync, intact() and cleanup."""
    settings = IpvsConfig(scheduler="wrr", strict_arp=True,
                          exclude_cidrs=(ipaddress.ip_network("10.96.0.0/16"),),
                          tcp_timeout=900, tcpfin_timeout=60, udp_timeout=120)
    mode = configure(settings)
    runner = NetnsRunner(net.node)
    other = NetlinkIpvs(find_netns(runner))  # someone else's virtual server
    theirs = VirtualServer(ipaddress.ip_address("10.96.5.5"), 443, "tcp", "rr", 0, 0, (),
                           NamespacedName("other", "x"), "cluster IP")
    other.add_service(theirs)
    other.add_dest((theirs.ip, "tcp", 443), RealServer(ipaddress.ip_address(POD), 8080))
    other.commit()
    try:
        dp = mode.data_plane(runner, PlaneOptions(iptables_backend="legacy"))
        dp.sync(mode.render(views(objects())))
        text = dp.rules()
        assert "-A -t 172.30.0.41:80 -s wrr" in text
        assert "-A -t 10.96.5.5:443 -s rr" in text
        assert other.timeouts() == Timeouts(900, 60, 120)
        for key, value in (("arp_ignore", "1"), ("arp_announce", "2")):
            got = runner.run(["sysctl", "-n", f"net.ipv4.conf.all.{key}"]).stdout.strip()
            assert got == value, key
        assert dp.intact()
        assert net.ask(net.client, "172.30.0.41", 80) == NODE_POD_SIDE
        dp.cleanup()
        text = dp.rules()
        assert "172.30.0.41" not in text
        assert f"-a -t 10.96.5.5:443 -r {POD}:8080 -m -w 1" in text
    finally:
        other.close()


def test_partial_syncs_follow_a_cluster_as_a_full_sync_does(net: Net) -> None:
    """The memoized renderer and partial syncs against the kernel: after each step the
    kernel holds what one full sync of a fresh plane writes."""
    steps = [(frozenset({A}), objects(sessionAffinity="ClientIP")),
             (frozenset({A}), objects(externalTrafficPolicy="Local")),
             (frozenset({A}), [node()])]
    incremental = Proxier(MODE, CONFIG, plane(net))
    incremental.sync(decode_objects(objects()), None)
    for changed, objs in steps:
        cluster = decode_objects(objs)
        incremental.sync(cluster, changed)
        partial = incremental.plane.rules()
        incremental.sync(cluster, None)
        assert incremental.plane.rules() == partial, changed



# A client that picks its own port, to send a new connection from the port an earlier,
# closed (TIME_WAIT in IPVS) connection used.
REUSE_CLIENT = """
import socket, sys
host, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport)); s.settimeout(float(sys.argv[4]))
try:
    s.connect((host, port)); print(s.recv(100).decode().strip() or "closed")
    s.recv(1)  # the server closes first: the TIME_WAIT is its, the port stays ours
except ConnectionRefusedError:
    print("refused")
except OSError as err:
    print("error", err)
"""


def ask_from_port(net: Net, sport: int, timeout: float = 5.0) -> str:
    out = subprocess.run(["ip", "netns", "exec", net.client, sys.executable, "-c",
                          REUSE_CLIENT, "172.30.0.41", "80", str(sport), str(timeout)],
                         capture_output=True, text=True, timeout=120, check=False)
    return out.stdout.strip() or out.stderr.strip()


def ipvs_state(net: Net) -> str:
    """The kernel's own account, for a failure message."""
    return subprocess.run(["ip", "netns", "exec", net.node, "sh", "-c",
                           "cat /proc/net/ip_vs /proc/net/ip_vs_conn; conntrack -L 2>&1"],
                          capture_output=True, text=True, check=False).stdout


def counts(net: Net) -> list[tuple[int, int]]:
    """The service's real servers' (active, inactive) connection counts, from the kernel."""
    kernel = NetlinkIpvs(find_netns(NetnsRunner(net.node)))
    try:
        return [(d.active, d.inactive) for d in
                kernel.dests((ipaddress.ip_address("172.30.0.41"), "tcp", 80))]
    finally:
        kernel.close()


@pytest.mark.parametrize("then", ["moved", "none"])
def test_a_new_connection_from_a_drained_connections_port_is_scheduled_afresh(
        net: Net, then: str) -> None:
    """A removed real server whose only connection is closed (TIME_WAIT in IPVS) stays at
    weight 0, as upstream; a new connection from the same client port is scheduled
    afresh (conn_reuse_mode, expire_nodest_conn): to the new endpoint, or refused when
    there is none."""
    second = "10.180.0.2"
    sh("ip", "-n", net.pod, "addr", "add", f"{second}/24", "dev", "eth0")
    dp = plane(net)
    dp.sync(MODE.render(views(objects())))
    assert ask_from_port(net, 40000) == NODE_POD_SIDE
    assert counts(net) == [(0, 1)], ipvs_state(net)  # closed, still counted (TIME_WAIT)
    eps = [endpoint(second)] if then == "moved" else []
    moved = [node(), service("svc1", cluster_ip="172.30.0.41", type="NodePort",
                             ports=[("p80", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)]),
             endpoint_slice("svc1", eps, ports=[("p80", 8080, "TCP"), ("dns", 5353, "UDP")])]
    dp.sync(MODE.render(views(moved)), frozenset({A}))
    text = dp.rules()
    assert f"-r {POD}:8080 -m -w 0" in text, text
    again = ask_from_port(net, 40000)
    want = NODE_POD_SIDE if then == "moved" else "refused"
    assert again == want, (again, ipvs_state(net))
