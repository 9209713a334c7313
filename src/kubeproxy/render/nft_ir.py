"""A small, typed model of the nftables vocabulary kube-proxy uses, and its text form.

Theory of operation
-------------------
The nftables renderer does not build rule strings directly: it builds the values below
(fields, matches, statements, rules, chains, sets), which then have two spellings:

* :func:`rule_text` & co. give the text ``nft list ruleset`` prints (so a rendered script
  and a kernel listing can be compared line by line), which ``nft -f`` also reads;
* :mod:`kubeproxy.render.nft_wire` gives the netlink messages the kernel receives.

The tracer parses the text back into these same values (:mod:`.nft_parse`), so "what the
renderer meant", "what the kernel got" and "what the tracer followed" are one model.

Only what kube-proxy needs is here: fixed-size fields (addresses, ports, protocol, mark,
conntrack state/status, fib address type), ``numgen``, set/map lookups and verdict maps,
mark arithmetic, DNAT (to a constant or through a map), masquerade, reject, dynamic set
updates. Everything is immutable; nothing here knows about Services.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# Field name -> (kind, value type). The kind says how the kernel reads it (see nft_wire).
FIELDS: dict[str, tuple[str, str]] = {
    "ip saddr": ("payload", "ipv4_addr"),
    "ip daddr": ("payload", "ipv4_addr"),
    "ip6 saddr": ("payload", "ipv6_addr"),
    "ip6 daddr": ("payload", "ipv6_addr"),
    "th dport": ("payload", "inet_service"),
    "tcp dport": ("payload", "inet_service"),  # implies "meta l4proto tcp"
    "udp dport": ("payload", "inet_service"),
    "sctp dport": ("payload", "inet_service"),
    "meta l4proto": ("meta", "inet_proto"),
    "iifname": ("meta", "ifname"),
    "meta mark": ("meta", "mark"),
    "ct state": ("ct", "ct_state"),
    "ct status": ("ct", "ct_status"),
    "fib saddr type": ("fib", "fib_addrtype"),
    "fib daddr type": ("fib", "fib_addrtype"),
}
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
CT_STATES = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
CT_STATUS = {"expected": 1, "seen-reply": 2, "assured": 4, "confirmed": 8, "snat": 16,
             "dnat": 32, "dying": 512}
FIB_ADDRTYPES = {"unicast": 1, "local": 2, "broadcast": 3, "anycast": 4, "multicast": 5,
                 "blackhole": 6, "unreachable": 7, "prohibit": 8}


@dataclass(frozen=True, slots=True)
class Field:
    """A packet or metadata field: ``ip daddr``, ``th dport``, ``meta l4proto`` ..."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in FIELDS:
            raise ValueError(f"unknown nftables field {self.name!r}")

    @property
    def kind(self) -> str:
        return FIELDS[self.name][0]

    @property
    def type(self) -> str:
        return FIELDS[self.name][1]

    def text(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Numgen:
    """``numgen random|inc mod N [offset O]``: a 32-bit number per packet.

    ``mod 1`` makes it a constant (the offset): the renderer uses that to put a fixed
    value into a map key next to a real random number.
    """

    mode: Literal["random", "inc"]
    mod: int
    offset: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.mod <= 0xFFFFFFFF or not 0 <= self.offset <= 0xFFFFFFFF:
            raise ValueError(f"numgen mod {self.mod} offset {self.offset} out of range")

    def text(self) -> str:
        off = f" offset {self.offset}" if self.offset else ""
        return f"numgen {self.mode} mod {self.mod}{off}"


Expr: TypeAlias = Field | Numgen
Key: TypeAlias = tuple[Expr, ...]  # one expression, or a concatenation


def key_text(key: Key) -> str:
    return " . ".join(e.text() for e in key)


# A constant: an address, a prefix, a number or a symbol ("tcp", "new", "local", an
# interface name, which may end in "*" for a prefix match).
Value: TypeAlias = IPAddress | IPNetwork | int | str


@dataclass(frozen=True, slots=True)
class Cmp:
    """``EXPR [!=] VALUE``; with ``mask``: ``EXPR & MASK ==|!= VALUE`` (mark tests)."""

    expr: Expr
    value: Value
    negate: bool = False
    mask: int | None = None

    def text(self) -> str:
        lhs = self.expr.text()
        if self.mask is not None:
            op = "!=" if self.negate else "=="
            return f"{lhs} & {self.mask:#010x} {op} {_value_text(self.expr, self.value)}"
        op = "!= " if self.negate else ""
        return f"{lhs} {op}{_value_text(self.expr, self.value)}"


@dataclass(frozen=True, slots=True)
class SetMatch:
    """``KEY [!=] @set``: membership in a named set."""

    key: Key
    set: str
    negate: bool = False

    def text(self) -> str:
        op = "!= " if self.negate else ""
        return f"{key_text(self.key)} {op}@{self.set}"


@dataclass(frozen=True, slots=True)
class VMap:
    """``KEY vmap @map``: look the packet up, apply the verdict found (if any)."""

    key: Key
    map: str

    def text(self) -> str:
        return f"{key_text(self.key)} vmap @{self.map}"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["accept", "drop", "return", "jump", "goto"]
    chain: str | None = None

    def __post_init__(self) -> None:
        if (self.chain is None) == (self.kind in ("jump", "goto")):
            raise ValueError(f"verdict {self.kind} {self.chain}: chain mismatch")

    def text(self) -> str:
        return f"{self.kind} {self.chain}" if self.chain else self.kind


@dataclass(frozen=True, slots=True)
class Reject:
    """Plain ``reject``: ICMP(v6) port unreachable, as upstream's reject-chain does."""

    def text(self) -> str:
        return "reject"


@dataclass(frozen=True, slots=True)
class MarkSet:
    """``meta mark set meta mark | BIT`` (or ``^ BIT`` to clear a set bit)."""

    op: Literal["|", "^"]
    value: int

    def text(self) -> str:
        return f"meta mark set meta mark {self.op} {self.value:#010x}"


@dataclass(frozen=True, slots=True)
class Masquerade:
    def text(self) -> str:
        return "masquerade fully-random"


@dataclass(frozen=True, slots=True)
class Dnat:
    """``dnat to ADDR:PORT``."""

    addr: IPAddress
    port: int

    def text(self) -> str:
        addr = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"dnat to {addr}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnatMap:
    """``dnat ip|ip6 to KEY map @map``: the map gives ``address . port``."""

    family: Literal["ip", "ip6"]
    key: Key
    map: str

    def text(self) -> str:
        return f"dnat {self.family} to {key_text(self.key)} map @{self.map}"


@dataclass(frozen=True, slots=True)
class Update:
    """``update @set { KEY }``: add the key, or refresh its timeout."""

    set: str
    key: Expr

    def text(self) -> str:
        return f"update @{self.set} {{ {self.key.text()} }}"


Match: TypeAlias = Cmp | SetMatch
Statement: TypeAlias = VMap | Verdict | Reject | MarkSet | Masquerade | Dnat | DnatMap | Update
Item: TypeAlias = Match | Statement


@dataclass(frozen=True, slots=True)
class Rule:
    items: tuple[Item, ...]
    comment: str | None = None

    def text(self) -> str:
        body = " ".join(i.text() for i in self.items)
        return f'{body} comment "{self.comment}"' if self.comment else body


@dataclass(frozen=True, slots=True)
class Hook:
    """What makes a chain a base chain."""

    type: Literal["filter", "nat"]
    hook: Literal["prerouting", "input", "forward", "output", "postrouting"]
    priority: int


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class SetDef:
    """A named set or map.

    ``key``/``data`` are either ``type`` names (``ipv4_addr . inet_proto``, ``verdict``)
    or, when ``typeof`` is true, expressions (``numgen random mod 1 . ...``).
    """

    name: str
    key: str
    data: str | None = None  # None: a set; else a map
    typeof: bool = False
    comment: str | None = None
    timeout: int | None = None  # seconds; makes a dynamic set with timeouts

    @property
    def is_map(self) -> bool:
        return self.data is not None

    def text(self, elements: list[str] | None = None, indent: str = "\t") -> list[str]:
        kind = "map" if self.is_map else "set"
        decl = "typeof" if self.typeof else "type"
        key = f"{self.key} : {self.data}" if self.data else self.key
        lines = [f"{indent}{kind} {self.name} {{", f"{indent}\t{decl} {key}"]
        if self.timeout is not None:
            lines += [f"{indent}\tflags dynamic,timeout",
                      f"{indent}\ttimeout {duration_text(self.timeout)}"]
        if self.comment:
            lines.append(f'{indent}\tcomment "{self.comment}"')
        if elements:
            lines.append(f"{indent}\telements = {{ " + f",\n{indent}\t\t     ".join(elements)
                         + " }")
        lines.append(f"{indent}}}")
        return lines


# An element: key values (one per key part), data (a value tuple for data maps, a verdict
# for verdict maps, None for sets) and an optional comment.
ElementData: TypeAlias = tuple[Value, ...] | Verdict | None


class Element(NamedTuple):
    """A set or map element (a tuple: hundreds of thousands are built in a full sync)."""

    key: tuple[Value, ...]
    data: ElementData = None
    comment: str | None = None

    def text(self, key_types: tuple[str, ...], data_types: tuple[str, ...] = ()) -> str:
        key = " . ".join(_typed_text(t, v) for t, v in zip(key_types, self.key, strict=True))
        if self.comment:
            key += f' comment "{self.comment}"'
        if self.data is None:
            return key
        if isinstance(self.data, Verdict):
            return f"{key} : {self.data.text()}"
        data = " . ".join(_typed_text(t, v) for t, v in zip(data_types, self.data, strict=True))
        return f"{key} : {data}"


def duration_text(seconds: int) -> str:
    """nft's spelling of a duration: 10800 -> ``3h``, 90 -> ``1m30s``."""
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


def _value_text(expr: Expr, value: Value) -> str:
    kind = expr.type if isinstance(expr, Field) else "integer"
    return _typed_text(kind, value)


def _typed_text(kind: str, value: Value) -> str:
    if kind == "ifname":
        return f'"{value}"'
    if kind == "mark" and isinstance(value, int):
        return f"{value:#010x}"
    return str(value)


def field_types(spec: str) -> tuple[str, ...]:
    """Value types of the parts of a ``type`` or ``typeof`` key/data spec."""
    out: list[str] = []
    for part in spec.split(" . "):
        part = part.strip()
        if part.startswith("numgen "):
            out.append("integer")
        elif part in FIELDS:
            out.append(FIELDS[part][1])
        else:
            out.append(part)
    return tuple(out)
