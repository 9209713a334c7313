"""Trace one packet through the IPVS mode: netfilter hooks, ipset matches, IPVS.

Theory of operation. The packet's way through the hooks is :mod:`.netfilter`'s journey;
this module is its :class:`~kubeproxy.trace.netfilter.ChainWalker`. The iptables part
is walked by the iptables tracer's own walker (:mod:`.iptables`) over the rule text,
with two matches the generic parser does not model added here: ``-m set --match-set``
(looked up in the ipsets, by the set's type and the rule's src/dst flags) and
``-m ipvs --vaddr/--vproto/--vport`` (the virtual server a connection was scheduled by).

IPVS hooks in where the kernel hooks it, between the iptables tables:

* LOCAL_OUT (priority -99, after nat OUTPUT, before filter OUTPUT): a connection the
  node itself opens to a virtual server is scheduled here;
* LOCAL_IN (priority 98, after filter INPUT): a packet routed to a local address (a
  node IP, or one bound to ``kube-ipvs0``, which the routing here counts as local) that
  hits a virtual server is scheduled, rewritten to the real server and sent out again
  through LOCAL_OUT (filter OUTPUT) and POSTROUTING (where KUBE-POSTROUTING
  masquerades), never through FORWARD.

A virtual server forks the packet once per real server (the scheduler may pick any of
them; persistence keeps a client on one, but which one is again the scheduler's pick),
as the other tracers fork over every DNAT target. A virtual server without real
servers answers ICMP port unreachable (``ip_vs_leave``): REJECT. Both tracing entry
points read the same state: a rendered ruleset, or the text ``render``/``rules()``
print (ipvsadm-save lines, ipset save lines, iptables-save per family).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from kubeproxy.errors import TraceError
from kubeproxy.render.ipvs import IPTABLES_HEADER, IpvsRuleset, host
from kubeproxy.render.ipvs_tables import IPSETS, base_set
from kubeproxy.trace.iptables import TableWalker
from kubeproxy.trace.iptables_parse import Chain, Ruleset, parse_iptables_save
from kubeproxy.trace.iptables_rules import Match, Tri
from kubeproxy.trace.netfilter import End, Flow, Hook, HookRun, Routing, trace_journey
from kubeproxy.trace.result import IPAddress, Packet, TraceResult

_SET = re.compile(r"-m set (! )?--match-set (\S+) (\S+) ?")
_VADDR = re.compile(r"-m ipvs --vaddr (\S+) --vproto (\d+) --vport (\d+) ?")
_VS = re.compile(r"-A (-t|-u|--sctp-service) (\S+) -s (\S+)(?: -b (\S+))?(?: -p (\d+))?$")
_RS = re.compile(r"-a (-t|-u|--sctp-service) (\S+) -r (\S+) -m -w (\d+)$")
_PROTO_OPT = {"-t": "tcp", "-u": "udp", "--sctp-service": "sctp"}
_PROTO_NUM = {6: "tcp", 17: "udp", 132: "sctp"}
_SIDES: dict[str, Literal["src", "dst"]] = {"src": "src", "dst": "dst"}


@dataclass(frozen=True)
class Service:
    scheduler: str
    timeout: int
    reals: tuple[tuple[IPAddress, int, int], ...]  # (ip, port, weight)


@dataclass(frozen=True)
class State:
    """What a trace reads: addresses on kube-ipvs0, virtual servers, ipsets, iptables."""

    addresses: frozenset[IPAddress]
    services: Mapping[tuple[IPAddress, str, int], Service]
    sets: Mapping[str, tuple[str, frozenset[str]]]  # name -> (type, entries)
    iptables: Mapping[int, str]  # family -> iptables-save text


def state_of(ruleset: IpvsRuleset) -> State:
    services: dict[tuple[IPAddress, str, int], Service] = {}
    sets: dict[str, tuple[str, frozenset[str]]] = {}
    addresses: set[IPAddress] = set()
    iptables: dict[int, str] = {}
    for fam in ruleset.families:
        addresses.update(fam.addresses)
        for vs in fam.services:
            services[(vs.ip, vs.proto, vs.port)] = Service(
                vs.scheduler, vs.timeout, tuple((r.ip, r.port, r.weight) for r in vs.reals))
        for s in fam.sets:
            sets[s.name] = (s.kind, s.entries)
        iptables[fam.family] = fam.iptables_text()
    return State(frozenset(addresses), services, sets, iptables)


def parse_state(text: str) -> State:
    """The state from ``text``/``rules()`` output (see render/ipvs.py ``text``)."""
    services: dict[tuple[IPAddress, str, int], Service] = {}
    sets: dict[str, tuple[str, set[str]]] = {}
    addresses: set[IPAddress] = set()
    iptables: dict[int, list[str]] = {}
    section: list[str] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        header = next((f for f in (4, 6)
                       if line.startswith(IPTABLES_HEADER.format(family=f))), None)
        if header is not None:
            section = iptables.setdefault(header, [])
            continue
        if section is not None:
            section.append(raw)
            continue
        try:
            _state_line(line, services, sets, addresses)
        except (ValueError, KeyError) as err:
            raise TraceError(f"line {n}: cannot read {line!r}: {err}") from None
    return State(frozenset(addresses), services,
                 {k: (t, frozenset(e)) for k, (t, e) in sets.items()},
                 {f: "\n".join(lines) + "\n" for f, lines in iptables.items()})


def _state_line(line: str, services: dict[tuple[IPAddress, str, int], Service],
                sets: dict[str, tuple[str, set[str]]], addresses: set[IPAddress]) -> None:
    if not line or line.startswith("#"):
        return
    words = line.split()
    if words[0] == "addr":
        addresses.add(ipaddress.ip_address(words[1]))
    elif words[0] == "create":
        sets[words[1]] = (words[2], set())
    elif words[0] == "add":
        sets[words[1]][1].add(words[2])
    elif (m := _VS.match(line)) is not None:
        ip, port = _split_host(m.group(2))
        services[(ip, _PROTO_OPT[m.group(1)], port)] = Service(m.group(3), int(m.group(5) or 0),
                                                               ())
    elif (m := _RS.match(line)) is not None:
        ip, port = _split_host(m.group(2))
        key = (ip, _PROTO_OPT[m.group(1)], port)
        rip, rport = _split_host(m.group(3))
        old = services[key]
        services[key] = replace(old, reals=(*old.reals, (rip, rport, int(m.group(4)))))
    else:
        raise ValueError("not an address, ipset or IPVS line")


def _split_host(text: str) -> tuple[IPAddress, int]:
    addr, _, port = text.rpartition(":")
    return ipaddress.ip_address(addr.strip("[]")), int(port)


def trace_ipvs(ruleset: IpvsRuleset, packet: Packet, local: frozenset[IPAddress]
               ) -> TraceResult:
    return trace_state(state_of(ruleset), packet, local)


def trace_text(text: str, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    return trace_state(parse_state(text), packet, local)


def trace_state(state: State, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    family = packet.dst.version
    rules = state.iptables.get(family)
    if rules is None:
        return TraceResult("ACCEPT", (), False, (), (
            f"packet {packet.describe()}",
            f"no IPv{family} rules were rendered: the packet is not touched"))
    bound = frozenset(a for a in state.addresses if a.version == family)
    routing = Routing(local | bound)
    walker = _IpvsWalker(state, _extend(rules, state, packet), routing)
    result = trace_journey(walker, packet, routing)
    if bound:
        note = f"kube-ipvs0 holds {len(bound)} IPv{family} service addresses (local to routing)"
        result = replace(result, explanation=(note, *result.explanation))
    return result


# --- matches the iptables parser does not model ------------------------------------------


@dataclass(frozen=True, eq=False)
class SetMatch(Match):
    """``-m set [!] --match-set NAME FLAGS``: is the packet's tuple in the ipset?"""

    name: str
    kind: str
    entries: frozenset[str]
    flags: tuple[Literal["src", "dst"], ...]
    negated: bool

    def test(self, flow: Flow) -> Tri:
        found = self._member(flow)
        return Tri.YES if found is not self.negated else Tri.NO

    def _member(self, flow: Flow) -> bool:
        dims = self.kind.split(":")[1].split(",")
        if len(self.flags) < len(dims):
            raise TraceError(f"set {self.name} ({self.kind}) needs {len(dims)} flags")
        parts: list[str] = []
        for dim, flag in zip(dims, self.flags, strict=False):
            ip = flow.src if flag == "src" else flow.dst
            if dim == "ip":
                parts.append(str(ip))
            elif dim == "port":
                port = flow.sport if flag == "src" else flow.dport
                parts.append(str(port) if self.kind == "bitmap:port"
                             else f"{flow.proto}:{port}")
            else:  # net: the entries' networks are tested one by one below
                parts.append(str(ip))
        if dims[-1] != "net":
            return ",".join(parts) in self.entries
        head, addr = ",".join(parts[:-1]), ipaddress.ip_address(parts[-1])
        for entry in self.entries:
            prefix, _, net = entry.rpartition(",")
            if prefix == head and addr in ipaddress.ip_network(net, strict=False):
                return True
        return False

    def describe(self) -> str:
        what = ",".join(self.flags)
        return f"{'not ' if self.negated else ''}({what}) in set {self.name}"


@dataclass(frozen=True, eq=False)
class VirtualServerMatch(Match):
    """``-m ipvs --vaddr A --vproto P --vport N``: scheduled by that virtual server."""

    vaddr: ipaddress.IPv4Network | ipaddress.IPv6Network
    proto: str
    port: int
    original: Packet  # the traced packet: its destination is the virtual server used

    def test(self, flow: Flow) -> Tri:
        o = self.original
        hit = (flow.dnat and o.dst in self.vaddr and o.proto == self.proto
               and o.port == self.port)
        return Tri.YES if hit else Tri.NO

    def describe(self) -> str:
        return f"ipvs virtual server {self.proto} {self.vaddr}:{self.port}"


class _Extended(Ruleset):
    """A parsed ruleset whose rules get the set / ipvs matches back; ``tables`` limits
    what it shows (to run nat and filter of one hook apart, with IPVS in between)."""

    def __init__(self, inner: Ruleset, extra: dict[int, tuple[Match, ...]],
                 lines: list[str], tables: frozenset[str]) -> None:
        self._inner, self._extra, self._text, self._shown = inner, extra, lines, tables
        self._chains: dict[tuple[str, str], Chain] = {}

    def only(self, tables: frozenset[str]) -> _Extended:
        return _Extended(self._inner, self._extra, self._text, tables)

    def table_names(self) -> tuple[str, ...]:
        return tuple(t for t in self._inner.table_names() if t in self._shown)

    def chain_names(self, table: str) -> tuple[str, ...]:
        return self._inner.chain_names(table) if table in self._shown else ()

    def chain(self, table: str, name: str) -> Chain | None:
        if table not in self._shown:
            return None
        found = self._chains.get((table, name))
        if found is None:
            chain = self._inner.chain(table, name)
            if chain is None:
                return None
            rules = tuple(replace(r, matches=(*r.matches, *self._extra[r.line]),
                                  text=self._text[r.line - 1].strip())
                          if r.line in self._extra else r for r in chain.rules)
            found = self._chains[(table, name)] = replace(chain, rules=rules)
        return found

    def check(self) -> None:
        self._inner.check()


def _extend(text: str, state: State, packet: Packet) -> _Extended:
    lines = text.splitlines()
    stripped, extra = [], {}
    for n, line in enumerate(lines, 1):
        matches: list[Match] = []
        if "--match-set" in line:
            for m in _SET.finditer(line):
                name, flags = m.group(2), tuple(m.group(3).split(","))
                if name not in state.sets or base_set(name) not in IPSETS:
                    raise TraceError(f"line {n}: the rule matches set {name}, which does "
                                     f"not exist: {line}")
                sides = tuple(_SIDES[f] for f in flags if f in _SIDES)
                if len(sides) != len(flags):
                    raise TraceError(f"line {n}: set flags {m.group(3)!r}: {line}")
                kind, entries = state.sets[name]
                matches.append(SetMatch(name, kind, entries, sides, bool(m.group(1))))
            line = _SET.sub("", line)
        if "-m ipvs " in line:
            for m in _VADDR.finditer(line):
                matches.append(VirtualServerMatch(
                    ipaddress.ip_network(m.group(1), strict=False),
                    _PROTO_NUM[int(m.group(2))], int(m.group(3)), packet))
            line = _VADDR.sub("", line)
        if matches:
            extra[n] = tuple(matches)
        stripped.append(line)
    inner = parse_iptables_save("\n".join(stripped) + "\n")
    return _Extended(inner, extra, lines, frozenset({"filter", "nat", "mangle"}))


# --- the walker -----------------------------------------------------------------------------


class _IpvsWalker:
    """The iptables tables with IPVS hooked in at LOCAL_OUT and LOCAL_IN."""

    def __init__(self, state: State, rules: _Extended, routing: Routing) -> None:
        self.state, self.routing = state, routing
        self.all = TableWalker(rules, routing)
        self.nat = TableWalker(rules.only(frozenset({"nat"})), routing)
        self.filter = TableWalker(rules.only(frozenset({"filter"})), routing)

    def run_hook(self, hook: Hook, flow: Flow, nat: bool) -> HookRun:
        if hook == "output":
            return self._output(flow, nat)
        if hook == "input":
            return self._input(flow, nat)
        return self.all.run_hook(hook, flow, nat)

    def _output(self, flow: Flow, nat: bool) -> HookRun:
        acc = _Acc()
        for f in acc.take(self.nat.run_hook("output", flow, nat)):
            for g in acc.take_ipvs(self._schedule(f, "LOCAL_OUT") if nat else None, f):
                acc.add(self.filter.run_hook("output", g, nat))
        return acc.run()

    def _input(self, flow: Flow, nat: bool) -> HookRun:
        acc = _Acc()
        for f in acc.take(self.all.run_hook("input", flow, nat)):
            scheduled = self._schedule(f, "LOCAL_IN") if nat and not f.dnat else None
            if scheduled is None:  # not a virtual server: delivered to this node
                acc.exits.append(("accept", f))
                continue
            for g in acc.take_ipvs(scheduled, f):
                acc.lines.append("IPVS sends the rewritten packet out: LOCAL_OUT (filter "
                                 "OUTPUT), POSTROUTING")
                for h in acc.take(self.filter.run_hook("output", g, False)):
                    acc.add(self.all.run_hook("postrouting", h, True))
        return acc.run()

    def _schedule(self, flow: Flow, where: str) -> tuple[list[str], list[Flow] | None] | None:
        """IPVS at ``where``: None if no virtual server; else (lines, forks or None for
        ICMP port unreachable)."""
        vs = self.state.services.get((flow.dst, flow.proto, flow.dport))
        if vs is None:
            return None
        front = f"{flow.proto} {host(flow.dst, flow.dport)}"
        how = f"scheduler {vs.scheduler}" + (
            f", persistence {vs.timeout}s" if vs.timeout else "")
        usable = [(ip, port) for ip, port, weight in vs.reals if weight > 0]
        if not usable:
            return ([f"IPVS {where}: virtual server {front} has no real servers: ICMP port "
                     "unreachable (ip_vs_leave)"], None)
        targets = ", ".join(host(ip, port) for ip, port in usable)
        lines = [f"IPVS {where}: virtual server {front} ({how}) picks one of {len(usable)} "
                 f"real servers (masquerade forwarding): {targets}"]
        return lines, [self.routing.dnat(flow, ip, port) for ip, port in usable]


class _Acc:
    """One hook's exits, explanation and chains, gathered over its parts."""

    def __init__(self) -> None:
        self.exits: list[tuple[End, Flow]] = []
        self.lines: list[str] = []
        self.chains: dict[str, None] = {}

    def add(self, run: HookRun) -> None:
        self.exits.extend(run.exits)
        self.lines.extend(run.lines)
        self.chains.update(dict.fromkeys(run.chains))

    def take(self, run: HookRun) -> list[Flow]:
        """Record a run's ends and lines; return the flows it accepted."""
        self.lines.extend(run.lines)
        self.chains.update(dict.fromkeys(run.chains))
        self.exits.extend(e for e in run.exits if e[0] != "accept")
        return [f for end, f in run.exits if end == "accept"]

    def take_ipvs(self, scheduled: tuple[list[str], list[Flow] | None] | None, flow: Flow
                  ) -> list[Flow]:
        if scheduled is None:
            return [flow]
        lines, forks = scheduled
        self.lines.extend(lines)
        self.chains.setdefault(f"IPVS {flow.proto} {host(flow.dst, flow.dport)}")
        if forks is None:
            self.exits.append(("reject", flow))
            return []
        return forks

    def run(self) -> HookRun:
        return HookRun(tuple(self.exits), tuple(self.lines), tuple(self.chains))
