"""Trace one packet through an iptables ruleset: where does it go, and why.

Theory of operation. The ruleset text is parsed generically (:mod:`.iptables_parse`):
every rule becomes matches and a target, with no idea of what a renderer meant, so a
renderer bug shows up as a wrong answer instead of being papered over. The tracer then
plays the kernel for the first packet of a NEW connection:

* locally originated (the source is a local or loopback address):
  OUTPUT -> POSTROUTING, then INPUT over ``lo`` if the (possibly DNATed) destination is local;
* otherwise: PREROUTING -> routing on the (possibly DNATed) destination -> INPUT if it is
  local, else FORWARD -> POSTROUTING.

Each hook runs its tables in kernel priority order (``_HOOK_TABLES``); a missing table or
chain is empty with an ACCEPT policy. Inside a table the walk is iptables' own: rules in
order, ``-j`` returns, ``-g`` returns to the caller's caller, RETURN or falling off a user
chain resumes the caller, falling off a builtin chain applies its policy. DROP and REJECT
end the packet; ACCEPT ends the table for this hook; DNAT, SNAT and MASQUERADE end the
nat table for this hook. DNAT rewrites destination and port, so later hooks see the
endpoint and conntrack status DNAT; MASQUERADE / SNAT mark the branch as masqueraded.

Branches: ``statistic`` and ``recent`` matches may go either way, so the walk forks and
explores every branch depth-first. Identical branches (same position, same packet state)
are explored once, which keeps the usual kube-proxy chains linear; the walk still stops
with :class:`TraceLimitError` past ``_MAX_STEPS`` steps or ``_MAX_DEPTH`` nested jumps
(parsing already refuses jump loops, as the kernel does). Merging: the endpoints are the
DNAT destinations of every branch that is delivered, masquerade is true if any delivered
branch is masqueraded, and if branches disagree on the verdict the most permissive wins
(DNAT > ACCEPT > REJECT > DROP) and the explanation says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal, TypeAlias

from kubeproxy.trace.iptables_parse import Chain, Ruleset, RulesetParseError, parse_iptables_save
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

# The tables each hook runs, in the kernel's priority order.
_HOOK_TABLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "PREROUTING": ("raw", "mangle", "nat"),  # nat here: DNAT (priority -100)
        "INPUT": ("mangle", "filter", "security", "nat"),  # nat INPUT: SNAT only (100)
        "FORWARD": ("mangle", "filter", "security"),
        "OUTPUT": ("raw", "mangle", "nat", "filter", "security"),  # nat OUTPUT: DNAT (-100)
        "POSTROUTING": ("mangle", "nat"),  # nat here: SNAT / MASQUERADE (100)
    }
)
# Hooks a target may be reached from; iptables-restore refuses a ruleset that does otherwise.
_TARGET_HOOKS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "DNAT": frozenset({"PREROUTING", "OUTPUT"}),
        "SNAT": frozenset({"POSTROUTING", "INPUT"}),
        "MASQUERADE": frozenset({"POSTROUTING"}),
        "REJECT": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
    }
)
_VERDICT_PRIORITY: tuple[Verdict, ...] = ("DROP", "REJECT", "ACCEPT", "DNAT")  # low to high
_MAX_STEPS = 100_000  # chains entered plus branches explored, per trace
_MAX_DEPTH = 64  # nested jumps

# How a walk through a chain ends: fell off / RETURN (resume the caller), or a verdict.
# NAT means a DNAT / SNAT / MASQUERADE ended the nat table for this hook.
_End: TypeAlias = Literal["CONTINUE", "ACCEPT", "DROP", "REJECT", "NAT"]
_Exit: TypeAlias = tuple[Flow, _End]


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
class _Stage:
    table: str
    hook: str


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
            sent = self._hook("POSTROUTING", self._hook("OUTPUT", [flow]))
            local = [f for f in sent if f.dst_local]
            delivered = [f for f in sent if not f.dst_local]
            for f in local:
                self._say(0, f"routing: {f.dst} is local: delivered over lo")
            delivered += self._hook("INPUT", [replace(f, in_interface="lo") for f in local])
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
        for table in _HOOK_TABLES[hook]:
            passed: dict[Flow, None] = {}
            for flow in flows:
                passed.update(dict.fromkeys(self._table(_Stage(table, hook), flow)))
            flows = list(passed)
        return flows

    def _table(self, stage: _Stage, flow: Flow) -> list[Flow]:
        chain = self._ruleset.chain(stage.table, stage.hook)
        if chain is None or (not chain.rules and chain.policy == "ACCEPT"):
            return [flow]
        self._say(0, f"{stage.table}/{stage.hook}: {flow.describe()}")
        passed = []
        for exit_flow, end in self._walk(stage, chain, flow, 1):
            if end in ("DROP", "REJECT"):
                self._finish(exit_flow, "DROP" if end == "DROP" else "REJECT")
            elif end == "CONTINUE" and chain.policy == "DROP":
                self._finish(exit_flow, "DROP")
            else:
                passed.append(exit_flow)
        return passed

    # --- chains ----------------------------------------------------------------------------

    def _walk(self, stage: _Stage, chain: Chain, flow: Flow, depth: int) -> list[_Exit]:
        """Every way through one chain, each with the packet state at its exit."""
        if depth > _MAX_DEPTH:
            raise TraceLimitError(f"more than {_MAX_DEPTH} nested jumps at chain {chain.name}")
        self._step()
        if not chain.builtin:
            self._path.setdefault(chain.name)
        exits: dict[_Exit, None] = {}
        pending: list[tuple[int, Flow, str | None]] = [(0, flow, None)]
        explored: set[tuple[int, Flow]] = set()
        while pending:
            start, cursor, note = pending.pop()
            if (start, cursor) in explored:
                if note is not None:
                    self._say(depth, f"{note}: same as a branch already explored")
                continue
            explored.add((start, cursor))
            if note is not None:
                self._say(depth, note)
            self._step()
            self._run(stage, chain, start, cursor, depth, pending, exits)
        return list(exits)

    def _run(
        self,
        stage: _Stage,
        chain: Chain,
        start: int,
        flow: Flow,
        depth: int,
        pending: list[tuple[int, Flow, str | None]],
        exits: dict[_Exit, None],
    ) -> None:
        """Walk one branch from rule `start`; forks go on `pending`, endings into `exits`."""
        label = f"{stage.table}/{chain.name}" if chain.builtin else chain.name
        rules = chain.rules
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
            result = self._apply(stage, chain, rule, flow, depth)
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
            else:
                exits.update(dict.fromkeys((f, "CONTINUE") for f in resumed))
            return
        self._fall_off(label, chain, depth)
        exits[(flow, "CONTINUE")] = None

    def _fall_off(self, label: str, chain: Chain, depth: int) -> None:
        if chain.builtin:
            self._say(depth, f"{label}: end of chain, policy {chain.policy}")
        else:
            self._say(depth, f"{label}: no further rule matches, return")

    def _apply(
        self, stage: _Stage, chain: Chain, rule: Rule, flow: Flow, depth: int
    ) -> Flow | list[_Exit]:
        """Apply a matched rule's target: a Flow to continue with, or how the walk ends."""
        target = rule.target
        if isinstance(target, Jump):
            dest = self._ruleset.chain(stage.table, target.chain)
            assert dest is not None, "the parser resolved every jump"
            return self._walk(stage, dest, flow, depth + 1)
        if isinstance(target, SetMark):
            return replace(flow, mark=target.apply(flow.mark))
        if isinstance(target, NoOp) or target is None:
            return flow
        if isinstance(target, Standard):
            if target.name == "RETURN":
                if chain.builtin:
                    self._say(depth, f"RETURN from a builtin chain: policy {chain.policy}")
                return [(flow, "CONTINUE")]
            if target.name == "REJECT":
                self._check_hook("REJECT", stage, rule)
            return [(flow, target.name)]
        if isinstance(target, SourceNat):
            self._check_hook(target.name, stage, rule)
            return [(replace(flow, masquerade=True), "NAT")]
        return [(self._dnat(stage, rule, target, flow), "NAT")]

    def _dnat(self, stage: _Stage, rule: Rule, target: Dnat, flow: Flow) -> Flow:
        self._check_hook("DNAT", stage, rule)
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
    def _check_hook(target: str, stage: _Stage, rule: Rule) -> None:
        allowed = _TARGET_HOOKS[target]
        if stage.hook not in allowed:
            raise TraceError(
                f"line {rule.line}: {target} reached from {stage.table}/{stage.hook}, but the "
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
