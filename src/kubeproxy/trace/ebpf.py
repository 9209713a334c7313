"""Trace one packet through the ebpf mode: the socket-LB decision, else the nftables path.

Theory of operation. A connection from a process in the attached cgroup (this node's
pods and the node itself) meets the socket programs before any packet exists: if its
destination is a frontend in the service map, ``connect()`` (TCP) / ``sendmsg()`` (UDP)
is rewritten to one of the slot backends (no NAT, so never masqueraded), refused with
ECONNREFUSED (REJECT), or passed on untouched (a policy drop: the packet then meets the
nftables rules, which drop it). Anything else (a packet from outside the node, a
frontend the map does not hold, SCTP) is traced through the nftables part by
:mod:`kubeproxy.trace.nftables`.

Which sources are cgroup members: the node's own (and loopback) addresses always; a pod
address when the node view's local-traffic detector says it is this node's (its CIDRs, or
the bridge / interface prefix the packet arrives on). ``trace_rules`` reads the kernel's
account (``DataPlane.rules()``), which has no detector: there only the node's own
addresses count as cgroup members.
"""

from __future__ import annotations

import ipaddress
import re

from kubeproxy.errors import TraceError
from kubeproxy.model import NamespacedName
from kubeproxy.nodeview import LocalDetector
from kubeproxy.render.ebpf import (
    FLAG_NAMES,
    PROTOCOLS,
    EbpfRuleset,
    FamilyLb,
    Flag,
    Kind,
    SockService,
)
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import IPAddress, Packet, TraceResult, format_endpoint

NFT_MARKER = "# nftables part"
_LINE = re.compile(r"frontend (\[?[0-9a-fA-F.:]+\]?):(\d+)/(tcp|udp) flags=(\S+)"
                   r"(?: timeout=(\d+))? backends=(\S+)$")


def trace_ebpf(ruleset: EbpfRuleset, packet: Packet, local: frozenset[IPAddress]
               ) -> TraceResult:
    return _trace(ruleset.families, ruleset.nft.script(), packet, local)


def trace_text(text: str, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    """Trace through ``rules()`` / ``render`` text: frontend lines, then the nft part."""
    head, marker, tail = text.partition(NFT_MARKER)
    if not marker:
        raise TraceError("no nftables part in the ebpf rules")
    services = [_parse(line) for line in head.splitlines() if line.startswith("frontend ")]
    families = tuple(FamilyLb(f, (), LocalDetector(), tuple(
        s for s in services if s.address.version == f)) for f in (4, 6))
    return _trace(families, tail.partition("\n")[2], packet, local)


def _parse(line: str) -> SockService:
    m = _LINE.match(line)
    if m is None:
        raise TraceError(f"cannot read the service-map line {line!r}")
    addr, port, proto, flags, timeout, backends = m.groups()
    by_name = {name: flag for flag, name in FLAG_NAMES.items()}
    bits = Flag(0)
    for name in flags.split(",") if flags != "-" else []:
        bits |= by_name[name]
    eps = [] if backends == "-" else [b.rpartition(":") for b in backends.split(",")]
    return SockService(
        NamespacedName("-", "-"), "", Kind.CLUSTER_IP, ipaddress.ip_address(addr.strip("[]")),
        int(port), proto, bits, int(timeout or 0),
        tuple((ipaddress.ip_address(a.strip("[]")), int(p)) for a, _, p in eps))


def in_cgroup(packet: Packet, detector: LocalDetector, local: frozenset[IPAddress]) -> bool:
    """Is the packet's sender a process of this node (its socket meets the programs)?"""
    if packet.src in local or packet.src.is_loopback:
        return True
    if any(packet.src in cidr for cidr in detector.cidrs):
        return True
    if detector.interface:
        iface = packet.in_interface
        return iface.startswith(detector.interface) if detector.prefix else (
            iface == detector.interface)
    return False


def _trace(families: tuple[FamilyLb, ...], script: str, packet: Packet,
           local: frozenset[IPAddress]) -> TraceResult:
    fam = next((f for f in families if f.family == packet.dst.version), None)
    hook = ("connect" if packet.proto == "tcp" else "sendmsg") + str(packet.dst.version)
    lines: list[str] = []
    if fam is None or not in_cgroup(packet, fam.detector, local):
        lines.append(f"socket LB: {packet.src} is not a process of this node: its packets"
                     " meet the nftables rules")
    elif packet.proto not in PROTOCOLS:
        lines.append(f"socket LB: {packet.proto} sockets are not load balanced here")
    else:
        found = next((s for s in fam.services if (s.address, s.port, s.proto) ==
                      (packet.dst, packet.port, packet.proto)), None)
        if found is None:
            lines.append(f"cgroup/{hook}: {format_endpoint(packet.dst, packet.port)}/"
                         f"{packet.proto} is no frontend in the service map: unchanged")
        elif Flag.REJECT in found.flags:
            return TraceResult("REJECT", (), False, (f"cgroup/{hook}",), (
                f"cgroup/{hook}: frontend {packet.dst} has no endpoints: the call fails"
                " with ECONNREFUSED",))
        elif Flag.PASS in found.flags:
            lines.append(f"cgroup/{hook}: frontend {packet.dst} has no endpoints for its"
                         " traffic policy: the socket is passed on to the nftables rules")
        else:
            eps = tuple(sorted({format_endpoint(a, p) for a, p in found.backends}))
            how = "round robin" if Flag.ROUND_ROBIN in found.flags else "at random"
            if Flag.AFFINITY in found.flags:
                how += f", ClientIP affinity {found.affinity_timeout}s"
            return TraceResult("DNAT", eps, False, (f"cgroup/{hook}",), (
                f"cgroup/{hook}: frontend {format_endpoint(packet.dst, packet.port)}/"
                f"{packet.proto}: the socket is connected to one of {len(eps)} backends"
                f" ({how}); no NAT, so no masquerade",))
    result = trace_nftables(script, packet, local)
    return TraceResult(result.verdict, result.endpoints, result.masquerade, result.path,
                       (*lines, *result.explanation))
