"""Incremental sync equals a sync from scratch, on random change sequences.

A proxy keeps its node views (``NodeViewCache``) and rendered rules (``Mode.renderer``)
across syncs and recomputes only the changed services. Hypothesis drives a tracker
through random sequences of Service, EndpointSlice and Node changes; after every sync
the kept views, the memoized render and the fake kernel (after partial syncs) must equal
what a fresh build, a plain render and one full sync into a fresh fake kernel give.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.nodeview import NodeViewCache, build_node_view, families_in_use, no_local_endpoints
from kubeproxy.proxier import Proxier
from kubeproxy.tracker import Tracker, Update
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, service

CONFIG = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
SERVICES = 4


def service_obj(i: int, variant: int) -> Obj:
    """Service i in one of a few shapes (ClusterIP, NodePort, eTP=Local LB, affinity,
    iTP=Local, dual-stack)."""
    name, ip = f"s{i}", f"172.30.0.{10 + i}"
    shapes: list[dict[str, Any]] = [
        {},
        {"type": "NodePort", "ports": [("p80", 80, "TCP", 30000 + i)]},
        {"type": "LoadBalancer", "ports": [("p80", 80, "TCP", 30010 + i)],
         "lb_ips": [f"5.6.7.{i}"], "externalTrafficPolicy": "Local",
         "healthCheckNodePort": 32000 + i},
        {"sessionAffinity": "ClientIP", "externalIPs": [f"192.168.99.{i}"]},
        {"internalTrafficPolicy": "Local"},
        {"cluster_ip": [ip, f"fd00:30::{10 + i}"], "ipFamilies": ["IPv4", "IPv6"]},
    ]
    shape = {"cluster_ip": ip, **shapes[variant % len(shapes)]}
    return service(name, **shape)


def slice_obj(i: int, eps: list[tuple[int, bool, bool]], v6: bool = False) -> Obj:
    """eps: (address suffix, on this node, ready)."""
    def ep(n: int, here: bool, ready: bool) -> Obj:
        ip = f"fd00:180::{n}" if v6 else f"10.180.{i}.{n}"
        return endpoint(ip, NODE if here else "node2", ready=ready,
                        serving=True, terminating=not ready)
    return endpoint_slice(f"s{i}", [ep(*e) for e in eps], name=f"s{i}-{'v6' if v6 else 'v4'}",
                          family="IPv6" if v6 else "IPv4")


endpoints = st.lists(st.tuples(st.integers(1, 6), st.booleans(), st.booleans()),
                     max_size=4, unique_by=lambda e: e[0])
change = st.one_of(
    st.tuples(st.just("service"), st.integers(0, SERVICES - 1), st.integers(0, 5)),
    st.tuples(st.just("delete-service"), st.integers(0, SERVICES - 1), st.just(0)),
    st.tuples(st.just("slice"), st.integers(0, SERVICES - 1), endpoints),
    st.tuples(st.just("slice6"), st.integers(0, SERVICES - 1), endpoints),
    st.tuples(st.just("delete-slice"), st.integers(0, SERVICES - 1), st.just(0)),
    st.tuples(st.just("node"), st.integers(0, 2), st.just(0)),
)
# A sync after each group of changes; True = a full sync.
script = st.lists(st.tuples(st.lists(change, min_size=1, max_size=4), st.booleans()),
                  min_size=1, max_size=6)


def updates(kind: str, i: int, arg: Any) -> list[Update]:
    if kind == "node":
        zones = ["", "z1", "z2"]
        objs = decode_objects([node(ips=["192.168.0.2", "fd00::2"], zone=zones[arg] or None)])
        return [Update("Node", NamespacedName("", NODE), objs.nodes[0])]
    ref = NamespacedName("ns1", f"s{i}")
    if kind == "service":
        return [Update("Service", ref, decode_objects([service_obj(i, arg)]).services[0])]
    if kind == "delete-service":
        return [Update("Service", ref, None)]
    v6 = kind == "slice6"
    key = NamespacedName("ns1", f"s{i}-{'v6' if v6 else 'v4'}")
    if kind == "delete-slice":
        return [Update("EndpointSlice", key, None)]
    return [Update("EndpointSlice", key, decode_objects([slice_obj(i, arg, v6)]).slices[0])]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script)
def test_incremental_equals_from_scratch(steps: list[tuple[list[Any], bool]]) -> None:
    tracker = Tracker(NODE)
    for u in updates("node", 0, 0):
        tracker.update(u)
    caches = {f: NodeViewCache(CONFIG, f) for f in (4, 6)}
    kept = {name: Proxier(modes.get(name), with_mode(name), modes.get(name).fake())
            for name in modes.NAMES}
    first = True
    for group, full in steps:
        for kind, i, arg in group:
            for u in updates(kind, i, arg):
                tracker.update(u)
        changes = tracker.apply()
        cluster = tracker.cluster()
        changed = None if (first or full or changes.full) else changes.services
        first = False
        for family in (4, 6):
            scratch_view = build_node_view(cluster, CONFIG, family)
            assert caches[family].build(cluster, changed) == scratch_view
            assert caches[family].no_local == no_local_endpoints(scratch_view.services)
        for name, proxier in kept.items():
            mode = modes.get(name)
            before = set(proxier.families)
            report = proxier.sync(cluster, changed)
            assert report.no_local == {
                f: no_local_endpoints(view.services) for f, view in report.views.items()}
            # Partial syncs look for a new family among the changed services only.
            assert set(report.views) == before | set(families_in_use(cluster, CONFIG))
            scratch = Proxier(mode, with_mode(name), mode.fake())
            scratch.sync(cluster, None)
            assert proxier.plane.rules() == scratch.plane.rules(), name
            # The rules it owns (metrics), counted as the memoized render went.
            owned = {k: v[0] for k, v in proxier.plane.counts().rules.items()}
            assert owned == {k: v[0] for k, v in scratch.plane.counts().rules.items()}
            views = [build_node_view(cluster, CONFIG, f)
                     for f in sorted(proxier.families | set(families_in_use(cluster, CONFIG)))]
            assert mode.text(proxier.render(views), NODE) == mode.text(mode.render(views), NODE)


def with_mode(name: str) -> ProxyConfig:
    return ProxyConfig(**{**CONFIG.__dict__, "mode": name})
