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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.nodeview import ClusterIPMasquerade, EndpointView, NodeView, Route, ServicePortView

DUMMY = "kube-ipvs0"
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")
FLAG_PERSISTENT = 0x1  # IP_VS_SVC_F_PERSISTENT
FLAG_SCHED_PORT = 0x10  # IP_VS_SVC_F_SCHED2: mh hashes the source port too (upstream)
FLAG_NAMES = MappingProxyType({FLAG_SCHED_PORT: "mh-port"})

# Set name -> (type, what it holds). The IPv6 sets are named KUBE-6-... (upstream's
# alternate names keep the two families' sets apart).
IPSETS: MappingProxyType[str, tuple[str, str]] = MappingProxyType({
    "KUBE-LOOP-BACK": ("hash:ip,port,ip",
                       "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    "KUBE-CLUSTER-IP": ("hash:ip,port",
                        "Kubernetes service cluster ip + port for masquerade purpose"),
    "KUBE-EXTERNAL-IP": ("hash:ip,port", "Kubernetes service external ip + port for "
                         "masquerade and filter purpose"),
    "KUBE-EXTERNAL-IP-LOCAL": ("hash:ip,port", "Kubernetes service external ip + port "
                               "with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER": ("hash:ip,port", "Kubernetes service lb portal"),
    "KUBE-LOAD-BALANCER-FW": ("hash:ip,port", "Kubernetes service load balancer ip + port "
                              "for load balancer with sourceRange"),
    "KUBE-LOAD-BALANCER-LOCAL": ("hash:ip,port", "Kubernetes service load balancer ip + "
                                 "port with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER-SOURCE-IP": ("hash:ip,port,ip", "Kubernetes service load balancer "
                                     "ip + port + source IP for packet filter purpose"),
    "KUBE-LOAD-BALANCER-SOURCE-CIDR": ("hash:ip,port,net", "Kubernetes service load "
                                       "balancer ip + port + source cidr for packet "
                                       "filter purpose"),
    "KUBE-NODE-PORT-TCP": ("bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-TCP": ("bitmap:port", "Kubernetes nodeport TCP port with "
                                 "externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-UDP": ("bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    "KUBE-NODE-PORT-LOCAL-UDP": ("bitmap:port", "Kubernetes nodeport UDP port with "
                                 "externalTrafficPolicy=local"),
    "KUBE-NODE-PORT-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port for "
                                 "masquerade purpose with type 'hash ip:port'"),
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH": ("hash:ip,port", "Kubernetes nodeport SCTP port with "
                                       "externalTrafficPolicy=local with type 'hash ip:port'"),
    "KUBE-HEALTH-CHECK-NODE-PORT": ("bitmap:port", "Kubernetes health check node port"),
    "KUBE-IPVS-IPS": ("hash:ip", "IPVS service addresses"),
})

# Our chains, per table (all rewritten whole on every sync: they do not grow with the
# number of services, the ipsets do).
CHAINS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "nat": ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER",
            "KUBE-MARK-MASQ"),
    "filter": ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL",
               "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER"),
})
# The jumps from builtin chains, in the order they stand there: (table, builtin, chain, comment)
JUMPS: tuple[tuple[str, str, str, str], ...] = (
    ("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
)
BUILTIN = MappingProxyType({"filter": ("INPUT", "FORWARD", "OUTPUT"),
                            "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")})
# (set, table, chain, protocol, match flags, target): rules written when the set is not
# empty, in this order (upstream's ipsetWithIptablesChain: a LOCAL set before its
# masquerading sibling).
SET_RULES: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("KUBE-LOOP-BACK", "nat", "KUBE-POSTROUTING", "", "dst,dst,src", "MASQUERADE"),
    ("KUBE-LOAD-BALANCER", "nat", "KUBE-SERVICES", "", "dst,dst", "KUBE-LOAD-BALANCER"),
    ("KUBE-LOAD-BALANCER-LOCAL", "nat", "KUBE-LOAD-BALANCER", "", "dst,dst", "RETURN"),
    ("KUBE-NODE-PORT-LOCAL-TCP", "nat", "KUBE-NODE-PORT", "tcp", "dst", "RETURN"),
    ("KUBE-NODE-PORT-TCP", "nat", "KUBE-NODE-PORT", "tcp", "dst", "KUBE-MARK-MASQ"),
    ("KUBE-NODE-PORT-LOCAL-UDP", "nat", "KUBE-NODE-PORT", "udp", "dst", "RETURN"),
    ("KUBE-NODE-PORT-UDP", "nat", "KUBE-NODE-PORT", "udp", "dst", "KUBE-MARK-MASQ"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "nat", "KUBE-NODE-PORT", "sctp", "dst,dst", "RETURN"),
    ("KUBE-NODE-PORT-SCTP-HASH", "nat", "KUBE-NODE-PORT", "sctp", "dst,dst", "KUBE-MARK-MASQ"),
    ("KUBE-LOAD-BALANCER-FW", "filter", "KUBE-PROXY-FIREWALL", "", "dst,dst",
     "KUBE-SOURCE-RANGES-FIREWALL"),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "filter", "KUBE-SOURCE-RANGES-FIREWALL", "",
     "dst,dst,src", "RETURN"),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "filter", "KUBE-SOURCE-RANGES-FIREWALL", "",
     "dst,dst,src", "RETURN"),
)
_NODE_PORT_SETS = {"tcp": ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP"),
                   "udp": ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"),
                   "sctp": ("KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH")}


def set_name(name: str, family: int) -> str:
    """The family's name of one of ``IPSETS``."""
    return name if family == 4 else "KUBE-6-" + name.removeprefix("KUBE-")


def base_set(name: str) -> str:
    """``IPSETS``' key for a family's set name."""
    return "KUBE-" + name.removeprefix("KUBE-6-") if name.startswith("KUBE-6-") else name


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
    addresses: tuple[IPAddress, ...]  # on kube-ipvs0, sorted
    services: tuple[VirtualServer, ...]  # sorted by key
    sets: tuple[IpSet, ...]  # in IPSETS order
    tables: MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]]  # table -> chain -> rules

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


def jump_rule(jump: tuple[str, str, str, str]) -> str:
    return f'-A {jump[1]} -m comment --comment "{jump[3]}" -j {jump[2]}'


def render(views: Sequence[NodeView], scheduler: str = "rr") -> IpvsRuleset:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"IPVS scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
    return IpvsRuleset(tuple(render_family(v, scheduler)
                             for v in sorted(views, key=lambda v: v.family)))


def render_family(view: NodeView, scheduler: str = "rr") -> FamilyIpvs:
    sets: dict[str, set[str]] = {name: set() for name in IPSETS}
    services: list[VirtualServer] = []
    bound: set[IPAddress] = set()
    node_ips = set(view.node_ips)
    nodeports = view.nodeports.without_localhost()  # IPVS has no localhost NodePorts
    np_addresses = view.node_ips if nodeports.match_all else nodeports.routable
    for spv in view.services:
        services += _port(spv, sets, bound, node_ips, np_addresses, scheduler)
    sets["KUBE-IPVS-IPS"] = {str(ip) for ip in bound}
    fam = view.family
    ipsets = tuple(IpSet(set_name(n, fam), IPSETS[n][0], fam, frozenset(sets[n]))
                   for n in IPSETS)
    return FamilyIpvs(fam, tuple(sorted(bound)), tuple(sorted(services, key=lambda s: s.key)),
                      ipsets, _tables(view, {n for n, e in sets.items() if e}))


def _reals(route: Route, spv: ServicePortView) -> tuple[RealServer, ...]:
    """Upstream syncEndpoint: the route's endpoints; a Local route without local
    endpoints falls back to the cluster endpoints (none when there are none at all)."""
    eps: tuple[EndpointView, ...]
    if route is Route.LOCAL:
        eps = spv.local_endpoints
    elif route is Route.REJECT:
        eps = ()
    else:  # CLUSTER, or DROP (a Local policy without local endpoints)
        eps = spv.cluster_endpoints
    return tuple(sorted({RealServer(e.ip, e.port) for e in eps}))


def _port(spv: ServicePortView, sets: dict[str, set[str]], bound: set[IPAddress],
          node_ips: set[IPAddress], np_addresses: Iterable[IPAddress], scheduler: str
          ) -> list[VirtualServer]:
    proto, port = spv.protocol, spv.port
    timeout = spv.affinity_timeout or 0
    flags = FLAG_SCHED_PORT if scheduler == "mh" else 0
    internal = _reals(spv.internal, spv)
    external = _reals(spv.external, spv)
    local_policy = spv.external_policy_local

    def vs(ip: IPAddress, p: int, reals: tuple[RealServer, ...], role: str) -> VirtualServer:
        return VirtualServer(ip, p, proto, scheduler, flags, timeout, reals, spv.name.service,
                             role)

    def entry(ip: IPAddress, p: int = port) -> str:
        return f"{ip},{proto}:{p}"

    for ep in spv.all_endpoints:  # hairpin: a local endpoint reaching itself
        if ep.local:
            sets["KUBE-LOOP-BACK"].add(f"{ep.addr},{proto}:{ep.port},{ep.addr}")
    out = [vs(spv.cluster_ip, port, internal, "cluster IP")]
    sets["KUBE-CLUSTER-IP"].add(entry(spv.cluster_ip))
    bound.add(spv.cluster_ip)
    for ip in spv.external_ips:
        sets["KUBE-EXTERNAL-IP-LOCAL" if local_policy else "KUBE-EXTERNAL-IP"].add(entry(ip))
        out.append(vs(ip, port, external, "external IP"))
        if ip not in node_ips:
            bound.add(ip)
    for ip in spv.load_balancer_ips:
        sets["KUBE-LOAD-BALANCER"].add(entry(ip))
        if local_policy:
            sets["KUBE-LOAD-BALANCER-LOCAL"].add(entry(ip))
        if spv.source_ranges:
            sets["KUBE-LOAD-BALANCER-FW"].add(entry(ip))
            for cidr in spv.source_ranges:
                sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"].add(f"{entry(ip)},{cidr}")
            if spv.firewall_allows_node:  # the node reaches its LB IP from the LB IP
                sets["KUBE-LOAD-BALANCER-SOURCE-IP"].add(f"{entry(ip)},{ip}")
        out.append(vs(ip, port, external, "load balancer IP"))
        if ip not in node_ips:
            bound.add(ip)
    if spv.node_port:
        plain, local = _NODE_PORT_SETS[proto]
        names = (plain, local) if local_policy else (plain,)
        for ip in np_addresses:
            out.append(vs(ip, spv.node_port, external, "node port"))
            for name in names:
                sets[name].add(entry(ip, spv.node_port) if proto == "sctp"
                               else str(spv.node_port))
    if spv.health_check_node_port:
        sets["KUBE-HEALTH-CHECK-NODE-PORT"].add(str(spv.health_check_node_port))
    return out


def _tables(view: NodeView, used: set[str]
            ) -> MappingProxyType[str, MappingProxyType[str, tuple[str, ...]]]:
    """The iptables rules (upstream's writeIptablesRules), given the non-empty sets."""
    fam = view.family
    nat: dict[str, list[str]] = {c: [] for c in CHAINS["nat"]}
    flt: dict[str, list[str]] = {c: [] for c in CHAINS["filter"]}
    tables = {"nat": nat, "filter": flt}

    def match(name: str, flags: str) -> str:
        return f"-m set --match-set {set_name(name, fam)} {flags}"

    def comment(name: str) -> str:
        return f'-m comment --comment "{IPSETS[name][1]}"'

    lo = "127.0.0.0/8" if fam == 4 else "::1/128"
    svc = nat["KUBE-SERVICES"]
    svc.append(f"-A KUBE-SERVICES -s {lo} -j RETURN")  # connections to localhost: not ours
    for name, table, chain, proto, flags, target in SET_RULES:
        if name in used:
            p = f"-p {proto} " if proto else ""
            tables[table][chain].append(
                f"-A {chain} {p}{comment(name)} {match(name, flags)} -j {target}")
    if "KUBE-CLUSTER-IP" in used:
        c = comment("KUBE-CLUSTER-IP")
        masq = view.cluster_ip_masquerade
        if masq is ClusterIPMasquerade.ALL:
            svc.append(f"-A KUBE-SERVICES {c} {match('KUBE-CLUSTER-IP', 'dst,dst')} "
                       "-j KUBE-MARK-MASQ")
        elif masq is ClusterIPMasquerade.NOT_LOCAL:
            svc.append(f"-A KUBE-SERVICES {_not_local(view)}{c} "
                       f"{match('KUBE-CLUSTER-IP', 'dst,dst')} -j KUBE-MARK-MASQ")
        else:  # no detector: masquerade node traffic sourced from a service IP
            svc.append(f"-A KUBE-SERVICES {c} {match('KUBE-CLUSTER-IP', 'src,dst')} "
                       "-j KUBE-MARK-MASQ")
    for name in ("KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL"):
        if name in used:
            head = f"-A KUBE-SERVICES {comment(name)} {match(name, 'dst,dst')}"
            if name == "KUBE-EXTERNAL-IP":
                svc.append(f"{head} -j KUBE-MARK-MASQ")
            svc.append(f"{head} -m addrtype --dst-type LOCAL -j ACCEPT")
    svc.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT")
    for name in ("KUBE-CLUSTER-IP", "KUBE-LOAD-BALANCER"):  # acceptIPVSTraffic
        if name in used:
            svc.append(f"-A KUBE-SERVICES {match(name, 'dst,dst')} -j ACCEPT")
    nat["KUBE-LOAD-BALANCER"].append("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    mark = f"{view.masquerade_mark:#x}"
    nat["KUBE-POSTROUTING"] += [
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --set-xmark {mark}/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully"]
    nat["KUBE-MARK-MASQ"].append(f"-A KUBE-MARK-MASQ -j MARK --set-xmark {mark}/{mark}")
    flt["KUBE-SOURCE-RANGES-FIREWALL"].append("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    for spv in view.services:  # LB IPs the node may not reach (source ranges exclude it)
        if spv.source_ranges and not spv.firewall_allows_node:
            for ip in spv.load_balancer_ips:
                flt["KUBE-IPVS-OUT-FILTER"].append(
                    f"-A KUBE-IPVS-OUT-FILTER -s {ip}/{ip.max_prefixlen} -m ipvs --vaddr "
                    f"{ip}/{ip.max_prefixlen} --vproto {_proto_number(spv.protocol)} "
                    f"--vport {spv.port} -j DROP")
    flt["KUBE-FORWARD"] += [
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark}/{mark} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    hc = "KUBE-HEALTH-CHECK-NODE-PORT"
    flt["KUBE-NODE-PORT"].append(f"-A KUBE-NODE-PORT {comment(hc)} {match(hc, 'dst')} -j ACCEPT")
    for name, flags in (("KUBE-LOAD-BALANCER", "dst,dst"), ("KUBE-CLUSTER-IP", "dst,dst"),
                        ("KUBE-EXTERNAL-IP", "dst,dst"), ("KUBE-EXTERNAL-IP-LOCAL", "dst,dst"),
                        (hc, "dst")):
        flt["KUBE-IPVS-FILTER"].append(f"-A KUBE-IPVS-FILTER {match(name, flags)} -j RETURN")
    flt["KUBE-IPVS-FILTER"].append(
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW "
        f"{match('KUBE-IPVS-IPS', 'dst')} -j REJECT --reject-with "
        + ("icmp-port-unreachable" if fam == 4 else "icmp6-port-unreachable"))
    return MappingProxyType({t: MappingProxyType({c: tuple(r) for c, r in chains.items()})
                             for t, chains in tables.items()})


def _proto_number(proto: str) -> int:
    return {"tcp": 6, "udp": 17, "sctp": 132}[proto]


def _not_local(view: NodeView) -> str:
    """How "not from a local pod" is spelled before the matches (canonical order)."""
    det = view.local_detector
    if det.cidrs:
        return f"! -s {det.cidrs[0]} "
    return f"! -i {det.interface}{'+' if det.prefix else ''} "


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
