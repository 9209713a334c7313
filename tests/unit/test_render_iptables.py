"""Renderer details that the packet-flow table cannot see (comments, spelling)."""

from __future__ import annotations

from kubeproxy.config.types import LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.nodeview import NodeViewCache
from kubeproxy.render.iptables import Renderer, Ruleset
from tests.builders import (
    Obj,
    endpoint,
    endpoint_slice,
    feature_cluster,
    node,
    render_iptables,
    service,
)

CONFIG = ProxyConfig(hostname="node1", cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))


def nat_rules(objs: list[Obj], config: ProxyConfig = CONFIG) -> list[str]:
    ruleset = render_iptables(decode_objects(objs), config)[4]
    return [r for rules in ruleset.tables["nat"].values() for r in rules]


def many(n_services: int, n_endpoints: int) -> list[Obj]:
    objs: list[Obj] = [node()]
    for i in range(n_services):
        objs.append(service(f"svc{i}", cluster_ip=f"172.30.{i // 250}.{i % 250 + 1}"))
        objs.append(endpoint_slice(f"svc{i}", [endpoint(f"10.{i % 250}.{j // 250}.{j % 250 + 1}")
                                               for j in range(n_endpoints)]))
    return objs


def test_small_cluster_has_endpoint_comments() -> None:
    rules = nat_rules(many(10, 100))  # 1,000 endpoints: not yet large
    assert any('--comment "ns1/svc0:p80 -> 10.0.0.1:80"' in r for r in rules)
    assert any(r.startswith("-A KUBE-SEP-") and "--comment" in r for r in rules)


def test_large_cluster_drops_endpoint_comments() -> None:
    rules = nat_rules(many(11, 100))  # 1,100 endpoints
    seps = [r for r in rules if r.startswith("-A KUBE-SEP-")]
    assert seps and not any("--comment" in r for r in seps)
    assert not any(" -> " in r for r in rules)
    # KUBE-SERVICES keeps its comments: that is what people read first.
    assert any(r.startswith("-A KUBE-SERVICES") and "cluster IP" in r for r in rules)


def test_round_robin_uses_nth() -> None:
    config = ProxyConfig(hostname="node1", lb_algorithm=LBAlgorithm.ROUND_ROBIN)
    rules = [r for r in nat_rules(many(1, 4), config) if r.startswith("-A KUBE-SVC-")]
    picks = [r.split("-m statistic ")[1].split(" -j")[0] if "statistic" in r else "always"
             for r in rules]
    assert picks == ["--mode nth --every 4 --packet 0", "--mode nth --every 3 --packet 0",
                     "--mode nth --every 2 --packet 0", "always"]


def test_random_probabilities_are_what_the_kernel_prints() -> None:
    rules = [r for r in nat_rules(many(1, 3)) if r.startswith("-A KUBE-SVC-")
             and "KUBE-MARK-MASQ" not in r]
    assert "--probability 0.33333333349 " in rules[0]
    assert "--probability 0.50000000000 " in rules[1]
    assert "statistic" not in rules[2]


def test_affinity_rules_precede_balancing() -> None:
    objs = [node(), service("svc1", sessionAffinity="ClientIP",
                            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            endpoint_slice("svc1", [endpoint("10.180.0.1"), endpoint("10.180.0.2")])]
    svc = [r for r in nat_rules(objs) if r.startswith("-A KUBE-SVC-")]
    kinds = ["recent" if "--rcheck --seconds 60 --reap" in r else
             "masq" if "KUBE-MARK-MASQ" in r else "pick" for r in svc]
    assert kinds == ["masq", "recent", "recent", "pick", "pick"]
    sep = [r for r in nat_rules(objs) if r.startswith("-A KUBE-SEP-") and "DNAT" in r]
    assert all("-m recent --set --name KUBE-SEP-" in r for r in sep)


def test_the_memoized_renderer_keeps_each_services_chains() -> None:
    """Renderer.by_service and its rule counts, patched per change, equal owners
    inverted and rules counted from scratch."""
    config = ProxyConfig(hostname="node1", cluster_cidrs=(parse_cidr("10.180.0.0/16", "t"),))
    memo, cache = Renderer(), NodeViewCache(config, 4)
    steps = [feature_cluster(), feature_cluster(endpoints_svc2=1),
             feature_cluster(endpoints_svc2=1, with_svc3=False), feature_cluster(),
             feature_cluster(endpoints_svc2=0)]
    changed = None
    for objs in steps:
        cluster = decode_objects(objs)
        got = memo(cache.build(cluster, changed))
        scratch = Ruleset(got.family, got.tables, got.jumps, dict(got.owners))
        assert got.by_service is not None
        assert got.services() == scratch.services() and got.services()
        # Its rule counts, kept as it went, are what the tables hold.
        assert got.rules and all(got.rule_count(t) == scratch.rule_count(t)
                                 == sum(map(len, got.tables[t].values())) > 0
                                 for t in ("filter", "nat"))
        changed = frozenset(s.ref for s in cluster.services) | set(got.services())
