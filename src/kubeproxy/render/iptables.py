"""NodeView -> iptables rules, in upstream kube-proxy's chain layout. Pure.

Theory of operation
-------------------
The layout is upstream's (pkg/proxy/iptables/proxier.go), so `iptables -t nat -L`
reads like the upstream documentation:

* nat ``PREROUTING``/``OUTPUT`` -> ``KUBE-SERVICES``: one rule per frontend (cluster IP,
  external IP, load-balancer IP) jumping to the port's chains; its last rule sends
  traffic for local addresses to ``KUBE-NODEPORTS``.
* ``KUBE-SVC-*`` (cluster endpoints) and ``KUBE-SVL-*`` (node-local endpoints) pick an
  endpoint: session affinity first (``-m recent``), then ``-m statistic`` (random, or
  nth for round-robin); ``KUBE-SEP-*`` marks hairpin traffic and DNATs.
* ``KUBE-EXT-*`` handles external destinations (masquerade, or for a Local policy the
  short-circuit of pod and node traffic), ``KUBE-FW-*`` the LB source ranges.
* filter ``KUBE-SERVICES`` / ``KUBE-EXTERNAL-SERVICES`` REJECT or DROP traffic that no
  endpoint can take; ``KUBE-PROXY-FIREWALL`` drops LB traffic the FW chain refused.
* nat ``KUBE-POSTROUTING`` masquerades packets carrying the masquerade mark.

Every decision comes from the NodeView; this module only spells it. Rules are written
in the canonical form ``iptables-save`` prints (``-s``/``-d`` with prefix lengths,
``-p`` before matches, ``MARK --set-xmark``, ``recent`` with its default mask, explicit
``--reject-with``, probabilities as the kernel stores them), so what the kernel reads
back is byte-for-byte what was rendered.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

from kubeproxy.config.types import LBAlgorithm
from kubeproxy.model import IPAddress, IPNetwork, NamespacedName
from kubeproxy.nodeview import ClusterIPMasquerade, EndpointView, NodeView, Route, ServicePortView
from kubeproxy.render.ipt_names import hash16, service_chain

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
# Prefixes of the per-service chains (all in the nat table).
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
LARGE_CLUSTER_ENDPOINTS = 1000  # above this, per-endpoint comments are dropped
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"

# The jumps from builtin chains into ours, in the order they stand in each builtin
# chain (the data plane inserts them at the top). (table, builtin, target, matches)
JUMPS: tuple[tuple[str, str, str, str], ...] = (
    # Load-balancer source ranges: drop what a KUBE-FW chain did not accept.
    ("filter", "INPUT", KUBE_PROXY_FIREWALL,
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall"'),
    # Health-check node ports are accepted before any host firewall.
    ("filter", "INPUT", KUBE_NODEPORTS,
     '-m comment --comment "kubernetes health check service ports"'),
    # DROP/REJECT for external destinations without (local) endpoints.
    ("filter", "INPUT", KUBE_EXTERNAL_SERVICES,
     '-m conntrack --ctstate NEW -m comment --comment '
     '"kubernetes externally-visible service portals"'),
    ("filter", "FORWARD", KUBE_PROXY_FIREWALL,
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall"'),
    # Accept forwarded service traffic even under a DROP forward policy.
    ("filter", "FORWARD", KUBE_FORWARD, '-m comment --comment "kubernetes forwarding rules"'),
    # REJECT/DROP for cluster IPs without endpoints (pods' traffic is forwarded).
    ("filter", "FORWARD", KUBE_SERVICES,
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals"'),
    ("filter", "FORWARD", KUBE_EXTERNAL_SERVICES,
     '-m conntrack --ctstate NEW -m comment --comment '
     '"kubernetes externally-visible service portals"'),
    ("filter", "OUTPUT", KUBE_PROXY_FIREWALL,
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall"'),
    ("filter", "OUTPUT", KUBE_SERVICES,
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals"'),
    # Service dispatch for traffic arriving at the node and leaving the node itself.
    ("nat", "PREROUTING", KUBE_SERVICES, '-m comment --comment "kubernetes service portals"'),
    ("nat", "OUTPUT", KUBE_SERVICES, '-m comment --comment "kubernetes service portals"'),
    ("nat", "POSTROUTING", KUBE_POSTROUTING, '-m comment --comment "kubernetes postrouting rules"'),
)
# Only with localhost NodePorts (IPv4): the CVE-2020-8558 guard, first in INPUT/OUTPUT.
LOCALHOST_JUMPS: tuple[tuple[str, str, str, str], ...] = (
    ("filter", "INPUT", KUBE_FIREWALL, ""),
    ("filter", "OUTPUT", KUBE_FIREWALL, ""),
)
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
# Chains rewritten whole on every sync, per table (the service chains come on top).
TOP_CHAINS = {
    "filter": (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD,
               KUBE_PROXY_FIREWALL),
    "nat": (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ),
}


@dataclass
class Ruleset:
    """One family's rules: table -> chain -> rule lines ("-A CHAIN ...").

    One from the memoizing :class:`Renderer` shares the renderer's own maps of the
    per-service chains (copying 100,000 chains per sync cost more than the rest of a
    partial sync): it is valid until the renderer's next call, and read-only."""

    family: int
    tables: dict[str, Mapping[str, list[str]]]
    jumps: tuple[tuple[str, str, str, str], ...]
    owners: Mapping[str, NamespacedName] = field(default_factory=dict)  # nat chain -> service
    # owners inverted: service -> its nat chains (built on first use, or handed over by
    # the memoizing Renderer, which keeps it up to date at the cost of the change).
    by_service: Mapping[NamespacedName, frozenset[str]] | None = None
    # Rules per table, where the Renderer counted them as it went (rule_count).
    rules: Mapping[str, int] = field(default_factory=dict)

    def rule_count(self, table: str) -> int:
        """How many rules ``table`` holds (for metrics)."""
        if table not in self.rules:
            return sum(map(len, self.tables[table].values()))
        return self.rules[table]

    def chains_of(self, service: NamespacedName) -> frozenset[str]:
        """The nat chains ``service`` owns."""
        return self.services().get(service, frozenset())

    def services(self) -> Mapping[NamespacedName, frozenset[str]]:
        """Every service's nat chains (``owners`` inverted)."""
        if self.by_service is None:
            inverted: dict[NamespacedName, set[str]] = {}
            for chain, owner in self.owners.items():
                inverted.setdefault(owner, set()).add(chain)
            self.by_service = {svc: frozenset(cs) for svc, cs in inverted.items()}
        return self.by_service

    def save_text(self, *, tables: Iterable[str] = ("mangle", "filter", "nat")) -> str:
        """The whole ruleset in iptables-save format: builtin chains with our jumps, our
        chains in the order iptables-save lists them, and the canary chains."""
        out: list[str] = []
        for table in tables:
            chains = self.tables.get(table, {})
            out.append(f"*{table}")
            out.extend(f":{c} ACCEPT [0:0]" for c in BUILTIN_CHAINS[table])
            order = sorted(chains)
            out += [f":{c} - [0:0]" for c in sorted([*order, KUBE_PROXY_CANARY])]
            for builtin in BUILTIN_CHAINS[table]:
                out.extend(jump_rule(j) for j in self.jumps if j[0] == table and j[1] == builtin)
            for chain in order:
                out += chains[chain]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def jump_rule(jump: tuple[str, str, str, str]) -> str:
    _, builtin, target, matches = jump
    return f"-A {builtin} {matches} -j {target}" if matches else f"-A {builtin} -j {target}"


def render(view: NodeView) -> Ruleset:
    r = _Renderer(view)
    r.render()
    return r.ruleset()


@dataclass(frozen=True, slots=True)
class _Part:
    """What one service port adds: lines for the shared top-level chains (in order), its
    own nat chains, and their owner."""

    top: tuple[tuple[str, str, tuple[str, ...]], ...]  # (table, chain, lines)
    chains: dict[str, list[str]]
    owners: dict[str, NamespacedName]


class Renderer:
    """:func:`render` with memory, for a proxy that renders the same node again and again.

    A service port's rules depend only on its ServicePortView and on the node-wide part
    of the view, so they are kept per ServicePortView *object* (the node view cache hands
    back the same object for an unchanged service) and re-rendered only for new ones;
    everything is forgotten when the node-wide part changes. The per-service chains of
    all ports are kept in one dict patched by what changed, with their owners and rule
    count, and the Ruleset returned shares them (valid until the next call): copying
    100,000 chains and owners per sync took ~70 ms at 10,000 services, more than the
    rest of a partial sync. The result equals ``render(view)``
    (tests/unit/test_incremental.py).
    """

    def __init__(self) -> None:
        self._context: tuple[NodeView, bool] | None = None
        self._parts: dict[int, tuple[ServicePortView, _Part]] = {}
        self._chains: dict[str, list[str]] = {}  # every port's own nat chains
        self._owners: dict[str, NamespacedName] = {}
        self._by_service: dict[NamespacedName, frozenset[str]] = {}  # _owners inverted
        self._rules = 0  # rules in _chains

    def __call__(self, view: NodeView) -> Ruleset:
        r = _Renderer(view)
        context = (replace(view, services=()), r.comments)
        if context != self._context:
            self._context, self._parts, self._chains, self._owners = context, {}, {}, {}
            self._by_service, self._rules = {}, 0
        known, parts, new = self._parts, {}, []
        for spv in view.services:
            hit = known.get(id(spv))
            if hit is None or hit[0] is not spv:
                hit = (spv, r.part(spv))
                new.append(hit[1])
            parts[id(spv)] = hit
        dropped: dict[NamespacedName, set[str]] = {}
        added: dict[NamespacedName, set[str]] = {}
        for key, old in known.items():  # gone or re-rendered: drop its chains
            if parts.get(key) is not old:
                for chain, rules in old[1].chains.items():
                    del self._chains[chain]
                    self._rules -= len(rules)
                    dropped.setdefault(self._owners.pop(chain), set()).add(chain)
        for part in new:
            self._chains.update(part.chains)
            self._owners.update(part.owners)
            self._rules += sum(map(len, part.chains.values()))
            for chain, owner in part.owners.items():
                added.setdefault(owner, set()).add(chain)
        for svc in dropped.keys() | added.keys():
            chains = (self._by_service.get(svc, frozenset()) - dropped.get(svc, set())
                      ) | added.get(svc, set())
            if chains:
                self._by_service[svc] = chains
            else:
                self._by_service.pop(svc, None)
        self._parts = parts
        r.fixed_chains()
        tables = {"nat": r.nat, "filter": r.filter}
        for _, part in parts.values():
            for table, chain, lines in part.top:
                tables[table][chain].extend(lines)
        r.nodeports_tail()
        ruleset = r.ruleset()
        # Shared, not copied (Ruleset): the top-level chains first, then the ports' own.
        ruleset.tables["nat"] = ChainMap(r.nat, self._chains)
        ruleset.owners = self._owners
        ruleset.by_service = self._by_service
        ruleset.rules = {"filter": sum(map(len, r.filter.values())),
                         "nat": self._rules + sum(map(len, r.nat.values()))}
        return ruleset


@lru_cache(maxsize=1024)
def _probability(n: int) -> str:
    """1/n as the kernel stores it (a 31-bit fraction) and iptables-save prints it."""
    stored = round(0x80000000 / n)
    return f"{stored / 0x80000000:.11f}"


class _Renderer:
    """Accumulates one family's chains; one method per part of upstream's layout."""

    def __init__(self, view: NodeView) -> None:
        self.view = view
        v6 = view.family == 6
        self.host = "/128" if v6 else "/32"
        self.reject = "REJECT --reject-with " + (
            "icmp6-port-unreachable" if v6 else "icmp-port-unreachable")
        self.rmask = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if v6 else "255.255.255.255"
        mark = f"{view.masquerade_mark:#x}"
        self.mark = mark
        self.comments = view.total_endpoints <= LARGE_CLUSTER_ENDPOINTS
        self.filter: dict[str, list[str]] = {c: [] for c in TOP_CHAINS["filter"]}
        self.nat: dict[str, list[str]] = {c: [] for c in TOP_CHAINS["nat"]}
        self.owners: dict[str, NamespacedName] = {}
        self.not_local, self.local = _detector_matches(view)
        # How the ClusterIP masquerade rule matches its source (None: no rule).
        self.cluster_ip_masq = {ClusterIPMasquerade.ALL: ("", ""),
                                ClusterIPMasquerade.NOT_LOCAL: self.not_local,
                                ClusterIPMasquerade.NONE: None}[view.cluster_ip_masquerade]

    # -- fixed chains ---------------------------------------------------------------

    def render(self) -> None:
        self.fixed_chains()
        for spv in self.view.services:
            self.service_port(spv)
        self.nodeports_tail()

    def ruleset(self) -> Ruleset:
        jumps = JUMPS + (LOCALHOST_JUMPS if self.view.nodeports.localhost else ())
        return Ruleset(family=self.view.family, tables={"filter": self.filter, "nat": self.nat},
                       jumps=jumps, owners=self.owners)

    def part(self, spv: ServicePortView) -> _Part:
        """What service_port(spv) writes, captured instead of written."""
        saved = self.nat, self.filter, self.owners
        self.nat = {c: [] for c in TOP_CHAINS["nat"]}
        self.filter = {c: [] for c in TOP_CHAINS["filter"]}
        self.owners = {}
        try:
            self.service_port(spv)
            top = tuple((table, chain, tuple(chains.pop(chain)))
                        for table, chains in (("nat", self.nat), ("filter", self.filter))
                        for chain in TOP_CHAINS[table] if chains[chain])
            return _Part(top, {c: r for c, r in self.nat.items() if c not in TOP_CHAINS["nat"]},
                         self.owners)
        finally:
            self.nat, self.filter, self.owners = saved

    def fixed_chains(self) -> None:
        mark = self.mark
        self.nat[KUBE_POSTROUTING] += [
            f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
            # Clear the mark so a packet re-traversing does not get masqueraded twice.
            f"-A KUBE-POSTROUTING -j MARK --set-xmark {mark}/0x0",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
            " -j MASQUERADE --random-fully",
        ]
        self.nat[KUBE_MARK_MASQ].append(f"-A KUBE-MARK-MASQ -j MARK --set-xmark {mark}/{mark}")
        self.filter[KUBE_FORWARD] += [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
            f"-m mark --mark {mark}/{mark} -j ACCEPT",
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
        if self.view.nodeports.localhost:
            lo = self.view.nodeports.loopback
            self.filter[KUBE_FIREWALL] = [
                f'-A KUBE-FIREWALL ! -s {lo} -d {lo} -m comment --comment '
                '"block incoming localnet connections" '
                "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"]

    def nodeports_tail(self) -> None:
        """The last rule of nat KUBE-SERVICES: traffic to node addresses -> KUBE-NODEPORTS."""
        rules = self.nat[KUBE_SERVICES]
        comment = f'-m comment --comment "{NODEPORTS_COMMENT}"'
        nodeports = self.view.nodeports
        if nodeports.match_all:
            guard = "" if nodeports.guard is None else f"! -d {nodeports.guard} "
            rules.append(f"-A KUBE-SERVICES {guard}{comment} -m addrtype --dst-type LOCAL "
                         "-j KUBE-NODEPORTS")
            return
        for ip in nodeports.destinations:
            rules.append(f"-A KUBE-SERVICES -d {ip}{self.host} {comment} -j KUBE-NODEPORTS")

    # -- one service port -----------------------------------------------------------

    def service_port(self, spv: ServicePortView) -> None:
        spn = str(spv.name)
        proto = spv.protocol
        svc_chain = service_chain("KUBE-SVC-", spn, proto)
        svl_chain = service_chain("KUBE-SVL-", spn, proto)
        ext_chain = service_chain("KUBE-EXT-", spn, proto)
        fw_chain = service_chain("KUBE-FW-", spn, proto)
        policy_chain = {Route.CLUSTER: svc_chain, Route.LOCAL: svl_chain}
        host = self.host
        pm = f"-p {proto}"
        dport = f"-m {proto} --dport {spv.port}"
        lb_target = fw_chain if spv.firewall else ext_chain
        nat_svc, filter_svc = self.nat[KUBE_SERVICES], self.filter[KUBE_SERVICES]
        ext_filter = self.filter[KUBE_EXTERNAL_SERVICES]
        ext_verdict = ("REJECT" if spv.external is Route.REJECT else "DROP",
                       f"{spn} has no endpoints" if spv.external is Route.REJECT
                       else f"{spn} has no local endpoints")
        ext_blocked = spv.external in (Route.DROP, Route.REJECT)
        ext_action = self.reject if ext_verdict[0] == "REJECT" else "DROP"

        # Cluster IP.
        if spv.internal in policy_chain:
            nat_svc.append(f"-A KUBE-SERVICES -d {spv.cluster_ip}{host} {pm} -m comment "
                           f'--comment "{spn} cluster IP" {dport} -j {policy_chain[spv.internal]}')
        else:
            why = "has no endpoints" if spv.internal is Route.REJECT else "has no local endpoints"
            action = self.reject if spv.internal is Route.REJECT else "DROP"
            filter_svc.append(f"-A KUBE-SERVICES -d {spv.cluster_ip}{host} {pm} -m comment "
                              f'--comment "{spn} {why}" {dport} -j {action}')
        # External IPs.
        for ip in spv.external_ips:
            if spv.has_endpoints:
                nat_svc.append(f"-A KUBE-SERVICES -d {ip}{host} {pm} -m comment "
                               f'--comment "{spn} external IP" {dport} -j {ext_chain}')
            if ext_blocked:
                ext_filter.append(f"-A KUBE-EXTERNAL-SERVICES -d {ip}{host} {pm} -m comment "
                                  f'--comment "{ext_verdict[1]}" {dport} -j {ext_action}')
        # Load-balancer IPs.
        for ip in spv.load_balancer_ips:
            if spv.has_endpoints:
                nat_svc.append(f"-A KUBE-SERVICES -d {ip}{host} {pm} -m comment "
                               f'--comment "{spn} loadbalancer IP" {dport} -j {lb_target}')
            if spv.firewall:
                self.filter[KUBE_PROXY_FIREWALL].append(
                    f"-A KUBE-PROXY-FIREWALL -d {ip}{host} {pm} -m comment --comment "
                    f'"{spn} traffic not accepted by {fw_chain}" {dport} -j DROP')
        if ext_blocked:
            for ip in spv.load_balancer_ips:
                ext_filter.append(f"-A KUBE-EXTERNAL-SERVICES -d {ip}{host} {pm} -m comment "
                                  f'--comment "{ext_verdict[1]}" {dport} -j {ext_action}')
        # NodePort.
        if spv.node_port:
            if spv.has_endpoints:
                self.nat[KUBE_NODEPORTS].append(
                    f'-A KUBE-NODEPORTS {pm} -m comment --comment "{spn}" '
                    f"-m {proto} --dport {spv.node_port} -j {ext_chain}")
            if ext_blocked:
                ext_filter.append(
                    f'-A KUBE-EXTERNAL-SERVICES {pm} -m comment --comment "{ext_verdict[1]}" '
                    f"-m addrtype --dst-type LOCAL -m {proto} --dport {spv.node_port} "
                    f"-j {ext_action}")
        if spv.health_check_node_port:
            self.filter[KUBE_NODEPORTS].append(
                f'-A KUBE-NODEPORTS -p tcp -m comment --comment "{spn} health check node port" '
                f"-m tcp --dport {spv.health_check_node_port} -j ACCEPT")

        self.policy_chains(spv, spn, svc_chain, svl_chain, ext_chain, fw_chain)

    def policy_chains(self, spv: ServicePortView, spn: str, svc_chain: str, svl_chain: str,
                      ext_chain: str, fw_chain: str) -> None:
        """The per-service nat chains: SVC, SVL, EXT, FW and one SEP per endpoint."""
        owner = spv.name.service
        chains: dict[str, list[str]] = {}
        if spv.uses_cluster_chain:
            chains[svc_chain] = []
        if spv.uses_local_chain:
            chains[svl_chain] = []
        internal_chain = svc_chain if spv.internal is Route.CLUSTER else svl_chain
        masq = self.cluster_ip_masq
        if spv.internal in (Route.CLUSTER, Route.LOCAL) and masq is not None:
            src, iface = masq
            chains[internal_chain].append(
                f"-A {internal_chain} {src}-d {spv.cluster_ip}{self.host}{iface} "
                f"-p {spv.protocol} -m comment --comment \"{spn} cluster IP\" "
                f"-m {spv.protocol} --dport {spv.port} -j KUBE-MARK-MASQ")
        if spv.uses_external_chain:
            chains[ext_chain] = list(self.external_chain(spv, spn, ext_chain, svc_chain,
                                                         svl_chain))
        if spv.firewall:
            chains[fw_chain] = self.firewall_chain(spv, spn, fw_chain, ext_chain)
        everyone = spv.all_endpoints
        hash_prefix = spn + spv.protocol  # endpoint_chain(), inlined: one per endpoint
        seps = {ep.target: "KUBE-SEP-" + hash16(hash_prefix + ep.target) for ep in everyone}
        if spv.uses_cluster_chain:
            self.balance(chains[svc_chain], svc_chain, spv, spn, spv.cluster_endpoints, seps)
        if spv.uses_local_chain:
            self.balance(chains[svl_chain], svl_chain, spv, spn, spv.local_endpoints, seps)
        self.endpoint_chains(chains, spv, spn, seps)
        self.nat.update(chains)
        self.owners.update(dict.fromkeys(chains, owner))

    def external_chain(self, spv: ServicePortView, spn: str, ext_chain: str, svc_chain: str,
                       svl_chain: str) -> Iterator[str]:
        if not spv.external_policy_local:
            # Endpoints may be on other nodes: masquerade so replies come back here.
            yield (f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn} '
                   'external destinations" -j KUBE-MARK-MASQ')
        else:
            if self.local is not None:
                # Pods reaching an external destination are not subject to the
                # traffic policy (as if they went out to the LB and back).
                yield (f'-A {ext_chain} {self.local} -m comment --comment "pod traffic for '
                       f'{spn} external destinations" -j {svc_chain}')
            # The node itself: its source address is local, so masquerade it.
            yield (f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn} '
                   'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ')
            yield (f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn} '
                   f'external destinations" -m addrtype --src-type LOCAL -j {svc_chain}')
        if spv.external is Route.CLUSTER:
            yield f"-A {ext_chain} -j {svc_chain}"
        elif spv.external is Route.LOCAL:
            yield f"-A {ext_chain} -j {svl_chain}"

    def firewall_chain(self, spv: ServicePortView, spn: str, fw_chain: str,
                       ext_chain: str) -> list[str]:
        comment = f'-m comment --comment "{spn} loadbalancer IP"'
        sources: list[IPNetwork | IPAddress] = list(spv.source_ranges)
        if spv.firewall_allows_node:
            # The node reaching its own LB IP loops back with the LB IP as source.
            sources += spv.load_balancer_ips
        rules = [f"-A {fw_chain} -s {_cidr(s, self.host)} {comment} -j {ext_chain}"
                 for s in sources]
        # A no-op rule that says where refused traffic goes.
        rules.append(f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be '
                     'dropped by KUBE-PROXY-FIREWALL"')
        return rules

    def balance(self, rules: list[str], chain: str, spv: ServicePortView, spn: str,
                endpoints: tuple[EndpointView, ...], sep_of: dict[str, str]) -> None:
        """Affinity rules, then one probabilistic (or nth) rule per endpoint."""
        n = len(endpoints)
        seps = [sep_of[ep.target] for ep in endpoints]
        comments = ([f'-m comment --comment "{spn} -> {ep.target}" ' for ep in endpoints]
                    if self.comments else [""] * n)
        if spv.affinity_timeout is not None:
            for sep, cmt in zip(seps, comments, strict=True):
                rules.append(f"-A {chain} {cmt}-m recent --rcheck --seconds "
                             f"{spv.affinity_timeout} --reap --name {sep} --mask {self.rmask} "
                             f"--rsource -j {sep}")
        round_robin = self.view.lb_algorithm is LBAlgorithm.ROUND_ROBIN
        for i, (sep, cmt) in enumerate(zip(seps, comments, strict=True)):
            if i == n - 1:
                rules.append(f"-A {chain} {cmt}-j {sep}")
            elif round_robin:
                rules.append(f"-A {chain} {cmt}-m statistic --mode nth --every {n - i} "
                             f"--packet 0 -j {sep}")
            else:
                rules.append(f"-A {chain} {cmt}-m statistic --mode random --probability "
                             f"{_probability(n - i)} -j {sep}")

    def endpoint_chains(self, chains: dict[str, list[str]], spv: ServicePortView, spn: str,
                        seps: dict[str, str]) -> None:
        """One KUBE-SEP chain per endpoint: hairpin masquerade, then DNAT."""
        cmt = f'-m comment --comment "{spn}" ' if self.comments else ""
        proto = spv.protocol
        host = self.host
        for ep in spv.all_endpoints:
            sep = seps[ep.target]
            recent = (f"-m recent --set --name {sep} --mask {self.rmask} --rsource "
                      if spv.affinity_timeout is not None else "")
            chains[sep] = [
                # Hairpin: a pod reaching itself through the service must be masqueraded.
                f"-A {sep} -s {ep.addr}{host} {cmt}-j KUBE-MARK-MASQ",
                f"-A {sep} -p {proto} {cmt}{recent}-m {proto} -j DNAT "
                f"--to-destination {ep.target}",
            ]


def _cidr(value: IPNetwork | IPAddress, host: str) -> str:
    if isinstance(value, IPNetwork):
        return str(value)
    return f"{value}{host}"


def _detector_matches(view: NodeView) -> tuple[tuple[str, str] | None, str | None]:
    """How "not from a local pod" and "from a local pod" are spelled (None: no detector).

    "Not local" comes as (source part, interface part): in canonical order ``-s`` stands
    before ``-d`` and ``-i`` after it, so the caller places the two parts separately.
    """
    det = view.local_detector
    if det.cidrs:
        return (f"! -s {det.cidrs[0]} ", ""), f"-s {det.cidrs[0]}"
    if det.interface:
        name = det.interface + ("+" if det.prefix else "")
        return ("", f" ! -i {name}"), f"-i {name}"
    return None, None
