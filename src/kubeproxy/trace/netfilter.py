"""One packet's journey through netfilter, shared by every tracer: which hooks, in what order.

Theory of operation. Every data plane kube-proxy writes (iptables chains, nftables base
chains) hangs off the same five netfilter hooks, and the kernel takes the first packet of
a NEW connection through them the same way whatever the mode. This module plays that
part once; a mode supplies only a :class:`ChainWalker`, which runs "hook H of my tables
on this packet state" and answers with every way out of it. The journey:

* arriving from the network: ``prerouting`` -> routing on the (possibly DNATed)
  destination -> ``input`` if it is local (delivered: no postrouting), else ``forward``
  -> ``postrouting``;
* originating on this node (the source is a local or loopback address): ``output`` ->
  routing -> ``postrouting``. If the destination, after any DNAT in ``output``, is local,
  the packet leaves on ``lo`` and comes straight back in on ``lo``: ``prerouting`` ->
  ``input`` once more, with ``in_interface = "lo"``. NAT is decided once per connection
  (the kernel's nat hooks run only while the connection has no NAT binding, and
  ``output`` and ``postrouting`` made both), so on the way back in the walker is asked
  to skip its NAT (``nat=False``): only the filter (and mangle) rules run. That is where
  a node talking to its own address meets the rules guarding its input, e.g. the
  NodePort rules that reject a NodePort without endpoints.

Routing is the node's: a destination is local if it is one of the node's addresses or a
loopback address; everything else is forwarded. A DNAT changes the route: the walker
rewrites the destination through :meth:`Routing.dnat`, which also says whether the new
destination is local (``addrtype`` / ``fib daddr type`` read it), and the journey routes
on the rewritten destination.

A walker may fork a packet (random load balancing, session affinity), so a hook returns
several exits; identical states are followed once. Every exit that is dropped or
rejected, and every branch that is delivered, is an outcome. Merging the outcomes into
one :class:`~kubeproxy.trace.result.TraceResult`: the endpoints are the DNAT
destinations of every delivered branch, masquerade is true if any delivered branch was
masqueraded, the path lists the mode's user chains in the order first entered, and if
branches disagree on the verdict the most permissive wins (DNAT > ACCEPT > REJECT >
DROP) and the explanation says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeAlias

from kubeproxy.errors import TraceError
from kubeproxy.trace.result import IPAddress, Packet, TraceResult, Verdict, format_endpoint

__all__ = [
    "ChainWalker",
    "End",
    "Flow",
    "Hook",
    "HookRun",
    "Routing",
    "trace_journey",
]

Hook: TypeAlias = Literal["prerouting", "input", "forward", "output", "postrouting"]
End: TypeAlias = Literal["accept", "drop", "reject"]  # accept: the packet leaves the hook

_VERDICT_PRIORITY: tuple[Verdict, ...] = ("DROP", "REJECT", "ACCEPT", "DNAT")  # low to high
_REJECTED: dict[End, Verdict] = {"drop": "DROP", "reject": "REJECT"}


@dataclass(frozen=True, slots=True)
class Flow:
    """One branch's state of the packet while it crosses the hooks."""

    src: IPAddress
    dst: IPAddress
    proto: str
    dport: int
    sport: int
    in_interface: str | None  # None for locally originated packets (no input interface)
    src_local: bool  # the source is a local or loopback address (addrtype LOCAL)
    dst_local: bool
    mark: int = 0
    dnat: bool = False  # conntrack status DNAT (the connection's destination was rewritten)
    endpoint: str | None = None  # "ip:port" this branch was DNATed to
    masquerade: bool = False  # MASQUERADE / SNAT happened

    def describe(self) -> str:
        states = "NEW,DNAT" if self.dnat else "NEW"
        src = str(self.src) if self.src.version == 4 else f"[{self.src}]"
        return (
            f"{src}:{self.sport} -> {format_endpoint(self.dst, self.dport)}/{self.proto}, "
            f"mark {self.mark:#x}, ctstate {states}"
        )


@dataclass(frozen=True)
class HookRun:
    """What one hook did to one packet state: its exits and what the walker saw."""

    exits: tuple[tuple[End, Flow], ...]  # every way out; "accept" carries on
    lines: tuple[str, ...] = ()  # explanation, one line per step
    chains: tuple[str, ...] = ()  # the mode's user chains entered, in order


class ChainWalker(Protocol):
    """A mode's rules, walked one hook at a time."""

    def run_hook(self, hook: Hook, flow: Flow, nat: bool) -> HookRun:
        """Run this mode's chains for ``hook`` on ``flow``, in priority order.

        ``nat=False``: the connection's NAT is already decided, skip the NAT chains.
        """
        ...


@dataclass(frozen=True)
class Routing:
    """The node's routing decision: which destinations are this node's own."""

    local: frozenset[IPAddress]

    def is_local(self, address: IPAddress) -> bool:
        return address in self.local or address.is_loopback

    def first_flow(self, packet: Packet) -> Flow:
        """The state of ``packet`` as it enters the first hook."""
        local_origin = self.is_local(packet.src)
        return Flow(
            src=packet.src,
            dst=packet.dst,
            proto=packet.proto,
            dport=packet.port,
            sport=packet.src_port,
            in_interface=None if local_origin else packet.in_interface,
            src_local=local_origin,
            dst_local=self.is_local(packet.dst),
        )

    def dnat(self, flow: Flow, address: IPAddress, port: int) -> Flow:
        """``flow`` with its destination rewritten, as conntrack records it."""
        if address.version != flow.dst.version:
            raise TraceError(
                f"DNAT to an IPv{address.version} address for an IPv{flow.dst.version} "
                f"packet: {address}"
            )
        return replace(
            flow,
            dst=address,
            dport=port,
            dnat=True,
            dst_local=self.is_local(address),
            endpoint=format_endpoint(address, port),
        )


def trace_journey(walker: ChainWalker, packet: Packet, routing: Routing) -> TraceResult:
    """Follow ``packet`` through every hook it crosses, with ``walker`` running the rules."""
    return _Journey(walker, routing).run(packet)


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


class _Journey:
    """One trace: the hooks in order, and the outcomes, path and explanation found."""

    def __init__(self, walker: ChainWalker, routing: Routing) -> None:
        self._walker = walker
        self._routing = routing
        self._lines: list[str] = []
        self._path: dict[str, None] = {}
        self._outcomes: dict[_Outcome, None] = {}

    def run(self, packet: Packet) -> TraceResult:
        flow = self._routing.first_flow(packet)
        if flow.src_local:
            self._lines.append(f"packet {packet.describe()} originates on this node")
            self._originate(flow)
        else:
            self._lines.append(f"packet {packet.describe()} arrives on {packet.in_interface}")
            self._arrive([flow], nat=True)
        return self._result()

    # --- the journey -----------------------------------------------------------------------

    def _originate(self, flow: Flow) -> None:
        sent = self._hook("postrouting", self._hook("output", [flow], nat=True), nat=True)
        looped = []
        for f in sent:
            if f.dst_local:
                self._lines.append(
                    f"routing: {f.dst} is local: the packet leaves on lo and comes back in "
                    "on lo (PREROUTING, INPUT; NAT is already decided)"
                )
                looped.append(replace(f, in_interface="lo"))
            else:
                self._lines.append(f"routing: {f.dst} is not local: the packet leaves the node")
                self._deliver(f)
        self._arrive(looped, nat=False)

    def _arrive(self, flows: list[Flow], nat: bool) -> None:
        routed = self._hook("prerouting", flows, nat)
        local = [f for f in routed if f.dst_local]
        forwarded = [f for f in routed if not f.dst_local]
        for f in local:
            self._lines.append(f"routing: {f.dst} is local: deliver to this node (INPUT)")
        for f in forwarded:
            self._lines.append(f"routing: {f.dst} is not local: forward (FORWARD, POSTROUTING)")
        for f in self._hook("input", local, nat):
            self._deliver(f)
        for f in self._hook("postrouting", self._hook("forward", forwarded, nat), nat):
            self._deliver(f)

    def _hook(self, hook: Hook, flows: list[Flow], nat: bool) -> list[Flow]:
        """Run one hook over every branch; return the states that leave it, once each."""
        passed: dict[Flow, None] = {}
        for flow in flows:
            run = self._walker.run_hook(hook, flow, nat)
            self._lines.extend(run.lines)
            self._path.update(dict.fromkeys(run.chains))
            for end, out in run.exits:
                if end == "accept":
                    passed.setdefault(out)
                else:
                    self._finish(out, _REJECTED[end])
        return list(passed)

    # --- outcomes --------------------------------------------------------------------------

    def _deliver(self, flow: Flow) -> None:
        self._finish(flow, "DNAT" if flow.dnat else "ACCEPT")

    def _finish(self, flow: Flow, verdict: Verdict) -> None:
        outcome = _Outcome(verdict, flow.endpoint, flow.masquerade)
        if outcome not in self._outcomes:
            self._outcomes[outcome] = None
            self._lines.append(f"outcome: {outcome.describe()}")

    def _result(self) -> TraceResult:
        outcomes = list(self._outcomes)
        if not outcomes:  # pragma: no cover - every branch ends somewhere
            raise TraceError("the packet took no path")
        verdicts = {o.verdict for o in outcomes}
        verdict = max(verdicts, key=_VERDICT_PRIORITY.index)
        if len(verdicts) > 1:
            seen = ", ".join(v for v in reversed(_VERDICT_PRIORITY) if v in verdicts)
            self._lines.append(
                f"branches disagree ({seen}); reporting {verdict}, the most permissive"
            )
        delivered = [o for o in outcomes if o.verdict in ("DNAT", "ACCEPT")]
        return TraceResult(
            verdict=verdict,
            endpoints=tuple(sorted({o.endpoint for o in delivered if o.endpoint is not None})),
            masquerade=any(o.masquerade for o in delivered),
            path=tuple(self._path),
            explanation=tuple(self._lines),
        )
