"""Trace one packet through an iptables ruleset: where does it go, and why.

Theory of operation. The ruleset text is parsed generically (:mod:`.iptables_parse`):
every rule becomes matches and a target, with no idea of what a renderer meant, so a
renderer bug shows up as a wrong answer instead of being papered over. Chains are parsed
when the trace first enters them, so tracing through a huge dump stays cheap. The tracer
then plays the kernel for the first packet of a NEW connection:

* locally originated (the source is a local or loopback address):
  nat OUTPUT -> filter OUTPUT -> nat POSTROUTING;
* otherwise: mangle PREROUTING -> nat PREROUTING -> routing on the (possibly DNATed)
  destination -> filter INPUT if it is local, else filter FORWARD -> nat POSTROUTING.

(``HOOK_TABLES`` in :mod:`.iptables_parse` is that list; the parser refuses rules in any
other builtin chain, since the trace would silently skip them.) A missing chain is empty
with an ACCEPT policy. Inside a table the walk is iptables' own: rules in order, ``-j``
returns, ``-g`` returns to the caller's caller, RETURN or falling off a user chain resumes
the caller, falling off a builtin chain applies its policy. DROP and REJECT end the
packet; ACCEPT ends the table for this hook; DNAT, SNAT and MASQUERADE end the nat table
for this hook. DNAT rewrites destination and port, so later hooks see the endpoint and
conntrack status DNAT; MASQUERADE / SNAT mark the branch as masqueraded.

Branches: ``statistic`` (random with probability below 1, nth with every above 1) and
``recent`` (--rcheck / --update) matches may go either way, so the walk forks and
explores both outcomes depth-first. Identical branches (same position, same packet
state) are explored once, which keeps the usual kube-proxy chains linear; the walk still
stops with :class:`TraceLimitError` past ``_MAX_STEPS`` steps or ``_MAX_DEPTH`` nested
jumps, and refuses a jump into a chain it is already inside (a loop, which the kernel
would refuse too) with a :class:`RulesetParseError` naming the line.

Merging: the endpoints are the DNAT destinations of every branch that is delivered,
masquerade is true if any delivered branch is masqueraded, the path lists the user chains
in the order they were first entered, and if branches disagree on the verdict the most
permissive wins (DNAT > ACCEPT > REJECT > DROP) and the explanation says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, TypeAlias

from kubeproxy.trace.iptables_parse import (
    HOOK_TABLES,
    Chain,
    Ruleset,
    RulesetParseError,
    parse_iptables_save,
)
from kubeproxy.trace.iptables_rules import (
    Dnat,
    Flow,
    Jump,
    NoOp,
    Rule,
    SetMark,
    SourceNat,
    Standard,
    Tri,
)
from kubeproxy.trace.result import (
    IPAddress,
    Packet,
    TraceError,
    TraceLimitError,
    TraceResult,
    Verdict,
    format_endpoint,
)

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
_VERDICT_PRIORITY: tuple[Verdict, ...] = ("DROP", "REJECT", "ACCEPT", "DNAT")  # low to high
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
    return _Tracer(ruleset, local_addresses).run(packet)


@dataclass(frozen=True)
class _Outcome:
    verdict: Verdict
    endpoint: str | None
    masquerade: bool

    def describe(self) -> str:
        text: str = self.verdict
        if self.endpoint is not None and self.verdict == "DNAT":
            text += f" to {self.endpoint}"
        elif self.endpoint is not None:
            text += f" (after DNAT to {self.endpoint})"
        return text + (", masqueraded" if self.masquerade else "")


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


class _Tracer:
    """One trace: holds the explanation, path and outcomes as they are found."""

    def __init__(self, ruleset: Ruleset, local_addresses: frozenset[IPAddress]) -> None:
        self._ruleset = ruleset
        self._local = local_addresses
        self._lines: list[str] = []
        self._path: dict[str, None] = {}
        self._outcomes: dict[_Outcome, None] = {}
        self._steps = 0

    def run(self, packet: Packet) -> TraceResult:
        local_origin = self._is_local(packet.src)
        flow = Flow(
            src=packet.src,
            dst=packet.dst,
            proto=packet.proto,
            dport=packet.port,
            sport=packet.src_port,
            in_interface=None if local_origin else packet.in_interface,
            mark=0,
            dnat=False,
            src_local=local_origin,
            dst_local=self._is_local(packet.dst),
            endpoint=None,
            masquerade=False,
        )
        if local_origin:
            self._say(0, f"packet {packet.describe()} originates on this node")
            delivered = self._hook("POSTROUTING", self._hook("OUTPUT", [flow]))
        else:
            self._say(0, f"packet {packet.describe()} arrives on {packet.in_interface}")
            routed = self._hook("PREROUTING", [flow])
            local = [f for f in routed if f.dst_local]
            forwarded = [f for f in routed if not f.dst_local]
            for f in local:
                self._say(0, f"routing: {f.dst} is local: deliver to this node (INPUT)")
            for f in forwarded:
                self._say(0, f"routing: {f.dst} is not local: forward (FORWARD, POSTROUTING)")
            delivered = self._hook("INPUT", local)
            delivered += self._hook("POSTROUTING", self._hook("FORWARD", forwarded))
        for f in delivered:
            self._finish(f, "DNAT" if f.dnat else "ACCEPT")
        return self._result()

    # --- hooks and tables ------------------------------------------------------------------

    def _hook(self, hook: str, flows: list[Flow]) -> list[Flow]:
        """Run each table of a hook over every branch; return the branches that pass."""
        for table in HOOK_TABLES[hook]:
            passed: dict[Flow, None] = {}
            for flow in flows:
                passed.update(dict.fromkeys(self._table(table, hook, flow)))
            flows = list(passed)
        return flows

    def _table(self, table: str, hook: str, flow: Flow) -> list[Flow]:
        chain = self._ruleset.chain(table, hook)
        if chain is None or (not chain.rules and chain.policy == "ACCEPT"):
            return [flow]
        self._say(0, f"{table}/{hook}: {flow.describe()}")
        passed = []
        for exit_flow, end in self._walk(_Frame(table, hook, chain, (hook,)), flow):
            if end in ("DROP", "REJECT"):
                self._finish(exit_flow, "DROP" if end == "DROP" else "REJECT")
            elif end == "CONTINUE" and chain.policy == "DROP":
                self._finish(exit_flow, "DROP")
            else:
                passed.append(exit_flow)
        return passed

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
        return replace(
            flow,
            dst=address,
            dport=port,
            dnat=True,
            dst_local=self._is_local(address),
            endpoint=format_endpoint(address, port),
        )

    @staticmethod
    def _check_hook(target: str, frame: _Frame, rule: Rule) -> None:
        allowed = _TARGET_HOOKS[target]
        if frame.hook not in allowed:
            raise TraceError(
                f"line {rule.line}: {target} reached from {frame.table}/{frame.hook}, but the "
                f"kernel allows it only in {', '.join(sorted(allowed))}: {rule.text}"
            )

    # --- bookkeeping -----------------------------------------------------------------------

    def _is_local(self, address: IPAddress) -> bool:
        return address in self._local or address.is_loopback

    def _step(self) -> None:
        self._steps += 1
        if self._steps > _MAX_STEPS:
            raise TraceLimitError(
                f"more than {_MAX_STEPS} steps exploring branches; the ruleset branches "
                "too much to trace"
            )

    def _say(self, depth: int, text: str) -> None:
        self._lines.append("  " * depth + text)

    def _finish(self, flow: Flow, verdict: Verdict) -> None:
        outcome = _Outcome(verdict, flow.endpoint, flow.masquerade)
        if outcome not in self._outcomes:
            self._outcomes[outcome] = None
            self._say(0, f"outcome: {outcome.describe()}")

    def _result(self) -> TraceResult:
        outcomes = list(self._outcomes)
        verdicts = {o.verdict for o in outcomes}
        verdict = max(verdicts, key=_VERDICT_PRIORITY.index)
        if len(verdicts) > 1:
            seen = ", ".join(v for v in reversed(_VERDICT_PRIORITY) if v in verdicts)
            self._say(0, f"branches disagree ({seen}); reporting {verdict}, the most permissive")
        delivered = [o for o in outcomes if o.verdict in ("DNAT", "ACCEPT")]
        return TraceResult(
            verdict=verdict,
            endpoints=tuple(sorted({o.endpoint for o in delivered if o.endpoint is not None})),
            masquerade=any(o.masquerade for o in delivered),
            path=tuple(self._path),
            explanation=tuple(self._lines),
        )


def _describe_rule(label: str, rule: Rule) -> str:
    """``KUBE-SVC-X rule 2: random probability 0.5 -> jump to KUBE-SEP-Y (comment)``."""
    conditions = rule.conditions()
    action = "count only" if rule.target is None else rule.target.describe()
    text = f"{label} rule {rule.index}: "
    text += f"{conditions} -> {action}" if conditions else action
    return text + (f" ({rule.comment})" if rule.comment else "")
