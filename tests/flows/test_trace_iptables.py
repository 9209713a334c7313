"""The iptables tracer on its own: small hand-written iptables-save rulesets, one packet each.

test_flows.py checks the tracer against the renderer; this table checks the tracer against
iptables itself, so a tracer bug cannot hide behind a matching renderer bug. The rulesets
are in canonical iptables-save form, copied from `kubeproxy render` output and trimmed.
Conventions as upstream's tests: node 192.168.0.2, pods in 10.0.0.0/8, endpoints
10.180.x.y, ClusterIP 172.30.0.41.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import pytest

from kubeproxy.trace.iptables import parse_iptables_save, trace_iptables, trace_ruleset
from kubeproxy.trace.iptables_parse import RulesetParseError
from kubeproxy.trace.result import IPAddress, Packet, TraceLimitError, TraceResult

NODE_IP = "192.168.0.2"
POD = "10.180.0.9"  # a pod on this node that is not an endpoint
EXTERNAL = "203.0.113.2"
CIP = "172.30.0.41"
EP1, EP2, EP3 = "10.180.0.1:80", "10.180.1.1:80", "10.180.2.1:80"
SVC, SEP1, SEP2, SEP3 = "KUBE-SVC-NS1SVC1", "KUBE-SEP-EP1", "KUBE-SEP-EP2", "KUBE-SEP-EP3"
EXT = "KUBE-EXT-NS1SVC1"

_BUILTINS = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
_TARGET = re.compile(r" -[jg] (KUBE-\S+)")


def dump(
    *, mangle: str = "", filter_: str = "", nat: str = "", policy: Mapping[str, str] | None = None
) -> str:
    """An iptables-save dump of these rules; `policy` maps "filter FORWARD" to "DROP".

    Declares the builtin chains, every chain that has a rule and every KUBE-* jump target,
    in iptables-save's order, so a case only writes its rules.
    """
    out = []
    for table, rules in (("mangle", mangle), ("filter", filter_), ("nat", nat)):
        lines = [line.strip() for line in rules.splitlines() if line.strip()]
        chains = {line.split()[1] for line in lines} | set(_TARGET.findall("\n".join(lines)))
        out.append(f"*{table}")
        for name in _BUILTINS[table]:
            out.append(f":{name} {(policy or {}).get(f'{table} {name}', 'ACCEPT')} [0:0]")
        out += [f":{name} - [0:0]" for name in sorted(chains - set(_BUILTINS[table]))]
        out += [*lines, "COMMIT"]
    return "\n".join(out) + "\n"


# --- the base rulesets: one ClusterIP service ns1/svc1 with a NodePort, two endpoints ---

NAT = f"""
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A {EXT} -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ
-A {EXT} -j {SVC}
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j {EXT}
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A {SEP1} -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A {SEP1} -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination {EP1}
-A {SEP2} -s 10.180.1.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ
-A {SEP2} -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination {EP2}
-A KUBE-SERVICES -d {CIP}/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j {SVC}
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A {SVC} ! -s 10.0.0.0/8 -d {CIP}/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A {SVC} -m comment --comment "ns1/svc1:p80 -> {EP1}" -m statistic --mode random --probability 0.50000000000 -j {SEP1}
-A {SVC} -m comment --comment "ns1/svc1:p80 -> {EP2}" -j {SEP2}
"""  # noqa: E501

FILTER = """
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc3:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 3003 -j DROP
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-SERVICES -d 172.30.0.42/32 -p tcp -m comment --comment "ns1/svc2:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
"""  # noqa: E501

BASE = dump(filter_=FILTER, nat=NAT)


def nat_with_service(svc_rules: str, *endpoints: tuple[str, str]) -> str:
    """NAT with ns1/svc1's KUBE-SVC chain replaced by `svc_rules` and these (chain, ip:port)
    endpoint chains added."""
    kept = "\n".join(line for line in NAT.splitlines() if not line.startswith("-A KUBE-S"))
    seps = "\n".join(
        f"-A {chain} -p tcp -m comment --comment \"ns1/svc1:p80\" -m tcp -j DNAT "
        f"--to-destination {ep}"
        for chain, ep in endpoints
    )
    services = (
        f"-A KUBE-SERVICES -d {CIP}/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" "
        f"-m tcp --dport 80 -j {SVC}"
    )
    return "\n".join((kept, seps, services, svc_rules))


AFFINITY = """
-A {svc} -m comment --comment "ns1/svc1:p80 -> {ep1}" -m recent --{cmd} --seconds 10800 --reap --name {sep1} --mask 255.255.255.255 --rsource -j {sep1}
-A {svc} -m comment --comment "ns1/svc1:p80 -> {ep2}" -j {sep2}
"""  # noqa: E501
NTH = f"""
-A {SVC} -m comment --comment "ns1/svc1:p80 -> {EP1}" -m statistic --mode nth --every 3 --packet 0 -j {SEP1}
-A {SVC} -m comment --comment "ns1/svc1:p80 -> {EP2}" -m statistic --mode nth --every 2 --packet 0 -j {SEP2}
-A {SVC} -m comment --comment "ns1/svc1:p80 -> {EP3}" -j {SEP3}
"""  # noqa: E501


def first_of_two(match: str) -> str:
    """KUBE-SVC: `match` decides for endpoint 1, else endpoint 2."""
    return (
        f"-A {SVC} -m comment --comment \"ns1/svc1:p80 -> {EP1}\" {match} -j {SEP1}\n"
        f"-A {SVC} -m comment --comment \"ns1/svc1:p80 -> {EP2}\" -j {SEP2}"
    )


TWO = ((SEP1, EP1), (SEP2, EP2))


def svc1(svc_rules: str, *endpoints: tuple[str, str]) -> str:
    """The base ruleset with ns1/svc1's KUBE-SVC chain replaced; see nat_with_service."""
    return dump(filter_=FILTER, nat=nat_with_service(svc_rules, *endpoints))


# detect-local-mode InterfaceNamePrefix: traffic not from a veth is masqueraded.
IFACE = svc1(
    f"-A {SVC} -d {CIP}/32 ! -i veth+ -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" "
    "-m tcp --dport 80 -j KUBE-MARK-MASQ\n"
    + first_of_two("-m statistic --mode random --probability 0.50000000000"),
    *TWO,
)
# Upstream's old KUBE-MARK-DROP: nat marks, filter drops; one branch DNATs, one is dropped.
DISAGREE = dump(
    filter_=FILTER.replace(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        "-A KUBE-FORWARD -m mark --mark 0x8000/0x8000 -j DROP",
    ),
    nat=nat_with_service(
        f"-A {SVC} -m statistic --mode random --probability 0.50000000000 -j {SEP1}\n"
        f"-A {SVC} -m comment --comment \"ns1/svc1:p80 has no endpoint left\" -j KUBE-MARK-DROP\n"
        "-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000",
        (SEP1, EP1),
    ),
)
# The first packet of a connection is NEW; only DNATed connections may be forwarded here.
ONLY_DNAT = dump(
    filter_="-A FORWARD -m conntrack ! --ctstate DNAT -m comment --comment \"not DNATed\" -j DROP",
    nat=NAT,
)
# Locally originated packets to another host take nat OUTPUT -> filter OUTPUT -> nat
# POSTROUTING and nothing else: every other hook here would drop them.
OUTPUT_ONLY = dump(
    mangle="-A PREROUTING -m comment --comment \"nothing arriving gets through\" -j DROP",
    filter_=FILTER,
    nat=NAT,
    policy={"filter INPUT": "DROP", "filter FORWARD": "DROP"},
)
# mangle PREROUTING runs before nat PREROUTING, and its mark reaches nat POSTROUTING.
MANGLE_MARK = dump(
    mangle="-A PREROUTING -j MARK --set-xmark 0x4000/0x4000", filter_=FILTER, nat=NAT
)
CALLS = """
-A PREROUTING -j KUBE-A
-A PREROUTING -m comment --comment "after KUBE-A" -j DNAT --to-destination 10.180.0.3:80
-A KUBE-A -{how} KUBE-B
-A KUBE-A -m comment --comment "after KUBE-B" -j DNAT --to-destination 10.180.0.2:80
-A KUBE-B -p tcp -m tcp --dport 80 -m comment --comment "port 80 returns" -j RETURN
-A KUBE-B -j DNAT --to-destination 10.180.0.1:80
"""
V6 = dump(
    nat="""
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:30::41/128 -p tcp -m comment --comment "ns1/svc6:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-NS1SVC6
-A KUBE-SVC-NS1SVC6 -m comment --comment "ns1/svc6:p80 -> [fd00:180::6]:80" -j KUBE-SEP-EP6
-A KUBE-SEP-EP6 -s fd00:180::6/128 -m comment --comment "ns1/svc6:p80" -j KUBE-MARK-MASQ
-A KUBE-SEP-EP6 -p tcp -m comment --comment "ns1/svc6:p80" -m tcp -j DNAT --to-destination [fd00:180::6]:80
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
"""  # noqa: E501
)
# Packets the node sends to itself come back in on lo: nat PREROUTING must not run again.
DNAT_ALL = dump(nat="-A PREROUTING -m comment --comment \"everything\" -j DNAT "
                "--to-destination 10.180.0.3:80")
FROM_LO = dump(filter_="-A INPUT -i lo -m comment --comment \"from lo\" -j REJECT", nat=NAT)
ESCAPED = dump(
    nat=r"""
-A PREROUTING -m comment --comment "ns1/svc1:p80 \"quoted\" -j KUBE-NOPE" -j KUBE-SERVICES
-A KUBE-SERVICES -p tcp -j LOG --log-prefix "svc1 hit: "
-A KUBE-SERVICES -p tcp -m multiport --dports 80,443 -j DNAT --to-destination 10.180.0.1
"""
)


@dataclass(frozen=True)
class Case:
    id: str
    ruleset: str
    src: str
    dst: str
    port: int
    verdict: str
    endpoints: tuple[str, ...]
    masquerade: bool
    path: tuple[str, ...]
    proto: Literal["tcp", "udp", "sctp"] = "tcp"
    in_interface: str = "eth0"
    local: tuple[str, ...] = field(default=(NODE_IP,))


BOTH = (EP1, EP2)
# What the base ruleset's ClusterIP and NodePort paths enter, in order.
CIP_PATH = ("KUBE-SERVICES", SVC, SEP1, SEP2, "KUBE-FORWARD", "KUBE-POSTROUTING")
MASQ_PATH = ("KUBE-SERVICES", SVC, "KUBE-MARK-MASQ", SEP1, SEP2, "KUBE-FORWARD",
             "KUBE-POSTROUTING")  # fmt: skip
ONLY_EP1_PATH = ("KUBE-SERVICES", SVC, SEP1, "KUBE-FORWARD", "KUBE-POSTROUTING")
NP_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", EXT, "KUBE-MARK-MASQ", SVC, SEP1, SEP2)

CASES = [
    # --- the kube-proxy paths ---------------------------------------------------------
    Case("clusterip-two-endpoints", BASE, POD, CIP, 80, "DNAT", BOTH, False, CIP_PATH),
    Case("clusterip-from-outside-masquerades", BASE, EXTERNAL, CIP, 80, "DNAT", BOTH, True,
         MASQ_PATH),
    Case("clusterip-wrong-port", BASE, POD, CIP, 81, "ACCEPT", (), False,
         ("KUBE-SERVICES", "KUBE-FORWARD", "KUBE-POSTROUTING")),
    Case("udp-does-not-match-tcp-rules", BASE, POD, CIP, 80, "ACCEPT", (), False,
         ("KUBE-SERVICES", "KUBE-FORWARD", "KUBE-POSTROUTING"), proto="udp"),
    Case("hairpin-endpoint-to-itself-masquerades", BASE, "10.180.0.1", CIP, 80, "DNAT", BOTH,
         True, ("KUBE-SERVICES", SVC, SEP1, "KUBE-MARK-MASQ", SEP2, "KUBE-FORWARD",
                "KUBE-POSTROUTING")),
    Case("nodeport-via-addrtype-local", BASE, EXTERNAL, NODE_IP, 3001, "DNAT", BOTH, True,
         (*NP_CHAINS, "KUBE-FORWARD", "KUBE-POSTROUTING")),
    Case("nodeport-on-an-address-that-is-not-local", BASE, EXTERNAL, NODE_IP, 3001, "ACCEPT",
         (), False, ("KUBE-SERVICES", "KUBE-FORWARD", "KUBE-POSTROUTING"), local=()),
    Case("filter-rejects-service-without-endpoints", BASE, POD, "172.30.0.42", 80, "REJECT",
         (), False, ("KUBE-SERVICES", "KUBE-FORWARD")),
    Case("external-services-drops", BASE, EXTERNAL, NODE_IP, 3003, "DROP", (), False,
         ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES")),
    Case("delivered-locally-through-input", BASE, EXTERNAL, NODE_IP, 22, "ACCEPT", (), False,
         ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL")),
    # --- hooks --------------------------------------------------------------------------
    Case("locally-originated-from-node-ip", BASE, NODE_IP, CIP, 80, "DNAT", BOTH, True,
         ("KUBE-SERVICES", SVC, "KUBE-MARK-MASQ", SEP1, SEP2, "KUBE-FIREWALL",
          "KUBE-POSTROUTING")),
    Case("locally-originated-takes-output-only", OUTPUT_ONLY, "127.0.0.1", "127.0.0.1", 3001,
         "DNAT", BOTH, True, (*NP_CHAINS, "KUBE-FIREWALL", "KUBE-POSTROUTING")),
    Case("arriving-meets-mangle-prerouting", OUTPUT_ONLY, POD, CIP, 80, "DROP", (), False, ()),
    Case("mangle-mark-reaches-postrouting", MANGLE_MARK, POD, CIP, 80, "DNAT", BOTH, True,
         CIP_PATH),
    Case("localnet-from-node-ip-dropped", BASE, NODE_IP, "127.0.0.1", 8080, "DROP", (), False,
         ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-FIREWALL")),
    Case("node-to-own-nodeport-meets-input-on-lo", BASE, NODE_IP, NODE_IP, 3003, "DROP", (),
         False, ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-FIREWALL", "KUBE-POSTROUTING",
                 "KUBE-EXTERNAL-SERVICES")),
    Case("node-to-itself-meets-mangle-prerouting-on-lo", OUTPUT_ONLY, NODE_IP, NODE_IP, 22,
         "DROP", (), False, ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-FIREWALL",
                             "KUBE-POSTROUTING")),
    Case("node-to-itself-skips-nat-prerouting-on-lo", DNAT_ALL, NODE_IP, NODE_IP, 22, "ACCEPT",
         (), False, ()),
    Case("arriving-takes-nat-prerouting", DNAT_ALL, EXTERNAL, NODE_IP, 22, "DNAT",
         ("10.180.0.3:80",), False, ()),
    Case("node-to-itself-arrives-on-lo", FROM_LO, NODE_IP, NODE_IP, 22, "REJECT", (), False,
         ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING")),
    Case("arriving-on-eth0-is-not-from-lo", FROM_LO, EXTERNAL, NODE_IP, 22, "ACCEPT", (), False,
         ("KUBE-SERVICES", "KUBE-NODEPORTS")),
    Case("builtin-policy-drop", dump(filter_=FILTER, nat=NAT, policy={"filter FORWARD": "DROP"}),
         POD, CIP, 80, "DROP", (), False, ("KUBE-SERVICES", SVC, SEP1, SEP2, "KUBE-FORWARD")),
    Case("builtin-policy-drop-after-accept", dump(
        filter_=FILTER, nat=NAT, policy={"filter FORWARD": "DROP"}), EXTERNAL, CIP, 80, "DNAT",
         BOTH, True, MASQ_PATH),
    # --- branches -----------------------------------------------------------------------
    *(Case(f"affinity-{cmd}-both-ways", svc1(AFFINITY.format(
        svc=SVC, sep1=SEP1, sep2=SEP2, ep1=EP1, ep2=EP2, cmd=cmd), *TWO),
        POD, CIP, 80, "DNAT", BOTH, False, CIP_PATH) for cmd in ("rcheck", "update")),
    Case("recent-set-always-matches", svc1(first_of_two(
        f"-m recent --set --name {SEP1} --mask 255.255.255.255 --rsource"), *TWO),
        POD, CIP, 80, "DNAT", (EP1,), False, ONLY_EP1_PATH),
    Case("nth-three-endpoints", svc1(NTH, *TWO, (SEP3, EP3)), POD, CIP, 80, "DNAT",
         (EP1, EP2, EP3), False,
         ("KUBE-SERVICES", SVC, SEP1, SEP2, SEP3, "KUBE-FORWARD", "KUBE-POSTROUTING")),
    Case("nth-every-1-always-matches", svc1(first_of_two(
        "-m statistic --mode nth --every 1 --packet 0"), *TWO),
        POD, CIP, 80, "DNAT", (EP1,), False, ONLY_EP1_PATH),
    Case("probability-1-always-matches", svc1(first_of_two(
        "-m statistic --mode random --probability 1.00000000000"), *TWO),
        POD, CIP, 80, "DNAT", (EP1,), False, ONLY_EP1_PATH),
    Case("branches-disagree-dnat-wins", DISAGREE, POD, CIP, 80, "DNAT", (EP1,), False,
         ("KUBE-SERVICES", SVC, SEP1, "KUBE-MARK-DROP", "KUBE-FORWARD", "KUBE-POSTROUTING")),
    # --- matches ------------------------------------------------------------------------
    Case("ipv6-dnat-brackets", V6, "fd00:180::9", "fd00:30::41", 80, "DNAT",
         ("[fd00:180::6]:80",), False, ("KUBE-SERVICES", "KUBE-SVC-NS1SVC6", "KUBE-SEP-EP6"),
         local=("fd00::2",)),
    Case("ipv6-hairpin-marks", V6, "fd00:180::6", "fd00:30::41", 80, "DNAT",
         ("[fd00:180::6]:80",), False, ("KUBE-SERVICES", "KUBE-SVC-NS1SVC6", "KUBE-SEP-EP6",
                                        "KUBE-MARK-MASQ"), local=("fd00::2",)),
    Case("negated-ctstate-dnated-passes", ONLY_DNAT, POD, CIP, 80, "DNAT", BOTH, False,
         ("KUBE-SERVICES", SVC, SEP1, SEP2, "KUBE-POSTROUTING")),
    Case("negated-ctstate-new-dropped", ONLY_DNAT, POD, "10.180.1.1", 80, "DROP", (), False,
         ("KUBE-SERVICES",)),
    Case("interface-wildcard-matches-prefix", IFACE, POD, CIP, 80, "DNAT", BOTH, False,
         CIP_PATH, in_interface="veth1234"),
    Case("interface-wildcard-matches-bare-prefix", IFACE, POD, CIP, 80, "DNAT", BOTH, False,
         CIP_PATH, in_interface="veth"),
    Case("interface-wildcard-other-interface", IFACE, POD, CIP, 80, "DNAT", BOTH, True,
         MASQ_PATH, in_interface="eth0"),
    Case("return-resumes-the-caller", dump(nat=CALLS.format(how="j")), POD, CIP, 80, "DNAT",
         ("10.180.0.2:80",), False, ("KUBE-A", "KUBE-B")),
    Case("goto-returns-to-the-callers-caller", dump(nat=CALLS.format(how="g")), POD, CIP, 80,
         "DNAT", ("10.180.0.3:80",), False, ("KUBE-A", "KUBE-B")),
    Case("goto-target-decides", dump(nat=CALLS.format(how="g")), POD, CIP, 81, "DNAT",
         ("10.180.0.1:80",), False, ("KUBE-A", "KUBE-B")),
    Case("mark-set-xmark-toggles-bits", dump(nat="""
        -A PREROUTING -j KUBE-MARK-MASQ
        -A PREROUTING -m comment --comment "xor clears the bit again" -j MARK --set-xmark 0x4000/0x0
        -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
        -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"""), POD, CIP, 80, "ACCEPT", (),
         False, ("KUBE-MARK-MASQ",)),
    Case("log-continues-multiport-dnat-keeps-port", ESCAPED, POD, CIP, 443, "DNAT",
         ("10.180.0.1:443",), False, ("KUBE-SERVICES",)),
]


def run(case: Case) -> TraceResult:
    packet = Packet(src=ipaddress.ip_address(case.src), dst=ipaddress.ip_address(case.dst),
                    port=case.port, proto=case.proto, in_interface=case.in_interface)
    local = frozenset(ipaddress.ip_address(a) for a in case.local)
    return trace_iptables(case.ruleset, packet, local)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_trace(case: Case) -> None:
    want = {"verdict": case.verdict, "endpoints": list(case.endpoints),
            "masquerade": case.masquerade, "path": list(case.path)}
    got = run(case)
    assert got.to_json() == want, got.to_text()


def test_case_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def test_disagreeing_branches_are_explained() -> None:
    text = run(next(c for c in CASES if c.id == "branches-disagree-dnat-wins")).to_text()
    assert "branches disagree (DNAT, DROP); reporting DNAT, the most permissive" in text
    assert "outcome: DROP" in text
    assert text.endswith("verdict: DNAT to 10.180.0.1:80; masquerade: no\n")


def test_to_json_has_exactly_the_contract_keys() -> None:
    got = run(CASES[0]).to_json()
    assert list(got) == ["verdict", "endpoints", "masquerade", "path"]
    assert json.loads(json.dumps(got)) == {
        "verdict": "DNAT", "endpoints": [EP1, EP2], "masquerade": False, "path": list(CIP_PATH)}


def test_to_text_quotes_the_comments() -> None:
    text = run(CASES[0]).to_text()
    assert f"KUBE-SERVICES rule 1: dst {CIP}/32, proto tcp, tcp dport 80 -> jump to {SVC} " \
           "(ns1/svc1:p80 cluster IP)" in text
    assert f"(ns1/svc1:p80 -> {EP1})" in text
    assert f"-> DNAT to {EP2} (ns1/svc1:p80)" in text
    assert text.endswith(f"verdict: DNAT to {EP1}, {EP2}; masquerade: no\n")


def test_comment_with_escaped_quotes() -> None:
    case = next(c for c in CASES if c.id == "log-continues-multiport-dnat-keeps-port")
    text = run(case).to_text()
    # One argument, quotes unescaped; the "-j KUBE-NOPE" inside it is not a jump.
    assert 'nat/PREROUTING rule 1: jump to KUBE-SERVICES (ns1/svc1:p80 "quoted" -j KUBE-NOPE)' \
        in text
    assert "LOG --log-prefix svc1 hit: (no effect on the packet)" in text


# --- errors: the line the problem is on, and what it is ----------------------------------

LOOP = """\
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-A - [0:0]
:KUBE-B - [0:0]
-A PREROUTING -j KUBE-A
-A KUBE-A -p tcp -m tcp --dport 80 -j KUBE-B
-A KUBE-B -m comment --comment "back again" -j KUBE-A
COMMIT
"""


def nat_dump(rule: str) -> str:
    """A nat table whose KUBE-SERVICES chain holds `rule`, which is line 5."""
    return (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n"
        f"-A PREROUTING -j KUBE-SERVICES\n{rule}\nCOMMIT\n"
    )


ERRORS = [
    ("unknown-option", nat_dump("-A KUBE-SERVICES -p tcp -m tcp --dport 80 --frobnicate 1 -j "
                                "ACCEPT"), 5, "unknown option --frobnicate"),
    ("unknown-match-module", nat_dump("-A KUBE-SERVICES -m geoip --src-cc US -j ACCEPT"), 5,
     "match module 'geoip' is not modelled"),
    ("jump-to-undeclared-chain", nat_dump("-A KUBE-SERVICES -d 172.30.0.41/32 -j KUBE-SVC-GONE"),
     5, "jump to undeclared chain KUBE-SVC-GONE in table nat"),
    ("port-match-without-protocol", nat_dump("-A KUBE-SERVICES -m tcp --dport 80 -j ACCEPT"), 5,
     "-m tcp needs -p tcp"),
    ("drop-in-nat", nat_dump("-A KUBE-SERVICES -j DROP"), 5, "nat table is not intended"),
    ("unterminated-quote", nat_dump('-A KUBE-SERVICES -m comment --comment "open -j ACCEPT'), 5,
     "unterminated quote"),
    ("bad-dnat-destination", nat_dump("-A KUBE-SERVICES -j DNAT --to-destination 10.1.2"), 5,
     "bad address"),
    ("rule-for-undeclared-chain", nat_dump("-A KUBE-NOWHERE -j ACCEPT"), 5,
     "chain KUBE-NOWHERE is not declared in table nat"),
    ("jump-loop", LOOP, 7, "chain loop KUBE-A -> KUBE-B -> KUBE-A"),
    ("table-not-modelled", "*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", 1,
     "table 'raw' is not modelled"),
    ("rules-in-a-chain-not-traced", "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ACCEPT\n"
     "COMMIT\n", 3, "the tracer does not follow packets through mangle OUTPUT"),
    ("missing-commit", "*nat\n:PREROUTING ACCEPT [0:0]\n", 1, "table has no COMMIT"),
]


@pytest.mark.parametrize(("ruleset", "lineno", "problem"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_ruleset_errors_name_the_line(ruleset: str, lineno: int, problem: str) -> None:
    packet = Packet(src=ipaddress.ip_address(POD), dst=ipaddress.ip_address(CIP), port=80,
                    proto="tcp")
    with pytest.raises(RulesetParseError) as caught:
        trace_iptables(ruleset, packet, frozenset())
    assert caught.value.lineno == lineno
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"line {lineno}: ")
    assert caught.value.text == ruleset.splitlines()[lineno - 1]


def test_check_finds_problems_in_chains_no_trace_entered() -> None:
    """Chains are parsed when a trace enters them; check() parses all of them."""
    text = dump(nat=NAT + "-A KUBE-UNUSED -m geoip --src-cc US -j ACCEPT\n"
                "-A KUBE-LOOP -p udp -j KUBE-LOOP2\n-A KUBE-LOOP2 -j KUBE-LOOP\n")
    ruleset = parse_iptables_save(text)
    packet = Packet(src=ipaddress.ip_address(POD), dst=ipaddress.ip_address(CIP), port=80,
                    proto="tcp")
    local: frozenset[IPAddress] = frozenset()
    assert trace_ruleset(ruleset, packet, local).endpoints == BOTH
    with pytest.raises(RulesetParseError) as caught:
        ruleset.check()
    assert caught.value.text == "-A KUBE-UNUSED -m geoip --src-cc US -j ACCEPT"
    looped = parse_iptables_save(text.replace("-A KUBE-UNUSED -m geoip --src-cc US -j ACCEPT\n",
                                              ""))
    with pytest.raises(RulesetParseError, match="chain loop KUBE-LOOP -> KUBE-LOOP2 -> KUBE-LOOP"):
        looped.check()
    parse_iptables_save(BASE).check()  # the base ruleset is clean


def test_parse_once_trace_many() -> None:
    ruleset = parse_iptables_save(BASE)
    for case in CASES[:4]:
        packet = Packet(src=ipaddress.ip_address(case.src), dst=ipaddress.ip_address(case.dst),
                        port=case.port, proto=case.proto)
        local = frozenset(ipaddress.ip_address(a) for a in case.local)
        assert trace_ruleset(ruleset, packet, local) == run(case)


def test_branch_explosion_is_bounded() -> None:
    """Each chain may or may not set its own mark bit, then jumps on: 2**30 branches."""
    rules = []
    for i in range(30):
        rules += [
            f"-A KUBE-C{i} -m statistic --mode random --probability 0.50000000000 "
            f"-j MARK --or-mark {1 << i:#x}",
            f"-A KUBE-C{i} -j KUBE-C{i + 1}",
        ]
    text = dump(nat="-A PREROUTING -j KUBE-C0\n" + "\n".join(rules) + "\n-A KUBE-C30 -j RETURN")
    packet = Packet(src=ipaddress.ip_address(POD), dst=ipaddress.ip_address(CIP), port=80,
                    proto="tcp")
    with pytest.raises(TraceLimitError, match="branches too much"):
        trace_iptables(text, packet, frozenset())
