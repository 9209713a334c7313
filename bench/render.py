"""Render benchmark: time and peak memory to render N services x 10 endpoints.

Prints, per size, the time to build the node view and render the iptables ruleset to
text, the process's peak memory, and the ratio against a plain string-building
renderer (the same rules built the obvious way, argv lists joined per rule, as
upstream's LineBuffer does) measured in the same run. Each size runs in a fresh
subprocess so the peak memory is its own.

    make bench-render            # 1,000 / 10,000 / 30,000 services
    python bench/render.py 5000  # one size
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import resource
import subprocess
import sys
import time

from kubeproxy.config.types import ProxyConfig
from kubeproxy.model import (
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Node,
    Service,
    ServicePortSpec,
    ServiceType,
)
from kubeproxy.nodeview import build_node_view
from kubeproxy.render.ipt_names import hash16
from kubeproxy.render.iptables import render
from kubeproxy.util.gcpause import paused_gc

ENDPOINTS = 10
SIZES = (1_000, 10_000, 30_000)


def synthetic_cluster(n: int) -> Cluster:
    services, slices = [], []
    node = Node(name="node1", addresses=(ipaddress.ip_address("192.168.0.2"),))
    for i in range(n):
        ns, name = f"ns{i % 100}", f"svc{i}"
        nodeport = i % 10 == 0
        services.append(Service(
            namespace=ns, name=name,
            type=ServiceType.NODE_PORT if nodeport else ServiceType.CLUSTER_IP,
            cluster_ips=(ipaddress.ip_address(0xAC1E0000 + i),),  # 172.30.x.y
            ports=(ServicePortSpec("http", "TCP", 80, 30000 + i % 2000 if nodeport else 0),),
        ))
        eps = tuple(Endpoint(address=ipaddress.ip_address(0x0AB40000 + i * ENDPOINTS + j),
                             node_name="node1" if j == 0 else "node2")
                    for j in range(ENDPOINTS))
        slices.append(EndpointSlice(ns, f"{name}-abc", name, 4,
                                    (EndpointPort("http", 8080, "TCP"),), eps))
    return Cluster(tuple(services), tuple(slices), (node,))


def plain_render(cluster: Cluster) -> str:
    """The obvious renderer: per rule an argv list, joined; hashes computed each time."""
    def chain(prefix: str, text: str) -> str:
        return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]

    lines = ["*nat"]
    by_svc = {(s.namespace, s.service_name): s for s in cluster.slices}
    for svc in cluster.services:
        port = svc.ports[0]
        spn = f"{svc.namespace}/{svc.name}:{port.name}"
        svc_chain = chain("KUBE-SVC-", spn + "tcp")
        lines.append(" ".join(["-A", "KUBE-SERVICES", "-m", "comment", "--comment",
                               f'"{spn} cluster IP"', "-m", "tcp", "-p", "tcp", "-d",
                               str(svc.cluster_ips[0]), "--dport", str(port.port), "-j",
                               svc_chain]))
        eps = by_svc[(svc.namespace, svc.name)].endpoints
        for k, ep in enumerate(eps):
            target = f"{ep.address}:8080"
            sep = chain("KUBE-SEP-", spn + "tcp" + target)
            args = ["-A", svc_chain]
            if k < len(eps) - 1:
                args += ["-m", "statistic", "--mode", "random", "--probability",
                         f"{1.0 / (len(eps) - k):0.10f}"]
            lines.append(" ".join([*args, "-j", sep]))
            lines.append(" ".join(["-A", sep, "-s", str(ep.address), "-j", "KUBE-MARK-MASQ"]))
            lines.append(" ".join(["-A", sep, "-m", "tcp", "-p", "tcp", "-j", "DNAT",
                                   "--to-destination", target]))
    lines.append("COMMIT")
    return "\n".join(lines)


def measure(n: int, repeat: int = 3) -> dict[str, float]:
    """Best of `repeat` runs of each (this VM's timings vary by 2x under load)."""
    cluster = synthetic_cluster(n)
    config = ProxyConfig(hostname="node1")
    view_s = render_s = plain_s = float("inf")
    lines = plain_lines = 0
    for _ in range(repeat):
        hash16.cache_clear()  # every run cold: a first sync, not a re-render
        with paused_gc():  # as the proxy renders (proxier.Proxier)
            t0 = time.perf_counter()
            view = build_node_view(cluster, config, 4)
            t1 = time.perf_counter()
            text = render(view).save_text()
            t2 = time.perf_counter()
        plain = plain_render(cluster)  # the obvious script, as it would run
        t3 = time.perf_counter()
        view_s, render_s = min(view_s, t1 - t0), min(render_s, t2 - t1)
        plain_s = min(plain_s, t3 - t2)
        lines, plain_lines = text.count("\n"), plain.count("\n")
        del view, text, plain
    # A running proxy re-renders on every sync; the chain-name hashes are then cached.
    with paused_gc():
        t0 = time.perf_counter()
        render(build_node_view(cluster, config, 4)).save_text()
        warm_s = time.perf_counter() - t0
    return {"services": n, "warm_s": warm_s, "view_s": view_s, "render_s": render_s,
            "total_s": view_s + render_s, "plain_s": plain_s, "lines": lines,
            "plain_lines": plain_lines,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]))))
        return
    sizes = [int(a) for a in sys.argv[1:]] or list(SIZES)
    print(f"{'services':>9} {'view s':>8} {'render s':>9} {'total s':>8} {'plain s':>8} "
          f"{'ratio':>6} {'rules':>9} {'peak MiB':>9} {'re-sync s':>9}")
    print("(view = policy: node view from the model; render = node view -> iptables-save text)")
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"{n:>9,} {r['view_s']:>8.3f} {r['render_s']:>9.3f} {r['total_s']:>8.3f} "
              f"{r['plain_s']:>8.3f} {r['total_s'] / r['plain_s']:>6.2f} {int(r['lines']):>9,} "
              f"{r['peak_mib']:>9.0f} {r['warm_s']:>9.3f}")
    print("re-sync = view + render again with the chain-name cache warm, as every later sync")
    print("ratio = our total (view + render) / the plain string-building renderer's time, "
          "which writes fewer rules (KUBE-SERVICES, SVC and SEP chains only)")


if __name__ == "__main__":
    main()
