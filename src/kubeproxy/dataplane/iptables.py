"""The iptables data plane: apply a rendered Ruleset to the kernel, fully or partially.

Theory of operation
-------------------
Each sync feeds one ``iptables-restore --noflush`` transaction per family holding what
differs between the ruleset and what the kernel holds:

* a partial sync compares with what it wrote last: the per-service chains
  (KUBE-SVC-/SVL-/EXT-/FW-/SEP-) of the services that changed, ``-X`` for those of
  theirs no longer wanted, and the top-level chains (KUBE-SERVICES, KUBE-NODEPORTS,
  ...) whose rules changed, a large one edited in place (``-D`` the rules that went,
  ``-I`` at their positions those that came: :func:`edit`) instead of rewriting its
  10,000 rules for a one-service change;
* a full sync reads filter and nat (``iptables-save``) and compares every chain: it
  writes those that differ or are missing, ``-X`` any per-service chain the kernel has
  that the ruleset does not, declares the KUBE-PROXY-CANARY chains and jump targets the
  kernel lacks, and inserts the jumps from the builtin chains into ours that are
  missing (in the same restore, at the top of the builtin chain, as upstream). So a
  restart or the hourly full sync with everything intact writes nothing to nat, and a
  repair after damage from outside writes the damaged chains.

Declaring a chain in the restore is what creates it (or flushes it), so there is no
``iptables -N`` whose "already exists" failure would have to be told apart from a real
one by its message; a table with nothing to write is left out of the restore (a legacy
kernel rewrites every table named in it: ~1.5 s for nat at 10,000 services).

The restore is atomic per table, so a failure leaves the previous rules in place and
the caller falls back to a full sync next time.

Flush detection (``damage``), in two steps so that it can run every second at 10,000
services: reading the nat table back costs ~0.9 s on the legacy backend at that size
(libiptc copies and parses the whole table even for ``-S KUBE-PROXY-CANARY``), so the
tables are not read while a cheap *fingerprint* (:class:`Watch`) is unchanged since our
last write: the x_tables GET_INFO of mangle, filter and nat (entry count and size, a
getsockopt without the rules) on legacy, the nf_tables generation id on nft. When it
moved, one ``iptables-save -t TABLE`` per table that moved (on legacy, someone else's
write to filter does not make us read nat; nft has one id for all) checks what we
wrote: the
KUBE-PROXY-CANARY chain of each table (upstream's canary), the rule count of each
top-level chain (``-F KUBE-SERVICES``), the jumps from the builtin chains (``-t nat -F``).
If all is there the change was someone else's and the new fingerprint is accepted.
Per-service chains are not checked (upstream does not either); they hang off
KUBE-SERVICES, and the hourly full sync rewrites them.

Which iptables binary: as upstream's iptables-wrapper decides it, the backend (legacy
or nft) already holding kube rules wins, else the one with more rules, else nft
(:func:`detect_backend`; :func:`choose_backend` applies ``--iptables-backend``, for
the iptables mode and the IPVS mode's iptables part alike).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
import shlex
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from kubeproxy.dataplane.base import Keep, Result, Runner, check
from kubeproxy.dataplane.netlink import NetlinkTransport, find_netns
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import NamespacedName
from kubeproxy.render.iptables import (
    JUMPS,
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
    LOCALHOST_JUMPS,
    SERVICE_CHAIN_PREFIXES,
    TOP_CHAINS,
    Ruleset,
    jump_rule,
)
from kubeproxy.util.netns_thread import call_at

Backend = Literal["legacy", "nft"]
BACKENDS: tuple[Backend, ...] = ("legacy", "nft")
CANARY_TABLES = ("mangle", "filter", "nat")  # where the KUBE-PROXY-CANARY chains live
_HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_CHAIN_LINE = re.compile(r"^:(\S+) ")
log = logging.getLogger("kubeproxy.dataplane.iptables")


def binaries(family: int, backend: Backend) -> tuple[str, str, str]:
    """(iptables, iptables-save, iptables-restore) for a family and backend."""
    base = "iptables" if family == 4 else "ip6tables"
    return (f"{base}-{backend}", f"{base}-{backend}-save", f"{base}-{backend}-restore")


def detect_backend(runner: Runner) -> Backend:
    """iptables-wrapper's rule: hints first, then whichever backend has more rules.
    A backend whose binaries are missing (a host with only the ``*-nft`` ones) is
    skipped; neither installed is a DataPlaneError naming both."""
    counts: dict[Backend, int] = {}
    missing: list[str] = []
    for backend in ("legacy", "nft"):
        text = ""
        try:
            for family in (4, 6):
                res = runner.run([binaries(family, backend)[1]])
                if res.returncode == 0:
                    text += res.stdout
        except DataPlaneError as err:
            missing.append(str(err))
            if family == 4:
                continue
        if any(f":{hint} " in text for hint in _HINT_CHAINS):
            return backend
        counts[backend] = sum(1 for line in text.splitlines() if line.startswith("-"))
    if not counts:
        raise DataPlaneError("no iptables backend is usable: " + "; ".join(missing))
    return max(counts, key=lambda b: (counts[b], b == "nft"))


def choose_backend(runner: Runner, wanted: str) -> Backend:
    """The backend ``wanted`` names (``--iptables-backend``: legacy, nft), or for
    ``auto`` the one :func:`detect_backend` picks (logged). Anything else: ValueError."""
    if wanted == "auto":
        backend = detect_backend(runner)
        log.info("iptables backend: %s", backend)
        return backend
    for backend in BACKENDS:
        if wanted == backend:
            return backend
    raise ValueError(f"iptables backend {wanted!r}: one of auto, {', '.join(BACKENDS)}")


def is_ours(chain: str) -> bool:
    """Chains this proxy owns (kubelet's KUBE-KUBELET-CANARY & co are not ours)."""
    fixed = {KUBE_FIREWALL, KUBE_PROXY_CANARY, *TOP_CHAINS["filter"], *TOP_CHAINS["nat"]}
    return chain in fixed or chain.startswith(SERVICE_CHAIN_PREFIXES)


# What marks the one rule we write in KUBE-FIREWALL (render/iptables.py's localnet guard).
LOCALNET_COMMENT = '--comment "block incoming localnet connections"'


def is_kubelets(chain: str, rules: Sequence[str]) -> bool:
    """Whether ``chain`` is kubelet's KUBE-FIREWALL, which kubelets before 1.28 wrote
    with the localnet guard we write too (upstream kube-proxy writes that chain and
    never removes it): any rule beside our guard says so."""
    return chain == KUBE_FIREWALL and any(LOCALNET_COMMENT not in rule for rule in rules)


def _ours_unless_kubelets(chain: str, rules: Sequence[str]) -> bool:
    return is_ours(chain) and not is_kubelets(chain, rules)


# Our jumps from builtin chains, per table, as iptables-save prints them: a cleanup that
# keeps their target (another mode's chain of the same name) deletes them unless kept.
OWN_JUMPS = frozenset((j[0], jump_rule(j)) for j in (*JUMPS, *LOCALHOST_JUMPS))
NOTHING_KEPT = Keep()


def remove_chains(runner: Runner, family: int, backend: Backend, table: str,
                  ours: Callable[[str, Sequence[str]], bool],
                  jumps: Collection[tuple[str, str]], keep: Keep = NOTHING_KEPT,
                  uses: Callable[[str], bool] = lambda rule: False) -> Counter[str]:
    """Remove one mode's chains from ``table`` in one ``iptables-restore --noflush``.

    ``ours(chain, its rules)`` names the mode's chains; every one of them goes (flushed,
    deleted) unless ``keep.chains`` has it. Rules are deleted first where they would
    keep what goes in force or referenced: any rule of a chain that stays jumping into
    one that goes (a chain still referenced cannot be deleted), the mode's own
    ``jumps`` (table, iptables-save line) into a kept chain unless ``keep.rules`` has
    them, and the rules of kept chains that ``uses`` says need what the caller removes
    next (the IPVS mode's ipsets). Nothing is written when nothing is ours; a table the
    backend cannot read (missing, or not created: see :class:`ExistingTablesOnly`)
    holds nothing. Returns {"chains": n, "rules": m}: the chains removed, and the rules
    that went with them or were deleted from chains that stay."""
    _, save, restore = binaries(family, backend)
    res = runner.run([save, "-t", table])
    if res.returncode != 0:
        return Counter()
    lines = res.stdout.splitlines()
    rules: dict[str, list[str]] = {}
    for line in lines:
        if (m := _CHAIN_LINE.match(line)) is not None:
            rules[m.group(1)] = []
        elif line.startswith("-A "):
            rules.setdefault(line.split(" ", 2)[1], []).append(line)
    mine = {c for c, held in rules.items() if ours(c, held)}
    kept = {c for c in mine if (table, c) in keep.chains}
    gone = sorted(mine - kept)
    dead = set(gone)
    delete = []
    for chain, held in rules.items():
        if chain in dead:
            continue
        for rule in held:
            target = _rule_target(rule)
            if target in dead or (target in kept and (table, rule) in jumps
                                  and (table, rule) not in keep.rules) \
                    or (chain in kept and uses(rule)):
                delete.append("-D " + rule[len("-A "):])
    if not gone and not delete:
        return Counter()
    payload = [f"*{table}", *(f":{c} - [0:0]" for c in gone), *delete,
               *(f"-X {c}" for c in gone), "COMMIT"]
    check(runner, [restore, "-w", "--noflush"], "\n".join(payload) + "\n")
    return Counter({"chains": len(gone),
                    "rules": sum(len(rules[c]) for c in gone) + len(delete)})


def _rule_target(rule: str) -> str | None:
    """The -j / -g target of an iptables-save rule line (shlex only when a quote follows
    the last " -j ", as a comment holding " -j " would)."""
    at = max(rule.rfind(" -j "), rule.rfind(" -g "))
    if at < 0:
        return None
    rest = rule[at + 4:]
    if '"' not in rest:
        return rest.split(" ", 1)[0]
    words = shlex.split(rule)
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "-g") and words[i - 1] != "--comment":
            return words[i + 1]
    return None


# The per-family list of the legacy tables that exist (reading it creates none).
LEGACY_TABLE_LISTS = {"iptables-legacy-save": "/proc/net/ip_tables_names",
                      "ip6tables-legacy-save": "/proc/net/ip6_tables_names"}


class ExistingTablesOnly:
    """A Runner that answers ``iptables-legacy-save -t TABLE`` for a table the kernel
    does not have with "no such table" instead of running it (which would create it,
    and iptables-nft would then warn about legacy tables for ever after)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        listing = LEGACY_TABLE_LISTS.get(argv[0]) if argv else None
        if listing is not None and "-t" in argv:
            table = argv[list(argv).index("-t") + 1]
            names = self.runner.run(["cat", listing])
            if names.returncode != 0 or table not in names.stdout.split():
                return Result(1, "", f"table {table!r} does not exist")
        return self.runner.run(argv, stdin)


def reader(runner: Runner, backend: Backend) -> Runner:
    """The runner a cleanup reads ``backend``'s tables with: on legacy, one that never
    creates a table by reading it."""
    return ExistingTablesOnly(runner) if backend == "legacy" else runner


@dataclass
class SyncStats:
    chains_written: int = 0
    chains_deleted: int = 0
    rules_written: int = 0
    bytes: int = 0
    rules_by_table: dict[str, int] = field(default_factory=dict)  # written, per table


Fingerprint = Mapping[str, object]  # table (CANARY_TABLES) -> what moves when it is written


class Watch(Protocol):
    """A cheap fingerprint of a family's tables on one backend, per table: an equal one
    means that table was not written in between (:class:`KernelWatch`; the fake kernel
    is its own). Where the backend has one counter for all (nft), every table has it."""

    def fingerprint(self, family: int, backend: Backend) -> Fingerprint:
        """Raises DataPlaneError when it cannot be read."""


class KernelWatch:
    """Fingerprints read from the kernel of the namespace the runner's commands run in:
    x_tables GET_INFO per table (legacy), the nf_tables generation id (nft)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._netns: list[str | None] = []  # looked up once: [path or None]
        self._sockets: dict[int, socket.socket] = {}
        self._nft: NetlinkTransport | None = None

    def _where(self) -> str | None:
        if not self._netns:
            self._netns.append(find_netns(self.runner))
        return self._netns[0]

    def fingerprint(self, family: int, backend: Backend) -> Fingerprint:
        if backend == "nft":
            if self._nft is None:
                self._nft = NetlinkTransport(self._where())
            generation = self._nft.generation()
            return dict.fromkeys(CANARY_TABLES, generation)
        sock = self._sockets.get(family)
        if sock is None:
            sock = self._sockets[family] = self._open(family)
        return {table: _xt_info(sock, family, table) for table in CANARY_TABLES}

    def _open(self, family: int) -> socket.socket:
        af = socket.AF_INET if family == 4 else socket.AF_INET6

        def raw() -> socket.socket:
            return socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)

        where = self._where()
        try:
            return raw() if where is None else call_at(where, raw)
        except OSError as err:
            raise DataPlaneError(f"cannot open a raw socket for x_tables: {err}") from err

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        if self._nft is not None:
            self._nft.close()


IPT_SO_GET_INFO = 64  # IPT_BASE_CTL; IP6T_SO_GET_INFO has the same number at IPPROTO_IPV6
_GETINFO_SIZE = 84  # struct ipt_getinfo: name[32], valid_hooks, hook_entry[5],
#                     underflow[5], num_entries, size (all u32)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _xt_info(sock: socket.socket, family: int, table: str) -> bytes | None:
    """The table's hooks, entry count and size (not its rules), or None if the table
    does not exist. The socket's namespace is the one read."""
    buf = ctypes.create_string_buffer(table.encode(), _GETINFO_SIZE)
    size = ctypes.c_uint32(_GETINFO_SIZE)
    level = socket.IPPROTO_IP if family == 4 else socket.IPPROTO_IPV6
    if _libc().getsockopt(sock.fileno(), level, IPT_SO_GET_INFO, buf,
                          ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise DataPlaneError(f"getsockopt(IPT_SO_GET_INFO, {table}): {os.strerror(err)}")
    return buf.raw[32:]


SEEN_FOR = 10.0  # seconds a table damage() read stands for what the kernel holds


@dataclass(frozen=True)
class Held:
    """What the kernel holds, per table: chain -> its rules, and the set of rule lines."""

    chains: dict[str, dict[str, list[str]]]
    rules: dict[str, set[str]]


def _parse_save(text: str) -> tuple[dict[str, list[str]], set[str]]:
    """iptables-save text of one table -> (chain -> its rules, every rule line)."""
    chains: dict[str, list[str]] = {}
    lines = text.splitlines()
    for line in lines:
        if line.startswith(":"):
            chains[line[1:line.index(" ")] if " " in line else line[1:]] = []
        elif line.startswith("-A "):
            end = line.find(" ", 3)
            chains.setdefault(line[3:end if end > 0 else len(line)], []).append(line)
    return chains, {line for line in lines if line.startswith("-A ")}


def _declared(ruleset: Ruleset, table: str) -> set[str]:
    """Chains of ``table`` that must exist without rules of their own: the canary, and
    any jump target the ruleset has no rules for."""
    chains = ruleset.tables[table]
    return {c for c in (KUBE_PROXY_CANARY, *(j[2] for j in ruleset.jumps if j[0] == table))
            if c not in chains}


def _tops(ruleset: Ruleset) -> list[tuple[str, str]]:
    """(table, chain) of the top-level chains the ruleset has (named, not searched for
    among the 100,000 per-service chains)."""
    return [(t, c) for t in ("filter", "nat") for c in (*TOP_CHAINS[t], KUBE_FIREWALL)
            if c in ruleset.tables[t]]


@dataclass(frozen=True)
class Written:
    """What a sync left in the kernel, as flush detection checks it."""

    rules: dict[tuple[str, str], int]  # (table, top-level chain) -> rule count
    jumps: tuple[tuple[str, str, str], ...]  # (table, builtin chain, our chain)
    fingerprint: Fingerprint | None  # the watch's, right after the sync; None without one


@dataclass
class IptablesDataPlane:
    runner: Runner
    family: int
    backend: Backend
    watch: Watch | None = None  # None: damage() reads the tables every time
    # What we wrote last: nat chain -> owning service (for partial syncs and -X), and
    # inverted (service -> its nat chains), so a partial sync looks up only its services.
    written: dict[str, NamespacedName] = field(default_factory=dict)
    written_by_service: dict[NamespacedName, frozenset[str]] = field(default_factory=dict)
    needs_full: bool = True
    last: Written | None = None  # for damage(); None until a sync succeeded
    # The top-level chains' rules as last written: a partial sync leaves out those that
    # did not change (most changes only touch one service's own chains).
    tops: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # Tables damage() read: table -> (its fingerprint then, the text, when), so that the
    # full sync repairing what it found need not read them again.
    _seen: dict[str, tuple[object, str, float]] = field(default_factory=dict)

    @property
    def _bins(self) -> tuple[str, str, str]:
        return binaries(self.family, self.backend)

    def sync(self, ruleset: Ruleset, changed: Iterable[NamespacedName] | None = None
             ) -> SyncStats:
        """Apply ``ruleset``; only the chains of ``changed`` services unless None (full).

        A full sync reads what the kernel holds and writes what differs from the
        ruleset: every chain whose rules differ (a flushed KUBE-SERVICES, a chain
        missing), ``-X`` for per-service chains nobody wants, the canaries and jumps
        that are missing. With nothing else changed it leaves the large nat table alone
        (a legacy kernel rewrites a table named in a restore: ~1.5 s at 10,000
        services), so an hourly full sync, a restart and a repair cost what they
        change. Rules are compared in iptables-save's spelling, which is how they are
        rendered (tests/kernel/test_iptables_dataplane.py reads them back)."""
        full = changed is None or self.needs_full
        self.needs_full = True  # until this sync succeeds
        jumps: list[tuple[str, str, str, str]] = []
        missing: dict[str, set[str]] | None = None  # full: chains to create
        tops = self.tops
        if full:
            kernel = self._kernel()
            nat = ruleset.tables["nat"]
            held = kernel.chains["nat"]
            write = {c for c in ruleset.owners if held.get(c) != nat[c]}
            stale = {c for c in held
                     if c.startswith(SERVICE_CHAIN_PREFIXES) and c not in ruleset.owners}
            tops = {(t, c): kernel.chains[t][c] for t, c in _tops(ruleset)
                    if c in kernel.chains[t]}
            # The jumps from builtin chains into ours, where missing, go in the same
            # restore. Partial syncs do not look: a `-C` costs a read of the whole table
            # (1 s for nat at 10,000 services on legacy), and a jump removed from outside
            # is found by flush detection (damage), which makes the next sync full.
            jumps = [j for j in ruleset.jumps if jump_rule(j) not in kernel.rules[j[0]]]
            missing = {t: {c for c in _declared(ruleset, t) if c not in kernel.chains[t]}
                       for t in ("filter", "nat")}
        else:
            assert changed is not None
            services = set(changed)
            write = {c for svc in services for c in ruleset.chains_of(svc)}
            stale = {c for svc in services for c in self.written_by_service.get(svc, ())
                     if c not in ruleset.owners}
        payload, stats = self._payload(ruleset, write, stale, jumps, tops, missing)
        if payload:
            check(self.runner, [self._bins[2], "-w", "--noflush", "--counters"], payload)
        if full and any(j[2] == KUBE_FIREWALL for j in ruleset.jumps):
            # Localhost NodePorts: let DNAT from 127.0.0.1 to pods route (IPv4 only).
            check(self.runner, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"])
        if full:
            self.written = dict(ruleset.owners)
            self.written_by_service = dict(ruleset.services())
        else:
            for chain in stale:
                del self.written[chain]
            self.written.update((c, ruleset.owners[c]) for c in write)
            for svc in services:
                self.written_by_service.pop(svc, None)
                if chains := ruleset.chains_of(svc):
                    self.written_by_service[svc] = chains
        self.tops = {(t, c): ruleset.tables[t][c] for t, c in _tops(ruleset)}
        self.needs_full = False
        self.last = Written(
            {(t, c): len(ruleset.tables[t][c]) for t, c in _tops(ruleset)},
            tuple(j[:3] for j in ruleset.jumps), self._fingerprint())
        return stats

    def _fingerprint(self) -> Fingerprint | None:
        return None if self.watch is None else self.watch.fingerprint(self.family,
                                                                      self.backend)

    def damage(self) -> str | None:
        """What was changed from outside in what the last sync wrote, or None (also
        before any sync). Cheap while the fingerprint holds (module docstring)."""
        last = self.last
        if last is None:
            return None
        try:
            now = self._fingerprint()
        except DataPlaneError:
            now = None  # cannot tell: read the tables
        if now is not None and now == last.fingerprint:
            return None
        # Only the tables that moved are read (on legacy, someone else's write to filter
        # does not cost a read of our 100,000-rule nat table).
        was = last.fingerprint
        tables = CANARY_TABLES if now is None or was is None else tuple(
            t for t in CANARY_TABLES if now.get(t) != was.get(t))
        found = self._check(last, tables, now)
        if found is None and now is not None:
            self.last = replace(last, fingerprint=now)  # someone else's change
        return found

    def _check(self, last: Written, tables: Iterable[str], now: Fingerprint | None
               ) -> str | None:
        """Read each of ``tables`` once and compare with ``last``; keep what was read
        under the fingerprint ``now`` for the repair (_kernel)."""
        name = f"IPv{self.family} {self.backend}"
        for table in tables:
            res = self.runner.run([self._bins[1], "-t", table])
            if res.returncode == 0 and now is not None:
                self._seen[table] = (now.get(table), res.stdout, time.monotonic())
            text = "\n" + res.stdout if res.returncode == 0 else ""
            if f"\n:{KUBE_PROXY_CANARY} " not in text:
                return f"iptables ({name}) {table} table: chain {KUBE_PROXY_CANARY} is gone"
            for (t, chain), want in sorted(last.rules.items()):
                if t != table:
                    continue
                got = text.count(f"\n-A {chain} ")
                if got != want:
                    return (f"iptables ({name}) {table} table: chain {chain} holds {got} "
                            f"rules, {want} were written")
            for t, builtin, target in last.jumps:
                if t == table and not _has_jump(text, builtin, target):
                    return (f"iptables ({name}) {table} table: the jump from {builtin} "
                            f"to {target} is gone")
        return None

    def _payload(self, ruleset: Ruleset, write: set[str], stale: set[str],
                 jumps: list[tuple[str, str, str, str]], tops: dict[tuple[str, str], list[str]],
                 missing: dict[str, set[str]] | None) -> tuple[str, SyncStats]:
        """The restore input: the chains in ``write`` and ``stale`` (``-X``), the
        top-level chains whose rules differ from ``tops`` (what the kernel holds: as
        last written, or as read on a full sync; edited in place where that is shorter:
        :func:`edit`), and ``jumps``. A full sync (``missing`` given) also declares the
        mangle canary and, per table, the empty chains the kernel lacks; a partial one
        declares the empty chains of each table it writes. A table with nothing to
        write is left out (with ``--noflush`` what is not named stays as it is; a
        legacy kernel rewrites every table named, ~1.5 s for nat at 10,000 services).
        Empty: nothing to do."""
        stats = SyncStats(chains_deleted=len(stale))
        out = [] if missing is None else ["*mangle", f":{KUBE_PROXY_CANARY} - [0:0]", "COMMIT"]
        for table in ("filter", "nat"):
            chains = ruleset.tables[table]
            top, edits = [], []
            for t, c in _tops(ruleset):
                old = tops.get((t, c))
                if t != table or old == chains[c]:
                    continue
                lines = None if old is None else edit(c, old, chains[c])
                if lines is None:
                    top.append(c)
                else:
                    edits.append(lines)
            body = top + (sorted(write) if table == "nat" else [])
            dead = sorted(stale) if table == "nat" else []
            new_jumps = [j for j in jumps if j[0] == table]
            # Declared, never written: the canary, and any jump target without rules.
            empty = sorted((_declared(ruleset, table) if missing is None else missing[table])
                           - set(body))
            if not body and not dead and not edits and not new_jumps \
                    and (missing is None or not empty):
                continue
            out.append(f"*{table}")
            out.extend(f":{c} - [0:0]" for c in [*body, *empty, *dead])
            written = 0
            for chain in body:
                out.extend(chains[chain])
                written += len(chains[chain])
            for lines in edits:  # after the chains their new rules jump to are declared
                out.extend(lines)
                written += sum(1 for line in lines if line.startswith("-I "))
            stats.rules_written += written
            stats.rules_by_table[table] = written
            # Missing jumps at the top of their builtin chain, last first: table order.
            out.extend("-I " + jump_rule(j)[len("-A "):].replace(" ", " 1 ", 1)
                       for j in reversed(new_jumps))
            out.extend(f"-X {c}" for c in dead)
            out.append("COMMIT")
            stats.chains_written += len(body) + len(edits)
        text = "\n".join(out) + "\n" if out else ""
        stats.bytes = len(text)
        return text, stats

    def _kernel(self) -> Held:
        """What filter and nat hold now: every chain's rules, and every rule line. A
        table damage() read moments ago is not read again if its fingerprint has not
        moved since (a repair right after a flush at 10,000 services saves ~1 s)."""
        try:
            now = self._fingerprint()
        except DataPlaneError:
            now = None
        held = Held({}, {})
        for table in ("filter", "nat"):
            seen = self._seen.get(table)
            if seen is not None and now is not None and seen[0] == now.get(table) \
                    and time.monotonic() - seen[2] < SEEN_FOR:
                text = seen[1]
            else:
                text = check(self.runner, [self._bins[1], "-t", table])
            held.chains[table], held.rules[table] = _parse_save(text)
        self._seen.clear()
        return held

    def save(self) -> str:
        """What the kernel holds now (iptables-save of filter and nat)."""
        return (check(self.runner, [self._bins[1], "-t", "filter"])
                + check(self.runner, [self._bins[1], "-t", "nat"]))

    def cleanup(self, keep: Keep = NOTHING_KEPT) -> Counter[str]:
        """Remove every jump, chain and rule this proxy may have written, but what
        ``keep`` names (the chains and jumps the mode now starting writes under the same
        names) and a KUBE-FIREWALL that is kubelet's (:func:`is_kubelets`). Returns how
        many chains and rules were removed, by kind ("chains", "rules")."""
        removed: Counter[str] = Counter()
        for table in ("filter", "nat", "mangle"):
            removed += remove_chains(self.runner, self.family, self.backend, table,
                                     _ours_unless_kubelets, OWN_JUMPS, keep)
        self.written = {}
        self.written_by_service = {}
        self.needs_full = True
        self.last = None
        return removed


def edit(chain: str, old: list[str], new: list[str]) -> list[str] | None:
    """Restore lines that turn ``chain``'s rules ``old`` (what the kernel holds) into
    ``new`` in place: ``-D`` each rule that went, then ``-I`` each that came at its
    position in ``new``, in order, so the kernel ends with ``new`` in ``new``'s order.
    None when rewriting the chain is the better way: the rules kept changed order, a
    rule is there twice, or most of the chain changed.

    The chain is not declared, so it is not flushed: a one-service change of a
    10,000-rule KUBE-SERVICES sends two lines instead of 10,000 (iptables-restore
    parses every rule it is given: ~0.2 s at that size). A ``-D`` of a rule the kernel
    does not hold fails the whole restore, which is then retried as a full sync.
    """
    olds, news = set(old), set(new)
    if len(olds) != len(old) or len(news) != len(new):
        return None
    gone = [line for line in old if line not in news]
    came = [(i, line) for i, line in enumerate(new) if line not in olds]
    if 2 * (len(gone) + len(came)) > len(new):
        return None
    if [line for line in old if line in news] != [line for line in new if line in olds]:
        return None
    head = f"-A {chain} "
    return ([f"-D {line[3:]}" for line in gone]
            + [f"-I {chain} {i + 1} {line[len(head):]}" for i, line in came])


def _has_jump(text: str, builtin: str, target: str) -> bool:
    """Whether iptables-save ``text`` has a rule in ``builtin`` jumping to ``target``."""
    head, at = f"\n-A {builtin} ", 0
    while (at := text.find(head, at)) >= 0:
        end = text.find("\n", at + 1)
        line = text[at + 1:end if end >= 0 else len(text)]
        if line.endswith(f" -j {target}") or f" -j {target} " in line:
            return True
        at += 1
    return False
