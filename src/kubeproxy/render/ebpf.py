"""ebpf mode: node views -> socket load-balancing map entries (+ the nftables part).

Theory of operation
-------------------
The ebpf mode splits a node's work as Cilium's kube-proxy replacement does:

* **In-node traffic** (processes in the attached cgroup: the node's pods and the node
  itself) is balanced *at the socket*: cgroup programs (bpf/sock_lb.c) rewrite a
  ``connect()`` / ``sendmsg()`` to a frontend into one to a backend, before any packet
  exists. The frontends are each service port's ClusterIP and, since in-node traffic to
  an external destination is short-circuited, its NodePort on the node's NodePort
  addresses, its external IPs and its load-balancer IPs (those with source ranges are
  left to nftables, which enforces the ranges). TCP and UDP only: SCTP stays with
  nftables.
* **Everything else** (packets from outside: NodePorts, external and LB IPs, source
  ranges, eTP=Local) is the nftables renderer's ruleset for the same node views,
  unchanged; in-node traffic never reaches its DNAT since its socket was rewritten.

What each frontend does is read from the node view, never re-decided: ClusterIPs follow
``internal`` (CLUSTER -> the cluster endpoints, LOCAL -> the local endpoints), external
frontends follow the short-circuit (the cluster endpoints); a ``REJECT`` route refuses
the connect (ECONNREFUSED) and a ``DROP`` route passes the socket on untouched so the
nftables rules drop it, as in the other modes.

This module is pure. It also holds the wire layout of the kernel maps (:data:`MAPS`,
the ``pack_*`` / ``unpack_*`` functions), which must match the C structs in
bpf/sock_lb.c byte for byte (tests/unit/test_ebpf_render.py checks sizes and fields).
Backend ids and rev-NAT indexes are the data plane's (stable across syncs), so a
:class:`SockService` carries addresses, not ids.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntFlag

from kubeproxy.config.types import LBAlgorithm
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.nodeview import EndpointView, LocalDetector, NodeView, Route, ServicePortView
from kubeproxy.render import nftables
from kubeproxy.render.nftables import NftRuleset

PROTOCOLS: dict[str, int] = {"tcp": 6, "udp": 17}  # IPPROTO_*; SCTP stays with nftables
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


class Kind(Enum):
    """What kind of frontend a service-map entry is (for people; the maps do not care)."""

    CLUSTER_IP = "cluster-ip"
    NODE_PORT = "node-port"
    EXTERNAL_IP = "external-ip"
    LOAD_BALANCER = "load-balancer"


class Flag(IntFlag):
    """Slot 0's flags byte; the values are bpf/sock_lb.c's ``F_*``."""

    AFFINITY = 0x01  # ClientIP affinity; the timeout is slot 0's backend_id
    ROUND_ROBIN = 0x02  # a per-service counter picks the slot, else bpf_get_prandom_u32
    REJECT = 0x04  # no usable endpoints: connect()/sendmsg() fail with ECONNREFUSED
    PASS = 0x08  # policy drop: the socket is left to the nftables rules (which drop)
    INTERNAL_LOCAL = 0x10  # internalTrafficPolicy=Local (informational: backends say it)
    EXTERNAL_LOCAL = 0x20  # externalTrafficPolicy=Local (informational)


FLAG_NAMES: dict[Flag, str] = {
    Flag.AFFINITY: "affinity", Flag.ROUND_ROBIN: "round-robin", Flag.REJECT: "reject",
    Flag.PASS: "pass", Flag.INTERNAL_LOCAL: "itp-local", Flag.EXTERNAL_LOCAL: "etp-local",
}


@dataclass(frozen=True, slots=True)
class SockService:
    """One frontend of one service port: slot 0 plus one slot per backend."""

    name: NamespacedName
    port_name: str
    kind: Kind
    address: IPAddress
    port: int
    proto: str  # "tcp" / "udp"
    flags: Flag
    affinity_timeout: int  # seconds; 0 without affinity
    backends: tuple[tuple[IPAddress, int], ...]  # slot 1.. in this order (sorted)

    @property
    def frontend(self) -> tuple[IPAddress, int, str]:
        return (self.address, self.port, self.proto)


@dataclass(frozen=True, slots=True)
class FamilyLb:
    family: Family
    node_ips: tuple[IPAddress, ...]
    detector: LocalDetector  # which sources are this node's pods (the tracer's question)
    services: tuple[SockService, ...]  # sorted by frontend


@dataclass(frozen=True, slots=True)
class EbpfRuleset:
    nft: NftRuleset
    families: tuple[FamilyLb, ...]


def render(views: Sequence[NodeView]) -> EbpfRuleset:
    return EbpfRuleset(
        nft=nftables.render(views),
        families=tuple(FamilyLb(v.family, v.node_ips, v.local_detector, _services(v))
                       for v in views))


def _backends(eps: Sequence[EndpointView]) -> tuple[tuple[IPAddress, int], ...]:
    return tuple(sorted({(e.ip, e.port) for e in eps}))


def _services(view: NodeView) -> tuple[SockService, ...]:
    out: list[SockService] = []
    for spv in view.services:
        if spv.protocol not in PROTOCOLS:
            continue
        out.append(_entry(spv, view, Kind.CLUSTER_IP, spv.cluster_ip, spv.port, internal=True))
        extra: list[tuple[Kind, IPAddress, int]] = []
        if spv.node_port:
            extra += [(Kind.NODE_PORT, ip, spv.node_port) for ip in _nodeport_ips(view)]
        extra += [(Kind.EXTERNAL_IP, ip, spv.port) for ip in spv.external_ips]
        if not spv.firewall:  # source ranges are nftables' to enforce
            extra += [(Kind.LOAD_BALANCER, ip, spv.port) for ip in spv.load_balancer_ips]
        out += [_entry(spv, view, kind, ip, port, internal=False) for kind, ip, port in extra]
    # One entry per frontend; the API server keeps frontends unique, first one wins.
    unique = {s.frontend: s for s in reversed(out)}
    return tuple(sorted(unique.values(), key=lambda s: (s.address, s.port, s.proto)))


def _nodeport_ips(view: NodeView) -> tuple[IPAddress, ...]:
    """The addresses a NodePort answers on from inside the node."""
    nodeports = view.nodeports
    if nodeports.match_all:
        ips = list(view.node_ips)
        if nodeports.localhost:
            ips.append(nodeports.loopback.network_address + 1)
        return tuple(ips)
    return tuple(ip for ip in nodeports.addresses
                 if nodeports.localhost or ip not in nodeports.loopback)


def _entry(spv: ServicePortView, view: NodeView, kind: Kind, address: IPAddress, port: int,
           *, internal: bool) -> SockService:
    if internal:
        route = spv.internal
        eps = spv.local_endpoints if route is Route.LOCAL else spv.cluster_endpoints
    else:  # in-node traffic to an external destination is short-circuited
        route = Route.CLUSTER if spv.cluster_endpoints else (
            Route.REJECT if not spv.has_endpoints else Route.DROP)
        eps = spv.cluster_endpoints
    flags = Flag(0)
    if route is Route.REJECT:
        flags |= Flag.REJECT
    elif route is Route.DROP:
        flags |= Flag.PASS
    if spv.affinity_timeout is not None:
        flags |= Flag.AFFINITY
    if view.lb_algorithm is LBAlgorithm.ROUND_ROBIN:
        flags |= Flag.ROUND_ROBIN
    if spv.internal in (Route.LOCAL, Route.DROP) and spv.has_endpoints:
        flags |= Flag.INTERNAL_LOCAL
    if spv.external_policy_local:
        flags |= Flag.EXTERNAL_LOCAL
    forwards = route in (Route.CLUSTER, Route.LOCAL)
    return SockService(
        name=spv.name.service, port_name=spv.name.port, kind=kind, address=address,
        port=port, proto=spv.protocol, flags=flags,
        affinity_timeout=spv.affinity_timeout or 0,
        backends=_backends(eps) if forwards else ())


# --- what `kubeproxy render` prints ---------------------------------------------------


def flag_text(flags: Flag) -> str:
    return ",".join(n for f, n in FLAG_NAMES.items() if f in flags) or "-"


def frontend_line(address: IPAddress, port: int, proto: str, flags: Flag, timeout: int,
                  backends: Sequence[tuple[IPAddress, int]]) -> str:
    """One service-map entry as a line; the kernel dump and the render share it."""
    line = f"frontend {_ep(address, port)}/{proto} flags={flag_text(flags)}"
    if Flag.AFFINITY in flags:
        line += f" timeout={timeout}"
    return line + " backends=" + (",".join(_ep(a, p) for a, p in backends) or "-")


def text(ruleset: EbpfRuleset, node: str) -> str:
    out = [f"# ebpf socket load balancing for node {node}: service map entries, one"
           " block per service port (slot 0 = the frontend, slots 1.. = backends)"]
    for fam in ruleset.families:
        out.append(f"# IPv{fam.family}")
        last: tuple[NamespacedName, str] | None = None
        for s in sorted(fam.services, key=lambda s: (s.name, s.port_name, s.kind.value)):
            if (s.name, s.port_name) != last:
                out.append(f"# service {s.name}:{s.port_name or '-'}")
                last = (s.name, s.port_name)
            out.append(f"#   {s.kind.value}")
            out.append(frontend_line(s.address, s.port, s.proto, s.flags, s.affinity_timeout,
                                     s.backends))
    out.append("# nftables part (north-south traffic; nft -f format)")
    return "\n".join(out) + "\n" + ruleset.nft.script()


def _ep(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --- the kernel maps' wire layout (bpf/sock_lb.c) ---------------------------------------


@dataclass(frozen=True)
class MapSpec:
    name: str
    key_size: int
    value_size: int
    max_entries: int
    owner: str  # "proxy": written from Python; "bpf": written by the programs


# name -> spec; the sizes are sizeof() of the C structs.
MAPS: dict[str, MapSpec] = {m.name: m for m in (
    MapSpec("kp_svc4", 12, 12, 1 << 20, "proxy"),  # svc4_key -> svc_val
    MapSpec("kp_svc6", 24, 12, 1 << 20, "proxy"),  # svc6_key -> svc_val
    MapSpec("kp_be4", 4, 8, 1 << 20, "proxy"),  # backend id -> be4
    MapSpec("kp_be6", 4, 20, 1 << 20, "proxy"),  # backend id -> be6
    MapSpec("kp_rnat4", 4, 8, 65536, "proxy"),  # rev-NAT index -> rnat4 (the frontend)
    MapSpec("kp_rnat6", 4, 20, 65536, "proxy"),  # rev-NAT index -> rnat6
    MapSpec("kp_sknat4", 16, 8, 1 << 18, "bpf"),  # (cookie, backend) -> frontend (LRU)
    MapSpec("kp_sknat6", 32, 20, 1 << 18, "bpf"),
    MapSpec("kp_aff", 16, 16, 1 << 18, "bpf"),  # (netns cookie, rev-NAT) -> backend (LRU)
    MapSpec("kp_rr", 4, 4, 65536, "bpf"),  # rev-NAT index -> round-robin counter
)}
# The programs of bpf/sock_lb.o (one cgroup hook each), as libbpf names them.
PROGRAMS: tuple[str, ...] = tuple(f"kp_{hook}{family}" for family in (4, 6) for hook in (
    "connect", "sendmsg", "recvmsg", "getpeername"))
MAX_REV_NAT = 65535  # rev-NAT indexes are u16 in the C structs
_VAL = struct.Struct("<IHHB3x")  # svc_val: backend_id, count, rev_nat, flags


def svc_map(family: Family) -> str:
    return f"kp_svc{family}"


def be_map(family: Family) -> str:
    return f"kp_be{family}"


def rnat_map(family: Family) -> str:
    return f"kp_rnat{family}"


def pack_service_key(address: IPAddress, port: int, proto: str, slot: int) -> bytes:
    return (address.packed + port.to_bytes(2, "big")
            + struct.pack("<HB3x", slot, PROTOCOLS[proto]))


def unpack_service_key(key: bytes) -> tuple[IPAddress, int, str, int]:
    n = len(key) - 8
    slot, proto = struct.unpack("<HB3x", key[n + 2:])
    return (ipaddress.ip_address(key[:n]), int.from_bytes(key[n:n + 2], "big"),
            PROTOCOL_NAMES[proto], slot)


def pack_service_value(backend_id: int, count: int, rev_nat: int, flags: Flag) -> bytes:
    return _VAL.pack(backend_id, count, rev_nat, int(flags))


def unpack_service_value(value: bytes) -> tuple[int, int, int, Flag]:
    backend_id, count, rev_nat, flags = _VAL.unpack(value)
    return backend_id, count, rev_nat, Flag(flags)


def pack_id(number: int) -> bytes:
    return struct.pack("<I", number)


def unpack_id(key: bytes) -> int:
    number: int = struct.unpack("<I", key)[0]
    return number


def pack_backend(address: IPAddress, port: int, proto: str) -> bytes:
    return address.packed + port.to_bytes(2, "big") + bytes([PROTOCOLS[proto], 0])


def unpack_backend(value: bytes) -> tuple[IPAddress, int, str]:
    n = len(value) - 4
    return (ipaddress.ip_address(value[:n]), int.from_bytes(value[n:n + 2], "big"),
            PROTOCOL_NAMES[value[n + 2]])


def pack_rev_nat(address: IPAddress, port: int, rev_nat: int) -> bytes:
    return address.packed + port.to_bytes(2, "big") + struct.pack("<H", rev_nat)


def unpack_rev_nat(value: bytes) -> tuple[IPAddress, int, int]:
    n = len(value) - 4
    index: int = struct.unpack("<H", value[n + 2:])[0]
    return ipaddress.ip_address(value[:n]), int.from_bytes(value[n:n + 2], "big"), index
