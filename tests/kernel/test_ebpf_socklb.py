"""ebpf mode against the real kernel: socket load balancing through a test cgroup.

One network namespace (kpt-...) holds the "node": backends 10.180.0.1/2 on its
loopback, each serving TCP and UDP on :8080 (the answer is the address the request reached).
Clients run in that namespace *and* in a child cgroup the test creates (kpt-...), where
the data plane attaches its programs; the bpffs is a private mount under /run. Proofs
that the socket (not nftables) did it: sendto() to a frontend without endpoints fails at
once with ECONNREFUSED (nftables would only answer with ICMP later), and the programs'
own socket rev-NAT map fills. Everything is removed even on failure; cleanup must leave
no link on the cgroup and no bpffs.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.config.types import LBAlgorithm, ProxyConfig
from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.modes import ebpf as mode_ebpf
from kubeproxy.nodeview import node_views
from kubeproxy.render import ebpf as r
from tests.builders import NODE, endpoint, endpoint_slice, node, service

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not mode_ebpf.OBJECT.is_file(),
    reason="needs root, iproute2 and bpf/sock_lb.o (make bpf)")

SERVER = textwrap.dedent("""
    import socket, threading
    def tcp(addr):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 8080)); s.listen(64)
        while True:
            c, _ = s.accept(); c.sendall(c.getsockname()[0].encode()); c.close()
    def udp(addr):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, 8080))
        while True:
            data, peer = s.recvfrom(100); s.sendto(addr.encode(), peer)
    for a in ("10.180.0.1", "10.180.0.2"):
        threading.Thread(target=tcp, args=(a,), daemon=True).start()
        threading.Thread(target=udp, args=(a,), daemon=True).start()
    threading.Event().wait()
""")
CLIENT = textwrap.dedent("""
    import json, socket, sys
    ip, port, n, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    out = []
    for _ in range(n):
        try:
            if proto == "tcp":
                s = socket.create_connection((ip, port), timeout=2)
                peer = s.getpeername(); answer = s.recv(100).decode()
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
                s.sendto(b"x", (ip, port)); data, peer = s.recvfrom(100)
                answer = data.decode()
            out.append([answer, "%s:%d" % peer[:2]]); s.close()
        except OSError as e:
            out.append(["error", e.errno])
    print(json.dumps(out))
""")


class Node:
    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.ns = f"kpt-ebpf-{suffix}"
        self.cgroup = bpf_sys.cgroup2_root() / f"kpt-ebpf-{suffix}"
        self.bpffs = Path(f"/run/kpt-ebpf-{suffix}")
        self.opts = mode_ebpf.EbpfOptions(cgroup_path=self.cgroup, bpf_dir=self.bpffs)
        self.server: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        ip = ["ip", "-n", self.ns]
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for argv in (["link", "set", "lo", "up"], ["addr", "add", "192.168.0.2/32", "dev", "lo"],
                     ["addr", "add", "10.180.0.1/32", "dev", "lo"],
                     ["addr", "add", "10.180.0.2/32", "dev", "lo"],
                     # A default route, so that a ClusterIP is routable when no socket
                     # program rewrote it (the nftables part then answers).
                     ["link", "add", "kp0", "type", "veth", "peer", "name", "kp1"],
                     ["link", "set", "kp0", "up"], ["link", "set", "kp1", "up"],
                     ["route", "add", "default", "dev", "kp0"]):
            subprocess.run([*ip, *argv], check=True)
        self.cgroup.mkdir()
        self.server = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c",
                                        SERVER])
        time.sleep(0.5)

    def plane(self) -> mode_ebpf.EbpfPlane:
        return mode_ebpf.ebpf_data_plane(NetnsRunner(self.ns), self.opts)

    def client(self, ip: str, port: int, n: int, proto: str = "tcp",
               in_cgroup: bool = True) -> list[list[Any]]:
        procs = str(self.cgroup / "cgroup.procs")

        def enter() -> None:
            if in_cgroup:
                Path(procs).write_text(str(os.getpid()))

        done = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", CLIENT,
                               ip, str(port), str(n), proto], preexec_fn=enter,
                              capture_output=True, text=True, timeout=60, check=True)
        result: list[list[Any]] = json.loads(done.stdout)
        return result

    def down(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        bpf_sys.remove_bpffs(self.bpffs)
        if self.cgroup.exists():
            self.cgroup.rmdir()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture
def bpf_node() -> Iterator[Node]:
    n = Node()
    try:
        n.up()
        yield n
    finally:
        n.down()


def cluster(**svc: Any) -> Any:
    objs = [node(),
            service("web", cluster_ip="172.30.0.41", ports=[("http", 80, "TCP", 0)], **svc),
            endpoint_slice("web", [endpoint("10.180.0.1"), endpoint("10.180.0.2")],
                           ports=[("http", 8080, "TCP")]),
            service("dns", cluster_ip="172.30.0.53", ports=[("dns", 53, "UDP", 0)]),
            endpoint_slice("dns", [endpoint("10.180.0.1"), endpoint("10.180.0.2")],
                           ports=[("dns", 8080, "UDP")]),
            service("empty", cluster_ip="172.30.0.60", ports=[("dns", 53, "UDP", 0)])]
    return decode_objects(objs)


def render(lb: LBAlgorithm = LBAlgorithm.RANDOM, **svc: Any) -> r.EbpfRuleset:
    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),),
                         lb_algorithm=lb)
    return r.render(node_views(cluster(**svc), config))


def answers(results: list[list[Any]]) -> list[str]:
    return [a for a, _ in results]


def test_cluster_ip_tcp_and_udp_through_the_cgroup(bpf_node: Node) -> None:
    plane = bpf_node.plane()
    plane.sync(render())
    tcp = bpf_node.client("172.30.0.41", 80, 30)
    assert set(answers(tcp)) == {"10.180.0.1", "10.180.0.2"}  # spread over both
    # getpeername() answers with the service address, not the backend's.
    assert {peer for _, peer in tcp} == {"172.30.0.41:80"}
    udp = bpf_node.client("172.30.0.53", 53, 10, "udp")
    assert set(answers(udp)) <= {"10.180.0.1", "10.180.0.2"} and "error" not in answers(udp)
    assert {peer for _, peer in udp} == {"172.30.0.53:53"}  # replies carry the service
    # No endpoints: sendto() itself fails (socket LB), not a later ICMP error.
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") == [["error", 111]]
    sknat = plane.plane.maps.dump("kp_sknat4", 16, 8)
    assert len(sknat) >= 2  # written by the programs: the sockets were rewritten


def test_round_robin_and_affinity(bpf_node: Node) -> None:
    plane = bpf_node.plane()
    plane.sync(render(LBAlgorithm.ROUND_ROBIN))
    got = answers(bpf_node.client("172.30.0.41", 80, 6))
    assert all(a != b for a, b in itertools.pairwise(got)), got  # strictly in turn
    plane.sync(render(sessionAffinity="ClientIP"))
    assert len(set(answers(bpf_node.client("172.30.0.41", 80, 10)))) == 1


def test_outside_the_cgroup_sockets_are_untouched(bpf_node: Node) -> None:
    bpf_node.plane().sync(render())
    # Not in the cgroup: no program sees the socket; nftables' reject in the output
    # path drops the datagram, which a local sender sees as EPERM, not ECONNREFUSED.
    assert bpf_node.client("172.30.0.60", 53, 1, "udp", in_cgroup=False) == [["error", 1]]
    # TCP: nftables DNATs it (conntrack shows the peer as the service address).
    tcp = bpf_node.client("172.30.0.41", 80, 4, in_cgroup=False)
    assert set(answers(tcp)) <= {"10.180.0.1", "10.180.0.2"}, tcp


def test_restart_takes_over_and_cleanup_leaves_nothing(bpf_node: Node) -> None:
    bpf_node.plane().sync(render())
    again = bpf_node.plane()  # a restarted proxy: same pins
    again.sync(render())
    shown = subprocess.run(["bpftool", "cgroup", "show", str(bpf_node.cgroup)],
                           capture_output=True, text=True, check=True).stdout
    assert shown.count("kp_") == 8, shown  # one link per hook, not two
    assert set(answers(bpf_node.client("172.30.0.41", 80, 10))) <= {"10.180.0.1",
                                                                      "10.180.0.2"}
    assert "frontend 172.30.0.41:80/tcp" in again.rules()
    again.cleanup()
    shown = subprocess.run(["bpftool", "cgroup", "show", str(bpf_node.cgroup)],
                           capture_output=True, text=True, check=True).stdout
    assert "kp_" not in shown, shown
    assert not bpf_sys.is_bpffs(bpf_node.bpffs) and not bpf_node.bpffs.exists()
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") != [["error", 111]]


def _cgroup_links(cgroup: Path) -> str:
    return subprocess.run(["bpftool", "cgroup", "show", str(cgroup)],
                          capture_output=True, text=True, check=True).stdout


# (id, what is done from outside to the programs of a synced node)
DAMAGE = [
    ("links-detached-and-unpinned", lambda n: bpf_sys.detach_links(
        n.bpffs / bpf_sys.LINKS_DIR)),
    ("link-detached-pin-kept", lambda n: bpf_sys.detach_link(
        n.bpffs / bpf_sys.LINKS_DIR / "kp_connect4")),
    ("map-unpinned", lambda n: (n.bpffs / bpf_sys.MAPS_DIR / "kp_svc4").unlink()),
]


@pytest.mark.parametrize("damage", [d[1] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damage_is_seen_and_the_next_sync_repairs_it(bpf_node: Node, damage: Any) -> None:
    plane = bpf_node.plane()
    assert plane.intact()  # before any sync
    plane.sync(render())
    assert plane.intact()
    damage(bpf_node)
    assert not plane.intact()
    assert f"attached: {' '.join(sorted(r.PROGRAMS))}" not in plane.rules() or \
        not (bpf_node.bpffs / bpf_sys.MAPS_DIR / "kp_svc4").exists()
    plane.sync(render())  # the daemon's full sync after a False
    assert plane.intact()
    assert f"attached: {' '.join(sorted(r.PROGRAMS))}" in plane.rules()
    assert _cgroup_links(bpf_node.cgroup).count("kp_") == 8
    assert set(answers(bpf_node.client("172.30.0.41", 80, 10))) <= {"10.180.0.1",
                                                                      "10.180.0.2"}
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") == [["error", 111]]
