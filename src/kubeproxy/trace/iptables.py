"""Trace one packet through an iptables ruleset: where does it go, and why.

Theory of operation. The ruleset text is parsed generically (:mod:`.iptables_parse`):
every rule becomes matches and a target, with no idea of what a renderer meant, so a
renderer bug shows up as a wrong answer instead of being papered over. Chains are parsed
when the trace first enters them, so tracing through a huge dump stays cheap.

The packet's way through the hooks (prerouting, routing, input / forward, postrouting;
output for packets the node sends, and back in on ``lo`` when it sends them to itself) is
:mod:`.netfilter`'s, shared with the nftables tracer. This module is the iptables
:class:`~kubeproxy.trace.netfilter.ChainWalker`: for each hook it runs the builtin chains
of ``HOOK_TABLES`` (:mod:`.iptables_parse`) in order: mangle then nat in PREROUTING,
filter in INPUT and FORWARD, nat then filter in OUTPUT, nat in POSTROUTING; the parser
refuses rules in any other builtin chain, since the trace would silently skip them. When
the connection's NAT is already decided (a packet coming back in on ``lo``), the nat
table is skipped. A missing chain is empty with an ACCEPT policy.

Inside a table the walk is iptables' own: rules in order, ``-j`` returns, ``-g`` returns
to the caller's caller, RETURN or falling off a user chain resumes the caller, falling
off a builtin chain applies its policy. DROP and REJECT end the packet; ACCEPT ends the
table for this hook; DNAT, SNAT and MASQUERADE end the nat table for this hook. DNAT
rewrites destination and port (and so the route), so later hooks see the endpoint and
conntrack status DNAT; MASQUERADE / SNAT mark the branch as masqueraded.

Branches: ``statistic`` (random with probability below 1, nth with every above 1) and
``recent`` (--rcheck / --update) matches may go either way, so the walk forks and
explores both outcomes depth-first. Identical branches (same position, same packet
state) are explored once, which keeps the usual kube-proxy chains linear; the walk still
stops with :class:`TraceLimitError` past ``_MAX_STEPS`` steps or ``_MAX_DEPTH`` nested
jumps, and refuses a jump into a chain it is already inside (a loop, which the kernel
would refuse too) with a :class:`RulesetParseError` naming the line. How branches merge
into one answer is :mod:`.netfilter`'s too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, TypeAlias

from kubeproxy.errors import TraceError
from kubeproxy.trace.iptables_parse import (
    HOOK_TABLES,
    Chain,
    Ruleset,
    RulesetParseError,
    parse_iptables_save,
)
from kubeproxy.trace.iptables_rules import (
    Dnat,
    Jump,
    NoOp,
    Rule,
    SetMark,
    SourceNat,
    Standard,
    Tri,
)
from kubeproxy.trace.netfilter import End, Flow, Hook, HookRun, Routing, trace_journey
from kubeproxy.trace.result import IPAddress, Packet, TraceLimitError, TraceResult

__all__ = [
    "Ruleset",
    "RulesetParseError",
    "parse_iptables_save",
    "trace_iptables",
    "trace_ruleset",
]

# Hooks a target may be reached from; iptables-restore refuses a ruleset that does otherwise.
_TARGET_HOOKS: dict[str, frozenset[str]] = {
    "DNAT": frozenset({"PREROUTING", "OUTPUT"}),
    "SNAT": frozenset({"POSTROUTING", "INPUT"}),
    "MASQUERADE": frozenset({"POSTROUTING"}),
    "REJECT": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}
_MAX_STEPS = 100_000  # chains entered plus branches explored, per trace
_MAX_DEPTH = 64  # nested jumps

# How a walk through a chain ends: fell off / RETURN (resume the caller), or a verdict.
# NAT means a DNAT / SNAT / MASQUERADE ended the nat table for this hook.
_End: TypeAlias = Literal["CONTINUE", "ACCEPT", "DROP", "REJECT", "NAT"]
_Exit: TypeAlias = tuple[Flow, _End]
_Pending: TypeAlias = list[tuple[int, Flow, str | None]]  # (rule position, state, note)


def trace_iptables(
    ruleset: str, packet: Packet, local_addresses: frozenset[IPAddress]
) -> TraceResult:
    """Parse iptables-save text and trace one packet through it."""
    return trace_ruleset(parse_iptables_save(ruleset), packet, local_addresses)


def trace_ruleset(
    ruleset: Ruleset, packet: Packet, local_addresses: frozenset[IPAddress]
) -> TraceResult:
    """Trace one packet through an already parsed ruleset (parse once, trace many)."""
    routing = Routing(local_addresses)
    return trace_journey(TableWalker(ruleset, routing), packet, routing)


@dataclass(frozen=True)
class _Frame:
    """One chain being walked: in which table and hook, and the chains that led here."""

    table: str
    hook: str
    chain: Chain
    calls: tuple[str, ...]  # chains entered in this table to get here, this one last

    @property
    def depth(self) -> int:
        return len(self.calls)

    @property
    def label(self) -> str:
        return f"{self.table}/{self.chain.name}" if self.chain.builtin else self.chain.name


class TableWalker:
    """The iptables tables of one trace, walked one hook at a time (a ChainWalker).

    Public: other tracers that have iptables chains around their own lookups
    (trace/ipvs.py: its nat and filter parts) walk them with this."""

    def __init__(self, ruleset: Ruleset, routing: Routing) -> None:
        self._ruleset = ruleset
        self._routing = routing
        self._lines: list[str] = []
        self._path: dict[str, None] = {}
        self._steps = 0  # over the whole trace

    def run_hook(self, hook: Hook, flow: Flow, nat: bool) -> HookRun:
        """Run each table of a hook over every branch, in order; NAT only if ``nat``."""
        self._lines, self._path = [], {}
        name = hook.upper()
        ended: list[tuple[End, Flow]] = []
        flows = [flow]
        for table in HOOK_TABLES[name]:
            if table == "nat" and not nat:
                continue
            passed: dict[Flow, None] = {}
            for f in flows:
                for end, out in self._table(table, name, f):
                    if end == "accept":
                        passed.setdefault(out)
                    else:
                        ended.append((end, out))
            flows = list(passed)
        exits = (*ended, *(("accept", f) for f in flows))
        return HookRun(exits, tuple(self._lines), tuple(self._path))

    def _table(self, table: str, hook: str, flow: Flow) -> list[tuple[End, Flow]]:
        chain = self._ruleset.chain(table, hook)
        if chain is None or (not chain.rules and chain.policy == "ACCEPT"):
            return [("accept", flow)]
        self._say(0, f"{table}/{hook}: {flow.describe()}")
        ends: list[tuple[End, Flow]] = []
        for exit_flow, end in self._walk(_Frame(table, hook, chain, (hook,)), flow):
            if end == "DROP" or (end == "CONTINUE" and chain.policy == "DROP"):
                ends.append(("drop", exit_flow))
            elif end == "REJECT":
                ends.append(("reject", exit_flow))
            else:
                ends.append(("accept", exit_flow))
        return ends

    # --- chains ----------------------------------------------------------------------------

    def _walk(self, frame: _Frame, flow: Flow) -> list[_Exit]:
        """Every way through one chain, each with the packet state at its exit."""
        if frame.depth > _MAX_DEPTH:
            raise TraceLimitError(f"more than {_MAX_DEPTH} nested jumps at {frame.label}")
        self._step()
        if not frame.chain.builtin:
            self._path.setdefault(frame.chain.name)
        exits: dict[_Exit, None] = {}
        pending: _Pending = [(0, flow, None)]
        explored: set[tuple[int, Flow]] = set()
        while pending:
            start, cursor, note = pending.pop()
            if (start, cursor) in explored:
                if note is not None:
                    self._say(frame.depth, f"{note}: same as a branch already explored")
                continue
            explored.add((start, cursor))
            if note is not None:
                self._say(frame.depth, note)
            self._step()
            self._run(frame, start, cursor, pending, exits)
        return list(exits)

    def _run(
        self, frame: _Frame, start: int, flow: Flow, pending: _Pending, exits: dict[_Exit, None]
    ) -> None:
        """Walk one branch from rule `start`; forks go on `pending`, endings into `exits`."""
        depth, label, rules = frame.depth, frame.label, frame.chain.rules
        for i in range(start, len(rules)):
            rule = rules[i]
            answer = rule.test(flow)
            if rule.out_interface and (note := rule.blind_spot(flow)) is not None:
                self._say(depth, f"{label} rule {rule.index}: {note}")
            if answer is Tri.NO or rule.target is None:
                continue
            line = _describe_rule(label, rule)
            if answer is Tri.MAYBE:
                self._say(depth, f"{line} [may or may not match: following the match]")
                other = f"{label} rule {rule.index}: [other branch: no match] continue"
                pending.append((i + 1, flow, other))
            else:
                self._say(depth, line)
            result = self._apply(frame, rule, flow)
            if isinstance(result, Flow):
                flow = result
                continue
            resumed = [f for f, end in result if end == "CONTINUE"]
            exits.update(dict.fromkeys(e for e in result if e[1] != "CONTINUE"))
            if isinstance(rule.target, Jump) and not rule.target.goto:
                if len(resumed) == 1:  # the common case: carry on inline
                    flow = resumed[0]
                    continue
                for n, f in reversed(list(enumerate(resumed, 1))):
                    back = f"back in {label} after rule {rule.index} (branch {n} of {len(resumed)})"
                    pending.append((i + 1, f, back))
            else:  # a verdict, or a goto: whatever comes back returns to our caller
                exits.update(dict.fromkeys((f, "CONTINUE") for f in resumed))
            return
        if frame.chain.builtin:
            self._say(depth, f"{label}: end of chain, policy {frame.chain.policy}")
        else:
            self._say(depth, f"{label}: no further rule matches, return")
        exits[(flow, "CONTINUE")] = None

    def _apply(self, frame: _Frame, rule: Rule, flow: Flow) -> Flow | list[_Exit]:
        """Apply a matched rule's target: a Flow to continue with, or how the walk ends."""
        target = rule.target
        if isinstance(target, Jump):
            return self._walk(self._enter(frame, rule, target), flow)
        if isinstance(target, SetMark):
            return replace(flow, mark=target.apply(flow.mark))
        if isinstance(target, NoOp) or target is None:
            return flow
        if isinstance(target, Standard):
            if target.name == "RETURN":
                if frame.chain.builtin:
                    policy = frame.chain.policy
                    self._say(frame.depth, f"RETURN from a builtin chain: policy {policy}")
                return [(flow, "CONTINUE")]
            if target.name == "REJECT":
                self._check_hook("REJECT", frame, rule)
            return [(flow, target.name)]
        if isinstance(target, SourceNat):
            self._check_hook(target.name, frame, rule)
            return [(replace(flow, masquerade=True), "NAT")]
        return [(self._dnat(frame, rule, target, flow), "NAT")]

    def _enter(self, frame: _Frame, rule: Rule, target: Jump) -> _Frame:
        """The frame for a jump's destination; a jump back into the call stack is a loop."""
        if target.chain in frame.calls:
            loop = " -> ".join((*frame.calls[frame.calls.index(target.chain) :], target.chain))
            raise RulesetParseError(rule.line, rule.text, f"chain loop {loop}")
        dest = self._ruleset.chain(frame.table, target.chain)
        assert dest is not None, "the parser resolved every jump"
        return _Frame(frame.table, frame.hook, dest, (*frame.calls, target.chain))

    def _dnat(self, frame: _Frame, rule: Rule, target: Dnat, flow: Flow) -> Flow:
        self._check_hook("DNAT", frame, rule)
        address = flow.dst if target.address is None else target.address
        port = flow.dport if target.port is None else target.port
        if address.version != flow.dst.version:
            raise TraceError(
                f"line {rule.line}: DNAT to an IPv{address.version} address for an "
                f"IPv{flow.dst.version} packet: {rule.text}"
            )
        return self._routing.dnat(flow, address, port)

    @staticmethod
    def _check_hook(target: str, frame: _Frame, rule: Rule) -> None:
        allowed = _TARGET_HOOKS[target]
        if frame.hook not in allowed:
            raise TraceError(
                f"line {rule.line}: {target} reached from {frame.table}/{frame.hook}, but the "
                f"kernel allows it only in {', '.join(sorted(allowed))}: {rule.text}"
            )

    # --- bookkeeping -----------------------------------------------------------------------

    def _step(self) -> None:
        self._steps += 1
        if self._steps > _MAX_STEPS:
            raise TraceLimitError(
                f"more than {_MAX_STEPS} steps exploring branches; the ruleset branches "
                "too much to trace"
            )

    def _say(self, depth: int, text: str) -> None:
        self._lines.append("  " * depth + text)


def _describe_rule(label: str, rule: Rule) -> str:
    """``KUBE-SVC-X rule 2: random probability 0.5 -> jump to KUBE-SEP-Y (comment)``."""
    conditions = rule.conditions()
    action = "count only" if rule.target is None else rule.target.describe()
    text = f"{label} rule {rule.index}: "
    text += f"{conditions} -> {action}" if conditions else action
    return text + (f" ({rule.comment})" if rule.comment else "")
