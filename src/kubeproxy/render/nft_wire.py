"""The IR of :mod:`.nft_ir` as nf_tables netlink messages: what nft would send. Pure.

Theory of operation
-------------------
The data plane talks to the kernel directly (see dataplane/nftables.py for why: ``nft``
re-reads every chain before each command and is quadratic on large inputs). This module
turns tables, chains, rules, sets and elements into the messages of one nfnetlink batch,
attribute for attribute what nft 1.0.6 sends for the same text, so ``nft list ruleset``
prints exactly what the renderer's script says (the kernel tests compare the two):

* expressions as nft linearizes them (a ``/8`` prefix loads one byte; ``ct state new``
  is a bitwise test; ``tcp dport`` carries its ``meta l4proto`` dependency; keys of
  concatenations go to consecutive 32-bit registers);
* set metadata (key/data type ids, lengths, flags) and nft's set "user data" (byte
  orders, ``typeof`` descriptions, comments), which is how nft knows how to print them.

Only building happens here; sockets, sequence numbers and error handling are the data
plane's. Messages are returned as (type, flags, family, payload) tuples.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from kubeproxy.render.nft_ir import (
    CT_STATES,
    CT_STATUS,
    FIB_ADDRTYPES,
    PROTOCOL_NUMBERS,
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
    SetDef,
    SetMatch,
    Update,
    Value,
    Verdict,
    VMap,
    field_types,
)

NFNL_SUBSYS_NFTABLES = 10
MSG_BATCH_BEGIN, MSG_BATCH_END = 0x10, 0x11
(NEWTABLE, GETTABLE, DELTABLE, NEWCHAIN, GETCHAIN, DELCHAIN, NEWRULE, GETRULE, DELRULE,
 NEWSET, GETSET, DELSET, NEWSETELEM, GETSETELEM, DELSETELEM, NEWGEN, GETGEN) = range(17)
F_REQUEST, F_ACK, F_DUMP = 0x1, 0x4, 0x300
F_CREATE, F_APPEND = 0x400, 0x800
NLA_F_NESTED = 0x8000
FAMILIES = {"ip": 2, "ip6": 10}
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
VERDICT_CODES = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
SET_MAP, SET_TIMEOUT, SET_EVAL = 0x8, 0x10, 0x20
DATA_VERDICT = 0xFFFFFF00
_TYPE_IDS = {"integer": 4, "ipv4_addr": 7, "ipv6_addr": 8, "inet_proto": 12,
             "inet_service": 13}
_TYPE_LEN = {"integer": 4, "ipv4_addr": 4, "ipv6_addr": 16, "inet_proto": 1,
             "inet_service": 2}
# (base, offset, length) of payload fields; base 1 = network header, 2 = transport.
_PAYLOAD = {"ip saddr": (1, 12, 4), "ip daddr": (1, 16, 4), "ip6 saddr": (1, 8, 16),
            "ip6 daddr": (1, 24, 16), "th dport": (2, 2, 2), "tcp dport": (2, 2, 2),
            "udp dport": (2, 2, 2), "sctp dport": (2, 2, 2)}
_META = {"meta l4proto": (16, 1), "iifname": (6, 16), "meta mark": (3, 4)}
# nft's descriptions of payload fields in set user data: (protocol, template).
_PAYLOAD_UDATA = {"ip daddr": (12, 12), "ip6 daddr": (13, 9), "th dport": (11, 2)}


_ADDRESS = (ipaddress.IPv4Address, ipaddress.IPv6Address)


class RuleWhat(NamedTuple):
    """A rule's description for error messages, spelled only if one is needed: a full
    sync at 10,000 services sends ~40,000 rules, and their text is ~5 MiB."""

    chain: str
    rule: Rule

    def __str__(self) -> str:
        return f"add rule {self.chain} {self.rule.text()}"


class Message(NamedTuple):
    type: int  # NFT_MSG_* (the subsystem is added when sending)
    flags: int
    family: int
    payload: bytes
    what: str | RuleWhat  # for error messages: str() of it


# -- attributes ----------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def strz(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a message body (the last one of a type wins)."""
    out: dict[int, bytes] = {}
    i = 0
    while i + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, i)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + size]
        i += (size + 3) & ~3
    return out


def _udata(*items: tuple[int, bytes]) -> bytes:
    return b"".join(bytes((t, len(v))) + v for t, v in items)


def _comment(text: str) -> bytes:
    return text.encode() + b"\0"


# -- tables, chains, sets ------------------------------------------------------------


def table_msg(family: str, name: str, comment: str | None) -> Message:
    body = strz(1, name) + u32(2, 0)
    if comment:
        body += attr(6, _udata((0, _comment(comment))))
    return Message(NEWTABLE, F_CREATE, FAMILIES[family], body, f"add table {family} {name}")


def del_table_msg(family: str, name: str) -> Message:
    return Message(DELTABLE, 0, FAMILIES[family], strz(1, name),
                   f"delete table {family} {name}")


def chain_msg(family: str, table: str, chain: Chain) -> Message:
    body = strz(1, table) + strz(3, chain.name)
    if chain.hook:
        h = chain.hook
        body += nest(4, u32(1, HOOKS[h.hook]), u32(2, h.priority)) + u32(5, 1)
        body += strz(7, h.type)
    if chain.comment:
        body += attr(12, _udata((0, _comment(chain.comment))))
    return Message(NEWCHAIN, F_CREATE, FAMILIES[family], body, f"add chain {chain.name}")


def chain_ref_msg(kind: int, family: str, table: str, chain: str) -> Message:
    """DELCHAIN (delete) or DELRULE (flush) of a chain, by name."""
    what = "delete chain" if kind == DELCHAIN else "flush chain"
    name_attr = 3 if kind == DELCHAIN else 2
    return Message(kind, 0, FAMILIES[family], strz(1, table) + strz(name_attr, chain),
                   f"{what} {chain}")


def set_msg(family: str, table: str, sdef: SetDef, set_id: int) -> Message:
    key_types = field_types(sdef.key)
    body = strz(1, table) + strz(2, sdef.name)
    flags = (SET_MAP if sdef.is_map else 0) | (
        SET_TIMEOUT | SET_EVAL if sdef.timeout is not None else 0)
    if flags:
        body += u32(3, flags)
    body += u32(4, _type_id(key_types)) + u32(5, _width(key_types))
    if sdef.data == "verdict":
        body += u32(6, DATA_VERDICT) + u32(7, 16)
    elif sdef.data:
        data_types = field_types(sdef.data)
        body += u32(6, _type_id(data_types)) + u32(7, _width(data_types))
    body += u32(10, set_id)
    if sdef.timeout is not None:
        # No size: nft 1.0.6 adds "size 65535" when a rule in the same input updates the
        # set, and the kernel then preallocates a 1 MiB hash table per set (0.4 s per 100
        # sets); without one the table starts small and grows.
        body += attr(11, struct.pack(">Q", sdef.timeout * 1000))
    body += attr(13, _set_udata(sdef, key_types))
    return Message(NEWSET, F_CREATE, FAMILIES[family], body, f"add set {sdef.name}")


def set_ref_msg(kind: int, family: str, table: str, name: str) -> Message:
    """DELSET (delete) or DELSETELEM without elements (flush) of a set, by name."""
    what = "delete set" if kind == DELSET else "flush set"
    return Message(kind, 0, FAMILIES[family], strz(1, table) + strz(2, name),
                   f"{what} {name}")


def _type_id(types: tuple[str, ...]) -> int:
    out = 0
    for t in types:
        out = out << 6 | _TYPE_IDS[t]
    return out


def _width(types: tuple[str, ...]) -> int:
    if len(types) == 1:
        return _TYPE_LEN[types[0]]
    return sum((_TYPE_LEN[t] + 3) & ~3 for t in types)


def _set_udata(sdef: SetDef, key_types: tuple[str, ...]) -> bytes:
    concat = len(key_types) > 1
    items: list[tuple[int, bytes]] = [(0, struct.pack("=I", 0 if concat else 2))]
    if sdef.is_map:
        items.append((1, struct.pack("=I", 0)))
    if sdef.typeof:
        items.append((3, _typeof_udata(sdef.key)))
        if sdef.data:
            items.append((4, _typeof_udata(sdef.data)))
    elif concat:
        items.append((3, _udata((0, struct.pack("=I", 13)), (1, b""))))
    if sdef.is_map:
        items.append((6, struct.pack("=I", 0)))
    if sdef.comment:
        items.append((7, _comment(sdef.comment)))
    return _udata(*items)


def _typeof_udata(spec: str) -> bytes:
    """nft's description of a ``typeof`` concatenation (numgen and payload parts)."""
    subs = []
    for i, part in enumerate(p.strip() for p in spec.split(" . ")):
        if part.startswith("numgen "):
            words = part.split()
            mode = {"inc": 0, "random": 1}[words[1]]
            data = _udata((0, struct.pack("=I", mode)), (1, struct.pack("=I", int(words[3]))),
                          (2, struct.pack("=I", 0)))
            subs.append(_udata((i, _udata((0, struct.pack("=I", 23)), (1, data)))))
        else:
            proto, template = _PAYLOAD_UDATA[part]
            data = _udata((0, struct.pack("=I", proto)), (1, struct.pack("=I", template)))
            subs.append(_udata((i, _udata((0, struct.pack("=I", 7)), (1, data)))))
    return _udata((0, struct.pack("=I", 13)), (1, b"".join(subs)))


# -- elements ------------------------------------------------------------------------


class ElementCodec:
    """Encodes the elements of one set or map. Everything about the layout is worked out
    once per set; an element is then a few byte concatenations (a full sync at 10,000
    Services encodes over 200,000 of them)."""

    def __init__(self, sdef: SetDef) -> None:
        self.sdef = sdef
        key_types = field_types(sdef.key)
        self.key = _packer(key_types, len(key_types) > 1)
        self.key_head = _heads(self.key.size, 1)
        self.data: _Packer | None = None
        if sdef.data and sdef.data != "verdict":
            self.data = _packer(field_types(sdef.data), True)
            self.data_head = _heads(self.data.size, 2)
        self._verdicts: dict[Verdict, bytes] = {}
        self._comments: dict[str, bytes] = {}

    def element(self, elem: Element, with_data: bool = True) -> bytes:
        body = self.key_head + self.key.pack(elem.key)
        if with_data:
            data = elem.data
            if isinstance(data, Verdict):
                raw = self._verdicts.get(data)
                if raw is None:
                    raw = self._verdicts[data] = nest(2, _verdict(data))
                body += raw
            elif data is not None:
                assert self.data is not None
                body += self.data_head + self.data.pack(data)
            if elem.comment:
                raw = self._comments.get(elem.comment)
                if raw is None:
                    raw = self._comments[elem.comment] = attr(
                        6, _udata((0, _comment(elem.comment))))
                body += raw
        return struct.pack("=HH", 4 + len(body), 1 | NLA_F_NESTED) + body


class _Packer(NamedTuple):
    size: int
    pack: Callable[[tuple[Value, ...]], bytes]


def _heads(size: int, kind: int) -> bytes:
    """The nest + NFTA_DATA_VALUE headers in front of a fixed-size value."""
    return struct.pack("=HHHH", 8 + size, kind | NLA_F_NESTED, 4 + size, 1)


def _packer(types: tuple[str, ...], padded: bool) -> _Packer:
    if all(t == "integer" for t in types):
        fmt = struct.Struct("=" + "I" * len(types))
        return _Packer(fmt.size, lambda v: fmt.pack(*v))
    parts = [_part(t, padded) for t in types]
    size = sum(p[0] for p in parts)
    if len(parts) == 1:
        one = parts[0][1]
        return _Packer(size, lambda v: one(v[0]))
    funcs = [p[1] for p in parts]
    return _Packer(size, lambda v: b"".join(f(x) for f, x in zip(funcs, v, strict=True)))


def _part(kind: str, padded: bool) -> tuple[int, Callable[[Value], bytes]]:
    pad = padded
    if kind in ("ipv4_addr", "ipv6_addr"):
        return _TYPE_LEN[kind], lambda v: v.packed
    if kind == "inet_proto":
        protos = {name: bytes((num,)) + (b"\0\0\0" if pad else b"")
                  for name, num in PROTOCOL_NUMBERS.items()}
        return (4 if pad else 1), lambda v: protos[str(v)]
    if kind == "inet_service":
        port = struct.Struct(">Hxx" if pad else ">H")
        return port.size, lambda v: port.pack(v)
    if kind == "integer":
        num = struct.Struct("=I")
        return 4, lambda v: num.pack(v)
    raise ValueError(f"cannot encode values of type {kind}")


def element_msgs(kind: int, family: str, table: str, codec: ElementCodec,
                 elements: Iterable[Element], limit: int = 60_000) -> Iterator[Message]:
    """NEWSETELEM / DELSETELEM messages, each element list under the 64 KiB nest limit."""
    head = strz(1, table) + strz(2, codec.sdef.name)
    verb = "add" if kind == NEWSETELEM else "delete"
    flags = F_CREATE if kind == NEWSETELEM else 0
    fam = FAMILIES[family]
    with_data = kind == NEWSETELEM
    chunk: list[bytes] = []
    size = 0
    for elem in elements:
        data = codec.element(elem, with_data)
        if size + len(data) > limit and chunk:
            yield Message(kind, flags, fam, head + nest(3, *chunk),
                          f"{verb} elements of {codec.sdef.name}")
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield Message(kind, flags, fam, head + nest(3, *chunk),
                      f"{verb} elements of {codec.sdef.name}")


# -- rules ---------------------------------------------------------------------------


def rule_msg(family: str, table: str, chain: str, rule: Rule,
             cache: dict[tuple[str, Item], bytes] | None = None) -> Message:
    """NEWRULE; ``cache`` keeps each item's encoding for the rest of the transaction (the
    same matches and jumps recur in thousands of rules)."""
    if cache is None:
        cache = {}
    parts = []
    for item in rule.items:
        if isinstance(item, DnatMap | Dnat) or (
                isinstance(item, Cmp) and isinstance(item.value, _ADDRESS)):
            parts.append(b"".join(_expressions(family, (item,))))  # one per Service
            continue
        raw = cache.get((family, item))
        if raw is None:
            raw = cache[(family, item)] = b"".join(_expressions(family, (item,)))
        parts.append(raw)
    body = strz(1, table) + strz(2, chain) + nest(4, *parts)
    if rule.comment:
        body += attr(7, _udata((0, _comment(rule.comment))))
    return Message(NEWRULE, F_CREATE | F_APPEND, FAMILIES[family], body,
                   RuleWhat(chain, rule))


def _expr(name: str, *data: bytes) -> bytes:
    return nest(1, strz(1, name), nest(2, *data))


def _data(payload: bytes) -> bytes:
    return attr(1, payload)


def _verdict(v: Verdict) -> bytes:
    body = u32(1, VERDICT_CODES[v.kind])
    if v.chain:
        body += strz(2, v.chain)
    return nest(2, body)


def _reg(word: int) -> int:
    """nft's register for a value starting at 32-bit word ``word`` of the key area."""
    return 1 if word == 0 else 8 + word


def _expressions(family: str, items: tuple[Item, ...]) -> Iterator[bytes]:
    for item in items:
        if isinstance(item, Cmp):
            yield from _cmp(item)
        elif isinstance(item, SetMatch):
            yield from _load_key(item.key)
            flags = 1 if item.negate else 0
            yield _expr("lookup", strz(1, item.set), u32(2, 1), u32(5, flags))
        elif isinstance(item, VMap):
            yield from _load_key(item.key)
            yield _expr("lookup", strz(1, item.map), u32(2, 1), u32(3, 0), u32(5, 0))
        elif isinstance(item, Verdict):
            yield _expr("immediate", u32(1, 0), nest(2, _verdict(item)))
        elif isinstance(item, Reject):
            yield _expr("reject", u32(1, 0), attr(2, bytes((3 if family == "ip" else 4,))))
        elif isinstance(item, MarkSet):
            mask = ~item.value & 0xFFFFFFFF if item.op == "|" else 0xFFFFFFFF
            yield _expr("meta", u32(2, 3), u32(1, 1))
            yield _bitwise(4, mask, item.value)
            yield _expr("meta", u32(2, 3), u32(3, 1))
        elif isinstance(item, Masquerade):
            yield _expr("masq", u32(1, 0x10))
        elif isinstance(item, Dnat):
            port = struct.pack(">H", item.port)
            yield _expr("immediate", u32(1, 1), nest(2, _data(item.addr.packed)))
            yield _expr("immediate", u32(1, 2), nest(2, _data(port)))
            yield _nat(item.addr.version, 1, 2)
        elif isinstance(item, DnatMap):
            yield from _load_key(item.key)
            yield _expr("lookup", strz(1, item.map), u32(2, 1), u32(3, 1), u32(5, 0))
            version = 4 if item.family == "ip" else 6
            yield _nat(version, 1, _reg(1 if version == 4 else 4))
        elif isinstance(item, Update):
            yield from _load(item.key, 1)
            yield _expr("dynset", strz(1, item.set), u32(3, 1), u32(4, 1), u32(9, 0))
        else:  # pragma: no cover - the IR has nothing else
            raise TypeError(f"cannot encode {item!r}")


def _nat(version: int, addr_reg: int, port_reg: int) -> bytes:
    return _expr("nat", u32(1, 1), u32(2, 2 if version == 4 else 10), u32(3, addr_reg),
                 u32(4, addr_reg), u32(5, port_reg), u32(6, port_reg), u32(7, 3))


def _bitwise(length: int, mask: int, xor: int) -> bytes:
    return _expr("bitwise", u32(1, 1), u32(2, 1), u32(3, length),
                 nest(4, _data(struct.pack("=I", mask))), nest(5, _data(struct.pack("=I", xor))))


def _cmp_expr(negate: bool, value: bytes) -> bytes:
    return _expr("cmp", u32(1, 1), u32(2, 1 if negate else 0), nest(3, _data(value)))


def _load_key(key: Key) -> Iterator[bytes]:
    word = 0
    for expr in key:
        yield from _load(expr, _reg(word))
        word += (_expr_width(expr) + 3) // 4


def _expr_width(expr: Expr) -> int:
    if isinstance(expr, Numgen):
        return 4
    if expr.name in _PAYLOAD:
        return _PAYLOAD[expr.name][2]
    if expr.name in _META:
        return _META[expr.name][1]
    return 4


def _load(expr: Expr, reg: int, length: int | None = None) -> Iterator[bytes]:
    """Load ``expr`` into ``reg`` (with its protocol dependency, for ``tcp dport``)."""
    if isinstance(expr, Numgen):
        mode = 0 if expr.mode == "inc" else 1
        yield _expr("numgen", u32(1, reg), u32(2, expr.mod), u32(3, mode), u32(4, expr.offset))
        return
    name = expr.name
    if name in _PAYLOAD:
        proto = name.split()[0]
        if proto in PROTOCOL_NUMBERS:
            yield _expr("meta", u32(2, 16), u32(1, 1))
            yield _cmp_expr(False, bytes((PROTOCOL_NUMBERS[proto],)))
        base, offset, size = _PAYLOAD[name]
        yield _expr("payload", u32(1, reg), u32(2, base), u32(3, offset),
                    u32(4, length or size))
    elif name in _META:
        yield _expr("meta", u32(2, _META[name][0]), u32(1, reg))
    elif name in ("ct state", "ct status"):
        yield _expr("ct", u32(1, reg), u32(2, 0 if name == "ct state" else 2))
    elif name in ("fib saddr type", "fib daddr type"):
        flags = 1 if name.startswith("fib saddr") else 2
        yield _expr("fib", u32(1, reg), u32(2, 3), u32(3, flags))
    else:  # pragma: no cover
        raise TypeError(f"cannot load {name}")


def _cmp(item: Cmp) -> Iterator[bytes]:
    expr, value = item.expr, item.value
    if isinstance(expr, Numgen):
        yield from _load(expr, 1)
        yield _cmp_expr(item.negate, struct.pack("=I", int(value)))  # type: ignore[arg-type]
        return
    name = expr.name
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        yield from _prefix(expr, value, item.negate)
    elif isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        yield from _load(expr, 1)
        yield _cmp_expr(item.negate, value.packed)
    elif name in ("ct state", "ct status"):
        bit = (CT_STATES if name == "ct state" else CT_STATUS)[str(value)]
        yield from _load(expr, 1)
        yield _bitwise(4, bit, 0)
        yield _cmp_expr(not item.negate, struct.pack("=I", 0))
    elif name == "meta mark":
        yield from _load(expr, 1)
        if item.mask is not None:
            yield _bitwise(4, item.mask, 0)
        yield _cmp_expr(item.negate, struct.pack("=I", int(value)))
    elif name == "meta l4proto":
        yield from _load(expr, 1)
        yield _cmp_expr(item.negate, bytes((PROTOCOL_NUMBERS[str(value)],)))
    elif name == "iifname":
        text = str(value)
        raw = text[:-1].encode() if text.endswith("*") else text.encode().ljust(16, b"\0")
        yield _expr("meta", u32(2, 6), u32(1, 1))
        yield _cmp_expr(item.negate, raw)
    elif name.startswith("fib "):
        yield from _load(expr, 1)
        yield _cmp_expr(item.negate, struct.pack("=I", FIB_ADDRTYPES[str(value)]))
    elif isinstance(expr, Field) and expr.type == "inet_service":
        yield from _load(expr, 1)
        yield _cmp_expr(item.negate, struct.pack(">H", int(value)))
    else:  # pragma: no cover
        raise TypeError(f"cannot encode {item.text()}")


def _prefix(expr: Expr, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
            negate: bool) -> Iterator[bytes]:
    """As nft: a byte-aligned prefix loads only its bytes; otherwise mask, then compare."""
    assert isinstance(expr, Field)
    base, offset, _ = _PAYLOAD[expr.name]
    if net.prefixlen % 8 == 0:
        nbytes = net.prefixlen // 8
        yield _expr("payload", u32(1, 1), u32(2, base), u32(3, offset), u32(4, nbytes))
        yield _cmp_expr(negate, net.network_address.packed[:nbytes])
        return
    nbytes = (net.prefixlen + 7) // 8
    mask = net.netmask.packed[:nbytes]
    yield _expr("payload", u32(1, 1), u32(2, base), u32(3, offset), u32(4, nbytes))
    yield _expr("bitwise", u32(1, 1), u32(2, 1), u32(3, nbytes), nest(4, _data(mask)),
                nest(5, _data(b"\0" * nbytes)))
    yield _cmp_expr(negate, net.network_address.packed[:nbytes])
