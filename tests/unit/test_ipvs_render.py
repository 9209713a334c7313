"""IPVS mode, pure parts: what render/ipvs.py writes, and the packet-flow table.

The flow table (tests/flows/test_flows.py CASES, with their ``only={"ipvs": ...}``
entries) runs here through the IPVS renderer and tracer, twice: over the rendered
ruleset and over its text (what ``kubeproxy render`` prints, read back), so the two
spellings cannot drift. tests/flows runs it too once the mode is registered.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.config.types import IpvsConfig, ProxyConfig
from kubeproxy.errors import TraceError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.modes.ipvs import MODE
from kubeproxy.nodeview import NodeViewCache, build_node_view, node_views
from kubeproxy.render import ipvs
from kubeproxy.render.ipvs import IpvsRuleset
from kubeproxy.trace.ipvs import parse_state, state_of, trace_text
from kubeproxy.trace.result import Packet
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.flows.test_flows import CASES, CIDR, Case, basic

LOCAL_NP: dict[str, Any] = {"type": "NodePort", "ports": [("p80", 80, "TCP", 3001)],
                            "externalTrafficPolicy": "Local"}


def render(objects: list[Obj], **config: Any) -> IpvsRuleset:
    cluster = decode_objects(objects)
    assert not cluster.errors, cluster.errors
    settings: dict[str, Any] = {"hostname": NODE, "cluster_cidrs": (parse_cidr(CIDR, "t"),)}
    return ipvs.render(node_views(cluster, ProxyConfig(**{**settings, **config})))


def flow(case: Case, *, via_text: bool) -> tuple[str, tuple[str, ...], bool]:
    ruleset = render(case.objects, **case.config)
    src, dst = ipaddress.ip_address(case.src), ipaddress.ip_address(case.dst)
    cluster = decode_objects(case.objects)
    node_obj = cluster.node(NODE)
    assert node_obj is not None
    local = frozenset(ip for ip in node_obj.addresses if ip.version == dst.version)
    packet = Packet(src=src, dst=dst, port=case.port, proto=case.proto,
                    in_interface=case.in_interface)
    got = (MODE.trace_rules(MODE.text(ruleset, NODE), packet, local) if via_text
           else MODE.trace(ruleset, packet, local))
    return got.verdict, tuple(got.endpoints), got.masquerade


@pytest.mark.parametrize("via_text", [False, True], ids=["ruleset", "text"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_flow_table(case: Case, via_text: bool) -> None:
    want = case.only.get("ipvs", (case.verdict, case.endpoints, case.masquerade))
    assert flow(case, via_text=via_text) == want


# --- what is rendered, per case ------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    name: str
    objects: list[Obj]
    # "proto ip:port" -> real servers ("ip:port"), for the virtual servers named here
    servers: dict[str, tuple[str, ...]]
    entries: dict[str, set[str]]  # set -> entries (those sets must hold exactly these)
    bound: set[str]
    config: dict[str, Any] | None = None


BOTH_EPS = ("10.180.0.1:80", "10.180.1.1:80")
REMOTE_ONLY = [node(), service("svc1", **LOCAL_NP),
               endpoint_slice("svc1", [endpoint("10.180.1.1", node="node2")])]
RENDERED = [
    Rendered("clusterip: one server, both endpoints, hairpin entry for the local one",
             basic(), {"tcp 172.30.0.41:80": ("10.180.0.1:80", "10.180.1.1:80")},
             {"KUBE-CLUSTER-IP": {"172.30.0.41,tcp:80"},
              "KUBE-LOOP-BACK": {"10.180.0.1,tcp:80,10.180.0.1"},
              "KUBE-NODE-PORT-TCP": set()}, {"172.30.0.41"}),
    Rendered("eTP=Local nodeport: local endpoints on the node-port server, all on the "
             "ClusterIP one", basic(**LOCAL_NP),
             {"tcp 172.30.0.41:80": ("10.180.0.1:80", "10.180.1.1:80"),
              f"tcp {NODE_IP}:3001": ("10.180.0.1:80",)},
             {"KUBE-NODE-PORT-TCP": {"3001"}, "KUBE-NODE-PORT-LOCAL-TCP": {"3001"}},
             {"172.30.0.41"}),
    Rendered("eTP=Local without local endpoints falls back to the cluster endpoints",
             REMOTE_ONLY, {f"tcp {NODE_IP}:3001": ("10.180.1.1:80",)},
             {"KUBE-LOOP-BACK": set()}, {"172.30.0.41"}),
    Rendered("no endpoints: servers without real servers",
             [node(), service("svc1", type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
                              lb_ips=["5.6.7.8"], externalIPs=["192.168.99.11"]),
              endpoint_slice("svc1", [])],
             {"tcp 172.30.0.41:80": (), "tcp 5.6.7.8:80": (), "tcp 192.168.99.11:80": (),
              f"tcp {NODE_IP}:3001": ()},
             {"KUBE-EXTERNAL-IP": {"192.168.99.11,tcp:80"},
              "KUBE-LOAD-BALANCER": {"5.6.7.8,tcp:80"},
              "KUBE-IPVS-IPS": {"172.30.0.41", "5.6.7.8", "192.168.99.11"}},
             {"172.30.0.41", "5.6.7.8", "192.168.99.11"}),
    Rendered("source ranges: FW and CIDR sets, node allowed by its own LB IP",
             basic(type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)], lb_ips=["5.6.7.8"],
                   loadBalancerSourceRanges=["192.168.0.0/24"]),
             {"tcp 5.6.7.8:80": ("10.180.0.1:80", "10.180.1.1:80")},
             {"KUBE-LOAD-BALANCER-FW": {"5.6.7.8,tcp:80"},
              "KUBE-LOAD-BALANCER-SOURCE-CIDR": {"5.6.7.8,tcp:80,192.168.0.0/24"},
              "KUBE-LOAD-BALANCER-SOURCE-IP": {"5.6.7.8,tcp:80,5.6.7.8"}},
             {"172.30.0.41", "5.6.7.8"}),
    Rendered("external IP that is a node address is not bound to kube-ipvs0",
             basic(externalIPs=[NODE_IP]), {f"tcp {NODE_IP}:80": BOTH_EPS},
             {"KUBE-EXTERNAL-IP": {f"{NODE_IP},tcp:80"}}, {"172.30.0.41"}),
    Rendered("sctp node port: hash:ip,port entries per node address",
             [node(), service("svc1", type="NodePort", ports=[("s", 9000, "SCTP", 3002)]),
              endpoint_slice("svc1", [endpoint("10.180.0.1")], ports=[("s", 9000, "SCTP")])],
             {f"sctp {NODE_IP}:3002": ("10.180.0.1:9000",)},
             {"KUBE-NODE-PORT-SCTP-HASH": {f"{NODE_IP},sctp:3002"}}, {"172.30.0.41"}),
    Rendered("nodePortAddresses outside the node: no node-port server",
             basic(type="NodePort", ports=[("p80", 80, "TCP", 3001)]),
             {}, {"KUBE-NODE-PORT-TCP": set()}, {"172.30.0.41"},
             {"nodeport_addresses": ("192.168.5.0/24",)}),
]


@pytest.mark.parametrize("case", RENDERED, ids=[c.name for c in RENDERED])
def test_rendered(case: Rendered) -> None:
    ruleset = render(case.objects, **(case.config or {}))
    fam = ruleset.family(4)
    assert fam is not None
    servers = {vs.frontend: tuple(r.target for r in vs.reals) for vs in fam.services}
    for front, reals in case.servers.items():
        assert servers.get(front) == reals, front
    if not case.servers:
        assert all(vs.role != "node port" for vs in fam.services)
    sets = {s.name: s.entries for s in fam.sets}
    for name, entries in case.entries.items():
        assert sets[name] == entries, name
    assert {str(ip) for ip in fam.addresses} == case.bound


def test_affinity_is_persistence_with_the_services_timeout() -> None:
    ruleset = render(basic(sessionAffinity="ClientIP"))
    fam = ruleset.family(4)
    assert fam is not None
    assert {vs.timeout for vs in fam.services} == {10800}
    assert "-A -t 172.30.0.41:80 -s rr -p 10800" in ipvs.text(ruleset)


def test_scheduler_is_chosen_and_checked() -> None:
    views = node_views(decode_objects(basic()), ProxyConfig(
        hostname=NODE, cluster_cidrs=(parse_cidr(CIDR, "t"),)))
    text = ipvs.text(ipvs.render(views, scheduler="mh"))
    assert "-A -t 172.30.0.41:80 -s mh -b mh-port" in text
    with pytest.raises(ValueError, match="scheduler 'random'"):
        ipvs.render(views, scheduler="random")


def test_ipv6_sets_have_their_own_names() -> None:
    from tests.flows.test_flows import V6
    ruleset = render(V6, cluster_cidrs=(parse_cidr(CIDR, "t"),
                                        parse_cidr("fd00:180::/64", "t")))
    fam6 = ruleset.family(6)
    assert fam6 is not None
    names = {s.name for s in fam6.sets}
    assert "KUBE-6-CLUSTER-IP" in names and "KUBE-CLUSTER-IP" not in names
    assert "--match-set KUBE-6-CLUSTER-IP dst,dst" in fam6.iptables_text()
    assert {s.name: s.entries for s in fam6.sets}["KUBE-6-CLUSTER-IP"] == {"fd00:30::46,tcp:80"}


def test_text_reads_back_as_the_same_state() -> None:
    ruleset = render(basic(sessionAffinity="ClientIP", externalIPs=["192.168.99.11"],
                           type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
                           lb_ips=["5.6.7.8"], loadBalancerSourceRanges=["203.0.113.0/25"]))
    assert parse_state(ipvs.text(ruleset)) == state_of(ruleset)


@pytest.mark.parametrize(("broken", "message"), [
    ("--match-set KUBE-CLUSTER-IP dst,dst", "set KUBE-NOPE"),
    ("add KUBE-CLUSTER-IP 172.30.0.41,tcp:80", "cannot read"),
], ids=["rule matches a missing set", "entry of a missing set"])
def test_trace_refuses_inconsistent_text(broken: str, message: str) -> None:
    text = ipvs.text(render(basic()))
    assert broken in text
    bad = (text.replace(broken, broken.replace("KUBE-CLUSTER-IP", "KUBE-NOPE"), 1))
    packet = Packet(ipaddress.ip_address("10.180.0.9"), ipaddress.ip_address("172.30.0.41"),
                    80, "tcp")
    with pytest.raises(TraceError, match=message):
        trace_text(bad, packet, frozenset({ipaddress.ip_address(NODE_IP)}))


def test_trace_explains_the_ipvs_choice() -> None:
    ruleset = render(basic())
    packet = Packet(ipaddress.ip_address("10.180.0.9"), ipaddress.ip_address("172.30.0.41"),
                    80, "tcp")
    result = MODE.trace(ruleset, packet, frozenset({ipaddress.ip_address(NODE_IP)}))
    text = result.to_text()
    assert "IPVS LOCAL_IN: virtual server tcp 172.30.0.41:80 (scheduler rr) picks one of 2" in text
    assert "(dst,dst) in set KUBE-CLUSTER-IP -> ACCEPT" in text
    assert "IPVS tcp 172.30.0.41:80" in result.path


# --- the memoized renderer (Mode.renderer) ----------------------------------------------------

def _svc(name: str, vip: str, *eps: str, np: int = 0, **spec: Any) -> list[Obj]:
    return [service(name, cluster_ip=vip, type="NodePort" if np else "ClusterIP",
                    ports=[("p80", 80, "TCP", np)], **spec),
            endpoint_slice(name, [endpoint(ip) for ip in eps])]


_X, _Y, _Z = (NamespacedName("ns1", n) for n in "xyz")
_SHARED: dict[str, Any] = {"externalIPs": ["192.168.99.1"]}  # x and y claim 192.168.99.1:80 both
# (changed services, the cluster): partial steps as the daemon would sync them.
MEMO_STEPS: list[tuple[frozenset[NamespacedName] | None, list[Obj]]] = [
    (None, [node(), *_svc("x", "172.30.0.1", "10.180.0.1", **_SHARED),
            *_svc("y", "172.30.0.2", "10.180.0.2", np=3001, **_SHARED)]),
    (frozenset({_Z}), [node(), *_svc("x", "172.30.0.1", "10.180.0.1", **_SHARED),
                       *_svc("y", "172.30.0.2", "10.180.0.2", np=3001, **_SHARED),
                       *_svc("z", "172.30.0.3", "10.180.0.1", "10.180.0.3", np=3002)]),
    (frozenset({_X}), [node(), *_svc("y", "172.30.0.2", "10.180.0.2", np=3001, **_SHARED),
                       *_svc("z", "172.30.0.3", "10.180.0.1", "10.180.0.3", np=3002)]),
    (frozenset({_Z}), [node(), *_svc("y", "172.30.0.2", "10.180.0.2", np=3001, **_SHARED),
                       *_svc("z", "172.30.0.3", "10.180.0.3", np=3002,
                             externalTrafficPolicy="Local")]),
    (frozenset({_X, _Y}), [node(), *_svc("x", "172.30.0.1", "10.180.0.4", **_SHARED),
                           *_svc("z", "172.30.0.3", "10.180.0.3", np=3002,
                                 externalTrafficPolicy="Local")]),
    (None, [node(ips=["192.168.0.2", "192.168.0.3"]),  # node-wide: all re-rendered
            *_svc("x", "172.30.0.1", "10.180.0.4", **_SHARED),
            *_svc("z", "172.30.0.3", "10.180.0.3", np=3002)]),
]


@pytest.mark.parametrize("scheduler", ["rr", "mh"])
def test_the_memoized_renderer_equals_a_fresh_render(scheduler: str) -> None:
    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr(CIDR, "t"),))
    memo, cache = ipvs.Renderer(scheduler), NodeViewCache(config, 4)
    for changed, objects in MEMO_STEPS:
        cluster = decode_objects(objects)
        assert not cluster.errors, cluster.errors
        got = memo([cache.build(cluster, changed)])
        want = ipvs.render([build_node_view(cluster, config, 4)], scheduler)
        assert got == want, changed
        assert ipvs.text(got) == ipvs.text(want)
    fam = got.families[0]
    assert set(fam.owners) == {_X, _Z}
    assert {str(k[0]) for k in fam.owners[_X]} == {"172.30.0.1", "192.168.99.1"}


def test_a_frontend_two_services_claim_goes_to_the_first_by_name() -> None:
    objs = [node(), *_svc("x", "172.30.0.1", "10.180.0.1", **_SHARED),
            *_svc("y", "172.30.0.2", "10.180.0.2", **_SHARED)]
    fam = render(objs).families[0]
    shared = fam.servers[(ipaddress.ip_address("192.168.99.1"), "tcp", 80)]
    assert shared.owner == _X and [r.target for r in shared.reals] == ["10.180.0.1:80"]
    assert [vs.frontend for vs in fam.services].count("tcp 192.168.99.1:80") == 1


def test_the_configured_mode_renders_and_syncs_with_the_ipvs_settings() -> None:
    """`modes.for_config` (what the daemon and the CLI call) applies ProxyConfig.ipvs."""
    objs = [node(), service("svc1", cluster_ip="172.30.0.41"),
            endpoint_slice("svc1", [endpoint("10.180.0.1")])]
    config = ProxyConfig(hostname=NODE, mode="ipvs", ipvs=IpvsConfig(scheduler="wrr"))
    mode = modes.for_config(config)
    views = node_views(decode_objects(objs), config)
    assert "-s wrr" in mode.text(mode.render(views), NODE)
    assert "-s wrr" in mode.text(mode.renderer()(views), NODE)
    plane = mode.fake()
    plane.sync(mode.render(views))
    assert "-s wrr" in plane.rules()
    default = modes.for_config(ProxyConfig(hostname=NODE, mode="ipvs"))
    assert "-s rr" in default.text(default.render(views), NODE)
