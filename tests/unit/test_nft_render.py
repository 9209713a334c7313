"""The nftables renderer: upstream's layout, translated from the node view, and a script
that reads back (through the parser the tracer uses) into exactly what was rendered."""

from __future__ import annotations

from typing import Any

import pytest

from kubeproxy.config.types import DetectLocalMode, LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.render import nftables
from kubeproxy.render.nft_parse import ScriptError, parse_rule, parse_script
from kubeproxy.render.nftables import NftRuleset, service_key
from tests.builders import (
    NODE,
    NODE_IP,
    Obj,
    endpoint,
    endpoint_slice,
    node,
    render_nftables,
    render_nftables_ruleset,
    service,
)

CIDR = parse_cidr("10.0.0.0/8", "t")
SVC = "service-ULMVA6XW-ns1/svc1/tcp/p80"
EXT = "external-ULMVA6XW-ns1/svc1/tcp/p80"
LOC = "local-ULMVA6XW-ns1/svc1/tcp/p80"
FW = "firewall-ULMVA6XW-ns1/svc1/tcp/p80"


def render(objs: list[Obj], **config: Any) -> NftRuleset:
    decoded = decode_objects(objs)
    assert not decoded.errors, decoded.errors
    settings: dict[str, Any] = {"hostname": NODE, "mode": "nftables", "cluster_cidrs": (CIDR,)}
    settings.update(config)
    return render_nftables_ruleset(decoded, ProxyConfig(**settings))


def basic(**svc: Any) -> list[Obj]:
    return [node(), service("svc1", **svc), endpoint_slice("svc1", [
        endpoint("10.180.0.1"), endpoint("10.180.1.1", node="node2")])]


def chain(rs: NftRuleset, name: str, family: str = "ip") -> list[str]:
    table = parse_script(rs.script())[(family, "kube-proxy")]
    return [r.text() for r in table.chains[name].rules]


def elements(rs: NftRuleset, set_name: str, family: str = "ip") -> list[str]:
    table = parse_script(rs.script())[(family, "kube-proxy")]
    sdef = table.sets[set_name]
    from kubeproxy.render.nft_ir import field_types
    kt = field_types(sdef.key)
    dt = field_types(sdef.data) if sdef.data and sdef.data != "verdict" else ()
    return sorted(e.text(kt, dt) for e in table.elements.get(set_name, []))


LB: dict[str, Any] = {"type": "LoadBalancer", "ports": [("p80", 80, "TCP", 3001)],
                      "lb_ips": ["5.6.7.8"]}
MASQ = "ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
MAP = ("meta l4proto tcp dnat ip to numgen random mod 1 offset 2887647273 . numgen random "
       "mod 1 offset 20486 . numgen random mod 2 map @endpoints-2c")

# (id, objects, config, chain, expected rules)
CHAIN_CASES: list[tuple[str, list[Obj], dict[str, Any], str, list[str]]] = [
    ("clusterip", basic(), {}, SVC, [MASQ, MAP]),
    ("masquerade-all", basic(), {"masquerade_all": True}, SVC, [
        "ip daddr 172.30.0.41 tcp dport 80 jump mark-for-masquerade", MAP]),
    ("no-detector", basic(), {"cluster_cidrs": ()}, SVC, [MAP]),
    ("bridge", basic(), {"detect_local_mode": DetectLocalMode.BRIDGE_INTERFACE,
                         "bridge_interface": "cbr0"}, SVC, [
        'ip daddr 172.30.0.41 tcp dport 80 iifname != "cbr0" jump mark-for-masquerade', MAP]),
    ("prefix", basic(), {"detect_local_mode": DetectLocalMode.INTERFACE_NAME_PREFIX,
                         "interface_name_prefix": "veth"}, SVC, [
        'ip daddr 172.30.0.41 tcp dport 80 iifname != "veth*" jump mark-for-masquerade', MAP]),
    ("round-robin", basic(), {"lb_algorithm": LBAlgorithm.ROUND_ROBIN}, SVC, [
        MASQ, MAP.replace("numgen random mod 2", "numgen inc mod 2")]),
    ("etp-cluster", basic(**LB), {}, EXT, ["jump mark-for-masquerade", f"goto {SVC}"]),
    ("etp-local", basic(**LB, externalTrafficPolicy="Local"), {}, EXT, [
        f'ip saddr 10.0.0.0/8 goto {SVC} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto {SVC} comment "short-circuit local traffic"',
        f"goto {LOC}"]),
    ("etp-local-endpoints", basic(**LB, externalTrafficPolicy="Local"), {}, LOC, [
        MAP.replace("mod 2 map", "mod 1 offset 2 map")]),
    ("itp-local", basic(internalTrafficPolicy="Local"), {}, LOC, [
        MASQ, MAP.replace("mod 2 map", "mod 1 map")]),
    ("firewall", basic(**LB, loadBalancerSourceRanges=["203.0.113.0/25", "198.51.100.7/32"]),
     {}, FW, ["ip saddr != 203.0.113.0/25 ip saddr != 198.51.100.7 drop"]),
    ("firewall-allows-node", basic(**LB, loadBalancerSourceRanges=["192.168.0.0/24"]), {}, FW,
     ["ip saddr != 192.168.0.0/24 ip saddr != 5.6.7.8 drop"]),
    ("affinity", basic(sessionAffinity="ClientIP"), {}, SVC, [
        MASQ,
        "ip saddr @affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 update "
        "@affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 { ip saddr } meta l4proto tcp "
        "dnat to 10.180.0.1:80",
        "ip saddr @affinity-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 update "
        "@affinity-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 { ip saddr } meta l4proto tcp "
        "dnat to 10.180.1.1:80",
        "meta l4proto tcp numgen random mod 2 0 update "
        "@affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 { ip saddr } dnat to 10.180.0.1:80",
        "meta l4proto tcp update @affinity-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 "
        "{ ip saddr } dnat to 10.180.1.1:80"]),
    ("nodeports-all", basic(), {}, "services", [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap "
        "@service-nodeports"]),
    ("nodeports-listed", basic(), {"nodeport_addresses": ("192.168.0.0/24",)}, "services", [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"]),
    ("postrouting", basic(), {}, "nat-postrouting", [
        "ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade",
        "jump masquerading"]),
    ("masquerading", basic(), {"masquerade_bit": 13}, "masquerading", [
        "meta mark & 0x00002000 == 0x00000000 return",
        "meta mark set meta mark ^ 0x00002000", "masquerade fully-random"]),
]


@pytest.mark.parametrize(("objs", "config", "name", "want"),
                         [c[1:] for c in CHAIN_CASES], ids=[c[0] for c in CHAIN_CASES])
def test_chain(objs: list[Obj], config: dict[str, Any], name: str, want: list[str]) -> None:
    assert chain(render(objs, **config), name) == want


ELEMENT_CASES: list[tuple[str, list[Obj], dict[str, Any], str, list[str]]] = [
    ("service-ips", basic(**LB, externalIPs=["192.168.99.11"]), {}, "service-ips", [
        f"172.30.0.41 . tcp . 80 : goto {SVC}", f"192.168.99.11 . tcp . 80 : goto {EXT}",
        f"5.6.7.8 . tcp . 80 : goto {EXT}"]),
    ("nodeports", basic(**LB), {}, "service-nodeports", [f"tcp . 3001 : goto {EXT}"]),
    ("no-endpoints-reject", [node(), service("svc1", **LB, externalIPs=["192.168.99.11"])],
     {}, "no-endpoint-services", [
        '172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain',
        '192.168.99.11 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain',
        '5.6.7.8 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain']),
    ("no-endpoints-nodeport", [node(), service("svc1", **LB)], {}, "no-endpoint-nodeports",
     ['tcp . 3001 comment "ns1/svc1:p80" : goto reject-chain']),
    ("itp-local-drop", [node(), service("svc1", internalTrafficPolicy="Local"),
                        endpoint_slice("svc1", [endpoint("10.180.1.1", node="node2")])],
     {}, "no-endpoint-services", ['172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : drop']),
    ("etp-local-drop", [node(), service("svc1", **LB, externalTrafficPolicy="Local"),
                        endpoint_slice("svc1", [endpoint("10.180.1.1", node="node2")])],
     {}, "no-endpoint-nodeports", ['tcp . 3001 comment "ns1/svc1:p80" : drop']),
    ("firewall-ips", basic(**LB, loadBalancerSourceRanges=["203.0.113.0/25"]), {},
     "firewall-ips", [f"5.6.7.8 . tcp . 80 : goto {FW}"]),
    ("cluster-ips", basic(), {}, "cluster-ips", ["172.30.0.41"]),
    ("hairpin", basic(), {}, "hairpin-endpoints",
     ["10.180.0.1 . 10.180.0.1", "10.180.1.1 . 10.180.1.1"]),
    ("endpoints", basic(), {}, "endpoints-2c", [
        '2887647273 . 20486 . 0 comment "ns1/svc1/tcp/p80" : 10.180.0.1 . 80',
        '2887647273 . 20486 . 1 comment "ns1/svc1/tcp/p80" : 10.180.1.1 . 80']),
    ("nodeport-ips", basic(), {"nodeport_addresses": ("192.168.0.0/24", "127.0.0.0/8")},
     "nodeport-ips", ["192.168.0.2"]),  # never localhost: upstream nftables has none
]


@pytest.mark.parametrize(("objs", "config", "name", "want"),
                         [c[1:] for c in ELEMENT_CASES], ids=[c[0] for c in ELEMENT_CASES])
def test_elements(objs: list[Obj], config: dict[str, Any], name: str, want: list[str]) -> None:
    assert elements(render(objs, **config), name) == sorted(want)


def test_ipv6_table() -> None:
    objs = [node(ips=[NODE_IP, "fd00::2"]),
            service("svc6", cluster_ip=["172.30.0.46", "fd00:30::46"],
                    ipFamilyPolicy="PreferDualStack"),
            endpoint_slice("svc6", [endpoint("fd00:180::6")], name="v6", family="IPv6")]
    rs = render(objs, cluster_cidrs=(CIDR, parse_cidr("fd00:180::/64", "t")))
    assert chain(rs, "nodeport-endpoints-check", "ip6") == [
        "ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports"]
    svc = next(c for c in parse_script(rs.script())[("ip6", "kube-proxy")].chains
               if c.startswith("service-"))
    rules = chain(rs, svc, "ip6")
    assert rules[0].startswith("ip6 daddr fd00:30::46 tcp dport 80 ip6 saddr != fd00:180::/64")
    assert rules[1].startswith("meta l4proto tcp dnat ip6 to numgen random mod 1 offset 20486")
    assert chain(rs, "reject-chain", "ip6") == ["reject"]


def test_ipv6_key_collisions_fall_back_to_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """If two IPv6 service ports hashed alike, the second picks endpoints by rules."""
    monkeypatch.setattr(nftables, "service_key", lambda spv: (1, 2, 3))
    objs = [node(ips=[NODE_IP, "fd00::2"])]
    for i, name in enumerate(("a", "b")):
        objs += [service(name, cluster_ip=[f"fd00:30::{i + 1}"], ipFamilies=["IPv6"]),
                 endpoint_slice(name, [endpoint("fd00:180::6")], family="IPv6")]
    rs = render(objs)
    table = parse_script(rs.script())[("ip6", "kube-proxy")]
    firsts = sorted(table.chains[c].rules[-1].text() for c in table.chains
                    if c.startswith("service-") and "/" in c)
    assert firsts == ["meta l4proto tcp dnat ip6 to numgen random mod 1 offset 1 . numgen "
                      "random mod 1 offset 2 . numgen random mod 1 offset 3 . numgen random "
                      "mod 1 map @" + firsts[0].rsplit("@", 1)[1],
                      "meta l4proto tcp dnat to [fd00:180::6]:80"]


def test_service_keys_are_exact_for_ipv4() -> None:
    rs = render(basic())
    spv = rs.families[0].view.services[0]
    assert service_key(spv) == (0xAC1E0029, 80 << 8 | 6)


def test_conflicting_elements_first_in_name_order_wins() -> None:
    objs = [node(), service("a", type="NodePort", ports=[("p", 80, "TCP", 3001)]),
            endpoint_slice("a", [endpoint("10.180.0.1")], ports=[("p", 80, "TCP")]),
            service("b", cluster_ip="172.30.0.42", type="NodePort",
                    ports=[("p", 80, "TCP", 3001)]),
            endpoint_slice("b", [endpoint("10.180.0.2")], ports=[("p", 80, "TCP")])]
    assert [e.split()[-1].split("-")[-1] for e in
            elements(render(objs), "service-nodeports")] == ["ns1/a/tcp/p"]


def test_script_is_deterministic_and_complete() -> None:
    objs = basic(**LB, externalTrafficPolicy="Local", sessionAffinity="ClientIP")
    first = render_nftables(decode_objects(objs), ProxyConfig(hostname=NODE, cluster_cidrs=(CIDR,)))
    again = render_nftables(decode_objects(list(reversed(objs))),
                            ProxyConfig(hostname=NODE, cluster_cidrs=(CIDR,)))
    assert first == again
    assert first.startswith("table ip kube-proxy {") and 'comment "rules for kube-proxy"' in first


ROUND_TRIP = {
    "plain": basic(),
    "lb-local-fw-affinity": basic(**LB, externalTrafficPolicy="Local", sessionAffinity="ClientIP",
                                  loadBalancerSourceRanges=["203.0.113.0/25"],
                                  externalIPs=["192.168.99.11"]),
    "no-endpoints": [node(), service("svc1", **LB)],
    "dual-stack": [node(ips=[NODE_IP, "fd00::2"]),
                   service("svc6", cluster_ip=["172.30.0.46", "fd00:30::46"],
                           ipFamilyPolicy="PreferDualStack", sessionAffinity="ClientIP"),
                   endpoint_slice("svc6", [endpoint("10.180.0.6")], name="v4"),
                   endpoint_slice("svc6", [endpoint("fd00:180::6")], name="v6", family="IPv6")],
}


@pytest.mark.parametrize("objs", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_script_reads_back_into_the_rendered_objects(objs: list[Obj]) -> None:
    rs = render(objs, nodeport_addresses=("192.168.0.0/24",))
    tables = parse_script(rs.script())
    for fam in rs.families:
        table = tables[(fam.family, "kube-proxy")]
        chains = {c.name: c for c in fam.chains}
        sets = {s.name: s for s in fam.sets}
        elems: dict[str, set[Any]] = {}
        for name, e in fam.elements:
            elems.setdefault(name, set()).add(e)
        for svc in fam.services:
            objs_ = fam.objects(svc)
            chains.update((c.name, c) for c in objs_.chains)
            for name, e in objs_.all_elements():
                elems.setdefault(name, set()).add(e)
        sets.update(fam.set_defs())
        assert table.chains == chains
        assert table.sets == sets
        assert {n: set(e) for n, e in table.elements.items() if e} == elems


def test_parser_refuses_what_it_does_not_know() -> None:
    with pytest.raises(ScriptError, match="line 3"):
        parse_script("table ip kube-proxy {\n chain x {\n  ip ttl 3 drop\n }\n}\n")
    with pytest.raises(ScriptError):
        parse_rule("ip daddr . ip saddr 1.2.3.4")
    with pytest.raises(ScriptError):
        parse_script("flush ruleset\n")


def test_the_memoized_renderer_renders_only_what_changed() -> None:
    """Unchanged port views (the same objects, from the node view cache) get the same
    objects back; a changed Service, and every Service after a node-wide change, are
    rendered again; the result equals a render from scratch each time."""
    from dataclasses import replace

    from kubeproxy.nodeview import NodeViewCache
    from tests.builders import feature_cluster

    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
    memo, cache = nftables.Renderer(), NodeViewCache(config, 4)
    first = memo([cache.build(decode_objects(feature_cluster()), None)]).families[0]
    before = {svc: first.objects(svc) for svc in first.services}
    changed = decode_objects(feature_cluster(endpoints_svc2=1))
    svc2 = next(s.ref for s in changed.services if s.name == "svc2")
    views = [cache.build(changed, frozenset({svc2}))]
    again = memo(views).families[0]
    after = {svc: again.objects(svc) for svc in again.services}
    assert {s for s in after if after[s] is not before[s]} == {svc2}
    scratch = nftables.render(views).families[0]
    assert after == {svc: scratch.objects(svc) for svc in scratch.services}
    # The same port views under another node-wide setting: all rendered again.
    rr = replace(views[0], lb_algorithm=LBAlgorithm.ROUND_ROBIN)
    fresh = memo([rr]).families[0]
    scratch = nftables.render([rr]).families[0]
    assert {s: fresh.objects(s) for s in fresh.services} == {
        s: scratch.objects(s) for s in scratch.services} != after
