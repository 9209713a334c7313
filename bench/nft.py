"""Benchmark of the nftables data plane against upstream kube-proxy's layout.

``make bench-nft`` (root; every measurement runs in network namespaces this script
creates and deletes, ``kpn-bench-*``). For N Services x E endpoints, built in-process as a
model.Cluster and turned into a NodeView by the core:

* baseline: upstream's nftables layout (pkg/proxy/nftables/proxier.go, first sync: the
  one transaction knftables hands to ``nft -f``), generated from the same NodeView by
  ``upstream_transaction`` below, loaded with one ``nft -f``; then one Service changed
  the way upstream changes it (a small ``nft -f`` on the loaded table);
* ours: ``render`` + ``NftablesDataPlane.sync`` (full), then the same one-Service changes
  as partial syncs;
* memory: this process's peak RSS (measured before the baseline text is built), and
  the baseline ``nft`` process's peak.

Prints the numbers and the ratios to the baseline measured in the same run. The
baseline takes minutes at 10,000 Services: ``--skip-baseline`` leaves it out.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import SubprocessRunner
from kubeproxy.dataplane.netlink import NetlinkTransport
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.model import (
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    NamespacedName,
    Node,
    Service,
    ServicePortSpec,
    ServiceType,
    TrafficPolicy,
)
from kubeproxy.nodeview import NodeView, Route, ServicePortView, build_node_view
from kubeproxy.render.nftables import BASE_CHAINS, render

NODE = "node1"
NODE_IP = ipaddress.ip_address("192.168.0.2")
POD_CIDR = ipaddress.ip_network("10.0.0.0/8")


# -- the synthetic cluster ---------------------------------------------------------------


def service(i: int) -> Service:
    """Service i: mostly ClusterIP; every 7th a NodePort, every 20th a LoadBalancer with
    externalTrafficPolicy=Local, every 100th with ClientIP session affinity."""
    cip = ipaddress.ip_address(0xAC1E0000 + i + 1)  # 172.30.0.1 + i
    kind = ServiceType.CLUSTER_IP
    node_port = 0  # unique: i // 7 and i // 20 number the NodePort and LB Services
    lb: tuple[Any, ...] = ()
    etp = TrafficPolicy.CLUSTER
    if i % 20 == 3:
        kind, etp, node_port = ServiceType.LOAD_BALANCER, TrafficPolicy.LOCAL, 31500 + i // 20
        lb = (ipaddress.ip_address(0x05060000 + i),)
    elif i % 7 == 1:
        kind, node_port = ServiceType.NODE_PORT, 30000 + i // 7
    return Service(f"ns{i // 100}", f"svc{i}", kind, (cip,),
                   (ServicePortSpec("http", "TCP", 80, node_port),), load_balancer_ips=lb,
                   external_traffic_policy=etp,
                   health_check_node_port=32000 if kind is ServiceType.LOAD_BALANCER else 0,
                   session_affinity_timeout=10800 if i % 100 == 7 else None)


def endpoints(i: int, n: int, generation: int = 0) -> EndpointSlice:
    """n endpoints 10.128.0.0/9 + ..., one in five on this node."""
    eps = []
    for j in range(n):
        k = i * n + j
        ip = ipaddress.ip_address(0x0A800000 + k + generation * 0x200000)
        eps.append(Endpoint(ip, node_name=NODE if j % 5 == 0 else "node2"))
    return EndpointSlice(f"ns{i // 100}", f"svc{i}-x{generation}", f"svc{i}", 4,
                         (EndpointPort("http", 8080, "TCP"),), tuple(eps))


def cluster(services: list[Service], slices: list[EndpointSlice]) -> Cluster:
    return Cluster(tuple(services), tuple(slices), (Node(NODE, addresses=(NODE_IP,)),))


# -- upstream's layout (the baseline) ------------------------------------------------------


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]


class Upstream:
    """The transaction upstream's syncProxyRules builds, as knftables writes it for
    ``nft -f``: every chain added and flushed, one rule per line, one element per line."""

    T = "ip kube-proxy"

    def __init__(self, view: NodeView) -> None:
        self.view = view
        self.mark = f"{view.masquerade_mark:#x}"

    def full(self) -> Iterator[str]:
        t = self.T
        yield f'add table {t} {{ comment "rules for kube-proxy" ; }}'
        for name, kind, hook, prio in BASE_CHAINS:  # the same base chains as ours
            yield f"add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
            yield f"flush chain {t} {name}"
        for dst, src, extra in (
                ("nodeport-endpoints-check", "filter-input", "ct state new "),
                ("service-endpoints-check", "filter-input", "ct state new "),
                ("service-endpoints-check", "filter-forward", "ct state new "),
                ("service-endpoints-check", "filter-output", "ct state new "),
                ("firewall-check", "filter-prerouting", "ct state new "),
                ("firewall-check", "filter-output", "ct state new "),
                ("services", "nat-output", ""), ("services", "nat-prerouting", ""),
                ("masquerading", "nat-postrouting", ""),
                ("cluster-ips-check", "filter-forward", "ct state new "),
                ("cluster-ips-check", "filter-output-post-dnat", "ct state new ")):
            yield f"add chain {t} {dst}"
            yield f"flush chain {t} {dst}"
            yield f"add rule {t} {src} {extra}jump {dst}"
        for name in ("mark-for-masquerade", "reject-chain"):
            yield f"add chain {t} {name}"
            yield f"flush chain {t} {name}"
        yield f"add rule {t} mark-for-masquerade mark set mark or {self.mark}"
        yield f"add rule {t} masquerading mark and {self.mark} == 0 return"
        yield f"add rule {t} masquerading mark set mark xor {self.mark}"
        yield f"add rule {t} masquerading masquerade fully-random"
        yield f'add set {t} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}'
        yield f"add rule {t} cluster-ips-check ip daddr @cluster-ips reject"
        yield f"add rule {t} reject-chain reject"
        for name, key in (("no-endpoint-services", "ipv4_addr . inet_proto . inet_service"),
                          ("no-endpoint-nodeports", "inet_proto . inet_service"),
                          ("firewall-ips", "ipv4_addr . inet_proto . inet_service"),
                          ("service-ips", "ipv4_addr . inet_proto . inet_service"),
                          ("service-nodeports", "inet_proto . inet_service")):
            yield f"add map {t} {name} {{ type {key} : verdict ; }}"
            yield f"flush map {t} {name}"
        vmap = "ip daddr . meta l4proto . th dport vmap"
        yield f"add rule {t} service-endpoints-check {vmap} @no-endpoint-services"
        yield (f"add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 "
               "meta l4proto . th dport vmap @no-endpoint-nodeports")
        yield f"add rule {t} firewall-check {vmap} @firewall-ips"
        yield f"add rule {t} services {vmap} @service-ips"
        yield (f"add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 "
               "meta l4proto . th dport vmap @service-nodeports")
        for spv in self.view.services:
            yield from self.port(spv)

    def port(self, spv: ServicePortView, elements: bool = True) -> Iterator[str]:
        t = self.T
        proto = spv.protocol
        base = f"{spv.name.service}/{proto}/{spv.name.port}"
        svc = f"service-{_hash(base)}-{base}"
        loc = f"local-{_hash(base)}-{base}"
        ext = f"external-{_hash(base)}-{base}"

        def ep_chain(ep: Any) -> str:
            eb = f"{base}__{ep.ip}/{ep.port}"
            return f"endpoint-{_hash(eb)}-{eb}"

        def aff(ep: Any) -> str:
            eb = f"{base}__{ep.ip}/{ep.port}"
            return f"affinity-{_hash(eb)}-{eb}"

        for ep in spv.all_endpoints:
            yield f"add chain {t} {ep_chain(ep)}"
            yield f"flush chain {t} {ep_chain(ep)}"
        for chain, used in ((svc, spv.uses_cluster_chain), (loc, spv.uses_local_chain),
                            (ext, spv.uses_external_chain)):
            if used:
                yield f"add chain {t} {chain}"
                yield f"flush chain {t} {chain}"
        if elements:
            yield f"add element {t} cluster-ips {{ {spv.cluster_ip} }}"
            target = svc if spv.internal is Route.CLUSTER else loc
            if spv.internal in (Route.CLUSTER, Route.LOCAL):
                yield (f"add element {t} service-ips {{ {spv.cluster_ip} . {proto} . "
                       f"{spv.port} : goto {target} }}")
            for ip in spv.load_balancer_ips:
                yield (f"add element {t} service-ips {{ {ip} . {proto} . {spv.port} : "
                       f"goto {ext} }}")
            if spv.node_port:
                yield (f"add element {t} service-nodeports {{ {proto} . {spv.node_port} : "
                       f"goto {ext} }}")
        if spv.internal in (Route.CLUSTER, Route.LOCAL):
            target = svc if spv.internal is Route.CLUSTER else loc
            yield (f"add rule {t} {target} ip daddr {spv.cluster_ip} {proto} dport {spv.port} "
                   f"ip saddr != {POD_CIDR} jump mark-for-masquerade")
        if spv.uses_external_chain:
            if not spv.external_policy_local:
                yield f"add rule {t} {ext} jump mark-for-masquerade"
            else:
                local = "fib saddr type local"
                yield (f"add rule {t} {ext} ip saddr {POD_CIDR} goto {svc} "
                       'comment "short-circuit pod traffic"')
                yield (f"add rule {t} {ext} {local} jump mark-for-masquerade "
                       'comment "masquerade local traffic"')
                yield (f"add rule {t} {ext} {local} goto {svc} "
                       'comment "short-circuit local traffic"')
            yield f"add rule {t} {ext} goto {svc if spv.external is Route.CLUSTER else loc}"
        if spv.affinity_timeout is not None:
            for ep in spv.all_endpoints:
                yield (f"add set {t} {aff(ep)} {{ type ipv4_addr ; flags dynamic,timeout ; "
                       f"timeout {spv.affinity_timeout}s ; }}")
        for chain, eps in ((svc, spv.cluster_endpoints), (loc, spv.local_endpoints)):
            if not eps:
                continue
            if spv.affinity_timeout is not None:
                for ep in eps:
                    yield f"add rule {t} {chain} ip saddr @{aff(ep)} goto {ep_chain(ep)}"
            vm = ", ".join(f"{i} : goto {ep_chain(ep)}" for i, ep in enumerate(eps))
            yield f"add rule {t} {chain} numgen random mod {len(eps)} vmap {{ {vm} }}"
        for ep in spv.all_endpoints:
            yield f"add rule {t} {ep_chain(ep)} ip saddr {ep.ip} jump mark-for-masquerade"
            if spv.affinity_timeout is not None:
                yield f"add rule {t} {ep_chain(ep)} update @{aff(ep)} {{ ip saddr }}"
            yield f"add rule {t} {ep_chain(ep)} meta l4proto {proto} dnat to {ep.ip}:{ep.port}"


# -- measuring -----------------------------------------------------------------------------


class Namespace:
    """A network namespace of our own (``kpn-bench-*``), deleted on exit."""

    def __init__(self, tag: str) -> None:
        self.name = f"kpn-bench-{tag}-{os.getpid()}"

    def __enter__(self) -> Namespace:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def nft(self, path: str) -> float:
        start = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", path], check=True)
        return time.perf_counter() - start


class TimedTransport(NetlinkTransport):
    """Adds up, per sync, how long the kernel took over its transactions."""

    kernel: list[float]

    def commit(self, ops: Any) -> None:
        super().commit(ops)
        self.kernel.append(self.kernel_seconds)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5, help="one-Service changes timed")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not measure upstream's layout (it takes minutes at 10,000)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/nft.py needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    n, e = args.services, args.endpoints
    config = ProxyConfig(hostname=NODE, mode="nftables", cluster_cidrs=(POD_CIDR,))
    print(f"== {n} Services x {e} endpoints")
    t_model, (services, slices) = clock(
        lambda: ([service(i) for i in range(n)], [endpoints(i, e) for i in range(n)]))
    rss_model = rss_mib()
    t_view, view = clock(lambda: build_node_view(cluster(services, slices), config, 4))
    print(f"core: model {t_model:.2f} s ({rss_model:.0f} MiB RSS), node view {t_view:.2f} s "
          f"({rss_mib():.0f} MiB RSS; {len(view.services)} service ports, "
          f"{view.total_endpoints} endpoints)")

    results: dict[str, float] = {}
    with Namespace("ours") as ns:
        transport = TimedTransport(ns.path)
        transport.kernel = []
        plane = NftablesDataPlane(SubprocessRunner(), transport)
        t_full, stats = clock(lambda: plane.sync(render([view])))
        results["full"] = t_full
        results["rss"] = rss_mib()
        print(f"ours: full sync {t_full:.2f} s (kernel {transport.kernel[0]:.2f} s, "
              f"{stats.ops} operations); proxy peak RSS {results['rss']:.0f} MiB "
              "(the model and node view included)")
        changes = one_service_changes(services, slices, config, n, e, args.repeat)
        for label, make in changes:
            times, kernel = [], []
            for step in make():
                new_view, changed = step
                transport.kernel.clear()
                start = time.perf_counter()
                st = plane.sync(render([new_view]), changed)
                dt = time.perf_counter() - start
                assert not st.full
                times.append(dt)
                kernel.append(sum(transport.kernel))
                del new_view
            med = statistics.median(times)
            results[label] = med
            print(f"ours: {label}: median {med * 1000:.1f} ms, max {max(times) * 1000:.1f} "
                  f"ms (kernel median {statistics.median(kernel) * 1000:.1f} ms)")
        print(f"ours: peak RSS after the changes {rss_mib():.0f} MiB (this benchmark "
              "keeps up to three node views alive)")
        listing = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "list", "ruleset"],
                                 capture_output=True, text=True, check=False)
        print(f"ours: `nft list ruleset` {'works' if listing.returncode == 0 else 'FAILS'}"
              f" ({len(listing.stdout) >> 20} MiB of text)")
    if not args.skip_baseline:
        baseline(view, results, services, slices, config, n, e)
    return 0


Steps = Callable[[], Iterator[tuple[NodeView, set[NamespacedName]]]]


def one_service_changes(services: list[Service], slices: list[EndpointSlice],
                        config: ProxyConfig, n: int, e: int, repeat: int
                        ) -> list[tuple[str, Steps]]:
    """(label, steps): each step changes one Service and yields (new view, {that Service})."""
    def replace_endpoint() -> Iterator[tuple[NodeView, set[NamespacedName]]]:
        for r in range(repeat):
            i = (n // 2 + r * 37) % n
            old = slices[i]
            slices[i] = endpoints(i, e, generation=1)  # all endpoints move (a rollout)
            yield (build_node_view(cluster(services, slices), config, 4),
                   {NamespacedName(old.namespace, old.service_name)})

    def add_endpoint() -> Iterator[tuple[NodeView, set[NamespacedName]]]:
        for r in range(repeat):
            i = (n // 3 + r * 41) % n
            old = slices[i]
            slices[i] = endpoints(i, e + 1, generation=2)  # one more: the chain changes
            yield (build_node_view(cluster(services, slices), config, 4),
                   {NamespacedName(old.namespace, old.service_name)})

    def add_service() -> Iterator[tuple[NodeView, set[NamespacedName]]]:
        for r in range(repeat):
            i = n + r
            services.append(service(i))
            slices.append(endpoints(i, e))
            yield (build_node_view(cluster(services, slices), config, 4),
                   {NamespacedName(f"ns{i // 100}", f"svc{i}")})

    return [("one Service's endpoints replaced", replace_endpoint),
            ("one Service scaled up by one endpoint", add_endpoint),
            ("one Service added", add_service)]


def baseline(view: NodeView, results: dict[str, float], services: list[Service],
             slices: list[EndpointSlice], config: ProxyConfig, n: int, e: int) -> None:
    up = Upstream(view)
    with tempfile.TemporaryDirectory() as tmp, Namespace("upstream") as ns:
        path = Path(tmp) / "full.nft"
        with path.open("w") as fh:
            for line in up.full():
                fh.write(line + "\n")
        print(f"baseline: upstream transaction {path.stat().st_size >> 20} MiB, "
              "loading with one `nft -f` ...", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t_full = ns.nft(str(path))
        nft_rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        # One Service changed, as upstream's partial sync writes it: its chains re-added
        # and flushed, its rules, its changed elements.
        i = n // 2
        slices[i] = endpoints(i, e, generation=3)
        new_view = build_node_view(cluster(services, slices), config, 4)
        name = NamespacedName(f"ns{i // 100}", f"svc{i}")
        spv = next(s for s in new_view.services if s.name.service == name)
        part = Path(tmp) / "partial.nft"
        part.write_text("\n".join(Upstream(new_view).port(spv, elements=False)) + "\n")
        times = [ns.nft(str(part)) for _ in range(3)]
    t_part = statistics.median(times)
    print(f"baseline: full {t_full:.1f} s (nft peak RSS {nft_rss:.0f} MiB); one Service's "
          f"endpoints replaced: median {t_part * 1000:.0f} ms")
    print("== ratios (baseline / ours)")
    print(f"full sync:            {t_full:8.1f} s  / {results['full']:6.2f} s   = "
          f"{t_full / results['full']:.0f}x")
    ours = results["one Service's endpoints replaced"]
    print(f"one-Service change:   {t_part * 1000:8.0f} ms / {ours * 1000:6.1f} ms  = "
          f"{t_part / ours:.0f}x")
    print(f"memory (peak RSS):    {nft_rss:8.0f} MiB (nft) / {results['rss']:.0f} MiB (proxy)")


if __name__ == "__main__":
    sys.exit(main())
