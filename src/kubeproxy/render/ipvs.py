"""NodeView -> IPVS ruleset, in upstream kube-proxy's IPVS layout. Pure.

Theory of operation
-------------------
Upstream's IPVS proxier (pkg/proxy/ipvs/proxier.go) load-balances in the kernel's IP
Virtual Server instead of DNAT chains. For each IP family this module computes what it
writes:

* the **addresses bound to the ``kube-ipvs0`` dummy interface**: every ClusterIP,
  external IP and load-balancer IP (not node addresses), so that the kernel delivers
  their packets locally, where IPVS (hooked into LOCAL_IN and LOCAL_OUT) picks them up;
* one **virtual server** per frontend (ClusterIP:port, externalIP:port, LB-IP:port,
  node-IP:NodePort) and protocol, with the scheduler (rr by default), ClientIP affinity
  as IPVS persistence with the service's timeout, and its **real servers** (weight 1,
  masquerade forwarding, i.e. NAT);
* the **ipsets** the iptables rules match on (``IPSETS``, upstream's names; IPv6 sets
  are called ``KUBE-6-...``);
* the **iptables rules** around them (``iptables_text``): masquerade marking, the
  load-balancer source-range firewall, and the REJECT of unknown ports on service IPs.

Which real servers a virtual server gets is the node view's answer, spelled the way
upstream's ``syncEndpoint`` spells it: the ClusterIP server takes the internal route's
endpoints, the external servers the external route's. Two of upstream's IPVS choices
differ from the iptables layout and are kept (docs/ipvs.md):

* there is no short-circuit of pod / node traffic to external destinations under
  ``externalTrafficPolicy: Local``: one virtual server serves every client, so it holds
  the local endpoints only;
* a ``Local`` policy without local endpoints falls back to the cluster endpoints
  (upstream PR 97081, so local pods keep access); there is no DROP. With no endpoints
  at all the virtual server has no real servers, and IPVS answers ICMP port unreachable.

Rules use iptables-save's canonical spelling, so what the kernel reads back matches.
The sets' and chains' layout and the iptables rules are in render/ipvs_tables.py.

:class:`Renderer` is the same with memory for the daemon: each service port's part
(virtual servers, set entries, addresses) is kept per port view object and what they
add up to is patched with reference counts, so a one-service change costs that service
(docs/ipvs.md "Syncs"). The ruleset names each service's virtual servers (``owners``),
which is how a partial sync finds what to rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from types import MappingProxyType
from typing import TypeVar

from kubeproxy.config.types import IPVS_SCHEDULERS
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.nodeview import (
    NodeView,
    Route,
    ServicePortView,
    single_balancer_endpoints,
)
from kubeproxy.render.ipvs_tables import (
    BUILTIN,
    IPSETS,
    JUMPS,
    jump_rule,
    proto_number,
    set_name,
    tables,
)

DUMMY = "kube-ipvs0"
SCHEDULERS = IPVS_SCHEDULERS  # rr (the default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh
Key = tuple[IPAddress, str, int]  # (address, protocol, port) of a virtual server
_T = TypeVar("_T")
FLAG_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
FLAG_SCHED_PORT = 0x10  # IP_VS_SVC_F_SCHED2: mh hashes the source port too (upstream)
FLAG_NAMES = MappingProxyType({FLAG_SCHED_PORT: "mh-port"})

_NODE_PORT_SETS = {"tcp": ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP"),
                   "udp": ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"),
                   "sctp": ("KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH")}


def ip_order(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


def key_of(vs: VirtualServer) -> Key:
    return (vs.ip, vs.proto, vs.port)


def host(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: IPAddress
    port: int
    weight: int = 1

    @property
    def target(self) -> str:
        return host(self.ip, self.port)


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """One IPVS service: a frontend (address, port, protocol) and its real servers."""

    ip: IPAddress
    port: int
    proto: str  # tcp, udp, sctp
    scheduler: str
    flags: int  # FLAG_* bits other than persistence
    timeout: int  # persistence timeout in seconds; 0: not persistent
    reals: tuple[RealServer, ...]  # sorted
    owner: NamespacedName
    role: str  # "cluster IP", "external IP", "load balancer IP", "node port"

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.ip.version, int(self.ip), self.proto, self.port)

    @property
    def frontend(self) -> str:
        return f"{self.proto} {host(self.ip, self.port)}"

    def save_lines(self) -> list[str]:
        """ipvsadm-save -n spelling: ``-A`` for the service, ``-a`` per real server."""
        opt = {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}[self.proto]
        head = f"-A {opt} {host(self.ip, self.port)} -s {self.scheduler}"
        flags = [n for bit, n in FLAG_NAMES.items() if self.flags & bit]
        if flags:
            head += " -b " + ",".join(flags)
        if self.timeout:
            head += f" -p {self.timeout}"
        return [head, *(f"-a {opt} {host(self.ip, self.port)} -r {r.target} -m -w {r.weight}"
                        for r in self.reals)]


@dataclass(frozen=True, slots=True)
class IpSet:
    name: str  # the family's name (KUBE-6-... for IPv6)
    kind: str  # hash:ip,port ...
    family: Family
    entries: frozenset[str]

    def create_line(self) -> str:
        if self.kind == "bitmap:port":
            return f"create {self.name} bitmap:port range 0-65535"
        fam = "inet" if self.family == 4 else "inet6"
        return f"create {self.name} {self.kind} family {fam} hashsize 1024 maxelem 65536"

    def save_lines(self) -> list[str]:
        return [self.create_line(), *(f"add {self.name} {e}" for e in sorted(self.entries))]


@dataclass(frozen=True)
class FamilyIpvs:
    """One family's part: bound addresses, virtual servers, ipsets, iptables rules."""

    family: Family
    bound: frozenset[IPAddress]  # on kube-ipvs0
    servers: Mapping[Key, VirtualServer]
    owners: Mapping[NamespacedName, frozenset[Key]]  # each service's virtual servers
    sets: tuple[IpSet, ...]  # in IPSETS order
    tables: MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]]  # table -> chain -> rules

    @cached_property
    def addresses(self) -> tuple[IPAddress, ...]:
        """``bound``, sorted (for printing: syncs use the set)."""
        return tuple(sorted(self.bound, key=ip_order))

    @cached_property
    def services(self) -> tuple[VirtualServer, ...]:
        """``servers``, sorted by address, protocol and port (for printing)."""
        return tuple(sorted(self.servers.values(), key=lambda s: s.key))

    def iptables_text(self) -> str:
        """The iptables part in iptables-save format (builtin chains with our jumps)."""
        out: list[str] = []
        for table in ("filter", "nat"):
            chains = self.tables[table]
            out.append(f"*{table}")
            out += [f":{c} ACCEPT [0:0]" for c in BUILTIN[table]]
            out += [f":{c} - [0:0]" for c in sorted(chains)]
            for builtin in BUILTIN[table]:
                out += [jump_rule(j) for j in JUMPS if j[0] == table and j[1] == builtin]
            for chain in sorted(chains):
                out += chains[chain]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class IpvsRuleset:
    families: tuple[FamilyIpvs, ...]  # by family

    def family(self, family: int) -> FamilyIpvs | None:
        return next((f for f in self.families if f.family == family), None)


def render(views: Sequence[NodeView], scheduler: str = "rr") -> IpvsRuleset:
    return Renderer(scheduler)(views)


def render_family(view: NodeView, scheduler: str = "rr") -> FamilyIpvs:
    return _FamilyRenderer(_check_scheduler(scheduler))(view)


def _check_scheduler(scheduler: str) -> str:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"IPVS scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
    return scheduler


class Renderer:
    """:func:`render` with memory, for a proxy that renders the same node again and again.

    A service port's virtual servers, set entries and addresses depend only on its
    ServicePortView and on the node-wide part of the view, so they are kept per
    ServicePortView *object* (the node view cache hands back the same object for an
    unchanged service) and re-rendered only for new ones; everything is forgotten when
    the node-wide part changes. What all ports add up to (the virtual servers by key,
    each set's entries, kube-ipvs0's addresses) is kept with reference counts and
    patched by what changed, so a one-service change costs that service plus copies at
    C speed. The result equals ``render(views)`` (tests/unit/test_ipvs_render.py).
    """

    def __init__(self, scheduler: str = "rr") -> None:
        self.scheduler = _check_scheduler(scheduler)
        self._families: dict[int, _FamilyRenderer] = {}

    def __call__(self, views: Sequence[NodeView]) -> IpvsRuleset:
        out = []
        for view in sorted(views, key=lambda v: v.family):
            memo = self._families.get(view.family)
            if memo is None:
                memo = self._families[view.family] = _FamilyRenderer(self.scheduler)
            out.append(memo(view))
        return IpvsRuleset(tuple(out))


@dataclass(frozen=True, slots=True)
class _Part:
    """What one service port adds."""

    order: tuple[str, str, str, str]  # the port view's place in the view (name order)
    owner: NamespacedName
    servers: tuple[VirtualServer, ...]
    entries: tuple[tuple[str, str], ...]  # (IPSETS name, entry), repeats allowed
    bound: tuple[IPAddress, ...]  # addresses for kube-ipvs0
    out_filter: tuple[str, ...]  # KUBE-IPVS-OUT-FILTER rules


@dataclass(frozen=True)
class _Env:
    """The node-wide inputs of a port's part."""

    scheduler: str
    node_ips: frozenset[IPAddress]
    np_addresses: tuple[IPAddress, ...]


class _FamilyRenderer:
    """One family's memo (see :class:`Renderer`)."""

    def __init__(self, scheduler: str) -> None:
        self.scheduler = scheduler
        self._context: NodeView | None = None
        self._reset()

    def _reset(self) -> None:
        self._parts: dict[int, tuple[ServicePortView, _Part]] = {}
        # key -> {part id: (its order, its virtual server)}: the first in name order wins
        # when two ports claim one frontend (the kernel holds one).
        self._claims: dict[Key, dict[int, tuple[tuple[str, ...], VirtualServer]]] = {}
        self._servers: dict[Key, VirtualServer] = {}
        self._by_owner: dict[NamespacedName, dict[int, _Part]] = {}
        self._owners: dict[NamespacedName, frozenset[Key]] = {}
        self._entries: dict[str, dict[str, int]] = {n: {} for n in IPSETS}  # entry -> refs
        self._bound: dict[IPAddress, int] = {}
        self._out: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._sets: dict[str, IpSet] = {}
        self._tables: tuple[object, MappingProxyType[str, MappingProxyType[
            str, tuple[str, ...]]]] | None = None

    def __call__(self, view: NodeView) -> FamilyIpvs:
        context = replace(view, services=())
        if context != self._context:
            self._context = context
            self._reset()
        nodeports = view.nodeports.without_localhost()  # IPVS has no localhost NodePorts
        env = _Env(self.scheduler, frozenset(view.node_ips),
                   tuple(view.node_ips if nodeports.match_all else nodeports.routable))
        # Which port views are new and which are gone, by object identity, in set
        # operations (C speed): the memo holds every view it knows, so an id it has
        # cannot have been reused by another object.
        parts = self._parts
        by_id = dict(zip(map(id, view.services), view.services, strict=True))
        dirty: set[str] = set()
        owners: set[NamespacedName] = set()
        for pid in parts.keys() - by_id.keys():
            self._patch(pid, parts.pop(pid)[1], -1, dirty, owners)
        for pid in by_id.keys() - parts.keys():
            spv = by_id[pid]
            parts[pid] = (spv, _port(spv, env, view.family))
            self._patch(pid, parts[pid][1], 1, dirty, owners)
        for owner in owners:
            mine = self._by_owner.get(owner)
            if mine:
                self._owners[owner] = frozenset(key_of(vs) for p in mine.values()
                                                for vs in p.servers)
            else:
                self._owners.pop(owner, None)
        fam = view.family
        for name in dirty | (set(IPSETS) - set(self._sets)):
            self._sets[name] = IpSet(set_name(name, fam), IPSETS[name][0], fam,
                                     frozenset(self._entries[name]))
        return FamilyIpvs(fam, frozenset(self._bound), MappingProxyType(dict(self._servers)),
                          MappingProxyType(dict(self._owners)),
                          tuple(self._sets[n] for n in IPSETS), self._tables_for(view))

    def _patch(self, pid: int, part: _Part, sign: int, dirty: set[str],
               owners: set[NamespacedName]) -> None:
        """Add (sign 1) or take away (-1) one port's part."""
        mine = self._by_owner.setdefault(part.owner, {})
        if sign > 0:
            mine[pid] = part
        else:
            del mine[pid]
            if not mine:
                del self._by_owner[part.owner]
        owners.add(part.owner)
        for vs in part.servers:
            key = key_of(vs)
            claims = self._claims.setdefault(key, {})
            if sign > 0:
                claims[pid] = (part.order, vs)
            else:
                claims.pop(pid, None)
            if claims:
                self._servers[key] = min(claims.values(), key=lambda c: c[0])[1]
            else:
                del self._claims[key], self._servers[key]
        for name, entry in part.entries:
            if _count(self._entries[name], entry, sign):
                dirty.add(name)
        for ip in part.bound:
            _count(self._bound, ip, sign)
        if part.out_filter:
            if sign > 0:
                self._out[pid] = (part.order, part.out_filter)
            else:
                del self._out[pid]

    def _tables_for(self, view: NodeView
                    ) -> MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]]:
        """The iptables part, re-rendered only when its inputs changed."""
        used = frozenset(n for n, e in self._entries.items() if e)
        out = tuple(line for _, lines in sorted(self._out.values()) for line in lines)
        inputs = (used, out)
        if self._tables is None or self._tables[0] != inputs:
            self._tables = (inputs, tables(view, used, out))
        return self._tables[1]


def _count(counts: dict[_T, int], item: _T, sign: int) -> bool:
    """Count one more (sign 1) or one less (-1) reference; True when ``item`` came or
    went (so a set whose members stay is not rebuilt)."""
    n = counts.get(item, 0) + sign
    if n:
        counts[item] = n
    else:
        del counts[item]
    return n == 0 or (n == 1 and sign > 0)


def _reals(route: Route, spv: ServicePortView) -> tuple[RealServer, ...]:
    """The route's endpoints as the node view answers for a single balancer."""
    return tuple(sorted({RealServer(e.ip, e.port)
                         for e in single_balancer_endpoints(route, spv)}))


def _port(spv: ServicePortView, env: _Env, family: int) -> _Part:
    """One port's virtual servers, set entries, bound addresses and out-filter rules."""
    proto, port = spv.protocol, spv.port
    timeout = spv.affinity_timeout or 0
    scheduler = env.scheduler
    flags = FLAG_SCHED_PORT if scheduler == "mh" else 0
    internal = _reals(spv.internal, spv)
    external = _reals(spv.external, spv)
    local_policy = spv.external_policy_local
    entries: list[tuple[str, str]] = []
    bound: list[IPAddress] = []

    def vs(ip: IPAddress, p: int, reals: tuple[RealServer, ...], role: str) -> VirtualServer:
        return VirtualServer(ip, p, proto, scheduler, flags, timeout, reals, spv.name.service,
                             role)

    def entry(ip: IPAddress, p: int = port) -> str:
        return f"{ip},{proto}:{p}"

    def bind(ip: IPAddress) -> None:
        bound.append(ip)
        entries.append(("KUBE-IPVS-IPS", str(ip)))

    for ep in spv.all_endpoints:  # hairpin: a local endpoint reaching itself
        if ep.local:
            entries.append(("KUBE-LOOP-BACK", f"{ep.addr},{proto}:{ep.port},{ep.addr}"))
    out = [vs(spv.cluster_ip, port, internal, "cluster IP")]
    entries.append(("KUBE-CLUSTER-IP", entry(spv.cluster_ip)))
    bind(spv.cluster_ip)
    for ip in spv.external_ips:
        entries.append(("KUBE-EXTERNAL-IP-LOCAL" if local_policy else "KUBE-EXTERNAL-IP",
                        entry(ip)))
        out.append(vs(ip, port, external, "external IP"))
        if ip not in env.node_ips:
            bind(ip)
    for ip in spv.load_balancer_ips:
        entries.append(("KUBE-LOAD-BALANCER", entry(ip)))
        if local_policy:
            entries.append(("KUBE-LOAD-BALANCER-LOCAL", entry(ip)))
        if spv.source_ranges:
            entries.append(("KUBE-LOAD-BALANCER-FW", entry(ip)))
            entries += [("KUBE-LOAD-BALANCER-SOURCE-CIDR", f"{entry(ip)},{cidr}")
                        for cidr in spv.source_ranges]
            if spv.firewall_allows_node:  # the node reaches its LB IP from the LB IP
                entries.append(("KUBE-LOAD-BALANCER-SOURCE-IP", f"{entry(ip)},{ip}"))
        out.append(vs(ip, port, external, "load balancer IP"))
        if ip not in env.node_ips:
            bind(ip)
    if spv.node_port:
        plain, local = _NODE_PORT_SETS[proto]
        names = (plain, local) if local_policy else (plain,)
        for ip in env.np_addresses:
            out.append(vs(ip, spv.node_port, external, "node port"))
            entries += [(name, entry(ip, spv.node_port) if proto == "sctp"
                         else str(spv.node_port)) for name in names]
    if spv.health_check_node_port:
        entries.append(("KUBE-HEALTH-CHECK-NODE-PORT", str(spv.health_check_node_port)))
    name = spv.name
    return _Part((name.service.namespace, name.service.name, name.port, name.protocol),
                 name.service, tuple(out), tuple(entries), tuple(bound),
                 _out_filter(spv))


def _out_filter(spv: ServicePortView) -> tuple[str, ...]:
    """LB IPs the node may not reach (source ranges exclude it)."""
    if not spv.source_ranges or spv.firewall_allows_node:
        return ()
    return tuple(f"-A KUBE-IPVS-OUT-FILTER -s {ip}/{ip.max_prefixlen} -m ipvs --vaddr "
                 f"{ip}/{ip.max_prefixlen} --vproto {proto_number(spv.protocol)} "
                 f"--vport {spv.port} -j DROP" for ip in spv.load_balancer_ips)


IPTABLES_HEADER = "# IPv{family} iptables"  # starts a family's iptables-save section


def text(ruleset: IpvsRuleset) -> str:
    """The whole state, as the tools print it: kube-ipvs0's addresses, ipvsadm-save -n,
    ipset save, then iptables-save per family (the tracer reads this text back)."""
    out = ["# kube-ipvs0 addresses"]
    for fam in ruleset.families:
        out += [f"addr {ip}" for ip in fam.addresses]
    out.append("# IPVS virtual servers (ipvsadm-save -n)")
    for fam in ruleset.families:
        for vs in fam.services:
            out += vs.save_lines()
    out.append("# ipsets (ipset save)")
    for fam in ruleset.families:
        for s in fam.sets:
            out += s.save_lines()
    body = "\n".join(out) + "\n"
    for fam in ruleset.families:
        tool = "iptables-save" if fam.family == 4 else "ip6tables-save"
        body += IPTABLES_HEADER.format(family=fam.family) + f" ({tool})\n" + fam.iptables_text()
    return body
