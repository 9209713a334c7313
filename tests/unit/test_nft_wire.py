"""Netlink encoding: what nft 1.0.6 sends for the same objects, byte for byte where the
bytes were captured from nft (set metadata), expression for expression for rules."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from kubeproxy.render import nft_wire as wire
from kubeproxy.render.nft_ir import (
    Cmp,
    Dnat,
    DnatMap,
    Element,
    Field,
    Numgen,
    Rule,
    SetDef,
    Update,
    Verdict,
    VMap,
)
from kubeproxy.render.nftables import GLOBAL_SETS, FamilyName, endpoint_map_def

# Set "user data" nft 1.0.6 wrote for these declarations (dumped from the kernel).
NFT_UDATA = {
    "cluster-ips": "00040200000007124163746976652043" "6c757374657249507300",
    "service-ips": "000400000000010400000000030800040d000000010006040000000007"
                   "32436c757374657249502c2045787465726e616c495020616e64204c6f"
                   "616442616c616e636572204950207472616666696300",
}
NUMGEN3_TYPEOF = (
    "00040d0000000154001a0004170000000112000401000000010401000000020400000000011a00041700"
    "00000112000401000000010401000000020400000000021a000417000000011200040100000001040100"
    "0000020400000000")
DATA_TYPEOF = {
    "ip": "00040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c"
          "00040b000000010402000000",
    "ip6": "00040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c"
           "00040b000000010402000000",
}


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, i)
        out.append((kind & 0x3FFF, data[i + 4:i + size]))
        i += (size + 3) & ~3
    return out


def udata(blob: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 2 <= len(blob):
        out[blob[i]] = blob[i + 2:i + 2 + blob[i + 1]]
        i += 2 + blob[i + 1]
    return out


def set_attrs(sdef: SetDef, family: str = "ip") -> dict[int, bytes]:
    return dict(attrs(wire.set_msg(family, "kube-proxy", sdef, 1).payload))


def global_set(name: str, family: str = "ip") -> SetDef:
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    n, k, d, c = next(s for s in GLOBAL_SETS if s[0] == name)
    return SetDef(n, k.format(addr=addr), d, comment=c)


@pytest.mark.parametrize("name", sorted(NFT_UDATA))
def test_set_user_data_is_nfts(name: str) -> None:
    assert set_attrs(global_set(name))[13].hex() == NFT_UDATA[name]


@pytest.mark.parametrize(("name", "family", "key_type", "key_len", "data_type"), [
    ("cluster-ips", "ip", 7, 4, None),
    ("cluster-ips", "ip6", 8, 16, None),
    ("hairpin-endpoints", "ip", 7 << 6 | 7, 8, None),
    ("service-ips", "ip", 7 << 12 | 12 << 6 | 13, 12, wire.DATA_VERDICT),
    ("service-ips", "ip6", 8 << 12 | 12 << 6 | 13, 24, wire.DATA_VERDICT),
    ("service-nodeports", "ip", 12 << 6 | 13, 8, wire.DATA_VERDICT),
])
def test_set_types(name: str, family: str, key_type: int, key_len: int,
                   data_type: int | None) -> None:
    a = set_attrs(global_set(name, family), family)
    assert struct.unpack(">I", a[4])[0] == key_type
    assert struct.unpack(">I", a[5])[0] == key_len
    if data_type is None:
        assert 6 not in a and 3 not in a  # a plain set: no flags
    else:
        assert struct.unpack(">I", a[6])[0] == data_type
        assert struct.unpack(">I", a[3])[0] == wire.SET_MAP


@pytest.mark.parametrize("family", ["ip", "ip6"])
def test_endpoint_maps_are_described_as_nft_describes_typeof(family: FamilyName) -> None:
    a = set_attrs(endpoint_map_def(family, 0x2C), family)
    u = udata(a[13])
    assert u[4].hex() == DATA_TYPEOF[family]
    if family == "ip":
        assert u[3].hex() == NUMGEN3_TYPEOF
        assert struct.unpack(">II", a[4] + a[5]) == (4 << 12 | 4 << 6 | 4, 12)
        assert struct.unpack(">II", a[6] + a[7]) == (7 << 6 | 13, 8)
    else:
        assert struct.unpack(">II", a[4] + a[5]) == (4 << 18 | 4 << 12 | 4 << 6 | 4, 16)
        assert struct.unpack(">II", a[6] + a[7]) == (8 << 6 | 13, 20)
    assert u[7] == b"service port . slot -> endpoint\0"


def test_affinity_set_has_timeout_and_no_size() -> None:
    a = set_attrs(SetDef("affinity-x", "ipv4_addr", timeout=10800))
    assert struct.unpack(">I", a[3])[0] == wire.SET_TIMEOUT | wire.SET_EVAL
    assert struct.unpack(">Q", a[11])[0] == 10_800_000
    assert 9 not in a  # a preset size makes the kernel preallocate 1 MiB per set
    assert a[13].hex() == "000402000000"


def expressions(rule: Rule, family: str = "ip") -> list[tuple[str, dict[int, bytes]]]:
    body = dict(attrs(wire.rule_msg(family, "kube-proxy", "c", rule).payload))
    out = []
    for _, elem in attrs(body[4]):
        e = dict(attrs(elem))
        out.append((e[1].rstrip(b"\0").decode(), dict(attrs(e[2]))))
    return out


def names(rule: Rule, family: str = "ip") -> list[str]:
    return [n for n, _ in expressions(rule, family)]


def u32(raw: bytes) -> int:
    return int(struct.unpack(">I", raw)[0])


@pytest.mark.parametrize(("rule", "want"), [
    (Rule((Cmp(Field("ct state"), "new"), Verdict("jump", "x"))),
     ["ct", "bitwise", "cmp", "immediate"]),
    (Rule((Cmp(Field("ip saddr"), ipaddress.ip_network("10.0.0.0/8"), negate=True),)),
     ["payload", "cmp"]),
    (Rule((Cmp(Field("ip saddr"), ipaddress.ip_network("203.0.113.0/25")),)),
     ["payload", "bitwise", "cmp"]),
    (Rule((Cmp(Field("tcp dport"), 80),)), ["meta", "cmp", "payload", "cmp"]),
    (Rule((VMap((Field("ip daddr"), Field("meta l4proto"), Field("th dport")), "m"),)),
     ["payload", "meta", "payload", "lookup"]),
    (Rule((Update("s", Field("ip saddr")), Dnat(ipaddress.ip_address("10.1.2.3"), 80))),
     ["payload", "dynset", "immediate", "immediate", "nat"]),
])
def test_expression_sequences_are_nfts(rule: Rule, want: list[str]) -> None:
    assert names(rule) == want


def test_prefix_loads_only_its_bytes() -> None:
    (_, payload), (_, cmp) = expressions(
        Rule((Cmp(Field("ip saddr"), ipaddress.ip_network("10.0.0.0/8"), negate=True),)))
    assert u32(payload[3]) == 12 and u32(payload[4]) == 1
    assert u32(cmp[2]) == 1 and dict(attrs(cmp[3]))[1] == b"\x0a"


@pytest.mark.parametrize(("family", "port_reg"), [("ip", 9), ("ip6", 12)])
def test_dnat_through_a_map_uses_consecutive_registers(family: FamilyName,
                                                       port_reg: int) -> None:
    words = 2 if family == "ip" else 3
    key = (*(Numgen("random", 1, c) for c in range(1, words + 1)), Numgen("random", 3, 5))
    exprs = expressions(Rule((Cmp(Field("meta l4proto"), "tcp"), DnatMap(family, key, "m"))),
                        family)
    assert [n for n, _ in exprs] == ["meta", "cmp", *["numgen"] * (words + 1), "lookup", "nat"]
    regs = [u32(a[1]) for n, a in exprs if n == "numgen"]
    assert regs == [1, *range(9, 9 + words)]
    assert [u32(a[2]) for n, a in exprs if n == "numgen"] == [1] * words + [3]  # modulus
    assert u32(exprs[-2][1][3]) == 1  # the lookup writes address . port to register 1
    nat = exprs[-1][1]
    assert (u32(nat[3]), u32(nat[5])) == (1, port_reg)


def test_endpoint_elements() -> None:
    codec = wire.ElementCodec(endpoint_map_def("ip", 1))
    raw = codec.element(Element((0xAC1E0029, 20486, 1),
                                (ipaddress.ip_address("10.180.0.1"), 80), "ns1/svc1/tcp/p80"))
    (_, body), = attrs(raw)
    parts = dict(attrs(body))
    assert dict(attrs(parts[1]))[1] == struct.pack("=III", 0xAC1E0029, 20486, 1)
    assert dict(attrs(parts[2]))[1] == bytes([10, 180, 0, 1, 0, 80, 0, 0])
    assert udata(parts[6]) == {0: b"ns1/svc1/tcp/p80\0"}


def test_verdict_elements() -> None:
    codec = wire.ElementCodec(global_set("service-ips"))
    raw = codec.element(Element((ipaddress.ip_address("172.30.0.41"), "tcp", 80),
                                Verdict("goto", "service-x")))
    parts = dict(attrs(attrs(raw)[0][1]))
    assert dict(attrs(parts[1]))[1] == bytes([172, 30, 0, 41, 6, 0, 0, 0, 0, 80, 0, 0])
    verdict = dict(attrs(dict(attrs(parts[2]))[2]))
    assert struct.unpack(">i", verdict[1])[0] == wire.VERDICT_CODES["goto"]
    assert verdict[2] == b"service-x\0"


def test_element_lists_stay_under_the_attribute_limit() -> None:
    codec = wire.ElementCodec(global_set("hairpin-endpoints"))
    elems = [Element((ip, ip)) for ip in
             (ipaddress.ip_address(0x0A000000 + i) for i in range(10_000))]
    msgs = list(wire.element_msgs(wire.NEWSETELEM, "ip", "kube-proxy", codec, elems))
    assert len(msgs) > 1
    total = 0
    for msg in msgs:
        listed = dict(attrs(msg.payload))[3]
        assert len(listed) + 4 < 65536
        total += len(attrs(listed))
    assert total == 10_000


def test_a_rule_is_described_only_when_asked() -> None:
    """A rule's message carries its description unspelled (the text costs ~5 MiB at
    10,000 services); str() spells it as nft prints the rule."""
    rule = Rule((Cmp(Field("ct state"), "new"), Verdict("jump", "x")))
    what = wire.rule_msg("ip", "kube-proxy", "c", rule).what
    assert not isinstance(what, str)
    assert str(what) == f"add rule c {rule.text()}" and "jump x" in str(what)
