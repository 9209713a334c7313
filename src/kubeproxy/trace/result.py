"""What a packet tracer is asked and what it answers; shared by every tracer.

A tracer takes one packet (a NEW connection's first packet, as it arrives at a node) and
a rendered ruleset, and answers with a :class:`TraceResult`: the verdict, every endpoint
the packet may be DNATed to, whether any path masquerades it, the user chains entered and
a plain-English explanation, one line per step. Rulesets branch (random load balancing,
session affinity), so a result summarises all branches; see each tracer for how.

Both classes validate themselves when built, so a half-formed packet or result cannot
exist. The errors at the bottom are the tracers' small error tree: every failure is a
:class:`TraceError`, which is a ``ValueError`` because it is always about bad input.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from kubeproxy.errors import TraceError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Verdict: TypeAlias = Literal["DNAT", "ACCEPT", "DROP", "REJECT"]
Protocol: TypeAlias = Literal["tcp", "udp", "sctp"]

_VERDICTS: frozenset[str] = frozenset(get_args(Verdict))
_PROTOCOLS: frozenset[str] = frozenset(get_args(Protocol))


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection, as it reaches the node."""

    src: IPAddress
    dst: IPAddress
    port: int  # destination port
    proto: Protocol
    # Interface the packet arrived on (pods: e.g. "cbr0" / "veth1234"); ignored for
    # locally originated packets, which have no input interface.
    in_interface: str = "eth0"
    src_port: int = 40000

    def __post_init__(self) -> None:
        for name in ("src", "dst"):
            value = getattr(self, name)
            if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise TypeError(f"Packet.{name} must be an IP address, not {value!r}")
        if self.src.version != self.dst.version:
            raise ValueError(f"Packet mixes address families: {self.src} -> {self.dst}")
        for name in ("port", "src_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ValueError(f"Packet.{name} must be a port in 1..65535, not {value!r}")
        if self.proto not in _PROTOCOLS:
            raise ValueError(
                f"Packet.proto must be one of {sorted(_PROTOCOLS)}, not {self.proto!r}"
            )
        if not self.in_interface or any(c.isspace() for c in self.in_interface):
            raise ValueError(f"Packet.in_interface is not an interface name: {self.in_interface!r}")

    def describe(self) -> str:
        """``10.0.0.2:40000 -> 172.30.0.41:80/tcp``, brackets around IPv6 addresses."""
        return (
            f"{format_endpoint(self.src, self.src_port)} -> "
            f"{format_endpoint(self.dst, self.port)}/{self.proto}"
        )


@dataclass(frozen=True)
class TraceResult:
    """Where a packet goes and why, merged over every branch the ruleset allows."""

    verdict: Verdict
    endpoints: tuple[str, ...]  # sorted, every "ip:port" ("[ip]:port" for IPv6) reachable
    masquerade: bool  # true if any reachable path is masqueraded in POSTROUTING
    path: tuple[str, ...]  # user-defined chains entered, in order of first visit
    explanation: tuple[str, ...]  # plain English, one line per step

    def __post_init__(self) -> None:
        if self.verdict not in _VERDICTS:
            raise ValueError(f"TraceResult.verdict must be one of {sorted(_VERDICTS)}")
        if list(self.endpoints) != sorted(set(self.endpoints)):
            raise ValueError("TraceResult.endpoints must be sorted and without duplicates")
        if len(set(self.path)) != len(self.path):
            raise ValueError("TraceResult.path must list each chain once")

    def to_json(self) -> dict[str, object]:
        """The comparable part of the result (no explanation), for tests and tools."""
        return {
            "verdict": self.verdict,
            "endpoints": list(self.endpoints),
            "masquerade": self.masquerade,
            "path": list(self.path),
        }

    def to_text(self) -> str:
        """The explanation, then one summary line."""
        if self.verdict == "DNAT":
            summary = f"verdict: DNAT to {', '.join(self.endpoints)}"
        else:
            summary = f"verdict: {self.verdict}"
        summary += f"; masquerade: {'yes' if self.masquerade else 'no'}"
        return "\n".join((*self.explanation, summary)) + "\n"


def format_endpoint(address: IPAddress, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6, as kube-proxy and iptables print them."""
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


class TraceLimitError(TraceError):
    """Exploring the ruleset went past the tracer's bounds (a loop or a branch explosion)."""
