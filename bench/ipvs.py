"""IPVS mode's sync cost, next to an iptables-legacy full load of the same services.

``python bench/ipvs.py [--services 1000 10000] [--endpoints 10]`` (root, a kernel with
IPVS: on this machine run it in the guest, ``tools/vmrun .venv/bin/python
bench/ipvs.py``, where everything is 20-50x slower than native, hence the ratio).
For each size, each in a network namespace this script creates and deletes
(``kpn-ipvsb-*``; the script re-runs itself inside it, as the daemon runs):

* ``iptables full``: the iptables mode's full sync (legacy backend) of the cluster;
* ``ipvs full``: the IPVS mode's full sync of the same cluster (fresh namespace);
* ``ipvs one``: then partial syncs after one service's endpoints changed, three times
  (another service each time): the median, and the slowest;
* ``ratio``: ipvs full / iptables full, measured in the same boot;
* ``intact``: one ``intact()`` call while nothing changed (the daemon's every second).

The cluster is bench/render.py's synthetic one (N services, every tenth a NodePort,
``--endpoints`` endpoints each). Prints seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
import time
from typing import Any

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import SubprocessRunner
from kubeproxy.model import Cluster, Endpoint, NamespacedName
from kubeproxy.modes import iptables as iptables_mode
from kubeproxy.modes import ipvs as ipvs_mode
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.proxier import Proxier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import render as synthetic  # bench/render.py, a sibling script


def cluster(n: int, endpoints: int) -> Cluster:
    synthetic.ENDPOINTS = endpoints
    c: Cluster = synthetic.synthetic_cluster(n)
    return c


def one_changed(c: Cluster, i: int = 0) -> tuple[Cluster, NamespacedName]:
    """The same cluster with the i-th slice's first endpoint replaced."""
    first = c.slices[i]
    moved = Endpoint(address=ipaddress.ip_address(f"10.99.0.{i + 1}"), node_name="node2")
    slices = (*c.slices[:i], dataclasses.replace(first, endpoints=(moved, *first.endpoints[1:])),
              *c.slices[i + 1:])
    return dataclasses.replace(c, slices=slices), NamespacedName(first.namespace,
                                                                  first.service_name)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def inside(what: str, n: int, endpoints: int) -> dict[str, float]:
    runner = SubprocessRunner()
    c = cluster(n, endpoints)
    options = PlaneOptions(iptables_backend="legacy")
    if what == "iptables":
        mode: Any = iptables_mode.MODE
        proxier = Proxier(mode, ProxyConfig(hostname="node1"),
                          mode.data_plane(runner, options))
        return {"iptables_full": timed(lambda: proxier.sync(c, None))}
    mode = ipvs_mode.MODE
    proxier = Proxier(mode, ProxyConfig(hostname="node1"), mode.data_plane(runner, options))
    full = timed(lambda: proxier.sync(c, None))
    ones = []
    for i in range(3):  # three one-service changes, each to another service
        changed, ref = one_changed(c, i * 7)
        ones.append(timed(lambda: proxier.sync(changed, frozenset({ref}))))  # noqa: B023
        c = changed
    assert proxier.plane.intact()
    check = min(timed(proxier.plane.intact) for _ in range(5))
    return {"ipvs_full": full, "ipvs_one": sorted(ones)[1], "ipvs_one_max": max(ones),
            "intact": check}


def in_namespace(what: str, n: int, endpoints: int) -> dict[str, float]:
    ns = f"kpn-ipvsb-{os.getpid()}-{what}-{n}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable,
                               os.path.abspath(__file__), "--inside", what,
                               "--services", str(n), "--endpoints", str(endpoints)],
                              capture_output=True, text=True, check=False, timeout=7200)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} at {n} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--inside", choices=["iptables", "ipvs"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        print(json.dumps(inside(args.inside, args.services[0], args.endpoints)))
        return 0
    if os.geteuid() != 0:
        print("bench/ipvs.py needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    reason = ipvs_mode.kernel_support(SubprocessRunner())
    if reason:
        print(f"bench/ipvs.py: {reason} (run it in the guest: tools/vmrun)", file=sys.stderr)
        return 2
    print(f"{'services':>8} {'endpoints':>9} {'iptables full s':>15} {'ipvs full s':>11} "
          f"{'ipvs one s':>10} {'one max s':>9} {'ratio':>6} {'intact ms':>9}", flush=True)
    for n in args.services:
        ipt = in_namespace("iptables", n, args.endpoints)["iptables_full"]
        ipvs = in_namespace("ipvs", n, args.endpoints)
        print(f"{n:>8} {args.endpoints:>9} {ipt:>15.2f} {ipvs['ipvs_full']:>11.2f} "
              f"{ipvs['ipvs_one']:>10.3f} {ipvs['ipvs_one_max']:>9.3f} "
              f"{ipvs['ipvs_full'] / ipt:>6.1f} "
              f"{ipvs['intact'] * 1000:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
