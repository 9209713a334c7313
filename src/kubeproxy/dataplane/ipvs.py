"""The IPVS data plane: kube-ipvs0, IPVS virtual servers, ipsets and a few iptables chains.

Theory of operation
-------------------
A sync writes an :class:`~kubeproxy.render.ipvs.IpvsRuleset` in the order that keeps
every reference valid (as upstream's IPVS proxier does):

1. the ``kube-ipvs0`` dummy interface (created if missing, left down as upstream) and
   the sysctls (``net.ipv4.vs.conntrack=1``, so that KUBE-POSTROUTING can masquerade
   IPVS traffic; expire_nodest_conn, expire_quiescent_template; with strictARP
   arp_ignore=1 and arp_announce=2) and the IPVS timeouts that are set: full syncs;
2. the ipsets, through one ``ipset restore -exist``: every set created if missing, the
   entries diffed against the kernel's (``ipset save``) on a full sync, against what we
   wrote last on a partial one (skipped when nothing changed);
3. the service addresses on kube-ipvs0 (``ip -batch``: added, and stale ones removed),
   diffed against the kernel's on a full sync, against what we bound on a partial one;
4. the virtual servers over generic netlink (:class:`IpvsKernel`, ipvs_netlink.py): all
   of them on a full sync (the kernel's list against the ruleset: add, change, delete;
   the ones in excludeCIDRs are someone else's and left alone), only the changed
   services' ones on a partial sync (the ruleset's ``owners`` and ours name them); per
   virtual server the real servers are diffed against the kernel's. A real server that
   goes away is **terminated gracefully**, as upstream's graceful-termination manager:
   TCP ones with connections get weight 0 (no new connections) and stay until their
   active and inactive connection counts are 0, which every later sync checks; UDP and
   SCTP ones are deleted at once (expire_nodest_conn drops their flows);
5. the iptables part, per family: one ``iptables-restore --noflush`` rewriting our fixed
   chains whole (they do not grow with services; the sets do), then the jumps from the
   builtin chains (``-C``, ``-I`` when missing); a partial sync skips both when the
   rendered chains equal what was written.

So a partial sync's cost follows the change: no read of the kernel's sets or addresses,
no iptables, netlink requests for the changed services only.

A failure raises DataPlaneError and the next sync is full. ``intact()`` checks cheaply:
kube-ipvs0 exists, the kernel's virtual-server count is what we wrote (a closer look
when it is not: other virtual servers in excludeCIDRs are fine), and the iptables part
(its fingerprint, then our chains' rule counts and jumps only when it moved).
``cleanup`` deletes every virtual server not in excludeCIDRs, kube-ipvs0, our chains
and jumps (both backends) and destroys our ipsets (after the rules that reference them).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kubeproxy.config.types import IpvsConfig
from kubeproxy.dataplane.base import Keep, Runner, check, not_installed
from kubeproxy.dataplane.iptables import (
    NOTHING_KEPT,
    Backend,
    Watch,
    binaries,
    reader,
    remove_chains,
)
from kubeproxy.dataplane.ipvs_netlink import KernelDest, KernelService, Timeouts
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.render.ipvs import (
    DUMMY,
    IPTABLES_HEADER,
    FamilyIpvs,
    IpvsRuleset,
    Key,
    RealServer,
    VirtualServer,
    ip_order,
)
from kubeproxy.render.ipvs_tables import CHAINS, IPSETS, JUMPS, jump_rule, set_name

log = logging.getLogger("kubeproxy.dataplane.ipvs")
SYSCTLS = ("net.ipv4.vs.conntrack=1", "net.ipv4.vs.expire_nodest_conn=1",
           "net.ipv4.vs.expire_quiescent_template=1")
STRICT_ARP = ("net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2")
GRACEFUL_PROTOCOLS = frozenset({"tcp"})  # UDP / SCTP real servers are deleted at once
OUR_SETS = tuple(set_name(n, f) for f in (4, 6) for n in IPSETS)
_COUNTERS = re.compile(r"\[\d+:\d+\]$")  # a chain's packet counters, zeroed in rules()
_ADDR = re.compile(r"\binet6? ([0-9a-fA-F.:]+)/\d+")
_OWNER = NamespacedName("-", "-")  # virtual servers read back from the kernel


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
    def set_timeouts(self, timeouts: Timeouts) -> None: ...
    def flush(self) -> None: ...
    def commit(self) -> None:
        """Apply the writes queued so far (a kernel may batch them; reads commit too)."""


def same_service(have: KernelService, want: VirtualServer) -> bool:
    return (have.scheduler, have.flags, have.timeout) == (want.scheduler, want.flags,
                                                          want.timeout)


def timeouts_of(settings: IpvsConfig) -> Timeouts:
    """Whole seconds, as upstream's ConfigureTimeouts passes them."""
    return Timeouts(int(settings.tcp_timeout), int(settings.tcpfin_timeout),
                    int(settings.udp_timeout))


@dataclass
class IpvsDataPlane:
    runner: Runner  # ip, ipset, iptables, sysctl
    kernel: IpvsKernel
    backend: Backend  # of the iptables part
    watch: Watch | None = None
    settings: IpvsConfig = field(default_factory=IpvsConfig)  # strictARP, excludeCIDRs, timeouts
    written: dict[Key, VirtualServer] = field(default_factory=dict)
    owned: dict[NamespacedName, frozenset[Key]] = field(default_factory=dict)  # as rendered
    foreign: int = 0  # virtual servers in excludeCIDRs at the last look (intact)
    sets: dict[str, frozenset[str]] = field(default_factory=dict)  # what we wrote last
    bound: frozenset[IPAddress] = frozenset()  # kube-ipvs0's addresses, as we left them
    terminating: dict[tuple[Key, IPAddress, int], None] = field(default_factory=dict)
    families: dict[int, FamilyIpvs] = field(default_factory=dict)  # iptables parts written
    fingerprints: dict[int, object] = field(default_factory=dict)
    needs_full: bool = True
    synced: bool = False

    def sync(self, ruleset: IpvsRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        full = changed is None or self.needs_full
        self.needs_full = True  # until this sync succeeds
        if full:
            self._dummy()
            sysctls = SYSCTLS + (STRICT_ARP if self.settings.strict_arp else ())
            for setting in sysctls:
                check(self.runner, ["sysctl", "-q", "-w", setting])
            timeouts = timeouts_of(self.settings)
            if timeouts != Timeouts():
                self.kernel.set_timeouts(timeouts)
        self._ipsets(ruleset, full)
        self._addresses(ruleset, full)  # first, as upstream binds before adding real servers
        self._virtual_servers(ruleset, None if full else changed)
        for fam in ruleset.families:
            before = self.families.get(fam.family)
            if full or before is None or (before.tables is not fam.tables
                                          and before.tables != fam.tables):
                self._iptables(fam)
        self.needs_full, self.synced = False, True

    # --- kube-ipvs0 and its addresses ----------------------------------------------------

    def _dummy(self) -> None:
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode != 0:
            check(self.runner, ["ip", "link", "add", DUMMY, "type", "dummy"])

    def kernel_bound(self) -> set[IPAddress]:
        text = check(self.runner, ["ip", "-o", "addr", "show", "dev", DUMMY])
        return {ipaddress.ip_address(m.group(1)) for m in _ADDR.finditer(text)}

    def _addresses(self, ruleset: IpvsRuleset, full: bool) -> None:
        want = frozenset().union(*(fam.bound for fam in ruleset.families))
        have = self.kernel_bound() if full else self.bound
        lines = [f"address add {ip}/{ip.max_prefixlen} dev {DUMMY}"
                 + (" nodad" if ip.version == 6 else "")
                 for ip in sorted(want - have, key=ip_order)]
        lines += [f"address del {ip}/{ip.max_prefixlen} dev {DUMMY}"
                  for ip in sorted(have - want, key=ip_order)]
        if lines:
            check(self.runner, ["ip", "-batch", "-"], "\n".join(lines) + "\n")
        self.bound = want

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
        creates: list[str] = []
        lines: list[str] = []
        written: dict[str, frozenset[str]] = {}
        for fam in ruleset.families:
            for s in fam.sets:
                old = have.get(s.name)
                if old is None or full:
                    creates.append(s.create_line())
                    old = old or frozenset()
                if old is not s.entries and old != s.entries:
                    lines += [f"add {s.name} {e}" for e in sorted(s.entries - old)]
                    lines += [f"del {s.name} {e}" for e in sorted(old - s.entries)]
                written[s.name] = s.entries
        if creates or lines:
            check(self.runner, ["ipset", "restore", "-exist"], "\n".join(creates + lines)
                  + "\n")
        self.sets = written

    # --- virtual and real servers ----------------------------------------------------------

    def _virtual_servers(self, ruleset: IpvsRuleset,
                         changed: frozenset[NamespacedName] | None) -> None:
        def wanted(key: Key) -> VirtualServer | None:
            for fam in ruleset.families:
                if fam.family == key[0].version:
                    return fam.servers.get(key)
            return None

        if changed is None:
            everything = {k for fam in ruleset.families for k in fam.servers}
            excluded = self.settings.excluded
            kernel = self.kernel.services()
            current = {(s.ip, s.proto, s.port): s for s in kernel
                       if (s.ip, s.proto, s.port) in everything or not excluded(s.ip)}
            self.foreign = len(kernel) - len(current)
            scope: Iterable[Key] = sorted(set(current) | everything, key=_order)
            self.owned = {}
        else:
            scope = sorted(self._scope(changed) | {k for fam in ruleset.families
                                                   for name in changed
                                                   for k in fam.owners.get(name, ())},
                           key=_order)
            current = {k: _as_kernel(self.written[k]) for k in scope if k in self.written}
        touched: set[Key] = set()
        for key in scope:
            want, have = wanted(key), current.get(key)
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
        self._own(ruleset, changed)
        self.terminating = {t: None for t in self.terminating if wanted(t[0]) is not None}
        self._graceful(touched)
        self.kernel.commit()

    def _scope(self, changed: frozenset[NamespacedName]) -> set[Key]:
        """The virtual servers we wrote for the ``changed`` services."""
        return {k for name in changed for k in self.owned.get(name, ())}

    def _own(self, ruleset: IpvsRuleset, changed: frozenset[NamespacedName] | None) -> None:
        names = (set().union(*(fam.owners for fam in ruleset.families)) if changed is None
                 else changed)
        for name in names:
            keys = frozenset().union(*(fam.owners.get(name, ()) for fam in ruleset.families))
            if keys:
                self.owned[name] = keys
            else:
                self.owned.pop(name, None)

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
        """Delete a real server, or drain it first (weight 0) while it has connections,
        established or closing (upstream's graceful-termination manager counts both)."""
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
        if count != len(self.written) + self.foreign:
            found = self._ipvs_damage()
            if found is not None:
                return found
        for _, fam in sorted(self.families.items()):
            found = self._iptables_damage(fam)
            if found is not None:
                return found
        return None

    def _ipvs_damage(self) -> str | None:
        """The count moved: ours all there and the others in excludeCIDRs is fine."""
        have = {(s.ip, s.proto, s.port) for s in self.kernel.services()}
        missing = [k for k in self.written if k not in have]
        others = [k for k in have if k not in self.written]
        if missing:
            return (f"IPVS holds {len(have)} virtual servers, {len(missing)} of the "
                    f"{len(self.written)} written are gone")
        stray = [k for k in others if not self.settings.excluded(k[0])]
        if stray:
            return f"IPVS holds {len(stray)} virtual servers that were not written"
        self.foreign = len(others)
        return None

    def rules(self) -> str:
        """The kernel's state in render's text format (render/ipvs.py ``text``)."""
        out = ["# kube-ipvs0 addresses"]
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode == 0:
            out += [f"addr {ip}" for ip in sorted(self.kernel_bound(), key=ip_order)]
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
        # The families this plane wrote; a plane that has not synced (`lab rules`, a new
        # process) prints each family whose nat table has our chains.
        for family in sorted(self.families) or (4, 6):
            _, save, _ = binaries(family, self.backend)
            text = "".join(_COUNTERS.sub("[0:0]", line) + "\n"  # without "# Generated by"
                           for table in ("filter", "nat")
                           for line in check(self.runner, [save, "-t", table]).splitlines()
                           if not line.startswith("#"))
            if self.families or ":KUBE-SERVICES " in text:
                body += IPTABLES_HEADER.format(family=family) + f" ({save})\n" + text
        return body

    def cleanup(self, backends: Iterable[Backend] = ("legacy", "nft"),
                keep: Keep = NOTHING_KEPT) -> Counter[str]:
        """Remove what this mode wrote: the virtual servers not in excludeCIDRs,
        kube-ipvs0, our chains and jumps on ``backends`` (but what ``keep`` names: the
        iptables mode's chains of the same names, when it starts; the rules in them
        that use our sets go), then our ipsets (only once no rule uses them). A kernel
        without IPVS, a missing ``ipset`` or iptables binary: nothing of theirs to
        remove (logged). Returns how many objects went, by kind."""
        removed: Counter[str] = Counter()
        try:
            if self.settings.exclude_cidrs:  # upstream: those are someone else's
                for s in self.kernel.services():
                    if not self.settings.excluded(s.ip):
                        self.kernel.del_service((s.ip, s.proto, s.port))
                        removed["virtual servers"] += 1
                self.kernel.commit()
            else:
                removed["virtual servers"] += len(self.kernel.services())
                self.kernel.flush()
        except DataPlaneError as err:
            removed.pop("virtual servers", None)
            log.debug("IPVS: nothing to flush (%s)", err)
        if self.runner.run(["ip", "-o", "link", "show", DUMMY]).returncode == 0:
            check(self.runner, ["ip", "link", "del", DUMMY])
            removed["interfaces"] += 1
        for backend in backends:
            try:
                for family in (4, 6):
                    removed += _remove_chains(reader(self.runner, backend), family, backend,
                                              keep)
            except DataPlaneError as err:
                if not not_installed(err):
                    raise
                log.debug("IPVS cleanup: iptables %s backend: %s", backend, err)
        removed += self._destroy_sets()
        self.written, self.owned, self.sets, self.terminating = {}, {}, {}, {}
        self.families, self.fingerprints, self.bound, self.foreign = {}, {}, frozenset(), 0
        self.needs_full, self.synced = True, False
        return +removed

    def _destroy_sets(self) -> Counter[str]:
        try:
            res = self.runner.run(["ipset", "list", "-n"])
        except DataPlaneError as err:
            if not not_installed(err):
                raise
            log.debug("IPVS cleanup: %s: no ipsets to destroy", err)
            return Counter()
        names = set(res.stdout.split()) if res.returncode == 0 else set()
        mine = [name for name in OUR_SETS if name in names]
        for name in mine:
            check(self.runner, ["ipset", "destroy", name])
        return Counter({"ipsets": len(mine)})


def _ours(table: str) -> Callable[[str, Sequence[str]], bool]:
    return lambda chain, rules: chain in CHAINS[table]


# Our jumps from builtin chains, per table, as iptables-save prints them.
_JUMP_LINES = frozenset((j[0], jump_rule(j)) for j in JUMPS)


def _uses_our_sets(rule: str) -> bool:
    """Whether an iptables rule matches one of our ipsets (it keeps the set in use)."""
    return "--match-set KUBE-" in rule and any(f"--match-set {name} " in rule
                                               for name in OUR_SETS)


def _remove_chains(runner: Runner, family: int, backend: Backend, keep: Keep = NOTHING_KEPT
                   ) -> Counter[str]:
    """Our jumps, then our chains (flushed and deleted), but what ``keep`` names; rules
    of kept chains that use our sets go."""
    removed: Counter[str] = Counter()
    for table in CHAINS:
        removed += remove_chains(runner, family, backend, table, _ours(table), _JUMP_LINES,
                                 keep, _uses_our_sets)
    return removed


def _as_kernel(vs: VirtualServer) -> KernelService:
    return KernelService(vs.ip, vs.proto, vs.port, vs.scheduler, vs.flags, vs.timeout)


def _order(key: Key) -> tuple[int, int, str, int]:
    return (key[0].version, int(key[0]), key[1], key[2])


def has_ipvs(runner: Runner) -> bool:
    """Whether the kernel the runner reaches has IPVS: loaded (its /proc file exists), or
    loadable (``modprobe ip_vs``, as upstream's proxier loads it when it can)."""
    if runner.run(["test", "-e", "/proc/net/ip_vs"]).returncode == 0:
        return True
    return (runner.run(["modprobe", "-q", "ip_vs"]).returncode == 0
            and runner.run(["test", "-e", "/proc/net/ip_vs"]).returncode == 0)
