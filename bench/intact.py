"""Cost of flush detection: one ``DataPlane.intact()`` call, per mode and size.

``python bench/intact.py [--services 1000 10000] [--modes iptables nftables]`` (root).
Each measurement runs in a network namespace this script creates and deletes
(``kpn-intact-*``): the script re-runs itself inside it, so commands run as the daemon
runs them (no ``ip netns exec`` per command). For each mode and size: a full sync of N
services x 10 endpoints (bench/render.py's synthetic cluster), then

* ``quiet``: intact() while nothing changed (the daemon's case every second);
* ``other``: the first intact() after someone else's unrelated change (a chain or table
  of theirs): the closer look, then the new fingerprint is accepted;
* ``flushed``: intact() after our main chain was flushed (it answers False).

iptables runs on the legacy backend (iptables-nft-restore takes minutes at 10,000
services); ``--iptables-backend nft`` measures the other one. Prints milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import Runner, SubprocessRunner
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.proxier import Proxier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from render import synthetic_cluster  # bench/render.py, a sibling script

# Per mode: (someone else's unrelated change, a flush of our main chain), as commands.
CHANGES: dict[str, tuple[list[str], list[str]]] = {
    "iptables": (["IPT", "-w", "-t", "filter", "-N", "SOMEONE-ELSE"],
                 ["IPT", "-w", "-t", "nat", "-F", "KUBE-SERVICES"]),
    "nftables": (["nft", "add", "table", "inet", "someone-else"],
                 ["nft", "flush", "chain", "ip", "kube-proxy", "services"]),
}


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Median milliseconds of ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), out


def run(runner: Runner, argv: list[str], ipt: str) -> None:
    res = runner.run([ipt if a == "IPT" else a for a in argv])
    assert res.returncode == 0, res.stderr


def inside(mode_name: str, services: int, backend: str) -> dict[str, Any]:
    """One measurement, in the namespace this process runs in."""
    mode = modes.get(mode_name)
    runner = SubprocessRunner()
    plane = mode.data_plane(runner, PlaneOptions(iptables_backend=backend))
    proxier = Proxier(mode, ProxyConfig(hostname="node1", mode=mode_name), plane)
    sync_s, _ = timed(lambda: proxier.sync(synthetic_cluster(services), None))
    ipt = f"iptables-{backend}"
    assert plane.intact()
    quiet, ok = timed(plane.intact, repeat=50)
    assert ok
    other_change, flush = CHANGES[mode_name]
    run(runner, other_change, ipt)
    other, ok = timed(plane.intact)
    assert ok, "someone else's change is not ours"
    run(runner, flush, ipt)
    flushed, ok = timed(plane.intact)
    assert not ok, "the flush was not seen"
    return {"mode": mode_name, "services": services,
            "backend": backend if mode_name == "iptables" else "",
            "full_sync_s": round(sync_s / 1000, 2), "quiet_ms": round(quiet, 3),
            "other_ms": round(other, 1), "flushed_ms": round(flushed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--modes", nargs="+", default=["iptables", "nftables"],
                        choices=modes.NAMES)
    parser.add_argument("--iptables-backend", default="legacy", choices=["legacy", "nft"])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        print(json.dumps(inside(args.modes[0], args.services[0], args.iptables_backend)))
        return 0
    if os.geteuid() != 0:
        print("bench/intact.py needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    print(f"{'mode':9} {'services':>8} {'full sync s':>11} {'quiet ms':>9} "
          f"{'other ms':>9} {'flushed ms':>10}")
    for mode_name in args.modes:
        for n in args.services:
            ns = f"kpn-intact-{os.getpid()}-{n}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                proc = subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                     "--inside", "--modes", mode_name, "--services", str(n),
                     "--iptables-backend", args.iptables_backend],
                    capture_output=True, text=True, check=False, timeout=3600)
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            name = mode_name + (f"/{r['backend']}" if r["backend"] else "")
            print(f"{name:9} {n:>8} {r['full_sync_s']:>11} {r['quiet_ms']:>9} "
                  f"{r['other_ms']:>9} {r['flushed_ms']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
