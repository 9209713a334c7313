"""Trace one packet through an nftables script: where does it go, and why.

Theory of operation. The script is parsed generically (:mod:`kubeproxy.render.nft_parse`)
into chains, sets and maps with their elements, and the packet is followed through the
``kube-proxy`` table of its family. Its way through the hooks (prerouting, routing,
input / forward, postrouting; output for packets the node sends, and back in on ``lo``
when it sends them to itself) and how branches merge into one answer are
:mod:`.netfilter`'s, shared with the iptables tracer. This module is the nftables
:class:`~kubeproxy.trace.netfilter.ChainWalker`: for each hook it runs the table's base
chains on that hook in priority order (e.g. output: filter -110, nat -100, filter -90);
when the connection's NAT is already decided (a packet coming back in on ``lo``), the
chains of type nat are skipped.

Inside a base chain the walk is nftables': rules in order; ``jump`` returns, ``goto``
returns to the caller's caller; ``return`` or the end of a regular chain resumes the
caller; the end of a base chain is its policy (accept). ``accept`` ends the base chain,
``drop``/``reject`` end the packet; ``dnat`` and ``masquerade`` end the nat chain. A vmap
or map lookup that finds nothing does nothing. ``iifname`` of a packet the node sends
is the empty string, as the kernel reads it.

Branches: ``numgen`` with a modulus above 1 takes every value, and membership of a
dynamic set (session affinity) may go either way, so the walk forks; identical branches
are explored once. ``numgen ... mod 1`` is a constant and does not fork.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import replace
from typing import Literal

from kubeproxy.errors import TraceError
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
from kubeproxy.trace.netfilter import End, Flow, Hook, HookRun, Routing, trace_journey
from kubeproxy.trace.result import IPAddress, Packet, TraceLimitError, TraceResult, format_endpoint

_MAX_STEPS = 200_000
_MAX_DEPTH = 16
_MAX_FORK = 4096
Outcome = Literal["return", "accept", "drop", "reject"]


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
    routing = Routing(local_addresses)
    return trace_journey(_Walker(table, routing), packet, routing)


class _Walker:
    """The base chains of one table, walked one hook at a time (a ChainWalker)."""

    def __init__(self, table: Table, routing: Routing) -> None:
        self.table = table
        self.routing = routing
        self.steps = 0
        self.path: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.maps: dict[str, dict[tuple[Value, ...], Element]] = {
            name: {e.key: e for e in elems} for name, elems in table.elements.items()}

    # -- hooks --------------------------------------------------------------------

    def run_hook(self, hook: Hook, flow: Flow, nat: bool) -> HookRun:
        """Every base chain on ``hook`` in priority order (type nat only if ``nat``)."""
        self.path, self.notes = {}, {}
        chains = sorted((c for c in self.table.chains.values()
                         if c.hook is not None and c.hook.hook == hook
                         and (nat or c.hook.type != "nat")),
                        key=lambda c: (c.hook.priority if c.hook else 0, c.name))
        ended: list[tuple[End, Flow]] = []
        flows = [flow]
        for chain in chains:
            nxt: list[Flow] = []
            for f in flows:
                for outcome, g in self.run(chain, f, 0):
                    if outcome == "drop" or outcome == "reject":
                        ended.append((outcome, g))
                    else:
                        nxt.append(g)
            flows = list(dict.fromkeys(nxt))
        exits = (*ended, *(("accept", f) for f in flows))
        return HookRun(exits, tuple(self.notes), tuple(self.path))

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
        self.note(f"{where} -> DNAT to {format_endpoint(addr, port)}")
        return self.routing.dnat(flow, addr, port)

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
            return [flow.in_interface or ""]
        if name == "meta mark":
            return [flow.mark]
        if name == "ct state":
            return ["new"]
        if name == "ct status":
            return ["dnat" if flow.dnat else ""]
        if name == "fib saddr type":
            return ["local" if flow.src_local else "unicast"]
        if name == "fib daddr type":
            return ["local" if flow.dst_local else "unicast"]
        raise TraceError(f"cannot trace field {name}")  # pragma: no cover

    def lookup(self, name: str, keys: list[tuple[Value, ...]]) -> list[Element]:
        if name not in self.table.sets:
            raise TraceError(f"reference to a missing set or map @{name}")
        elems = self.maps.get(name, {})
        return [elems[k] for k in keys if k in elems]

    # -- helpers ------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.setdefault(text, None)


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
