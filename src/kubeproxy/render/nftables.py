"""NodeView -> nftables: upstream kube-proxy's layout, with endpoints as data. Pure.

Theory of operation
-------------------
One table per family (``ip kube-proxy``, ``ip6 kube-proxy``) laid out as upstream's
nftables proxier (pkg/proxy/nftables/proxier.go) lays it out:

* base chains ``filter-prerouting/-input/-forward/-output`` (priority dstnat-10),
  ``filter-output-post-dnat`` (dstnat+10), ``nat-prerouting/-output`` (dstnat),
  ``nat-postrouting`` (srcnat), jumping to the fixed chains (``BASE_CHAINS``, ``JUMPS``);
* dispatch by verdict maps: ``services`` looks ``ip daddr . meta l4proto . th dport`` up
  in ``service-ips`` (ClusterIPs, external IPs, LB IPs) and NodePorts in
  ``service-nodeports``; ``no-endpoint-services`` / ``no-endpoint-nodeports`` drop or
  reject what has no (local) endpoints; ``firewall-ips`` sends LB traffic with
  loadBalancerSourceRanges to a ``firewall-*`` chain; ``cluster-ips`` rejects unknown
  ports of a ClusterIP;
* per service port: ``service-HASH-ns/svc/proto/port`` (cluster endpoints),
  ``local-...`` (node-local endpoints), ``external-...`` (external destinations:
  masquerade, or for externalTrafficPolicy=Local the short-circuit of pod and node
  traffic), ``firewall-...`` (source ranges); ``mark-for-masquerade`` and
  ``masquerading`` do the SNAT.

Where it departs from upstream, and why (measured; details in docs/nftables.md)
------------------------------------------------------------------------------
Upstream gives every endpoint a chain (``endpoint-...``: hairpin mark + DNAT) and picks
one with ``numgen random mod N vmap { 0 : goto endpoint-..., ... }``. At 10,000 Services
x 10 endpoints that is 110,000 chains and 10,000 anonymous sets in one transaction, and
the kernel (6.18 here) binds each anonymous set by scanning the whole transaction
(__nft_set_trans_bind): quadratic; ``nft -f`` took 253 s, nft peaking at 1.3 GB. Then
every change of a rule or verdict element makes the kernel re-validate the whole chain
graph from each nat hook (nft_table_validate), so the table's rule count sets the floor
of a one-Service change. Measured alternatives at 10,000 x 10 (ClusterIP only): per-
endpoint rules (``numgen random mod K 0``) instead of the vmap, 14.7 s with endpoint
chains and 5.5 s without, but 130,000 rules to re-validate (87 ms per change); per-
Service anonymous DNAT maps 53 s; per-Service named maps 17 s (the kernel finds sets by
name in a list); one shared map 21 s (every element is checked against every rule bound
to its map); 256 shared maps 3.5 s and ~25 ms per change. So:

* **Endpoints are data, not chains.** A service port's chain DNATs in one rule through
  one of 256 shared maps (chosen by a hash of the port's name):
  ``dnat ip to K1 . K2 . numgen random mod N map @endpoints-XX``, where ``K1 . K2`` are
  ``numgen ... mod 1 offset C`` terms, i.e. constants naming the port: its ClusterIP and
  ``port << 8 | protocol``, unique per service port by construction (for IPv6, whose
  128-bit ClusterIP does not fit the 4-part keys nft 1.0.6 can still list, ``port << 8
  | protocol`` and 64 bits of SHA-256 of the ClusterIP; the rare colliding port falls
  back to the rule-per-endpoint form below). Elements are ``K1 . K2 . slot : address .
  port``, commented with the port's name. Cluster endpoints take slots 0..N-1, local
  ones follow (the local chain's numgen has an offset). Selection is still one uniform
  ``numgen random mod N`` (``inc`` for round-robin) per connection, as upstream.
* **Hairpin is one global rule**: ``ct status dnat ip saddr . ip daddr
  @hairpin-endpoints jump mark-for-masquerade`` in nat-postrouting, the set holding
  ``E . E`` for every endpoint address E. Upstream marks in the chosen endpoint's chain
  when the source is that endpoint; after DNAT the destination *is* the chosen endpoint,
  so "DNATed, and source == destination == an endpoint" is the same condition (it also
  holds for another component's DNAT to an endpoint from that same endpoint, which
  upstream would not masquerade).
* **Session affinity** keeps upstream's per-endpoint ``affinity-...`` sets, but the
  endpoint choice is written as rules in the service chain (the affinity hits, then
  ``numgen random mod K 0`` tests, probability 1/K for K = N..2 as iptables does), since
  the chosen endpoint's set must be updated in the same rule that DNATs. The sets have
  no preset size (nft adds ``size 65535`` when it sees the rule that updates them, and
  the kernel then preallocates 1 MiB per set).
* The firewall chain spells ``ip saddr != { a, b } drop`` as ``ip saddr != a ip saddr
  != b drop`` (same meaning, no anonymous set).
* Not implemented: the ``Drop traffic to unallocated ClusterIPs`` rule (there is no
  --service-cidr flag). Localhost NodePorts are not offered, as upstream nftables: the
  renderer reads the node view's ``NodePorts.without_localhost()``.

The ruleset is lazy: :func:`render` indexes the views, and each Service's objects are
built when first asked for, so a partial sync of one Service at 10,000 costs one
Service's worth of work.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from kubeproxy.config.types import LBAlgorithm
from kubeproxy.model import IPAddress, NamespacedName, ServicePortName
from kubeproxy.nodeview import (
    ClusterIPMasquerade,
    EndpointView,
    NodePorts,
    NodeView,
    Route,
    ServicePortView,
)
from kubeproxy.render.nft_ir import (
    PROTOCOL_NUMBERS,
    Chain,
    Cmp,
    Dnat,
    DnatMap,
    Element,
    Field,
    Hook,
    Item,
    Key,
    MarkSet,
    Masquerade,
    Numgen,
    Reject,
    Rule,
    SetDef,
    SetMatch,
    Update,
    Verdict,
    VMap,
    field_types,
)
from kubeproxy.render.nft_names import (
    chain_base,
    endpoint_base,
    endpoint_group,
    endpoint_map,
    port_base,
)

TABLE = "kube-proxy"
FamilyName = Literal["ip", "ip6"]

# (name, type, hook, priority): upstream's nftablesBaseChains.
BASE_CHAINS: tuple[tuple[str, Literal["filter", "nat"], str, int], ...] = (
    # Filtering sees the pre-DNAT destination, so it runs before DNAT.
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    # ... except the ClusterIP check of locally sent packets, which must see DNAT's result.
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# (from base chain, "ct state new" first?, to chain): upstream's nftablesJumpChains, in
# the order the rules stand in each base chain.
JUMPS: tuple[tuple[str, bool, str], ...] = (
    ("filter-input", True, "nodeport-endpoints-check"),  # NodePorts without endpoints
    ("filter-input", True, "service-endpoints-check"),  # service IPs without endpoints
    ("filter-forward", True, "service-endpoints-check"),
    ("filter-forward", True, "cluster-ips-check"),  # unknown ports of ClusterIPs
    ("filter-output", True, "service-endpoints-check"),
    ("filter-output", True, "firewall-check"),  # loadBalancerSourceRanges
    ("filter-prerouting", True, "firewall-check"),
    ("filter-output-post-dnat", True, "cluster-ips-check"),
    ("nat-prerouting", False, "services"),  # dispatch
    ("nat-output", False, "services"),
    ("nat-postrouting", False, "masquerading"),  # SNAT of marked packets
)
FIXED_CHAINS = ("services", "service-endpoints-check", "nodeport-endpoints-check",
                "firewall-check", "cluster-ips-check", "mark-for-masquerade", "masquerading",
                "reject-chain")
# Maps and sets every table has: (name, key type, data type, comment).
GLOBAL_SETS: tuple[tuple[str, str, str | None, str], ...] = (
    ("cluster-ips", "{addr}", None, "Active ClusterIPs"),
    ("hairpin-endpoints", "{addr} . {addr}", None,
     "endpoint -> itself through a service: masquerade"),
    ("service-ips", "{addr} . inet_proto . inet_service", "verdict",
     "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    ("service-nodeports", "inet_proto . inet_service", "verdict", "NodePort traffic"),
    ("no-endpoint-services", "{addr} . inet_proto . inet_service", "verdict",
     "vmap to drop or reject packets to services with no endpoints"),
    ("no-endpoint-nodeports", "inet_proto . inet_service", "verdict",
     "vmap to drop or reject packets to service nodeports with no endpoints"),
    ("firewall-ips", "{addr} . inet_proto . inet_service", "verdict",
     "destinations that are subject to LoadBalancerSourceRanges"),
)
NODEPORT_IPS = ("nodeport-ips", "{addr}", None, "IPs that accept NodePort traffic")
REJECT_CHAIN_COMMENT = "helper for @no-endpoint-services / @no-endpoint-nodeports"
TABLE_COMMENT = "rules for kube-proxy"
ENDPOINTS_COMMENT = "service port . slot -> endpoint"
KEY_WORDS: dict[str, int] = {"ip": 2, "ip6": 3}  # constant words before the slot


@dataclass(frozen=True)
class ServiceObjects:
    """Everything one Service owns in one family's table.

    Endpoint-map and hairpin elements are kept as references to the node view's own
    endpoint tuples (``slots``, ``hairpin``) and spelled out on demand: at 10,000
    Services they are 200,000 elements the proxy need not hold twice.
    """

    chains: tuple[Chain, ...] = ()
    sets: tuple[SetDef, ...] = ()  # affinity sets
    elements: tuple[tuple[str, Element], ...] = ()  # (set or map name, element)
    slots: tuple[EndpointSlots, ...] = ()
    hairpin: tuple[tuple[EndpointView, ...], ...] = ()  # endpoints, for hairpin-endpoints

    def all_elements(self) -> Iterator[tuple[str, Element]]:
        """Every element, each once: the explicit ones, then the endpoint slots, then the
        hairpin pairs."""
        yield from self.elements
        for group in self.slots:
            for elem in group.elements():
                yield group.map, elem
        for ip in self.hairpin_ips():
            yield "hairpin-endpoints", Element((ip, ip))

    def hairpin_ips(self) -> dict[IPAddress, None]:
        """The endpoint addresses, each once, in order."""
        return {ep.ip: None for eps in self.hairpin for ep in eps}


class EndpointSlots(NamedTuple):
    """A policy chain's endpoints in its endpoint map: slots ``first`` .. ``first+N-1``."""

    map: str
    key: tuple[int, ...]  # the constant words naming the service port
    first: int
    endpoints: tuple[EndpointView, ...]
    comment: str

    def elements(self) -> Iterator[Element]:
        for slot, ep in enumerate(self.endpoints, self.first):
            yield Element((*self.key, slot), (ep.ip, ep.port), self.comment)


NO_CASCADE: frozenset[ServicePortName] = frozenset()  # shared: one per Service is 2 MiB
# Per Service: the port views its objects were rendered for, which of them had
# colliding endpoint-map keys, and the objects (FamilyRuleset.objects, Renderer).
Memo = dict[NamespacedName, tuple[tuple[ServicePortView, ...], frozenset[ServicePortName],
                                  "ServiceObjects"]]


@dataclass
class FamilyRuleset:
    """One family's table: the fixed part built eagerly, each Service on demand."""

    family: FamilyName
    view: NodeView
    chains: tuple[Chain, ...]  # base and fixed chains
    sets: tuple[SetDef, ...]  # global sets and maps (not the endpoint maps)
    elements: tuple[tuple[str, Element], ...]  # elements of the fixed part
    _cache: dict[NamespacedName, ServiceObjects] = field(default_factory=dict, repr=False)
    # A Renderer's memory of earlier renders (Renderer): what each Service's objects were
    # for which port view objects; shared, and updated as objects are rendered.
    _memo: Memo | None = field(default=None, repr=False)
    _cascade: frozenset[ServicePortName] | None = field(default=None, repr=False)
    _common: _Common | None = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return "ipv4_addr" if self.family == "ip" else "ipv6_addr"

    @property
    def services(self) -> list[NamespacedName]:
        """The Services with ports in this family, in name order."""
        return list(dict.fromkeys(spv.name.service for spv in self.view.services))

    def ports(self, service: NamespacedName) -> tuple[ServicePortView, ...]:
        """One Service's port views (found by bisection: the views are sorted by name)."""
        views = self.view.services
        lo = bisect.bisect_left(views, service, key=lambda v: v.name.service)
        hi = lo
        while hi < len(views) and views[hi].name.service == service:
            hi += 1
        return views[lo:hi]

    @property
    def common(self) -> _Common:
        if self._common is None:
            self._common = _Common(self.family, self.view)
        return self._common

    @property
    def cascade(self) -> frozenset[ServicePortName]:
        """Service ports whose endpoint-map key collides with another's (IPv6 only)."""
        if self._cascade is None:
            self._cascade = _collisions(self.view)
        return self._cascade

    def objects(self, service: NamespacedName) -> ServiceObjects:
        """This Service's chains, affinity sets and elements (empty if it has none)."""
        cached = self._cache.get(service)
        if cached is None:
            ports = self.ports(service)
            cascade = (frozenset(p.name for p in ports if p.name in self.cascade)
                       if self.cascade else NO_CASCADE)
            seen = None if self._memo is None else self._memo.get(service)
            if seen is not None and seen[1] == cascade and len(seen[0]) == len(ports) \
                    and all(a is b for a, b in zip(seen[0], ports, strict=True)):
                cached = seen[2]
            else:
                cached = _ServiceRenderer(self).render(ports)
                if self._memo is not None:
                    self._memo[service] = (ports, cascade, cached)
            if self._memo is None:  # the memo is the cache (one 10,000-entry dict, not two)
                self._cache[service] = cached
        return cached

    def endpoint_map(self, group: int) -> SetDef:
        return endpoint_map_def(self.family, group)

    def set_defs(self) -> dict[str, SetDef]:
        """Every set and map of the table as rendered, the endpoint maps in use included."""
        out = {s.name: s for s in self.sets}
        for svc in self.services:
            objs = self.objects(svc)
            for s in objs.sets:
                out[s.name] = s
            for group in objs.slots:
                if group.map not in out:
                    out[group.map] = self.endpoint_map(int(group.map[len("endpoints-"):], 16))
        return out


@dataclass
class NftRuleset:
    """Both families' tables; ``script()`` is the complete ``nft -f`` input."""

    families: tuple[FamilyRuleset, ...]

    def services(self) -> set[NamespacedName]:
        return {svc for fam in self.families for svc in fam.services}

    def script(self) -> str:
        out: list[str] = []
        for fam in self.families:
            out.extend(table_text(fam))
        return "\n".join(out) + "\n"


def render(views: Sequence[NodeView]) -> NftRuleset:
    return NftRuleset(tuple(_family(view) for view in views))


class Renderer:
    """:func:`render` with memory, for a proxy that renders the same node again and again.

    A Service's objects depend only on its port views, on whether their endpoint-map
    keys collide (IPv6), and on the node-wide part of the view; the node view cache
    hands back the same port view objects for an unchanged Service, so what was rendered
    for them is used again (a full sync at 10,000 Services otherwise renders every one:
    ~1 s). Everything is forgotten when the node-wide part changes. The result equals
    ``render(views)`` (tests/unit/test_incremental.py)."""

    def __init__(self) -> None:
        self._memos: dict[int, tuple[NodeView, Memo]] = {}

    def __call__(self, views: Sequence[NodeView]) -> NftRuleset:
        families = []
        for view in views:
            context = replace(view, services=())
            kept = self._memos.get(view.family)
            if kept is None or kept[0] != context:
                kept = self._memos[view.family] = (context, {})
            memo = kept[1]
            if len(memo) > 2 * len(view.services) + 1000:  # Services gone: forget them
                alive = {spv.name.service for spv in view.services}
                for svc in [s for s in memo if s not in alive]:
                    del memo[svc]
            families.append(_family(view, memo))
        return NftRuleset(tuple(families))


def endpoint_map_def(family: FamilyName, group: int) -> SetDef:
    key = " . ".join(["numgen random mod 1"] * (KEY_WORDS[family] + 1))
    return SetDef(endpoint_map(group), key, f"{family} daddr . th dport", typeof=True,
                  comment=ENDPOINTS_COMMENT)


def service_key(spv: ServicePortView) -> tuple[int, ...]:
    """The constant words naming a service port in its endpoint map.

    IPv4: the ClusterIP and ``port << 8 | protocol`` (exact). IPv6: ``port << 8 |
    protocol`` and 64 bits of SHA-256 of the ClusterIP (see the module docstring).
    """
    portproto = spv.port << 8 | PROTOCOL_NUMBERS[spv.protocol]
    packed = spv.cluster_ip.packed
    if len(packed) == 4:
        return (int.from_bytes(packed, "big"), portproto)
    digest = hashlib.sha256(packed).digest()
    return (portproto, int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big"))


def table_text(fam: FamilyRuleset) -> list[str]:
    """The table in ``nft list`` form: sets and maps, then chains, each sorted by name."""
    defs = fam.set_defs()
    # Element keys are unique per set; if two Services claim one (invalid input, which
    # the API server would refuse) the first in name order wins, as the data plane does.
    elements: dict[str, dict[tuple[object, ...], Element]] = {}
    for set_name, elem in fam.elements:
        elements.setdefault(set_name, {}).setdefault(elem.key, elem)
    chains = {c.name: c for c in fam.chains}
    for svc in fam.services:
        objs = fam.objects(svc)
        for set_name, elem in objs.all_elements():
            elements.setdefault(set_name, {}).setdefault(elem.key, elem)
        chains.update((c.name, c) for c in objs.chains)
    out = [f"table {fam.family} {TABLE} {{", f'\tcomment "{TABLE_COMMENT}"']
    for name in sorted(defs):
        sdef = defs[name]
        key_types = field_types(sdef.key)
        data_types = field_types(sdef.data) if sdef.data and sdef.data != "verdict" else ()
        texts = sorted(e.text(key_types, data_types) for e in elements.get(name, {}).values())
        out.append("")
        out.extend(sdef.text(texts))
    for name in sorted(chains):
        out.append("")
        out.extend(chain_text(chains[name]))
    out.append("}")
    return out


def chain_text(chain: Chain) -> list[str]:
    out = [f"\tchain {chain.name} {{"]
    if chain.hook:
        h = chain.hook
        out.append(f"\t\ttype {h.type} hook {h.hook} priority {h.priority}; policy accept;")
    if chain.comment:
        out.append(f'\t\tcomment "{chain.comment}"')
    out.extend(f"\t\t{rule.text()}" for rule in chain.rules)
    out.append("\t}")
    return out


# -- the fixed part ----------------------------------------------------------------------


def _family(view: NodeView, memo: Memo | None = None) -> FamilyRuleset:
    family: FamilyName = "ip" if view.family == 4 else "ip6"
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    sets = [SetDef(n, k.format(addr=addr), d, comment=c) for n, k, d, c in GLOBAL_SETS]
    elements: list[tuple[str, Element]] = []
    nodeports = _nodeports(view)
    if not nodeports.match_all:
        name, key, _, comment = NODEPORT_IPS
        sets.append(SetDef(name, key.format(addr=addr), comment=comment))
        elements += [(name, Element((ip,))) for ip in nodeports.destinations]
    return FamilyRuleset(family, view, _fixed_chains(view, family), tuple(sets),
                         tuple(elements), _memo=memo)


def _collisions(view: NodeView) -> frozenset[ServicePortName]:
    """Ports whose hashed IPv6 key another port already has (all but the first)."""
    if view.family == 4:
        return frozenset()  # IPv4 keys are exact
    seen: set[tuple[int, ...]] = set()
    out: set[ServicePortName] = set()
    for spv in view.services:
        key = service_key(spv)
        if key in seen:
            out.add(spv.name)
        seen.add(key)
    return frozenset(out)


def _nodeports(view: NodeView) -> NodePorts:
    """Where NodePorts answer here: upstream nftables offers no localhost NodePorts."""
    return view.nodeports.without_localhost()


def _net(net: ipaddress.IPv4Network | ipaddress.IPv6Network
         ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | IPAddress:
    """A network as nft spells it: a single address without its prefix length."""
    return net if net.prefixlen < net.max_prefixlen else net.network_address


def _fixed_chains(view: NodeView, family: FamilyName) -> tuple[Chain, ...]:
    mark = view.masquerade_mark
    daddr, saddr = Field(f"{family} daddr"), Field(f"{family} saddr")
    frontend = (daddr, Field("meta l4proto"), Field("th dport"))
    l4 = (Field("meta l4proto"), Field("th dport"))
    nodeports = _nodeports(view)
    if nodeports.match_all:
        guard = nodeports.guard
        np_check: tuple[Item, ...] = () if guard is None else (Cmp(daddr, _net(guard),
                                                                    negate=True),)
        to_node: tuple[Item, ...] = (Cmp(Field("fib daddr type"), "local"), *np_check)
    else:
        to_node = np_check = (SetMatch((daddr,), "nodeport-ips"),)
    rules: dict[str, list[Rule]] = {name: [] for name, *_ in BASE_CHAINS}
    rules.update({name: [] for name in FIXED_CHAINS})
    for src, new_only, dst in JUMPS:
        first: tuple[Item, ...] = (Cmp(Field("ct state"), "new"),) if new_only else ()
        rules[src].append(Rule((*first, Verdict("jump", dst))))
    # Hairpin: a packet DNATed back to its own source must leave with the node's address.
    rules["nat-postrouting"].insert(0, Rule((
        Cmp(Field("ct status"), "dnat"), SetMatch((saddr, daddr), "hairpin-endpoints"),
        Verdict("jump", "mark-for-masquerade"))))
    rules["services"] += [Rule((VMap(frontend, "service-ips"),)),
                          Rule((*to_node, VMap(l4, "service-nodeports")))]
    rules["service-endpoints-check"].append(Rule((VMap(frontend, "no-endpoint-services"),)))
    rules["nodeport-endpoints-check"].append(
        Rule((*np_check, VMap(l4, "no-endpoint-nodeports"))))
    rules["firewall-check"].append(Rule((VMap(frontend, "firewall-ips"),)))
    rules["cluster-ips-check"].append(Rule(
        (SetMatch((daddr,), "cluster-ips"), Reject()),
        comment="Reject traffic to invalid ports of ClusterIPs"))
    rules["mark-for-masquerade"].append(Rule((MarkSet("|", mark),)))
    rules["masquerading"] += [
        Rule((Cmp(Field("meta mark"), 0, mask=mark), Verdict("return"))),
        Rule((MarkSet("^", mark),)),  # clear it: a re-traversing packet is not SNATed twice
        Rule((Masquerade(),)),
    ]
    rules["reject-chain"].append(Rule((Reject(),)))
    hooks = {name: Hook(t, h, p) for name, t, h, p in BASE_CHAINS}  # type: ignore[arg-type]
    return tuple(Chain(name, tuple(r), hooks.get(name),
                       REJECT_CHAIN_COMMENT if name == "reject-chain" else None)
                 for name, r in rules.items())


# -- one Service ----------------------------------------------------------------------


class _Common:
    """Matches and statements every Service of a table shares (built once, not per
    Service: a table at 10,000 Services holds them 10,000 times)."""

    def __init__(self, family: FamilyName, view: NodeView) -> None:
        self.saddr = Field(f"{family} saddr")
        self.daddr = Field(f"{family} daddr")
        self.masq = Verdict("jump", "mark-for-masquerade")
        self.dport = {p: Field(f"{p} dport") for p in PROTOCOL_NUMBERS}
        self.l4proto = {p: Cmp(Field("meta l4proto"), p) for p in PROTOCOL_NUMBERS}
        self.mode: Literal["random", "inc"] = (
            "inc" if view.lb_algorithm is LBAlgorithm.ROUND_ROBIN else "random")
        det = view.local_detector
        # "From a local pod" and its negation (None: no detector, upstream writes no rule).
        self.local: Cmp | None = None
        if det.cidrs:
            self.local = Cmp(self.saddr, det.cidrs[0])
        elif det.interface:
            self.local = Cmp(Field("iifname"), det.interface + ("*" if det.prefix else ""))
        self.not_local = (Cmp(self.local.expr, self.local.value, negate=True)
                          if self.local else None)
        # How the ClusterIP masquerade rule matches its source (None: no rule).
        self.cluster_ip_masq: tuple[Item, ...] | None = None
        if view.cluster_ip_masquerade is ClusterIPMasquerade.ALL:
            self.cluster_ip_masq = ()
        elif view.cluster_ip_masquerade is ClusterIPMasquerade.NOT_LOCAL and self.not_local:
            self.cluster_ip_masq = (self.not_local,)


class _ServiceRenderer:
    """Translates one Service's port views; every decision is the view's."""

    def __init__(self, fam: FamilyRuleset) -> None:
        self.fam = fam
        self.view = fam.view
        self.c = fam.common
        self.saddr, self.daddr, self.local = self.c.saddr, self.c.daddr, self.c.local
        self.chains: list[Chain] = []
        self.sets: dict[str, SetDef] = {}
        self.elements: list[tuple[str, Element]] = []
        self.slots: list[EndpointSlots] = []
        self.hairpin: list[tuple[EndpointView, ...]] = []

    def render(self, spvs: Iterable[ServicePortView]) -> ServiceObjects:
        for spv in spvs:
            self.port(spv)
        # A ClusterIP serves every port of its Service: one copy of its element.
        elements = dict.fromkeys(self.elements)
        return ServiceObjects(tuple(self.chains), tuple(self.sets.values()), tuple(elements),
                              tuple(self.slots), tuple(self.hairpin))

    def port(self, spv: ServicePortView) -> None:
        base = chain_base(spv.name)
        svc_chain, local_chain = f"service-{base}", f"local-{base}"
        ext_chain, fw_chain = f"external-{base}", f"firewall-{base}"
        policy = {Route.CLUSTER: svc_chain, Route.LOCAL: local_chain}
        proto = spv.protocol
        comment = str(spv.name)

        def frontend(ip: IPAddress) -> tuple[IPAddress, str, int]:
            return (ip, proto, spv.port)

        def blocked(route: Route) -> Verdict:
            return Verdict("drop") if route is Route.DROP else Verdict("goto", "reject-chain")

        add = self.elements.append
        add(("cluster-ips", Element((spv.cluster_ip,))))
        if spv.internal in policy:
            add(("service-ips", Element(frontend(spv.cluster_ip),
                                        Verdict("goto", policy[spv.internal]))))
        else:
            add(("no-endpoint-services", Element(frontend(spv.cluster_ip),
                                                 blocked(spv.internal), comment)))
        ext_blocked = spv.external in (Route.DROP, Route.REJECT)
        for ip in (*spv.external_ips, *spv.load_balancer_ips):
            if spv.has_endpoints:
                add(("service-ips", Element(frontend(ip), Verdict("goto", ext_chain))))
            if ext_blocked:
                add(("no-endpoint-services", Element(frontend(ip), blocked(spv.external),
                                                     comment)))
        if spv.firewall:
            for ip in spv.load_balancer_ips:
                add(("firewall-ips", Element(frontend(ip), Verdict("goto", fw_chain))))
        if spv.node_port:
            if spv.has_endpoints:
                add(("service-nodeports", Element((proto, spv.node_port),
                                                  Verdict("goto", ext_chain))))
            if ext_blocked:
                add(("no-endpoint-nodeports", Element((proto, spv.node_port),
                                                      blocked(spv.external), comment)))
        self.policy_chains(spv, svc_chain, local_chain)
        if spv.uses_external_chain:
            self.chains.append(Chain(ext_chain, tuple(self.external_rules(
                spv, svc_chain, local_chain))))
        if spv.firewall:
            self.chains.append(Chain(fw_chain, (self.firewall_rule(spv),)))

    def policy_chains(self, spv: ServicePortView, svc_chain: str, local_chain: str) -> None:
        masq: list[Rule] = []
        if spv.internal in (Route.CLUSTER, Route.LOCAL):
            # Masquerade ClusterIP traffic that does not come from a local pod (it may be
            # routed here from anywhere; the reply must come back through this node).
            head: tuple[Item, ...] = (Cmp(self.daddr, spv.cluster_ip),
                                      Cmp(self.c.dport[spv.protocol], spv.port))
            if self.c.cluster_ip_masq is not None:
                masq.append(Rule((*head, *self.c.cluster_ip_masq, self.c.masq)))
        internal = svc_chain if spv.internal is Route.CLUSTER else local_chain
        slots = 0
        for name, eps in ((svc_chain, spv.cluster_endpoints),
                          (local_chain, spv.local_endpoints)):
            if not eps:
                continue
            rules = list(masq) if name == internal else []
            rules += self.balance(spv, eps, slots)
            slots += len(eps)
            self.chains.append(Chain(name, tuple(rules)))

    def balance(self, spv: ServicePortView, eps: tuple[EndpointView, ...],
                first_slot: int) -> Iterator[Rule]:
        """Endpoint choice: one DNAT through the endpoint map, or affinity rules."""
        proto = self.c.l4proto[spv.protocol]
        mode = self.c.mode
        if spv.affinity_timeout is not None or spv.name in self.fam.cascade:
            yield from self.affinity(spv, eps, proto, mode)
            return
        group = endpoint_group(spv.name)
        consts = service_key(spv)
        key: Key = (*(Numgen("random", 1, c) for c in consts),
                    Numgen(mode, len(eps), first_slot))
        name = endpoint_map(group)
        yield Rule((proto, DnatMap(self.fam.family, key, name)))
        self.slots.append(EndpointSlots(name, consts, first_slot, eps, port_base(spv.name)))
        self.hairpin.append(eps)

    def affinity(self, spv: ServicePortView, eps: tuple[EndpointView, ...], proto: Cmp,
                 mode: Literal["random", "inc"]) -> Iterator[Rule]:
        """A rule per endpoint: upstream's affinity sets (a timed set per endpoint, checked
        first, updated on use), then endpoint i with probability 1/(N-i)."""
        timeout = spv.affinity_timeout
        sets: list[str | None] = []
        self.hairpin.append(eps)
        for ep in eps:
            name = f"affinity-{endpoint_base(spv.name, ep)}" if timeout is not None else None
            if name is not None:
                self.sets[name] = SetDef(name, self.fam.addr, timeout=timeout)
            sets.append(name)
        for name, ep in zip(sets, eps, strict=True):
            if name is not None:
                yield Rule((SetMatch((self.saddr,), name), Update(name, self.saddr), proto,
                            Dnat(ep.ip, ep.port)))
        n = len(eps)
        for i, (name, ep) in enumerate(zip(sets, eps, strict=True)):
            pick: tuple[Item, ...] = (Cmp(Numgen(mode, n - i), 0),) if i < n - 1 else ()
            update: tuple[Item, ...] = (Update(name, self.saddr),) if name else ()
            yield Rule((proto, *pick, *update, Dnat(ep.ip, ep.port)))

    def external_rules(self, spv: ServicePortView, svc_chain: str,
                       local_chain: str) -> Iterator[Rule]:
        masq = self.c.masq
        if not spv.external_policy_local:
            # Endpoints may be on other nodes: masquerade so replies come back here.
            yield Rule((masq,))
        elif spv.uses_cluster_chain:
            if self.local is not None:
                # Pods going to an external destination are not subject to the traffic
                # policy (as if they went out to the load balancer and came back).
                yield Rule((self.local, Verdict("goto", svc_chain)),
                           comment="short-circuit pod traffic")
            # The node itself: its source address is local, so it must be masqueraded.
            local_src = Cmp(Field("fib saddr type"), "local")
            yield Rule((local_src, masq), comment="masquerade local traffic")
            yield Rule((local_src, Verdict("goto", svc_chain)),
                       comment="short-circuit local traffic")
        if spv.external is Route.CLUSTER:
            yield Rule((Verdict("goto", svc_chain),))
        elif spv.external is Route.LOCAL:
            yield Rule((Verdict("goto", local_chain),))

    def firewall_rule(self, spv: ServicePortView) -> Rule:
        sources: list[Cmp] = [Cmp(self.saddr, r if r.prefixlen < r.max_prefixlen
                                  else r.network_address, negate=True)
                              for r in spv.source_ranges]
        if spv.firewall_allows_node:
            # The node reaching its own LB IP loops back with the LB IP as source.
            sources += [Cmp(self.saddr, ip, negate=True) for ip in spv.load_balancer_ips]
        return Rule((*sources, Verdict("drop")))
