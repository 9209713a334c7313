"""First-connect latency to a ClusterIP at scale, per mode, against a direct connect to a pod.

``python bench/connect.py [--services 10000] [--samples 3000] [--modes ebpf nftables
iptables]`` (root). One run measures every mode, each in a network namespace of its own
that the script creates and deletes (``kpn-connect-*``); the ebpf mode also gets a child
cgroup (``kpt-connect-*``, bind-mounted where the namespace's process sees it, since
``ip netns exec`` remounts /sys) that the measuring process runs in, and a private bpffs;
all removed at the end, also on failure.

Inside the namespace: N services x 10 endpoints (bench/render.py's synthetic cluster:
ClusterIPs 172.30.x.y:80, endpoints 10.180-181.x.y:8080, made local by one ``local`` route
on lo, one server process accepting on :8080), written by the mode's real data plane
(iptables on the legacy backend). Then, from the node itself (the OUTPUT path), for
``--samples`` random services: the time ``connect()`` takes to a ClusterIP (a full TCP
handshake: the first packet walks the rules, or the socket program rewrites the address
before any packet exists), and to a random endpoint of the same service directly; every
connection is new (closed with RST, so no TIME_WAIT piles up). The same direct connects
before any rule is written give the bare cost. Prints microseconds. Note: iptables walks
nat KUBE-SERVICES rule by rule for *every* new connection, so with its rules written even
a direct connect to a pod pays the whole walk (the ClusterIP's stops halfway on average).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.base import SubprocessRunner
from kubeproxy.lab import cgroups
from kubeproxy.modes.base import Mode, PlaneOptions
from kubeproxy.proxier import Proxier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from render import ENDPOINTS, synthetic_cluster  # bench/render.py, a sibling script

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4096)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""
# The node: an address (on a veth whose peer stays in the namespace) with a default
# route (so a ClusterIP is routable before any rule sees it); every endpoint local.
NODE_SETUP = [["link", "set", "lo", "up"],
              ["link", "add", "kp0", "type", "veth", "peer", "name", "kp1"],
              ["addr", "add", "192.168.0.2/24", "dev", "kp0"], ["link", "set", "kp0", "up"],
              ["link", "set", "kp1", "up"],
              ["route", "add", "default", "dev", "kp0"],
              ["route", "add", "local", "10.180.0.0/15", "dev", "lo"]]


def mode_of(name: str) -> Mode[Any]:
    """A registered mode, or one whose module is there but not yet registered."""
    if name in modes.NAMES:
        return modes.get(name)
    mode: Mode[Any] = importlib.import_module(f"kubeproxy.modes.{name}").MODE
    return mode


def connect_us(address: str, port: int) -> float:
    """Microseconds for one new TCP connection to be established."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        start = time.perf_counter_ns()
        s.connect((address, port))
        return (time.perf_counter_ns() - start) / 1000
    finally:
        s.close()


def summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median": round(statistics.median(times), 1),
            "p99": round(times[int(len(times) * 0.99) - 1], 1)}


def inside(mode_name: str, services: int, samples: int, options: PlaneOptions
           ) -> dict[str, Any]:
    """One mode's measurement, in the namespace (and cgroup) this process runs in."""
    mode = mode_of(mode_name)
    rng = random.Random(1)
    picks = [rng.randrange(services) for _ in range(samples)]
    bare = [connect_us(str(ipaddress.ip_address(_backend(i, rng))), 8080) for i in picks]
    plane = mode.data_plane(SubprocessRunner(), options)
    proxier = Proxier(mode, ProxyConfig(hostname="node1"), plane)  # views: mode-blind
    start = time.perf_counter()
    proxier.sync(synthetic_cluster(services), None)
    sync_s = time.perf_counter() - start
    try:
        for i in picks[:50]:  # warm up: code paths, caches, the server's accept loop
            connect_us(str(ipaddress.ip_address(0xAC1E0000 + i)), 80)
        service, direct = [], []
        for i in picks:  # interleaved, so both see the same machine state
            service.append(connect_us(str(ipaddress.ip_address(0xAC1E0000 + i)), 80))
            direct.append(connect_us(str(ipaddress.ip_address(_backend(i, rng))), 8080))
    finally:
        plane.cleanup()
    return {"mode": mode_name, "sync_s": round(sync_s, 1), "service": summary(service),
            "direct": summary(direct), "bare": summary(bare[50:])}


def _backend(service: int, rng: random.Random) -> int:
    """A random endpoint address of synthetic service ``service``."""
    return 0x0AB40000 + service * ENDPOINTS + rng.randrange(ENDPOINTS)


@contextlib.contextmanager
def node(mode_name: str) -> Iterator[tuple[str, PlaneOptions, Path | None]]:
    """A namespace with the server running; for a cgroup mode its cgroup and bpffs."""
    tag = f"{os.getpid()}-{mode_name[:3]}"
    ns = f"kpn-connect-{tag}"
    cgroup: Path | None = None
    run_dir = Path(f"/run/kpt-connect-{tag}")
    server: subprocess.Popen[bytes] | None = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for argv in NODE_SETUP:
            subprocess.run(["ip", "-n", ns, *argv], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER],
                                  stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        options = PlaneOptions(iptables_backend="legacy")
        if mode_of(mode_name).needs_cgroup:
            cgroup = bpf_sys.cgroup2_root() / f"kpt-connect-{tag}"
            cgroup.mkdir()
            (run_dir / "cgroup").mkdir(parents=True)
            cgroups.bind_mount(cgroup, run_dir / "cgroup")
            options = PlaneOptions(cgroup_path=str(run_dir / "cgroup"),
                                   bpf_dir=str(run_dir / "bpf"))
        yield ns, options, cgroup
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if run_dir.exists():
            bpf_sys.remove_bpffs(run_dir / "bpf")
            if bpf_sys.fs_type(run_dir / "cgroup") == "cgroup2":
                cgroups.unmount(run_dir / "cgroup")
            shutil.rmtree(run_dir)
        if cgroup is not None and cgroup.exists():
            cgroup.rmdir()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def measure(mode_name: str, services: int, samples: int) -> dict[str, Any]:
    with node(mode_name) as (ns, options, cgroup):
        argv = cgroups.in_cgroup(
            ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
             "--inside", json.dumps(options.__dict__), "--modes", mode_name,
             "--services", str(services), "--samples", str(samples)], cgroup)
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode_name}: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--modes", nargs="+", default=["ebpf", "nftables", "iptables"],
                        choices=sorted({*modes.NAMES, "ebpf"}))
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        options = PlaneOptions(**json.loads(args.inside))
        print(json.dumps(inside(args.modes[0], args.services, args.samples, options)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up on a timeout too
    if os.geteuid() != 0:
        print("bench/connect.py needs root (it creates namespaces)", file=sys.stderr)
        return 2
    print(f"{args.services} services x {ENDPOINTS} endpoints, {args.samples} new "
          "connections each; microseconds per connect(); iptables: legacy backend")
    print("svc: to a ClusterIP; pod: to an endpoint directly, with the mode's rules "
          "written; bare: the same before any rule")
    print(f"{'mode':10} {'sync s':>7} {'svc median':>11} {'svc p99':>8} "
          f"{'pod median':>11} {'pod p99':>8} {'bare median':>12} {'bare p99':>9}")
    for mode_name in args.modes:
        r = measure(mode_name, args.services, args.samples)
        print(f"{mode_name:10} {r['sync_s']:>7} {r['service']['median']:>11} "
              f"{r['service']['p99']:>8} {r['direct']['median']:>11} {r['direct']['p99']:>8} "
              f"{r['bare']['median']:>12} {r['bare']['p99']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
