"""The IPVS data plane: kube-ipvs0, IPVS virtual servers, ipsets and a few iptables chains.

Theory of operation
-------------------
A sync writes an :class:`~kubeproxy.render.ipvs.IpvsRuleset` in the order that keeps
every reference valid (as upstream's IPVS proxier does):

1. the ``kube-ipvs0`` dummy interface (created if missing, left down as upstream) and
   the IPVS sysctls (``net.ipv4.vs.conntrack=1``, so that KUBE-POSTROUTING can
   masquerade IPVS traffic; expire_nodest_conn, expire_quiescent_template);
2. the ipsets, through one ``ipset restore -exist``: every set created if missing, the
   entries diffed against the kernel's (``ipset save``) on a full sync, against what we
   wrote last on a partial one;
3. the service addresses on kube-ipvs0 (``ip -batch``: added, and stale ones removed);
4. the virtual servers over generic netlink (:class:`IpvsKernel`): all of them on a full
   sync (the kernel's list against the ruleset: add, change, delete), only the changed
   services' ones on a partial sync; per virtual server the real servers are diffed
   against the kernel's. A real server that goes away is **terminated gracefully**, as
   upstream's graceful-termination manager: TCP ones with connections get weight 0
   (no new connections) and stay until their active and inactive connection counts are
   0, which every later sync checks; UDP and SCTP ones are deleted at once
   (expire_nodest_conn drops their flows);
5. the iptables part, per family: one ``iptables-restore --noflush`` rewriting our fixed
   chains whole (they do not grow with services; the sets do), then the jumps from the
   builtin chains (``-C``, ``-I`` when missing).

A failure raises DataPlaneError and the next sync is full. ``intact()`` checks cheaply:
kube-ipvs0 exists, the kernel's virtual-server count is what we wrote, and the iptables
part (its fingerprint, then our chains' rule counts and jumps only when it moved).
``cleanup`` flushes IPVS, deletes kube-ipvs0, our chains and jumps (both backends) and
destroys our ipsets (after the rules that reference them).
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import re
import shlex
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubeproxy.dataplane.base import DataPlaneError, Runner, check
from kubeproxy.dataplane.iptables import Backend, Watch, binaries
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.netns_thread import call_at
from kubeproxy.render.ipvs import (
    CHAINS,
    DUMMY,
    IPSETS,
    IPTABLES_HEADER,
    JUMPS,
    FamilyIpvs,
    IpvsRuleset,
    RealServer,
    VirtualServer,
    jump_rule,
    set_name,
)

log = logging.getLogger("kubeproxy.dataplane.ipvs")
Key = tuple[IPAddress, str, int]  # (address, protocol, port) of a virtual server
SYSCTLS = ("net.ipv4.vs.conntrack=1", "net.ipv4.vs.expire_nodest_conn=1",
           "net.ipv4.vs.expire_quiescent_template=1")
GRACEFUL_PROTOCOLS = frozenset({"tcp"})  # UDP / SCTP real servers are deleted at once
OUR_SETS = tuple(set_name(n, f) for f in (4, 6) for n in IPSETS)
_COUNTERS = re.compile(r"\[\d+:\d+\]$")  # a chain's packet counters, zeroed in rules()
_ADDR = re.compile(r"\binet6? ([0-9a-fA-F.:]+)/\d+")
_OWNER = NamespacedName("-", "-")  # virtual servers read back from the kernel


def key_of(vs: VirtualServer) -> Key:
    return (vs.ip, vs.proto, vs.port)


@dataclass(frozen=True)
class KernelService:
    ip: IPAddress
    proto: str
    port: int
    scheduler: str
    flags: int  # without the persistence bit
    timeout: int  # 0: not persistent


@dataclass(frozen=True)
class KernelDest:
    ip: IPAddress
    port: int
    weight: int
    active: int = 0  # connection counts, for graceful termination
    inactive: int = 0


class IpvsKernel(Protocol):
    """IPVS as the data plane uses it (generic netlink; a strict fake in tests)."""

    def services(self) -> list[KernelService]: ...
    def count(self) -> int: ...
    def dests(self, key: Key) -> list[KernelDest]: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def set_service(self, vs: VirtualServer) -> None: ...
    def del_service(self, key: Key) -> None: ...
    def add_dest(self, key: Key, real: RealServer) -> None: ...
    def set_dest(self, key: Key, real: RealServer) -> None: ...
    def del_dest(self, key: Key, ip: IPAddress, port: int) -> None: ...
    def flush(self) -> None: ...
    def commit(self) -> None:
        """Apply the writes queued so far (a kernel may batch them; reads commit too)."""


def same_service(have: KernelService, want: VirtualServer) -> bool:
    return (have.scheduler, have.flags, have.timeout) == (want.scheduler, want.flags,
                                                          want.timeout)


@dataclass
class IpvsDataPlane:
    runner: Runner  # ip, ipset, iptables, sysctl
    kernel: IpvsKernel
    backend: Backend  # of the iptables part
    watch: Watch | None = None
    written: dict[Key, VirtualServer] = field(default_factory=dict)
    sets: dict[str, frozenset[str]] = field(default_factory=dict)  # what we wrote last
    terminating: dict[tuple[Key, IPAddress, int], None] = field(default_factory=dict)
    families: dict[int, FamilyIpvs] = field(default_factory=dict)  # iptables parts written
    fingerprints: dict[int, object] = field(default_factory=dict)
    needs_full: bool = True
    synced: bool = False

    def sync(self, ruleset: IpvsRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        full = changed is None or self.needs_full
        self.needs_full = True  # until this sync succeeds
        self._dummy()
        if full:
            for setting in SYSCTLS:
                check(self.runner, ["sysctl", "-q", "-w", setting])
        self._ipsets(ruleset, full)
        self._addresses(ruleset)  # first, as upstream binds before adding real servers
        wanted = {key_of(vs): vs for fam in ruleset.families for vs in fam.services}
        self._virtual_servers(wanted, None if full else changed)
        for fam in ruleset.families:
            self._iptables(fam)
        self.needs_full, self.synced = False, True

    # --- kube-ipvs0 and its addresses ----------------------------------------------------

    def _dummy(self) -> None:
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode != 0:
            check(self.runner, ["ip", "link", "add", DUMMY, "type", "dummy"])

    def bound(self) -> set[IPAddress]:
        text = check(self.runner, ["ip", "-o", "addr", "show", "dev", DUMMY])
        return {ipaddress.ip_address(m.group(1)) for m in _ADDR.finditer(text)}

    def _addresses(self, ruleset: IpvsRuleset) -> None:
        want = {ip for fam in ruleset.families for ip in fam.addresses}
        have = self.bound()
        lines = [f"address add {ip}/{ip.max_prefixlen} dev {DUMMY}"
                 + (" nodad" if ip.version == 6 else "")
                 for ip in sorted(want - have, key=_ip_order)]
        lines += [f"address del {ip}/{ip.max_prefixlen} dev {DUMMY}"
                  for ip in sorted(have - want, key=_ip_order)]
        if lines:
            check(self.runner, ["ip", "-batch", "-"], "\n".join(lines) + "\n")

    # --- ipsets ---------------------------------------------------------------------------

    def kernel_sets(self) -> dict[str, tuple[str, set[str]]]:
        """Our sets as ``ipset save`` prints them: name -> (create line, entries)."""
        out: dict[str, tuple[str, set[str]]] = {}
        res = self.runner.run(["ipset", "save"])
        if res.returncode != 0:
            raise DataPlaneError(f"ipset save failed: {res.stderr.strip()}")
        for line in res.stdout.splitlines():
            words = line.split()
            if len(words) >= 3 and words[1] in OUR_SETS:
                if words[0] == "create":
                    out[words[1]] = (line, set())
                elif words[0] == "add" and words[1] in out:
                    out[words[1]][1].add(words[2])
        return out

    def _ipsets(self, ruleset: IpvsRuleset, full: bool) -> None:
        have = ({n: frozenset(e) for n, (_, e) in self.kernel_sets().items()} if full
                else self.sets)
        lines: list[str] = []
        written: dict[str, frozenset[str]] = {}
        for fam in ruleset.families:
            for s in fam.sets:
                old = have.get(s.name, frozenset())
                lines.append(s.create_line())
                lines += [f"add {s.name} {e}" for e in sorted(s.entries - old)]
                lines += [f"del {s.name} {e}" for e in sorted(old - s.entries)]
                written[s.name] = s.entries
        check(self.runner, ["ipset", "restore", "-exist"], "\n".join(lines) + "\n")
        self.sets = written

    # --- virtual and real servers ----------------------------------------------------------

    def _virtual_servers(self, wanted: dict[Key, VirtualServer],
                         changed: frozenset[NamespacedName] | None) -> None:
        if changed is None:
            current = {(s.ip, s.proto, s.port): s for s in self.kernel.services()}
            scope = set(current) | set(wanted)
        else:
            current = {k: _as_kernel(vs) for k, vs in self.written.items()}
            scope = ({k for k, vs in wanted.items() if vs.owner in changed}
                     | {k for k, vs in self.written.items() if vs.owner in changed})
        touched: set[Key] = set()
        for key in sorted(scope, key=_order):
            want, have = wanted.get(key), current.get(key)
            if want is None:
                if have is not None:
                    self.kernel.del_service(key)
                self.written.pop(key, None)
                continue
            if have is None:
                self.kernel.add_service(want)
                dests: list[KernelDest] = []
            else:
                if not same_service(have, want):
                    self.kernel.set_service(want)
                dests = self.kernel.dests(key)
            self._reals(key, want, dests)
            self.written[key] = want
            touched.add(key)
        self.terminating = {t: None for t in self.terminating if t[0] in wanted}
        self._graceful(touched)
        self.kernel.commit()

    def _reals(self, key: Key, want: VirtualServer, dests: list[KernelDest]) -> None:
        have = {(d.ip, d.port): d for d in dests}
        for real in want.reals:
            d = have.get((real.ip, real.port))
            if d is None:
                self.kernel.add_dest(key, real)
            elif d.weight != real.weight:  # e.g. back from graceful termination
                self.kernel.set_dest(key, real)
            self.terminating.pop((key, real.ip, real.port), None)
        keep = {(r.ip, r.port) for r in want.reals}
        for (ip, port), d in have.items():
            if (ip, port) not in keep:
                self._terminate(key, d)

    def _terminate(self, key: Key, d: KernelDest) -> None:
        """Delete a real server, or drain it first (weight 0) while it has connections."""
        if key[1] not in GRACEFUL_PROTOCOLS or d.active + d.inactive == 0:
            self.kernel.del_dest(key, d.ip, d.port)
            self.terminating.pop((key, d.ip, d.port), None)
            return
        if d.weight != 0:
            self.kernel.set_dest(key, RealServer(d.ip, d.port, 0))
        self.terminating[(key, d.ip, d.port)] = None

    def _graceful(self, touched: set[Key]) -> None:
        """Delete the draining real servers whose connections are gone."""
        pending = [t for t in self.terminating if t[0] not in touched]
        by_key: dict[Key, dict[tuple[IPAddress, int], KernelDest]] = {}
        for key, ip, port in pending:
            if key not in by_key:
                by_key[key] = {(d.ip, d.port): d for d in self.kernel.dests(key)}
            d = by_key[key].get((ip, port))
            if d is None:
                self.terminating.pop((key, ip, port), None)
            else:
                self._terminate(key, d)

    # --- the iptables part ------------------------------------------------------------------

    def _iptables(self, fam: FamilyIpvs) -> None:
        ipt, _, restore = binaries(fam.family, self.backend)
        out: list[str] = []
        for table in ("nat", "filter"):
            chains = fam.tables[table]
            out += [f"*{table}", *(f":{c} - [0:0]" for c in sorted(chains))]
            for chain in sorted(chains):
                out += chains[chain]
            out.append("COMMIT")
        check(self.runner, [restore, "-w", "--noflush", "--counters"], "\n".join(out) + "\n")
        for jump in reversed(JUMPS):
            spec = shlex.split(jump_rule(jump))[2:]
            if self.runner.run([ipt, "-w", "-t", jump[0], "-C", jump[1], *spec]).returncode:
                check(self.runner, [ipt, "-w", "-t", jump[0], "-I", jump[1], "1", *spec])
        self.families[fam.family] = fam
        if self.watch is not None:
            self.fingerprints[fam.family] = self.watch.fingerprint(fam.family, self.backend)

    def _iptables_damage(self, fam: FamilyIpvs) -> str | None:
        if self.watch is not None:
            try:
                now = self.watch.fingerprint(fam.family, self.backend)
            except DataPlaneError:
                now = None
            if now is not None and now == self.fingerprints.get(fam.family):
                return None
        _, save, _ = binaries(fam.family, self.backend)
        for table in ("nat", "filter"):
            text = "\n" + check(self.runner, [save, "-t", table])
            for chain, rules in fam.tables[table].items():
                got = text.count(f"\n-A {chain} ")
                if got != len(rules):
                    return (f"IPv{fam.family} {table} table: chain {chain} holds {got} rules, "
                            f"{len(rules)} were written")
            for jump in JUMPS:
                if jump[0] == table and f"\n{jump_rule(jump)}\n" not in text + "\n":
                    return f"IPv{fam.family} {table} table: the jump from {jump[1]} is gone"
        if self.watch is not None:  # someone else's change: ours is in place
            self.fingerprints[fam.family] = self.watch.fingerprint(fam.family, self.backend)
        return None

    # --- checks, reading back, cleanup --------------------------------------------------------

    def damage(self) -> str | None:
        if not self.synced:
            return None
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode != 0:
            return f"interface {DUMMY} is gone"
        count = self.kernel.count()
        if count != len(self.written):
            return f"IPVS holds {count} virtual servers, {len(self.written)} were written"
        for _, fam in sorted(self.families.items()):
            found = self._iptables_damage(fam)
            if found is not None:
                return found
        return None

    def rules(self) -> str:
        """The kernel's state in render's text format (render/ipvs.py ``text``)."""
        out = ["# kube-ipvs0 addresses"]
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode == 0:
            out += [f"addr {ip}" for ip in sorted(self.bound(), key=_ip_order)]
        out.append("# IPVS virtual servers (ipvsadm-save -n)")
        for s in sorted(self.kernel.services(), key=lambda s: _order((s.ip, s.proto, s.port))):
            reals = tuple(sorted(RealServer(d.ip, d.port, d.weight)
                                 for d in self.kernel.dests((s.ip, s.proto, s.port))))
            out += VirtualServer(s.ip, s.port, s.proto, s.scheduler, s.flags, s.timeout, reals,
                                 _OWNER, "").save_lines()
        out.append("# ipsets (ipset save)")
        sets = self.kernel_sets()
        for name in OUR_SETS:
            if name in sets:
                create, entries = sets[name]
                out += [create, *(f"add {name} {e}" for e in sorted(entries))]
        body = "\n".join(out) + "\n"
        for family in sorted(self.families):
            _, save, _ = binaries(family, self.backend)
            body += IPTABLES_HEADER.format(family=family) + f" ({save})\n"
            for table in ("filter", "nat"):  # without the dated "# Generated by" lines
                text = check(self.runner, [save, "-t", table])
                body += "".join(_COUNTERS.sub("[0:0]", line) + "\n"
                                for line in text.splitlines() if not line.startswith("#"))
        return body

    def cleanup(self, backends: Iterable[Backend] = ("legacy", "nft")) -> None:
        try:
            self.kernel.flush()
        except DataPlaneError as err:
            log.info("IPVS: nothing to flush (%s)", err)
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode == 0:
            check(self.runner, ["ip", "link", "del", DUMMY])
        for backend in backends:
            for family in (4, 6):
                _remove_chains(self.runner, family, backend)
        res = self.runner.run(["ipset", "list", "-n"])
        names = set(res.stdout.split()) if res.returncode == 0 else set()
        for name in OUR_SETS:
            if name in names:
                check(self.runner, ["ipset", "destroy", name])
        self.written, self.sets, self.terminating = {}, {}, {}
        self.families, self.fingerprints = {}, {}
        self.needs_full, self.synced = True, False


def _remove_chains(runner: Runner, family: int, backend: Backend) -> None:
    """Our jumps (deleted one by one), then our chains (flushed and deleted)."""
    ipt, save, restore = binaries(family, backend)
    for table, chains in CHAINS.items():
        res = runner.run([save, "-t", table])
        if res.returncode != 0:
            continue
        present = [c for c in chains if f"\n:{c} " in "\n" + res.stdout]
        for jump in JUMPS:
            if jump[0] == table and jump[2] in present \
                    and f"\n{jump_rule(jump)}\n" in "\n" + res.stdout + "\n":
                check(runner, [ipt, "-w", "-t", table, "-D", jump[1],
                               *shlex.split(jump_rule(jump))[2:]])
        if present:
            payload = [f"*{table}", *(f":{c} - [0:0]" for c in present),
                       *(f"-X {c}" for c in present), "COMMIT"]
            check(runner, [restore, "-w", "--noflush"], "\n".join(payload) + "\n")


def _as_kernel(vs: VirtualServer) -> KernelService:
    return KernelService(vs.ip, vs.proto, vs.port, vs.scheduler, vs.flags, vs.timeout)


def _ip_order(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


def _order(key: Key) -> tuple[int, int, str, int]:
    return (key[0].version, int(key[0]), key[1], key[2])


# --- generic netlink (pyroute2) -------------------------------------------------------------

_PROTO = {"tcp": 6, "udp": 17, "sctp": 132}
_PROTO_NAME = {v: k for k, v in _PROTO.items()}
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ: NAT; pyroute2's default (3) is direct routing
F_PERSISTENT = 0x1
F_HASHED = 0x2  # the kernel's own bookkeeping bit, set on every service it lists


def _attr(msg: Any, kind: str, name: str, default: Any) -> Any:
    """An attribute of a pyroute2 IPVS record by its netlink name (from_message keeps
    most under ``IPVS_SVC_ATTR_...`` / ``IPVS_DEST_ATTR_...``), else by its short name."""
    value = msg.get(f"IPVS_{kind}_ATTR_{name.upper()}")
    return msg.get(name, default) if value is None else value


def _pyroute2() -> Any:
    """pyroute2, imported on first use (only the real IPVS data plane needs it)."""
    return importlib.import_module("pyroute2")


class NetlinkIpvs:
    """:class:`IpvsKernel` over generic netlink ("IPVS" family) with pyroute2, inside
    ``netns`` (a /run/netns path) or ours."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: Any = None
        self._writer: _GenlBatch | None = None
        self._pending: list[tuple[bytes, str]] = []

    def _ipvs(self) -> Any:
        if self._sock is None:
            try:
                ipvs = _pyroute2().IPVS
                self._sock = ipvs(netns=self.netns) if self.netns else ipvs()
            except Exception as err:  # no module, no IPVS family in the kernel ...
                raise DataPlaneError(f"IPVS netlink unavailable: {err}") from err
        return self._sock

    def _call(self, what: str, fn: Any, *args: Any) -> list[Any]:
        self.commit()  # reads see every write queued before them
        try:
            return list(fn(*args))
        except DataPlaneError:
            raise
        except Exception as err:  # pyroute2's NetlinkError & co
            raise DataPlaneError(f"IPVS {what}: {err}") from err

    @staticmethod
    def _service(key: Key, vs: VirtualServer | None = None) -> Any:
        ip, proto, port = key
        fields: dict[str, Any] = {"addr": str(ip), "port": port, "protocol": _PROTO[proto]}
        if vs is not None:
            flags = vs.flags | (F_PERSISTENT if vs.timeout else 0)
            fields.update(sched_name=vs.scheduler, timeout=vs.timeout,
                          flags={"flags": flags, "mask": 0xFFFFFFFF})
        return _pyroute2().IPVSService(**fields)

    @staticmethod
    def _dest(ip: IPAddress, port: int, weight: int) -> Any:
        return _pyroute2().IPVSDest(addr=str(ip), port=port, weight=weight, fwd_method=FWD_MASQ)

    def services(self) -> list[KernelService]:
        out = []
        for msg in self._call("dump services", self._ipvs().service, "dump"):
            s = _pyroute2().IPVSService.from_message(msg)
            if _attr(s, "SVC", "fwmark", 0):
                continue
            flags = int(_attr(s, "SVC", "flags", {}).get("flags", 0))
            timeout = int(_attr(s, "SVC", "timeout", 0))
            out.append(KernelService(ipaddress.ip_address(s["addr"]),
                                     _PROTO_NAME.get(int(s["protocol"]), str(s["protocol"])),
                                     int(s["port"]), str(s["sched_name"]),
                                     flags & 0xFFFF & ~(F_PERSISTENT | F_HASHED),
                                     timeout if flags & F_PERSISTENT else 0))
        return out

    def count(self) -> int:
        """How many virtual servers the kernel has: a raw dump whose messages are only
        counted (intact() asks every second; parsing them costs 30x more)."""
        self.commit()
        return self._batch().count(_CMD_GET_SERVICE)

    def dests(self, key: Key) -> list[KernelDest]:
        out = []
        for msg in self._call("dump dests", self._ipvs().dest, "dump", self._service(key)):
            d = _pyroute2().IPVSDest.from_message(msg)
            out.append(KernelDest(ipaddress.ip_address(d["addr"]), int(d["port"]),
                                  int(d["weight"]), int(_attr(d, "DEST", "active_conns", 0)),
                                  int(_attr(d, "DEST", "inact_conns", 0))))
        return out

    # Writes are queued and sent as netlink batches (many requests per sendmsg, acks read
    # in bulk): one pyroute2 request costs ~1.4 ms here, ~40 ms in the emulated guest.
    def add_service(self, vs: VirtualServer) -> None:
        self._queue(_CMD_NEW_SERVICE, key_of(vs), vs, None, "add service")

    def set_service(self, vs: VirtualServer) -> None:
        self._queue(_CMD_SET_SERVICE, key_of(vs), vs, None, "set service")

    def del_service(self, key: Key) -> None:
        self._queue(_CMD_DEL_SERVICE, key, None, None, "delete service")

    def add_dest(self, key: Key, real: RealServer) -> None:
        self._queue(_CMD_NEW_DEST, key, None, real, "add real server")

    def set_dest(self, key: Key, real: RealServer) -> None:
        self._queue(_CMD_SET_DEST, key, None, real, "set real server")

    def del_dest(self, key: Key, ip: IPAddress, port: int) -> None:
        self._queue(_CMD_DEL_DEST, key, None, RealServer(ip, port, 0), "delete real server")

    def _queue(self, cmd: int, key: Key, vs: VirtualServer | None, real: RealServer | None,
               what: str) -> None:
        body = _nla(_ATTR_SERVICE | _NESTED, _service_attrs(key, vs))
        if real is not None:
            body += _nla(_ATTR_DEST | _NESTED, _dest_attrs(real))
        self._pending.append((struct.pack("=BBH", cmd, 1, 0) + body,
                              f"{what} {key[1]} {key[0]}:{key[2]}"
                              + (f" -> {real.target}" if real is not None else "")))

    def commit(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._batch().send(pending)

    def _batch(self) -> _GenlBatch:
        if self._writer is None:
            self._writer = (call_at(self.netns, _GenlBatch) if self.netns else _GenlBatch())
        return self._writer

    def flush(self) -> None:
        for s in self.services():
            self.del_service((s.ip, s.proto, s.port))
        self.commit()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._writer is not None:
            self._writer.sock.close()
            self._writer = None


# Generic netlink, spelled out for the batched writes (linux/ip_vs.h, linux/genetlink.h).
_CMD_NEW_SERVICE, _CMD_SET_SERVICE, _CMD_DEL_SERVICE = 1, 2, 3
_CMD_GET_SERVICE, _CMD_NEW_DEST, _CMD_SET_DEST, _CMD_DEL_DEST = 4, 5, 6, 7
_NLM_F_DUMP, _NLMSG_DONE = 0x300, 3
_ATTR_SERVICE, _ATTR_DEST, _NESTED = 1, 2, 0x8000
_NLM_F_REQUEST, _NLM_F_ACK, _NLMSG_ERROR, _GENL_ID_CTRL = 1, 4, 2, 0x10
_CHUNK = 32 << 10  # bytes per sendmsg: well under the socket's send buffer


def _nla(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def _service_attrs(key: Key, vs: VirtualServer | None) -> bytes:
    ip, proto, port = key
    v4 = ip.version == 4
    out = (_nla(1, struct.pack("=H", socket.AF_INET if v4 else socket.AF_INET6))
           + _nla(2, struct.pack("=H", _PROTO[proto])) + _nla(3, ip.packed)
           + _nla(4, struct.pack("!H", port)))
    if vs is not None:  # a full entry: scheduler, flags, timeout, netmask
        flags = vs.flags | (F_PERSISTENT if vs.timeout else 0)
        out += (_nla(6, vs.scheduler.encode() + b"\0")
                + _nla(7, struct.pack("=II", flags, 0xFFFFFFFF))
                + _nla(8, struct.pack("=I", vs.timeout))
                + _nla(9, struct.pack("=I", 0xFFFFFFFF if v4 else 128)))
    return out


def _dest_attrs(real: RealServer) -> bytes:
    af = socket.AF_INET if real.ip.version == 4 else socket.AF_INET6
    return (_nla(1, real.ip.packed) + _nla(2, struct.pack("!H", real.port))
            + _nla(3, struct.pack("=I", FWD_MASQ)) + _nla(4, struct.pack("=I", real.weight))
            + _nla(5, struct.pack("=I", 0)) + _nla(6, struct.pack("=I", 0))
            + _nla(11, struct.pack("=H", af)))


class _GenlBatch:
    """A NETLINK_GENERIC socket that sends IPVS requests many per sendmsg."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
        self.sock.bind((0, 0))
        self.sock.setsockopt(270, 10, 1)  # SOL_NETLINK, NETLINK_CAP_ACK: acks without echo
        try:  # room for a whole chunk's acks
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seq = 0
        self.family = self._family_id()

    def _family_id(self) -> int:
        """CTRL_CMD_GETFAMILY "IPVS" (the kernel loads ip_vs on this request if it can)."""
        body = struct.pack("=BBH", 3, 1, 0) + _nla(2, b"IPVS\0")
        self.seq += 1
        self.sock.send(struct.pack("=IHHII", 16 + len(body), _GENL_ID_CTRL,
                                   _NLM_F_REQUEST, self.seq, 0) + body)
        data = self.sock.recv(65536)
        size, kind = struct.unpack_from("=IH", data)
        if kind == _NLMSG_ERROR:
            code = struct.unpack_from("=i", data, 16)[0]
            raise DataPlaneError(f"IPVS netlink family unavailable: {os.strerror(-code)}")
        at = 20
        while at < size:
            length, attr = struct.unpack_from("=HH", data, at)
            if attr == 1:  # CTRL_ATTR_FAMILY_ID
                return int(struct.unpack_from("=H", data, at + 4)[0])
            at += (length + 3) & ~3
        raise DataPlaneError("IPVS netlink family: no id in the kernel's answer")

    def count(self, cmd: int) -> int:
        """The number of records a dump of ``cmd`` answers with."""
        self.seq += 1
        seq, body = self.seq, struct.pack("=BBH", cmd, 1, 0)
        self.sock.send(struct.pack("=IHHII", 16 + len(body), self.family,
                                   _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
        found = 0
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off < len(data):
                length, kind, _, got = struct.unpack_from("=IHHI", data, off)
                if got == seq:
                    if kind == _NLMSG_DONE:
                        return found
                    if kind == _NLMSG_ERROR:
                        code = struct.unpack_from("=i", data, off + 16)[0]
                        raise DataPlaneError(f"IPVS dump: {os.strerror(-code)}")
                    found += 1
                off += (length + 3) & ~3

    def send(self, requests: list[tuple[bytes, str]]) -> None:
        """Send every request; raise DataPlaneError naming the first that failed."""
        first_error: str | None = None
        at = 0
        while at < len(requests):
            chunk, names, size = [], {}, 0
            while at < len(requests) and size < _CHUNK:
                body, what = requests[at]
                self.seq += 1
                chunk.append(struct.pack("=IHHII", 16 + len(body), self.family,
                                         _NLM_F_REQUEST | _NLM_F_ACK, self.seq, 0) + body)
                names[self.seq] = what
                size += 16 + len(body)
                at += 1
            self.sock.sendall(b"".join(chunk))
            while names:
                data = self.sock.recv(1 << 20)
                off = 0
                while off < len(data):
                    length, kind, _, seq = struct.unpack_from("=IHHI", data, off)
                    if kind == _NLMSG_ERROR and seq in names:
                        code = struct.unpack_from("=i", data, off + 16)[0]
                        what = names.pop(seq)
                        if code and first_error is None:
                            first_error = f"IPVS {what}: {os.strerror(-code)}"
                    off += (length + 3) & ~3
        if first_error is not None:
            raise DataPlaneError(first_error)


def has_ipvs(runner: Runner) -> bool:
    """Whether the kernel the runner reaches has IPVS: loaded (its /proc file exists), or
    loadable (``modprobe ip_vs``, as upstream's proxier loads it when it can)."""
    if runner.run(["test", "-e", "/proc/net/ip_vs"]).returncode == 0:
        return True
    return (runner.run(["modprobe", "-q", "ip_vs"]).returncode == 0
            and runner.run(["test", "-e", "/proc/net/ip_vs"]).returncode == 0)
