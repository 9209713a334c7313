"""Trace one packet through an nftables script: where does it go, and why.

Theory of operation. The script is parsed generically (:mod:`kubeproxy.render.nft_parse`)
into chains, sets and maps with their elements; the tracer then plays the kernel for the
first packet of a NEW connection, in the table of the packet's family:

* locally originated (the source is a local or loopback address): the ``output`` base
  chains in priority order (filter -110, nat -100, filter -90), then ``postrouting``; if
  the destination (after DNAT) is local, the packet then comes back in on ``lo`` through
  the filter chains of ``prerouting`` and ``input`` (NAT is decided once per connection,
  so the nat chains do not run again);
* otherwise: ``prerouting`` (filter, then nat), routing on the possibly DNATed
  destination, ``input`` if it is local (delivered: no postrouting), else ``forward``
  then ``postrouting``.

Inside a base chain the walk is nftables': rules in order; ``jump`` returns, ``goto``
returns to the caller's caller; ``return`` or the end of a regular chain resumes the
caller; the end of a base chain is its policy (accept). ``accept`` ends the base chain,
``drop``/``reject`` end the packet; ``dnat`` and ``masquerade`` end the nat chain. A vmap
or map lookup that finds nothing does nothing.

Branches: ``numgen`` with a modulus above 1 takes every value, and membership of a
dynamic set (session affinity) may go either way, so the walk forks; identical branches
are explored once. ``numgen ... mod 1`` is a constant and does not fork.

Merging, as the iptables tracer does: the endpoints are the DNAT destinations of every
delivered branch, masquerade is true if any delivered branch is masqueraded, the path
lists the regular chains in the order first entered, and if branches disagree on the
verdict the most permissive wins (DNAT > ACCEPT > REJECT > DROP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

from kubeproxy.render.nft_ir import (
    CT_STATES,
    CT_STATUS,
    FIB_ADDRTYPES,
    Chain,
    Cmp,
    Dnat,
    DnatMap,
    Element,
    Expr,
    Field,
    Item,
    Key,
    MarkSet,
    Masquerade,
    Numgen,
    Reject,
    Rule,
    SetMatch,
    Update,
    Value,
    Verdict,
    VMap,
)
from kubeproxy.render.nft_parse import ScriptError, Table, parse_script
from kubeproxy.trace.result import (
    IPAddress,
    Packet,
    TraceError,
    TraceLimitError,
    TraceResult,
    format_endpoint,
)

_MAX_STEPS = 200_000
_MAX_DEPTH = 16
_MAX_FORK = 4096
Outcome = Literal["return", "accept", "drop", "reject"]
_RANK = {"DNAT": 3, "ACCEPT": 2, "REJECT": 1, "DROP": 0}


@dataclass(frozen=True, slots=True)
class Flow:
    """One branch's view of the packet."""

    src: IPAddress
    dst: IPAddress
    proto: str
    dport: int
    iif: str  # "" for locally originated packets
    mark: int = 0
    dnat: bool = False  # conntrack status DNAT
    endpoint: str | None = None
    masquerade: bool = False


def trace_nftables(script: str, packet: Packet,
                   local_addresses: frozenset[IPAddress]) -> TraceResult:
    """Follow ``packet`` through the ``kube-proxy`` table of its family in ``script``."""
    try:
        tables = parse_script(script)
    except (ScriptError, ValueError) as err:
        raise TraceError(f"cannot read the nftables script: {err}") from err
    family = "ip" if packet.dst.version == 4 else "ip6"
    table = tables.get((family, "kube-proxy"))
    if table is None:  # nothing of ours in this family: the kernel lets it through
        return TraceResult("ACCEPT", (), False, (), (
            f"packet {packet.describe()}",
            f"there is no {family} kube-proxy table: the packet is not touched"))
    return _Tracer(table, local_addresses).trace(packet)


class _Tracer:
    def __init__(self, table: Table, local: frozenset[IPAddress]) -> None:
        self.table = table
        self.local = local
        self.steps = 0
        self.path: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.maps: dict[str, dict[tuple[Value, ...], Element]] = {
            name: {e.key: e for e in elems} for name, elems in table.elements.items()}

    # -- hooks --------------------------------------------------------------------

    def trace(self, packet: Packet) -> TraceResult:
        local_out = self.is_local(packet.src)
        flow = Flow(packet.src, packet.dst, packet.proto, packet.port,
                    "" if local_out else packet.in_interface)
        self.note(f"packet {packet.describe()}"
                  + (", sent by this node" if local_out else f", arriving on {flow.iif}"))
        self.finals: list[tuple[str, Flow]] = []
        self.journey(flow, local_out)
        return self.merge(self.finals)

    def journey(self, flow: Flow, local_out: bool) -> None:
        if local_out:
            for f in self.hook("output", flow, nat=True):
                for g in self.hook("postrouting", f, nat=True):
                    if not self.is_local(g.dst):
                        self.finals.append(("delivered", g))
                        continue
                    self.note(f"{g.dst} is local: the packet comes back in on lo")
                    for h in self.hook("prerouting", replace(g, iif="lo"), nat=False):
                        self.finals.extend(("delivered", k)
                                           for k in self.hook("input", h, nat=False))
            return
        for f in self.hook("prerouting", flow, nat=True):
            if self.is_local(f.dst):
                self.note(f"{f.dst} is local: input")
                self.finals.extend(("delivered", g) for g in self.hook("input", f, nat=True))
            else:
                self.note(f"{f.dst} is not local: forward")
                for g in self.hook("forward", f, nat=True):
                    self.finals.extend(("delivered", h)
                                       for h in self.hook("postrouting", g, nat=True))

    def hook(self, hook: str, flow: Flow, nat: bool) -> list[Flow]:
        """The flows that leave ``hook``; the dropped and rejected ones become finals."""
        chains = sorted((c for c in self.table.chains.values()
                         if c.hook is not None and c.hook.hook == hook
                         and (nat or c.hook.type != "nat")),
                        key=lambda c: (c.hook.priority if c.hook else 0, c.name))
        flows = [flow]
        for chain in chains:
            nxt: list[Flow] = []
            for f in flows:
                for outcome, g in self.run(chain, f, 0):
                    if outcome in ("drop", "reject"):
                        self.finals.append((outcome, g))
                    else:
                        nxt.append(g)
            flows = list(dict.fromkeys(nxt))
        return flows

    # -- chains -------------------------------------------------------------------

    def run(self, chain: Chain, flow: Flow, depth: int) -> list[tuple[Outcome, Flow]]:
        if depth > _MAX_DEPTH:
            raise TraceLimitError(f"more than {_MAX_DEPTH} nested jumps at {chain.name}")
        if chain.hook is None:
            self.path.setdefault(chain.name, None)
        out: list[tuple[Outcome, Flow]] = []
        live = [flow]
        for rule in chain.rules:
            nxt: list[Flow] = []
            for f in live:
                for outcome, g in self.rule(chain, rule, f, depth):
                    if outcome == "next":
                        nxt.append(g)
                    else:
                        out.append((outcome, g))  # type: ignore[arg-type]
            live = list(dict.fromkeys(nxt))
            if not live:
                break
        out.extend(("return", f) for f in live)
        if chain.hook is not None:  # a base chain's end is its policy
            out = [("accept" if o == "return" else o, f) for o, f in out]
        return list(dict.fromkeys(out))

    def rule(self, chain: Chain, rule: Rule, flow: Flow,
             depth: int) -> Iterator[tuple[str, Flow]]:
        """("next", flow) to go on in this chain, or a chain outcome."""
        self.steps += 1
        if self.steps > _MAX_STEPS:
            raise TraceLimitError(f"more than {_MAX_STEPS} rule evaluations")
        branches = [flow]
        for i, item in enumerate(rule.items):
            if not isinstance(item, Cmp | SetMatch):
                for f in branches:
                    yield from self.statements(chain, rule, rule.items[i:], f, depth)
                return
            outcomes = self.test(item, flow)
            if False in outcomes:
                yield "next", flow
            if True not in outcomes:
                return
        yield from (("next", f) for f in branches)

    def statements(self, chain: Chain, rule: Rule, items: tuple[Item, ...], flow: Flow,
                   depth: int) -> Iterator[tuple[str, Flow]]:
        if not items:
            yield "next", flow
            return
        item, rest = items[0], items[1:]
        where = f"{chain.name}: {rule.text()}"
        if isinstance(item, Cmp | SetMatch):  # a match after a statement
            if any(self.test(item, flow)):
                yield from self.statements(chain, rule, rest, flow, depth)
            else:
                yield "next", flow
            return
        if isinstance(item, Verdict):
            yield from self.verdict(where, item, flow, depth)
        elif isinstance(item, VMap):
            found = self.lookup(item.map, self.key_values(item.key, flow))
            if not found:
                yield "next", flow
                return
            for elem in found:
                assert isinstance(elem.data, Verdict)
                yield from self.verdict(f"{where} ({_key_text(elem)})", elem.data, flow, depth)
        elif isinstance(item, Reject):
            self.note(f"{where} -> reject")
            yield "reject", flow
        elif isinstance(item, MarkSet):
            mark = flow.mark | item.value if item.op == "|" else flow.mark ^ item.value
            yield from self.statements(chain, rule, rest, replace(flow, mark=mark), depth)
        elif isinstance(item, Update):
            yield from self.statements(chain, rule, rest, flow, depth)
        elif isinstance(item, Masquerade):
            self.note(f"{where} -> masquerade")
            yield "accept", replace(flow, masquerade=True)
        elif isinstance(item, Dnat):
            yield "accept", self.dnat(where, flow, item.addr, item.port)
        elif isinstance(item, DnatMap):
            values = self.key_values(item.key, flow)
            found = self.lookup(item.map, values)
            if not found:
                self.note(f"{where}: no endpoint found")
                yield "next", flow
            for elem in found:
                addr, port = elem.data  # type: ignore[misc]
                assert isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
                assert isinstance(port, int)
                yield "accept", self.dnat(f"{where} (slot {elem.key[-1]})", flow, addr, port)
        else:  # pragma: no cover - the parser makes nothing else
            raise TraceError(f"{where}: cannot trace {item!r}")

    def verdict(self, where: str, v: Verdict, flow: Flow,
                depth: int) -> Iterator[tuple[str, Flow]]:
        if v.kind in ("accept", "drop", "return"):
            self.note(f"{where} -> {v.kind}")
            yield v.kind, flow
            return
        assert v.chain is not None
        target = self.table.chains.get(v.chain)
        if target is None:
            raise TraceError(f"{where}: {v.kind} to a missing chain {v.chain}")
        self.note(f"{where} -> {v.kind} {v.chain}")
        for outcome, f in self.run(target, flow, depth + 1):
            if outcome == "return" and v.kind == "jump":
                yield "next", f
            else:
                yield outcome, f

    def dnat(self, where: str, flow: Flow, addr: IPAddress, port: int) -> Flow:
        ep = format_endpoint(addr, port)
        self.note(f"{where} -> DNAT to {ep}")
        return replace(flow, dst=addr, dport=port, dnat=True, endpoint=ep)

    # -- matches ------------------------------------------------------------------

    def test(self, item: Cmp | SetMatch, flow: Flow) -> list[bool]:
        """The possible outcomes of one match: [True], [False] or both."""
        if isinstance(item, SetMatch):
            if item.set in self.table.dynamic:
                return [True, False]  # the kernel fills it (session affinity)
            found = bool(self.lookup(item.set, self.key_values(item.key, flow)))
            return [found != item.negate]
        if isinstance(item.expr, Numgen) and item.expr.mod > 1:
            return [True, False]
        values = self.value(item.expr, flow)
        if len(values) != 1:
            raise TraceError(f"cannot compare {item.text()}")
        have = values[0]
        if have is None:
            return [False]  # the field does not exist for this packet
        if item.mask is not None:
            assert isinstance(have, int)
            ok = (have & item.mask) == item.value
        else:
            ok = _equal(item.expr, have, item.value)
        return [ok != item.negate]

    def key_values(self, key: Key, flow: Flow) -> list[tuple[Value, ...]]:
        combos: list[tuple[Value, ...]] = [()]
        for expr in key:
            vals = self.value(expr, flow)
            combos = [(*c, v) for c in combos for v in vals if v is not None]
            if len(combos) > _MAX_FORK:
                raise TraceLimitError("too many numgen values")
        return combos

    def value(self, expr: Expr, flow: Flow) -> list[Value | None]:
        if isinstance(expr, Numgen):
            return list(range(expr.offset, expr.offset + expr.mod))
        name = expr.name
        if name.endswith(" saddr") and not name.startswith("fib"):
            return [flow.src]
        if name.endswith(" daddr") and not name.startswith("fib"):
            return [flow.dst]
        if name == "th dport":
            return [flow.dport]
        if name in ("tcp dport", "udp dport", "sctp dport"):
            return [flow.dport if name.startswith(flow.proto) else None]
        if name == "meta l4proto":
            return [flow.proto]
        if name == "iifname":
            return [flow.iif]
        if name == "meta mark":
            return [flow.mark]
        if name == "ct state":
            return ["new"]
        if name == "ct status":
            return ["dnat" if flow.dnat else ""]
        if name == "fib saddr type":
            return ["local" if self.is_local(flow.src) else "unicast"]
        if name == "fib daddr type":
            return ["local" if self.is_local(flow.dst) else "unicast"]
        raise TraceError(f"cannot trace field {name}")  # pragma: no cover

    def lookup(self, name: str, keys: list[tuple[Value, ...]]) -> list[Element]:
        if name not in self.table.sets:
            raise TraceError(f"reference to a missing set or map @{name}")
        elems = self.maps.get(name, {})
        return [elems[k] for k in keys if k in elems]

    # -- helpers ------------------------------------------------------------------

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self.local or ip.is_loopback

    def note(self, text: str) -> None:
        self.notes.setdefault(text, None)

    def merge(self, finals: list[tuple[str, Flow]]) -> TraceResult:
        verdicts = []
        endpoints: set[str] = set()
        masq = False
        for outcome, f in finals:
            if outcome == "delivered":
                verdicts.append("DNAT" if f.endpoint else "ACCEPT")
                if f.endpoint:
                    endpoints.add(f.endpoint)
                masq = masq or f.masquerade
            else:
                verdicts.append(outcome.upper())
        if not verdicts:
            raise TraceError("the packet took no path")
        verdict = max(verdicts, key=lambda v: _RANK[v])
        lines = list(self.notes)
        if len(set(verdicts)) > 1:
            lines.append(f"branches end in {', '.join(sorted(set(verdicts)))}; "
                         f"the most permissive ({verdict}) is reported")
        if verdict != "DNAT":
            endpoints = set()
        return TraceResult(verdict, tuple(sorted(endpoints)), masq and verdict != "DROP",  # type: ignore[arg-type]
                           tuple(self.path), tuple(lines))


def _equal(expr: Expr, have: Value, want: Value) -> bool:
    if isinstance(want, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return isinstance(have, ipaddress.IPv4Address | ipaddress.IPv6Address) and \
            have.version == want.version and have in want
    if isinstance(expr, Field) and expr.name == "iifname" and isinstance(want, str):
        assert isinstance(have, str)
        return have.startswith(want[:-1]) if want.endswith("*") else have == want
    if isinstance(expr, Field) and expr.name in ("ct state", "ct status"):
        table = CT_STATES if expr.name == "ct state" else CT_STATUS
        if want not in table:
            raise TraceError(f"unknown {expr.name} {want}")
        return have == want
    if isinstance(expr, Field) and expr.name.startswith("fib") and want not in FIB_ADDRTYPES:
        raise TraceError(f"unknown address type {want}")
    return have == want


def _key_text(elem: Element) -> str:
    return " . ".join(str(v) for v in elem.key)
