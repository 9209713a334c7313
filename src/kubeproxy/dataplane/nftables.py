"""The nftables data plane: write an NftRuleset to the kernel in one netlink transaction.

Theory of operation
-------------------
Each sync is one nf_tables batch (all-or-nothing in the kernel), built from the IR and
sent on a netlink socket, with no ``nft`` process in between:

* **full** (``changed=None``, the first sync, or after the fixed part changed): every
  chain is (re)written (``add`` + ``flush`` + rules), the proxy's own sets and maps are
  flushed and refilled, chains and sets the table holds but the ruleset does not are
  flushed / deleted. A data plane that has not written yet reads the table's chain and
  set names first, so a restarted proxy takes over what an earlier one left (session
  affinity sets are kept, as upstream does).
* **partial** (``changed`` = the Services whose objects may differ): for those Services
  only, chains whose rules differ from what was last written are rewritten, removed ones
  flushed, and set/map elements are diffed against what was last written (elements
  shared between Services, a ClusterIP's ``cluster-ips`` entry or an endpoint's hairpin
  pair, are reference-counted).

Stale chains are flushed in the transaction and deleted right after it in a second,
separate one: before Linux 6.2 a chain that a just-deleted map element pointed to is
still "in use" for a moment (upstream kube-proxy defers the same way). A failed batch
changes nothing in the kernel, so what was last written stays true.

Why netlink and not ``nft`` (or a long-lived libnftables session): measured at 10,000
Services, nft 1.0.6 lists every chain of the table before running any command, even one
``add element`` (~40 ms at our 10,000 chains; with upstream's 110,000 the one-Service
change of the benchmark took 2.9 s), and a libnftables context does not keep that cache
across commands, since each commit changes the generation it checks. Building the batch
ourselves leaves only the kernel's work: a one-Service endpoint change is a handful of
messages (3.3 ms at 10,000 x 10, 1.7 ms of it in the kernel), a change that rewrites a
chain ~29 ms (mostly the kernel re-validating the chain graph), the full sync 5.1 s (1.3 s
in the kernel, the rest rendering and encoding in Python). The messages are nft's own
(render/nft_wire.py; the kernel tests compare the kernel's dump of both), so ``nft list``
reads the table as the renderer wrote it; ``nft`` stays the tool to *read* it.

Safety: the socket is opened in the network namespace the Runner's commands run in (it
is found by inode under /run/netns when it differs from ours), never anywhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import hashlib
import mmap
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kubeproxy.dataplane.base import DataPlaneError, Runner
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.render import nft_wire as wire
from kubeproxy.render.nft_ir import Chain, Element, Item, Rule, SetDef
from kubeproxy.render.nftables import (
    TABLE,
    TABLE_COMMENT,
    EndpointSlots,
    FamilyRuleset,
    NftRuleset,
    ServiceObjects,
)

# Sets whose elements several Services may share: reference-counted.
SHARED_SETS = frozenset({"cluster-ips", "hairpin-endpoints"})
FAMILIES = ("ip", "ip6")


# -- operations: what a transaction does, before it is spelled in netlink -------------


class Op(NamedTuple):
    """One step of a transaction. ``kind`` is one of:

    add-table, delete-table, add-chain, flush-chain, delete-chain, add-rule, add-set,
    flush-set, delete-set, add-elements, delete-elements.
    """

    kind: str
    family: str
    name: str = ""  # chain or set name
    chain: Chain | None = None
    rule: Rule | None = None
    sdef: SetDef | None = None
    elements: Iterable[Element] = ()  # read once


class Listing(NamedTuple):
    chains: frozenset[str]
    sets: frozenset[str]


class Transport(Protocol):
    """Where transactions go: the kernel (NetlinkTransport) or a fake in tests."""

    def commit(self, ops: Iterable[Op]) -> None:
        """Apply all of ``ops`` (read once, in order) atomically, or none; raise
        DataPlaneError."""

    def listing(self, family: str) -> Listing | None:
        """Chain and set names of our table in ``family``, or None if there is none."""


@dataclass
class SyncStats:
    full: bool = False
    ops: int = 0
    chains_written: int = 0
    chains_deleted: int = 0
    elements_added: int = 0
    elements_deleted: int = 0


# -- what was last written -------------------------------------------------------------


@dataclass
class _FamilyState:
    fixed: str = ""  # digest of the fixed part last written
    services: dict[NamespacedName, ServiceObjects] = field(default_factory=dict)
    # Users of each shared element: cluster-ips by ClusterIP, hairpin pairs by endpoint.
    shared: dict[str, Counter[IPAddress]] = field(
        default_factory=lambda: {name: Counter() for name in SHARED_SETS})
    map_sizes: Counter[str] = field(default_factory=Counter)  # elements per endpoint map
    # Which Service wrote each element keyed by a frontend (service-ips & co). Keys are
    # unique per set; if two Services claim one (the API server prevents that), the one
    # holding it keeps it.
    owners: dict[tuple[str, tuple[object, ...]], NamespacedName] = field(default_factory=dict)


class NftablesDataPlane:
    """Keeps the kernel's ``kube-proxy`` tables equal to the rulesets it is given."""

    def __init__(self, runner: Runner, transport: Transport | None = None) -> None:
        self.runner = runner
        self._transport = transport
        self.state: dict[str, _FamilyState] | None = None  # None: nothing written yet
        self.stale: dict[str, set[str]] = {f: set() for f in FAMILIES}  # chains to delete

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = NetlinkTransport(find_netns(self.runner))
        return self._transport

    def sync(self, ruleset: NftRuleset, changed: Iterable[NamespacedName] | None = None
             ) -> SyncStats:
        """Apply ``ruleset``: fully, or only the objects of the ``changed`` Services."""
        with _paused_gc():
            return self._sync(ruleset, changed)

    def _sync(self, ruleset: NftRuleset, changed: Iterable[NamespacedName] | None
              ) -> SyncStats:
        fams: dict[str, FamilyRuleset] = {f.family: f for f in ruleset.families}
        full = changed is None or self.state is None or any(
            self.state[name].fixed != _fixed_digest(fam) for name, fam in fams.items())
        stats = SyncStats(full=full)
        if full:
            states, stale = {f: _FamilyState() for f in FAMILIES}, dict(self.stale)
            listings = {f: self.transport.listing(f) for f in FAMILIES}
            self.transport.commit(_counted(
                self._full(fams, listings, states, stale, stats), stats))
            self.state, self.stale = states, stale
        else:
            assert changed is not None and self.state is not None
            diffs = [_Diff(fam, self.state[name], self.stale[name], stats)
                     for name, fam in fams.items()]
            ops = [op for d in diffs for op in d.ops(sorted(changed))]
            stats.ops = len(ops)
            self.transport.commit(ops)
            for d in diffs:
                d.apply()
        self._delete_stale(stats)
        return stats

    def cleanup(self) -> None:
        """Delete both kube-proxy tables (if present): everything this proxy wrote."""
        for family in FAMILIES:
            if self.transport.listing(family) is not None:
                self.transport.commit([Op("delete-table", family)])
        self.state = None
        self.stale = {f: set() for f in FAMILIES}

    # -- full ----------------------------------------------------------------------

    def _full(self, fams: dict[str, FamilyRuleset], listings: dict[str, Listing | None],
              states: dict[str, _FamilyState], stale: dict[str, set[str]],
              stats: SyncStats) -> Iterator[Op]:
        """The operations of a full sync, generated while they are sent (at 10,000
        Services there are 40,000 of them); fills in ``states`` and ``stale``."""
        for family in FAMILIES:
            fam = fams.get(family)
            stale[family] = set(stale[family])
            if fam is None:  # a family the node does not use: no table
                if listings[family] is not None:
                    yield Op("delete-table", family)
                stale[family] = set()
                continue
            yield from self._full_family(fam, listings[family], states[family],
                                         stale[family], stats)

    def _full_family(self, fam: FamilyRuleset, listing: Listing | None,
                     st: _FamilyState, stale_out: set[str], stats: SyncStats
                     ) -> Iterator[Op]:
        family = fam.family
        old_chains = listing.chains if listing else frozenset()
        old_sets = listing.sets if listing else frozenset()
        services = {svc: fam.objects(svc) for svc in fam.services}
        set_defs = fam.set_defs()
        chains = list(fam.chains) + [c for o in services.values() for c in o.chains]
        wanted_chains = {c.name for c in chains}
        yield Op("add-table", family)
        if listing is not None and self.state is None:
            # Base chains may have changed hook or priority: recreate them, as upstream.
            for chain in fam.chains:
                if chain.hook is not None and chain.name in old_chains:
                    yield Op("delete-chain", family, chain.name)
        yield from (Op("add-set", family, sdef.name, sdef=sdef) for sdef in set_defs.values())
        for chain in chains:
            yield Op("add-chain", family, chain.name, chain=chain)
            if chain.name in old_chains and (chain.hook is None or self.state is not None):
                yield Op("flush-chain", family, chain.name)
        stale = old_chains - wanted_chains
        yield from (Op("flush-chain", family, name) for name in sorted(stale))
        stale_out |= stale
        stale_out -= wanted_chains
        for name in sorted(old_sets - set(set_defs)):
            yield Op("delete-set", family, name)
        for name in sorted(old_sets & set(set_defs)):
            if set_defs[name].timeout is None:  # keep session affinity state
                yield Op("flush-set", family, name)
        for chain in chains:
            yield from (Op("add-rule", family, chain.name, rule=r) for r in chain.rules)
        stats.chains_written += len(chains)
        # Elements: the fixed ones, then every Service's (the first claim of a key wins).
        # Endpoint slots and hairpin pairs are spelled out while they are encoded.
        seen: dict[str, dict[tuple[object, ...], Element]] = {}
        for set_name, elem in fam.elements:
            seen.setdefault(set_name, {}).setdefault(elem.key, elem)
        slots: dict[str, list[EndpointSlots]] = {}
        cluster_ips, hairpin = st.shared["cluster-ips"], st.shared["hairpin-endpoints"]
        for svc, objs in services.items():
            for set_name, elem in objs.elements:
                if set_name in SHARED_SETS:
                    seen.setdefault(set_name, {}).setdefault(elem.key, elem)
                elif elem.key not in seen.setdefault(set_name, {}):
                    seen[set_name][elem.key] = elem
                    st.owners[(set_name, elem.key)] = svc
            cluster_ips.update(_cluster_ips(objs))
            for group in objs.slots:
                slots.setdefault(group.map, []).append(group)
            hairpin.update(objs.hairpin_ips().keys())
        for set_name in sorted(seen):
            elems = tuple(seen[set_name].values())
            yield Op("add-elements", family, set_name, sdef=set_defs[set_name],
                     elements=elems)
            stats.elements_added += len(elems)
        for name in sorted(slots):
            size = sum(len(g.endpoints) for g in slots[name])
            yield Op("add-elements", family, name, sdef=set_defs[name],
                     elements=(e for g in slots[name] for e in g.elements()))
            stats.elements_added += size
            st.map_sizes[name] = size
        if hairpin:
            yield Op("add-elements", family, "hairpin-endpoints",
                     sdef=set_defs["hairpin-endpoints"],
                     elements=(Element((ip, ip)) for ip in hairpin))
            stats.elements_added += len(hairpin)
        st.fixed = _fixed_digest(fam)
        st.services = {svc: o for svc, o in services.items() if o != _EMPTY}

    # -- stale chains ----------------------------------------------------------------

    def _delete_stale(self, stats: SyncStats) -> None:
        """Delete flushed chains in a transaction of their own (see module docstring)."""
        ops = [Op("delete-chain", f, name) for f in FAMILIES for name in sorted(self.stale[f])]
        if not ops:
            return
        try:
            self.transport.commit(ops)
        except DataPlaneError:
            return  # still referenced for a moment (Linux < 6.2): the next sync retries
        stats.chains_deleted += len(ops)
        self.stale = {f: set() for f in FAMILIES}


class _Diff:
    """The operations taking one family from what was written to the new ruleset, for
    some Services. Reads the state; ``apply()`` updates it once the kernel took them."""

    def __init__(self, fam: FamilyRuleset, st: _FamilyState, stale: set[str],
                 stats: SyncStats) -> None:
        self.fam, self.st, self.stale, self.stats = fam, st, stale, stats
        self.family = fam.family
        self.set_defs: dict[str, SetDef] = {s.name: s for s in fam.sets}
        self.services: dict[NamespacedName, ServiceObjects | None] = {}
        self.shared: dict[str, Counter[IPAddress]] = {n: Counter() for n in SHARED_SETS}
        self.sizes: Counter[str] = Counter()
        self.chains: dict[str, bool] = {}  # chain -> written (True) or flushed (False)
        self.owners: dict[tuple[str, tuple[object, ...]], NamespacedName | None] = {}

    def apply(self) -> None:
        st = self.st
        for svc, objs in self.services.items():
            if objs is None:
                st.services.pop(svc, None)
            else:
                st.services[svc] = objs
        for name, deltas in self.shared.items():
            counts = st.shared[name]
            for ip, delta in deltas.items():
                counts[ip] += delta
                if counts[ip] <= 0:
                    del counts[ip]
        for key, owner in self.owners.items():
            if owner is None:
                st.owners.pop(key, None)
            else:
                st.owners[key] = owner
        for name, delta in self.sizes.items():
            st.map_sizes[name] += delta
            if st.map_sizes[name] <= 0:
                del st.map_sizes[name]
        for name, written in self.chains.items():
            if written:
                self.stale.discard(name)
            else:
                self.stale.add(name)

    def sdef(self, name: str) -> SetDef:
        if name not in self.set_defs:
            if not name.startswith("endpoints-"):
                raise DataPlaneError(f"set {name} is not known to the data plane")
            self.set_defs[name] = self.fam.endpoint_map(int(name.rsplit("-", 1)[1], 16))
        return self.set_defs[name]

    def ops(self, services: list[NamespacedName]) -> list[Op]:
        """In order: chains (add + flush), element deletions, set deletions, set
        additions, rules, element additions: every reference meets an existing object."""
        fam, st, family = self.fam, self.st, self.family
        chain_ops: list[Op] = []
        rule_ops: list[Op] = []
        dels: dict[str, list[Element]] = {}
        adds: dict[str, list[Element]] = {}
        del_sets: set[str] = set()
        add_sets: dict[str, SetDef] = {}
        for svc in services:
            old = st.services.get(svc, _EMPTY)
            new = fam.objects(svc)
            if old == new:
                continue
            old_chains = {c.name: c for c in old.chains}
            old_sets = {s.name: s for s in old.sets}
            # A set whose definition changed is deleted and added again: the rules using
            # it must go first, so its chains are rewritten even if they read the same.
            recreated = any(s.name in old_sets and old_sets[s.name] != s for s in new.sets)
            for chain in new.chains:
                if old_chains.get(chain.name) == chain and not recreated:
                    continue
                chain_ops += [Op("add-chain", family, chain.name, chain=chain),
                              Op("flush-chain", family, chain.name)]
                rule_ops += [Op("add-rule", family, chain.name, rule=r) for r in chain.rules]
                self.chains[chain.name] = True
                self.stats.chains_written += 1
            for name in sorted(old_chains.keys() - {c.name for c in new.chains}):
                chain_ops.append(Op("flush-chain", family, name))
                self.chains[name] = False
            new_sets = {s.name: s for s in new.sets}
            for name, sdef in new_sets.items():
                self.set_defs[name] = sdef
                if name in old_sets and old_sets[name] != sdef:
                    del_sets.add(name)  # a new timeout: recreate the set
                if old_sets.get(name) != sdef:
                    add_sets[name] = sdef
            del_sets |= old_sets.keys() - new_sets.keys()
            self.elements(svc, old, new, dels, adds)
            self.services[svc] = new if new != _EMPTY else None
        # Endpoint maps appear with their first element and go with their last.
        for name in sorted(set(dels) | set(adds)):
            if not name.startswith("endpoints-"):
                continue
            before = st.map_sizes[name]
            self.sizes[name] = len(adds.get(name, ())) - len(dels.get(name, ()))
            if before == 0 and before + self.sizes[name] > 0:
                add_sets[name] = self.sdef(name)
            elif before + self.sizes[name] <= 0:
                del_sets.add(name)
        out = list(chain_ops)
        for name in sorted(dels):
            if name not in del_sets:
                out.append(Op("delete-elements", family, name, sdef=self.sdef(name),
                              elements=tuple(dels[name])))
                self.stats.elements_deleted += len(dels[name])
        out += [Op("delete-set", family, name) for name in sorted(del_sets)]
        out += [Op("add-set", family, name, sdef=sdef) for name, sdef in sorted(add_sets.items())]
        out += rule_ops
        for name in sorted(adds):
            out.append(Op("add-elements", family, name, sdef=self.sdef(name),
                          elements=tuple(adds[name])))
            self.stats.elements_added += len(adds[name])
        return out

    def owner(self, key: tuple[str, tuple[object, ...]]) -> NamespacedName | None:
        return self.owners[key] if key in self.owners else self.st.owners.get(key)

    def elements(self, svc: NamespacedName, old: ServiceObjects, new: ServiceObjects,
                 dels: dict[str, list[Element]], adds: dict[str, list[Element]]) -> None:
        # Elements keyed by a frontend: only the Service that holds a key writes it.
        old_e = {(s, e.key): e for s, e in old.elements if s not in SHARED_SETS}
        new_e = {(s, e.key): e for s, e in new.elements if s not in SHARED_SETS}
        for key, elem in old_e.items():
            if self.owner(key) == svc and new_e.get(key) != elem:
                dels.setdefault(key[0], []).append(elem)
                self.owners[key] = None
        for key, elem in new_e.items():
            if self.owner(key) in (None, svc) and (
                    old_e.get(key) != elem or self.owners.get(key, svc) is None):
                adds.setdefault(key[0], []).append(elem)
                self.owners[key] = svc
        # Endpoint slots: keyed by the service port itself.
        old_s = {(g.map, e.key): e for g in old.slots for e in g.elements()}
        new_s = {(g.map, e.key): e for g in new.slots for e in g.elements()}
        for key, elem in old_s.items():
            if new_s.get(key) != elem:
                dels.setdefault(key[0], []).append(elem)
        for key, elem in new_s.items():
            if old_s.get(key) != elem:
                adds.setdefault(key[0], []).append(elem)
        for name, before, after in (
                ("cluster-ips", _cluster_ips(old), _cluster_ips(new)),
                ("hairpin-endpoints", old.hairpin_ips().keys(), new.hairpin_ips().keys())):
            counts, deltas = self.st.shared[name], self.shared[name]
            for ip in before - after:
                deltas[ip] -= 1
                if counts[ip] + deltas[ip] <= 0:
                    dels.setdefault(name, []).append(_shared_element(name, ip))
            for ip in after - before:
                deltas[ip] += 1
                if counts[ip] + deltas[ip] == 1:
                    adds.setdefault(name, []).append(_shared_element(name, ip))


_EMPTY = ServiceObjects()


@contextlib.contextmanager
def _paused_gc() -> Iterator[None]:
    """Rendering and encoding allocate millions of objects and no cycles; the cyclic
    collector rescanning them on the way costs ~10% of a full sync."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _counted(ops: Iterable[Op], stats: SyncStats) -> Iterator[Op]:
    for op in ops:
        stats.ops += 1
        yield op


def _cluster_ips(objs: ServiceObjects) -> set[IPAddress]:
    return {e.key[0] for s, e in objs.elements if s == "cluster-ips"}  # type: ignore[misc]


def _shared_element(name: str, ip: IPAddress) -> Element:
    return Element((ip,) if name == "cluster-ips" else (ip, ip))


def _fixed_digest(fam: FamilyRuleset) -> str:
    """What the fixed part of a table looks like; a change forces a full sync."""
    text = repr((fam.chains, fam.sets, fam.elements))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the kernel ----------------------------------------------------------------------

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
NLMSG_ERROR, NLMSG_DONE = 2, 3
CLONE_NEWNET = 0x40000000
_HDR = struct.Struct("=IHHII")


def find_netns(runner: Runner) -> str | None:
    """The /run/netns path of the namespace the runner's commands run in, or None when
    that is our own namespace. Raises DataPlaneError when it cannot be found."""
    mine = os.stat("/proc/self/ns/net").st_ino
    res = runner.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
    try:
        theirs = int(res.stdout.strip())
    except ValueError:
        raise DataPlaneError(f"cannot tell the runner's network namespace: {res.stderr!r}"
                             ) from None
    if theirs == mine:
        return None
    try:
        names = os.listdir("/run/netns")
    except OSError:
        names = []
    for name in names:
        path = os.path.join("/run/netns", name)
        try:
            if os.stat(path).st_ino == theirs:
                return path
        except OSError:
            continue
    raise DataPlaneError("the runner's network namespace is not ours and has no name "
                         "under /run/netns: refusing to guess where to write")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetlinkTransport:
    """nf_tables over a NETLINK_NETFILTER socket, in a given network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        # Seconds the last transaction spent being encoded, and in the kernel.
        self.encode_seconds = 0.0
        self.kernel_seconds = 0.0

    def _socket(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        if self.netns is None:
            sock = self._open()
        else:
            home = os.open("/proc/self/ns/net", os.O_RDONLY)
            target = os.open(self.netns, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    sock = self._open()
                finally:
                    _setns(home)
            except OSError as err:
                raise DataPlaneError(f"cannot open netlink in {self.netns}: {err}") from err
            finally:
                os.close(home)
                os.close(target)
        self._sock = sock
        return sock

    @staticmethod
    def _open() -> socket.socket:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as err:
            raise DataPlaneError(f"cannot open a netfilter netlink socket: {err}") from err
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        return sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def commit(self, ops: Iterable[Op]) -> None:
        if isinstance(ops, Sequence) and not ops:
            return
        sock = self._socket()
        batch = _Batch()
        what: dict[int, str] = {}
        subsys = wire.NFNL_SUBSYS_NFTABLES
        start = time.perf_counter()
        try:
            begin = self._next_seq()
            batch.put(wire.MSG_BATCH_BEGIN, wire.F_REQUEST, begin, 0, b"",
                      socket.htons(subsys))
            what[begin] = "the transaction"
            for msg in encode(ops):
                seq = self._next_seq()
                batch.put(subsys << 8 | msg.type, wire.F_REQUEST | msg.flags, seq,
                          msg.family, msg.payload)
                what[seq] = msg.what
            batch.put(wire.MSG_BATCH_END, wire.F_REQUEST, self._next_seq(), 0, b"",
                      socket.htons(subsys))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, batch.size + 65536)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, batch.size + 65536)
            # The kernel runs the whole batch inside sendmsg and queues its errors; a
            # GETGEN request sent after it marks the end of what the batch produced.
            probe = self._next_seq()
            getgen = _HDR.pack(20, subsys << 8 | wire.GETGEN, wire.F_REQUEST, probe, 0) + \
                struct.pack("BBH", 0, 0, 0)
            sent = time.perf_counter()
            self.encode_seconds = sent - start
            with batch.view() as data:
                sock.sendall(data)
            sock.sendall(getgen)
        except OSError as err:
            raise DataPlaneError(f"nftables transaction not sent: {err}") from err
        finally:
            batch.close()
        errors = [f"{what.get(seq, f'message {seq}')}: {os.strerror(code)}"
                  for seq, code in self._replies(probe) if code]
        self.kernel_seconds = time.perf_counter() - sent
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataPlaneError(f"nftables transaction failed, nothing changed: "
                                 f"{errors[0]}{more}")

    def _replies(self, until: int) -> Iterator[tuple[int, int]]:
        """(seq, -errno) of error messages, until the reply to ``until`` arrives."""
        sock = self._socket()
        while True:
            try:
                data = sock.recv(1 << 20)
            except OSError as err:
                raise DataPlaneError(f"reading nftables replies: {err}") from err
            for msg_type, seq, body in _messages(data):
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        yield seq, code
                    if seq == until:
                        return
                elif seq == until:
                    return

    def listing(self, family: str) -> Listing | None:
        fam = wire.FAMILIES[family]
        tables = {wire.parse_attrs(b)[1].rstrip(b"\0").decode()
                  for b in self._dump(wire.GETTABLE, fam)}
        if TABLE not in tables:
            return None
        chains = frozenset(
            a[3].rstrip(b"\0").decode() for b in self._dump(wire.GETCHAIN, fam)
            if (a := wire.parse_attrs(b)).get(1, b"").rstrip(b"\0").decode() == TABLE)
        sets = frozenset(
            a[2].rstrip(b"\0").decode() for b in self._dump(wire.GETSET, fam)
            if (a := wire.parse_attrs(b)).get(1, b"").rstrip(b"\0").decode() == TABLE)
        return Listing(chains, sets)

    def _dump(self, msg_type: int, family: int, payload: bytes = b"") -> list[bytes]:
        """The bodies (attributes) of the objects a GET* dump returns."""
        sock = self._socket()
        seq = self._next_seq()
        req = _HDR.pack(20 + len(payload), wire.NFNL_SUBSYS_NFTABLES << 8 | msg_type,
                        wire.F_REQUEST | wire.F_DUMP, seq, 0) + \
            struct.pack("BBH", family, 0, 0) + payload
        sock.sendall(req)
        out: list[bytes] = []
        while True:
            data = sock.recv(1 << 20)
            for kind, got_seq, body in _messages(data):
                if got_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code in (0, errno.ENOENT):
                        return out
                    raise DataPlaneError(f"listing nftables objects: {os.strerror(code)}")
                out.append(body[4:])  # skip the nfgenmsg header

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _Batch:
    """A netlink batch written straight into anonymous memory: a full sync at 10,000
    Services is ~25 MB, and only the pages written are ever resident."""

    def __init__(self, capacity: int = 1 << 24) -> None:
        # Private: a shared anonymous mapping cannot grow (SIGBUS past its first size).
        self.buf = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = 0

    def put(self, msg_type: int, flags: int, seq: int, family: int, payload: bytes,
            res_id: int = 0) -> None:
        length = 20 + len(payload)
        end = self.size + ((length + 3) & ~3)
        if end > len(self.buf):
            self.buf.resize(max(end, 2 * len(self.buf)))
        _HDR.pack_into(self.buf, self.size, length, msg_type, flags, seq, 0)
        struct.pack_into("BBH", self.buf, self.size + 16, family, 0, res_id)
        self.buf[self.size + 20:self.size + length] = payload
        self.size = end

    def view(self) -> memoryview:
        return memoryview(self.buf)[:self.size]

    def close(self) -> None:
        if not self.buf.closed:
            self.buf.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    i = 0
    while i + 16 <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, i)
        if length < 16:
            break
        yield kind, seq, data[i + 16:i + length]
        i += (length + 3) & ~3


def encode(ops: Iterable[Op]) -> Iterator[wire.Message]:
    """The netlink messages of a transaction, in order."""
    codecs: dict[tuple[str, str], wire.ElementCodec] = {}
    items: dict[tuple[str, Item], bytes] = {}
    set_id = 0
    for op in ops:
        f = op.family
        if op.kind == "add-table":
            yield wire.table_msg(f, TABLE, TABLE_COMMENT)
        elif op.kind == "delete-table":
            yield wire.del_table_msg(f, TABLE)
        elif op.kind == "add-chain":
            assert op.chain is not None
            yield wire.chain_msg(f, TABLE, op.chain)
        elif op.kind == "flush-chain":
            yield wire.chain_ref_msg(wire.DELRULE, f, TABLE, op.name)
        elif op.kind == "delete-chain":
            yield wire.chain_ref_msg(wire.DELCHAIN, f, TABLE, op.name)
        elif op.kind == "add-rule":
            assert op.rule is not None
            yield wire.rule_msg(f, TABLE, op.name, op.rule, items)
        elif op.kind == "add-set":
            assert op.sdef is not None
            set_id += 1
            yield wire.set_msg(f, TABLE, op.sdef, set_id)
        elif op.kind == "flush-set":
            yield wire.set_ref_msg(wire.DELSETELEM, f, TABLE, op.name)
        elif op.kind == "delete-set":
            yield wire.set_ref_msg(wire.DELSET, f, TABLE, op.name)
        elif op.kind in ("add-elements", "delete-elements"):
            assert op.sdef is not None
            codec = codecs.get((f, op.name))
            if codec is None or codec.sdef != op.sdef:
                codec = codecs[(f, op.name)] = wire.ElementCodec(op.sdef)
            kind = wire.NEWSETELEM if op.kind == "add-elements" else wire.DELSETELEM
            yield from wire.element_msgs(kind, f, TABLE, codec, op.elements)
        else:  # pragma: no cover
            raise ValueError(f"unknown operation {op.kind}")
