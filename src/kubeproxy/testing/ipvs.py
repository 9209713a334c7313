"""A strict, in-memory IPVS node: virtual servers, ipsets, kube-ipvs0 and iptables.

Theory of operation
-------------------
:class:`FakeIpvs` is the :class:`~kubeproxy.dataplane.ipvs.IpvsKernel` the IPVS data
plane talks to, as the kernel answers it: adding a virtual server or real server that
exists fails (EEXIST), changing or deleting one that does not fails (ENOENT), a real
server needs its virtual server and the other family is refused, schedulers must be
ones the kernel has. Each real server carries connection counts a test sets
(``connections``) to drive graceful termination; ``set_timeouts`` keeps the
connection timeouts as the kernel does (a 0 leaves one unchanged).

:class:`FakeNode` is the :class:`~kubeproxy.dataplane.base.Runner` for everything else:
``ip`` (the dummy link and its addresses, ``-batch`` all or nothing), ``ipset``
(``restore [-exist]``, ``save``, ``list -n``, ``destroy``; entries checked against the
set's type and family; a set referenced by an iptables rule cannot be destroyed, as
the kernel says "in use"), ``test -e /proc/net/ip_vs``, and passes ``iptables*`` and
``sysctl`` to a :class:`~kubeproxy.testing.iptables.FakeIptables`. Anything else raises
AssertionError naming the argv: a fake that guesses proves nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.ipvs_netlink import KernelDest, KernelService, Timeouts
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import IPAddress
from kubeproxy.render.ipvs import SCHEDULERS, Key, RealServer, VirtualServer
from kubeproxy.testing.iptables import FakeIptables

_OK = Result(0, "", "")


@dataclass
class FakeIpvs:
    services_: dict[Key, KernelService] = field(default_factory=dict)
    reals: dict[Key, dict[tuple[IPAddress, int], int]] = field(default_factory=dict)
    # (virtual server, ip, port) -> (active, inactive) connections
    connections: dict[tuple[Key, IPAddress, int], tuple[int, int]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    timeouts: Timeouts = field(default_factory=Timeouts)  # the kernel's: 0 = its built-in default

    def _need(self, key: Key) -> None:
        if key not in self.services_:
            raise DataPlaneError(f"IPVS: virtual server {key} does not exist (ENOENT)")

    def services(self) -> list[KernelService]:
        return list(self.services_.values())

    def count(self) -> int:
        return len(self.services_)

    def dests(self, key: Key) -> list[KernelDest]:
        self._need(key)
        return [KernelDest(ip, port, w, *self.connections.get((key, ip, port), (0, 0)))
                for (ip, port), w in self.reals[key].items()]

    def add_service(self, vs: VirtualServer) -> None:
        key = (vs.ip, vs.proto, vs.port)
        self.calls.append(f"add-service {key}")
        if key in self.services_:
            raise DataPlaneError(f"IPVS: virtual server {key} exists (EEXIST)")
        self._check(vs)
        self.services_[key] = KernelService(vs.ip, vs.proto, vs.port, vs.scheduler, vs.flags,
                                            vs.timeout)
        self.reals[key] = {}

    def set_service(self, vs: VirtualServer) -> None:
        key = (vs.ip, vs.proto, vs.port)
        self.calls.append(f"set-service {key}")
        self._need(key)
        self._check(vs)
        self.services_[key] = KernelService(vs.ip, vs.proto, vs.port, vs.scheduler, vs.flags,
                                            vs.timeout)

    @staticmethod
    def _check(vs: VirtualServer) -> None:
        if vs.scheduler not in SCHEDULERS:
            raise DataPlaneError(f"IPVS: scheduler {vs.scheduler} not found (ENOENT)")
        if vs.proto not in ("tcp", "udp", "sctp") or not 0 < vs.port < 65536:
            raise DataPlaneError(f"IPVS: bad virtual server {vs.frontend} (EINVAL)")

    def del_service(self, key: Key) -> None:
        self.calls.append(f"del-service {key}")
        self._need(key)
        del self.services_[key], self.reals[key]
        self.connections = {k: v for k, v in self.connections.items() if k[0] != key}

    def add_dest(self, key: Key, real: RealServer) -> None:
        self.calls.append(f"add-dest {key} {real.target}")
        self._need(key)
        if real.ip.version != key[0].version:
            raise DataPlaneError(f"IPVS: real server {real.target} of the other family (EINVAL)")
        if (real.ip, real.port) in self.reals[key]:
            raise DataPlaneError(f"IPVS: real server {real.target} exists (EEXIST)")
        self.reals[key][(real.ip, real.port)] = real.weight

    def set_dest(self, key: Key, real: RealServer) -> None:
        self.calls.append(f"set-dest {key} {real.target} weight {real.weight}")
        self._need(key)
        if (real.ip, real.port) not in self.reals[key]:
            raise DataPlaneError(f"IPVS: real server {real.target} does not exist (ENOENT)")
        self.reals[key][(real.ip, real.port)] = real.weight

    def del_dest(self, key: Key, ip: IPAddress, port: int) -> None:
        self.calls.append(f"del-dest {key} {ip}:{port}")
        self._need(key)
        if self.reals[key].pop((ip, port), None) is None:
            raise DataPlaneError(f"IPVS: real server {ip}:{port} does not exist (ENOENT)")
        self.connections.pop((key, ip, port), None)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """As IPVS_CMD_SET_CONFIG: the non-zero values replace the kernel's."""
        self.calls.append(f"set-timeouts {timeouts}")
        self.timeouts = Timeouts(timeouts.tcp or self.timeouts.tcp,
                                 timeouts.tcpfin or self.timeouts.tcpfin,
                                 timeouts.udp or self.timeouts.udp)

    def commit(self) -> None:
        """Writes apply at once here; the data plane commits after its writes."""

    def flush(self) -> None:
        self.calls.append("flush")
        self.services_.clear()
        self.reals.clear()
        self.connections.clear()


@dataclass
class _Set:
    kind: str
    family: str  # inet, inet6 ("" for bitmap:port)
    create: str  # the create line, as `ipset save` prints it
    entries: set[str] = field(default_factory=set)


class FakeNode:
    """``ip``, ``ipset`` and (via FakeIptables) ``iptables*`` / ``sysctl`` of one node."""

    def __init__(self, iptables: FakeIptables | None = None, ipvs_loaded: bool = True) -> None:
        self.iptables = iptables or FakeIptables()
        self.ipvs_loaded = ipvs_loaded
        self.links: dict[str, set[IPAddress]] = {}
        self.sets: dict[str, _Set] = {}
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self._failing: set[str] = set()

    def fail(self, tool: str) -> None:
        """The next ``tool`` command (ip, ipset) fails as the kernel refusing it would."""
        self._failing.add(tool)

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        args = tuple(argv)
        self.calls.append((args, stdin))
        if args[0] in self._failing:
            self._failing.discard(args[0])
            return Result(1, "", f"{args[0]}: injected failure\n")
        if args[0] == "ip":
            return self._ip(args[1:], stdin)
        if args[0] == "ipset":
            return self._ipset(args[1:], stdin)
        if args == ("test", "-e", "/proc/net/ip_vs"):
            return Result(0 if self.ipvs_loaded else 1, "", "")
        if args == ("modprobe", "-q", "ip_vs"):  # a kernel without the module
            return Result(0 if self.ipvs_loaded else 1, "", "")
        if args[0].startswith(("iptables", "ip6tables", "sysctl")):
            return self.iptables.run(argv, stdin)
        raise AssertionError(f"FakeNode: unexpected command {list(argv)}")

    # --- ip ---------------------------------------------------------------------------------

    def _ip(self, args: tuple[str, ...], stdin: str | None) -> Result:
        if args[:3] == ("-o", "link", "show"):
            name = args[3]
            if name not in self.links:
                return Result(1, "", f'Device "{name}" does not exist.\n')
            return Result(0, f"7: {name}: <BROADCAST,NOARP> mtu 1500 state DOWN\n", "")
        if args[:2] == ("link", "add") and args[3:] == ("type", "dummy"):
            if args[2] in self.links:
                return Result(2, "", "RTNETLINK answers: File exists\n")
            self.links[args[2]] = set()
            return _OK
        if args[:2] == ("link", "del"):
            if self.links.pop(args[2], None) is None:
                return Result(1, "", "Cannot find device\n")
            return _OK
        if args[:4] == ("-o", "addr", "show", "dev"):
            addrs = self.links.get(args[4])
            if addrs is None:
                return Result(1, "", f'Device "{args[4]}" does not exist.\n')
            lines = [f"7: {args[4]}    inet{'6' if ip.version == 6 else ''} {ip}/"
                     f"{ip.max_prefixlen} scope global {args[4]}" for ip in sorted(
                         addrs, key=lambda a: (a.version, int(a)))]
            return Result(0, "".join(f"{line}\n" for line in lines), "")
        if args == ("-batch", "-"):
            return self._batch(stdin or "")
        raise AssertionError(f"FakeNode: unexpected ip command {list(args)}")

    def _batch(self, text: str) -> Result:
        links = {k: set(v) for k, v in self.links.items()}  # all or nothing
        for n, line in enumerate(text.splitlines(), 1):
            w = line.split()
            if len(w) < 5 or w[0] != "address" or w[1] not in ("add", "del") or w[3] != "dev":
                raise AssertionError(f"FakeNode: unexpected ip -batch line {line!r}")
            if w[4] not in links:
                return Result(1, "", f"Command failed -:{n}\nCannot find device \"{w[4]}\"\n")
            iface = ipaddress.ip_interface(w[2])
            if iface.network.prefixlen != iface.max_prefixlen:
                raise AssertionError(f"FakeNode: service address without a host prefix: {line}")
            if w[1] == "add":
                if iface.ip in links[w[4]]:
                    return Result(2, "", f"RTNETLINK answers: File exists\nCommand failed -:{n}\n")
                links[w[4]].add(iface.ip)
            else:
                if iface.ip not in links[w[4]]:
                    return Result(2, "", "RTNETLINK answers: Cannot assign requested address\n"
                                  f"Command failed -:{n}\n")
                links[w[4]].discard(iface.ip)
        self.links = links
        return _OK

    # --- ipset ------------------------------------------------------------------------------

    def _ipset(self, args: tuple[str, ...], stdin: str | None) -> Result:
        if args[0] == "restore" and set(args[1:]) <= {"-exist"}:
            return self._restore(stdin or "", "-exist" in args)
        if args == ("save",):
            out = []
            for name, s in self.sets.items():
                out += [s.create, *(f"add {name} {e}" for e in sorted(s.entries))]
            return Result(0, "".join(f"{line}\n" for line in out), "")
        if args == ("list", "-n"):
            return Result(0, "".join(f"{n}\n" for n in self.sets), "")
        if args[0] == "destroy" and len(args) == 2:
            if args[1] not in self.sets:
                return Result(1, "", "ipset v7.17: The set with the given name does not exist\n")
            if self._referenced(args[1]):
                return Result(1, "", "ipset v7.17: Set cannot be destroyed: it is in use by "
                              "a kernel component\n")
            del self.sets[args[1]]
            return _OK
        raise AssertionError(f"FakeNode: unexpected ipset command {list(args)}")

    def _referenced(self, name: str) -> bool:
        return f"--match-set {name} " in self.iptables.snapshot()

    def _restore(self, text: str, exist: bool) -> Result:
        sets = {n: _Set(s.kind, s.family, s.create, set(s.entries)) for n, s in self.sets.items()}
        for n, line in enumerate(text.splitlines(), 1):
            w = line.split()
            if not w:
                continue
            try:
                _restore_line(sets, w, line, exist)
            except ValueError as err:
                return Result(1, "", f"ipset v7.17: Error in line {n}: {err}\n")
        self.sets = sets
        return _OK


def _restore_line(sets: dict[str, _Set], w: list[str], line: str, exist: bool) -> None:
    if w[0] == "create":
        kind = w[2]
        family = w[w.index("family") + 1] if "family" in w else ""
        if kind == "bitmap:port" and "range" not in w:
            raise ValueError("Missing mandatory option: range")
        old = sets.get(w[1])
        if old is not None:
            if not exist or (old.kind, old.family) != (kind, family):
                raise ValueError("Set cannot be created: set with the same name already exists")
            return
        sets[w[1]] = _Set(kind, family, line)
    elif w[0] in ("add", "del"):
        s = sets.get(w[1])
        if s is None:
            raise ValueError("The set with the given name does not exist")
        _check_entry(s, w[2])
        if w[0] == "add":
            if w[2] in s.entries and not exist:
                raise ValueError("Element cannot be added to the set: it's already added")
            s.entries.add(w[2])
        else:
            if w[2] not in s.entries and not exist:
                raise ValueError("Element cannot be deleted from the set: it's not added")
            s.entries.discard(w[2])
    else:
        raise AssertionError(f"FakeNode: unexpected ipset restore line {line!r}")


def _check_entry(s: _Set, entry: str) -> None:
    """The entry's shape for the set's type, and its family; raises ValueError."""
    dims = s.kind.split(":")[1].split(",")
    parts = entry.split(",")
    if len(parts) != len(dims):
        raise ValueError(f"Syntax error: {entry!r} is not a {s.kind} element")
    want = 6 if s.family == "inet6" else 4
    for dim, part in zip(dims, parts, strict=True):
        if dim == "port":
            proto, _, port = part.rpartition(":")
            if s.kind == "bitmap:port" and proto:
                raise ValueError(f"Syntax error: {part!r}: bitmap:port takes a bare port")
            if s.kind != "bitmap:port" and proto not in ("tcp", "udp", "sctp"):
                raise ValueError(f"Syntax error: {part!r} needs a protocol")
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"Syntax error: bad port {part!r}")
        else:
            addr = (ipaddress.ip_network(part, strict=True) if dim == "net"
                    else ipaddress.ip_address(part))
            if addr.version != want:
                raise ValueError(f"Syntax error: {part!r} is not an IPv{want} address")
