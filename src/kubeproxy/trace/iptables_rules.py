"""The iptables vocabulary the tracer understands: packet state, matches, targets, rules.

A :class:`~kubeproxy.trace.netfilter.Flow` is one branch's view of the packet: addresses
and ports (rewritten by DNAT), the packet mark, the conntrack DNAT bit and what has
happened to it so far; every tracer shares it.

Each match answers, for one Flow, YES, NO or MAYBE. MAYBE is for matches whose outcome
depends on something a single-packet trace cannot know: ``statistic`` (random / nth) and
``recent`` (whether this client already has session affinity). The engine explores both
outcomes of a MAYBE. ``!`` flips YES and NO and leaves MAYBE alone.

Targets are plain data; the engine in :mod:`kubeproxy.trace.iptables` gives them meaning.
Everything here is immutable and knows how to describe itself in plain English.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from kubeproxy.trace.netfilter import Flow
from kubeproxy.trace.result import IPAddress


class Tri(enum.Enum):
    """The answer of a match: it matches, it does not, or both are possible."""

    NO = 0
    YES = 1
    MAYBE = 2


def _answer(matched: bool, negated: bool) -> Tri:
    return Tri.YES if matched is not negated else Tri.NO


@dataclass(frozen=True, slots=True)
class Cidr:
    """An address or network from ``-s`` / ``-d``, kept as integers for fast matching."""

    version: int
    network: int
    netmask: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Cidr:
        """Raises ValueError for anything that is not an IPv4/IPv6 address or network."""
        quick = cls._parse_ipv4(text)
        if quick is not None:
            return quick
        net = ipaddress.ip_network(text, strict=False)
        return cls(net.version, int(net.network_address), int(net.netmask), str(net))

    @classmethod
    def _parse_ipv4(cls, text: str) -> Cidr | None:
        """The common ``a.b.c.d[/n]`` with no host bits, in C speed (a dump can hold tens
        of thousands); None for anything else, which ``ipaddress`` then handles."""
        address, slash, length = text.partition("/")
        if ":" in address or not (length.isdigit() if slash else True):
            return None
        bits = 32 if not slash else int(length)
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        except OSError:
            return None
        if bits > 32 or (length[:1] == "0" and bits):
            return None
        netmask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        if value & ~netmask:
            return None  # host bits set: let ipaddress normalize the text
        return cls(4, value, netmask, f"{address}/{bits}")

    def contains(self, address: IPAddress) -> bool:
        return address.version == self.version and int(address) & self.netmask == self.network


PortRange: TypeAlias = tuple[int, int]


def _in_ranges(port: int, ranges: tuple[PortRange, ...]) -> bool:
    return any(low <= port <= high for low, high in ranges)


def _ranges_text(ranges: tuple[PortRange, ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ranges)


def _not(negated: bool) -> str:
    return "not " if negated else ""


class Match(abc.ABC):
    """One condition of a rule."""

    __slots__ = ()

    @abc.abstractmethod
    def test(self, flow: Flow) -> Tri: ...

    @abc.abstractmethod
    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AddressMatch(Match):
    """``[!] -s`` / ``[!] -d``; a family mismatch simply does not match."""

    field: Literal["src", "dst"]
    cidrs: tuple[Cidr, ...]
    negated: bool

    def test(self, flow: Flow) -> Tri:
        address = flow.src if self.field == "src" else flow.dst
        for cidr in self.cidrs:
            if cidr.contains(address):
                return Tri.NO if self.negated else Tri.YES
        return Tri.YES if self.negated else Tri.NO

    def describe(self) -> str:
        return f"{_not(self.negated)}{self.field} {','.join(c.text for c in self.cidrs)}"


@dataclass(frozen=True, slots=True)
class ProtocolMatch(Match):
    """``[!] -p NAME``; "all" matches every protocol."""

    proto: str
    negated: bool

    def test(self, flow: Flow) -> Tri:
        return _answer(self.proto in ("all", flow.proto), self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}proto {self.proto}"


@dataclass(frozen=True, slots=True)
class InInterfaceMatch(Match):
    """``[!] -i NAME``; a trailing ``+`` is a prefix wildcard."""

    name: str
    negated: bool

    def test(self, flow: Flow) -> Tri:
        iface = flow.in_interface
        if iface is None:
            matched = False
        elif self.name.endswith("+"):
            matched = iface.startswith(self.name[:-1])
        else:
            matched = iface == self.name
        return _answer(matched, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}in-interface {self.name}"


@dataclass(frozen=True, slots=True)
class OutInterfaceMatch(Match):
    """``[!] -o NAME``: the tracer does not model routes, so the output interface is
    unknown; ``-o`` is taken as not matching (``! -o`` as matching) and the engine says so."""

    name: str
    negated: bool

    def test(self, flow: Flow) -> Tri:
        return _answer(False, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}out-interface {self.name}"


@dataclass(frozen=True, slots=True)
class PortMatch(Match):
    """``-m tcp|udp|sctp [[!] --dport P[:Q]] [[!] --sport P[:Q]]``."""

    proto: str
    dports: PortRange | None
    dports_negated: bool
    sports: PortRange | None
    sports_negated: bool

    def test(self, flow: Flow) -> Tri:
        if flow.proto != self.proto:
            return Tri.NO
        if self.dports is not None:
            low, high = self.dports
            if (low <= flow.dport <= high) is self.dports_negated:
                return Tri.NO
        if self.sports is not None:
            low, high = self.sports
            if (low <= flow.sport <= high) is self.sports_negated:
                return Tri.NO
        return Tri.YES

    def describe(self) -> str:
        parts = [self.proto]
        if self.dports is not None:
            parts.append(f"{_not(self.dports_negated)}dport {_ranges_text((self.dports,))}")
        if self.sports is not None:
            parts.append(f"{_not(self.sports_negated)}sport {_ranges_text((self.sports,))}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class MultiportMatch(Match):
    """``-m multiport [!] --dports|--sports|--ports a,b,c:d``."""

    which: Literal["dports", "sports", "ports"]
    ranges: tuple[PortRange, ...]
    negated: bool

    def test(self, flow: Flow) -> Tri:
        if self.which == "dports":
            matched = _in_ranges(flow.dport, self.ranges)
        elif self.which == "sports":
            matched = _in_ranges(flow.sport, self.ranges)
        else:
            matched = _in_ranges(flow.dport, self.ranges) or _in_ranges(flow.sport, self.ranges)
        return _answer(matched, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}{self.which} {_ranges_text(self.ranges)}"


@dataclass(frozen=True, slots=True)
class AddrTypeLocalMatch(Match):
    """``-m addrtype [!] --src-type LOCAL`` / ``--dst-type LOCAL``."""

    field: Literal["src", "dst"]
    negated: bool

    def test(self, flow: Flow) -> Tri:
        return _answer(flow.src_local if self.field == "src" else flow.dst_local, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}{self.field}-type LOCAL"


@dataclass(frozen=True, slots=True)
class CtStateMatch(Match):
    """``-m conntrack [!] --ctstate S,..`` and ``-m state [!] --state S,..``.

    The first packet of a connection is NEW (never RELATED, ESTABLISHED, INVALID or
    UNTRACKED), and has DNAT once a DNAT rule rewrote it.
    """

    option: str
    states: frozenset[str]
    negated: bool

    def test(self, flow: Flow) -> Tri:
        matched = "NEW" in self.states or (flow.dnat and "DNAT" in self.states)
        return _answer(matched, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}{self.option} {','.join(sorted(self.states))}"


@dataclass(frozen=True, slots=True)
class MarkMatch(Match):
    """``-m mark [!] --mark V[/M]``: matches when mark & M == V."""

    value: int
    mask: int
    negated: bool

    def test(self, flow: Flow) -> Tri:
        return _answer(flow.mark & self.mask == self.value, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}mark {self.value:#x}/{self.mask:#x}"


@dataclass(frozen=True, slots=True)
class ChanceMatch(Match):
    """``statistic`` and ``recent``: the answer was worked out from the options when the
    rule was parsed (YES, NO, or MAYBE when the kernel may go either way)."""

    answer: Tri
    text: str
    negated: bool

    def test(self, flow: Flow) -> Tri:
        if self.answer is Tri.MAYBE:
            return Tri.MAYBE
        return _answer(self.answer is Tri.YES, self.negated)

    def describe(self) -> str:
        return f"{_not(self.negated)}{self.text}"


# --- targets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Standard:
    """The standard targets ACCEPT, DROP, RETURN, and REJECT (``--reject-with``)."""

    name: Literal["ACCEPT", "DROP", "REJECT", "RETURN"]
    detail: str = ""

    def describe(self) -> str:
        return f"{self.name} {self.detail}".rstrip()


@dataclass(frozen=True, slots=True)
class Dnat:
    """``DNAT --to-destination``; None keeps the packet's address or port."""

    address: IPAddress | None
    port: int | None
    text: str

    def describe(self) -> str:
        return f"DNAT to {self.text}"


@dataclass(frozen=True, slots=True)
class SourceNat:
    """MASQUERADE or SNAT: for the trace, both mean "masqueraded"."""

    name: Literal["MASQUERADE", "SNAT"]
    detail: str

    def describe(self) -> str:
        return f"{self.name} {self.detail}".rstrip()


@dataclass(frozen=True, slots=True)
class SetMark:
    """MARK: new mark = ((mark & and_mask) | or_bits) ^ xor_bits, covering every option."""

    and_mask: int
    or_bits: int
    xor_bits: int
    text: str

    def apply(self, mark: int) -> int:
        return ((mark & self.and_mask) | self.or_bits) ^ self.xor_bits

    def describe(self) -> str:
        return f"MARK {self.text}"


@dataclass(frozen=True, slots=True)
class NoOp:
    """LOG, NFLOG and similar: record, then continue with the next rule."""

    name: str
    detail: str

    def describe(self) -> str:
        return f"{self.name} {self.detail}".rstrip() + " (no effect on the packet)"


@dataclass(frozen=True, slots=True)
class Jump:
    """``-j CHAIN`` (returns here) or ``-g CHAIN`` (returns to our caller)."""

    chain: str
    goto: bool

    def describe(self) -> str:
        return f"{'goto' if self.goto else 'jump to'} {self.chain}"


Target: TypeAlias = Standard | Dnat | SourceNat | SetMark | NoOp | Jump


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``-A`` line: every match must hold for the target to apply."""

    line: int  # 1-based line number in the iptables-save text
    text: str  # the line itself
    chain: str
    index: int  # 1-based position in its chain, as `iptables -L --line-numbers` shows
    matches: tuple[Match, ...]
    target: Target | None  # None: a rule without -j only counts packets
    comment: str | None
    out_interface: bool = field(init=False)  # has an `-o` the tracer cannot evaluate

    def __post_init__(self) -> None:
        unknowable = any(isinstance(m, OutInterfaceMatch) for m in self.matches)
        object.__setattr__(self, "out_interface", unknowable)

    def test(self, flow: Flow) -> Tri:
        answer = Tri.YES
        for match in self.matches:
            result = match.test(flow)
            if result is Tri.NO:
                return Tri.NO
            if result is Tri.MAYBE:
                answer = Tri.MAYBE
        return answer

    def blind_spot(self, flow: Flow) -> str | None:
        """If this rule failed only because of an ``-o`` the tracer cannot evaluate, say so."""
        if not self.out_interface:
            return None
        unknown = [m for m in self.matches if isinstance(m, OutInterfaceMatch)]
        known = [m for m in self.matches if not isinstance(m, OutInterfaceMatch)]
        if any(m.test(flow) is Tri.NO for m in known):
            return None
        names = ", ".join(m.describe() for m in unknown)
        return f"{names}: output interface unknown to the tracer, taken as " + (
            "matching" if all(m.negated for m in unknown) else "not matching"
        )

    def conditions(self) -> str:
        return ", ".join(m.describe() for m in self.matches)
