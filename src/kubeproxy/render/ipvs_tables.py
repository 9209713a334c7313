"""IPVS mode's ipsets and iptables layout, and the iptables rules around IPVS. Pure.

Theory of operation
-------------------
Upstream's IPVS proxier keeps the per-service state in IPVS and in ipsets; iptables
only holds a few fixed chains that match on the sets (pkg/proxy/ipvs/proxier.go
``writeIptablesRules``). This module is that layout as literal tables, one row per set,
chain, jump and set rule, and :func:`tables`, which writes the chains for one family
given which sets are non-empty and the ``KUBE-IPVS-OUT-FILTER`` rules (the only
per-service lines). render/ipvs.py renders the sets' entries and the virtual servers;
the data plane writes these chains with ``iptables-restore --noflush``.
"""

from __future__ import annotations

from types import MappingProxyType

from kubeproxy.nodeview import ClusterIPMasquerade, NodeView

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


def set_name(name: str, family: int) -> str:
    """The family's name of one of ``IPSETS``."""
    return name if family == 4 else "KUBE-6-" + name.removeprefix("KUBE-")


def base_set(name: str) -> str:
    """``IPSETS``' key for a family's set name."""
    return "KUBE-" + name.removeprefix("KUBE-6-") if name.startswith("KUBE-6-") else name




def jump_rule(jump: tuple[str, str, str, str]) -> str:
    return f'-A {jump[1]} -m comment --comment "{jump[3]}" -j {jump[2]}'


def tables(view: NodeView, used: frozenset[str], out_filter: tuple[str, ...]
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
    flt["KUBE-IPVS-OUT-FILTER"] += out_filter
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


def proto_number(proto: str) -> int:
    return {"tcp": 6, "udp": 17, "sctp": 132}[proto]


def _not_local(view: NodeView) -> str:
    """How "not from a local pod" is spelled before the matches (canonical order)."""
    det = view.local_detector
    if det.cidrs:
        return f"! -s {det.cidrs[0]} "
    return f"! -i {det.interface}{'+' if det.prefix else ''} "
