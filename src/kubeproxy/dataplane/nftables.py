"""The nftables data plane: keep the kernel's ``kube-proxy`` tables equal to a ruleset.

Theory of operation
-------------------
Each sync is one nf_tables transaction (all-or-nothing in the kernel) of typed
operations (nft_ops.py), handed to a Transport: netlink to the kernel (netlink.py), with
no ``nft`` process in between, or the strict fake in tests (kubeproxy/testing/nftables.py).
This module only decides *what* to write:

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

Flush detection (``damage``): after each successful sync the data plane notes the
ruleset's generation id, which the kernel moves with every transaction anyone commits.
While it has not moved, nothing changed (one GETGEN round trip, ~0.1 ms). When it moved
(someone else wrote, often to a table of theirs), the fixed chains of our tables
(``services``, the base chains, ...) are counted with small filtered dumps and compared
with what was written; the per-service chains hang off those, and a chain or set still
referenced cannot be deleted, so ``nft flush chain ... services``, ``nft delete table``
or a flush of the whole ruleset all show there. Not seen: elements deleted from a map
or rules changed inside a per-service chain (upstream does not look either); the hourly
full sync repairs those. The full sync that follows a finding repairs it: if only fixed
chains were changed (``nft flush chain ... services``), it rewrites the fixed chains
and brings every Service to the ruleset by diffing it against what was written, a
small transaction (0.5 s at 10,000 Services, against ~5 s to write the whole table
again, most of it encoding 200,000 elements); a table gone is written whole.

Stale chains are flushed in the transaction and deleted right after it in a second,
separate one: before Linux 6.2 a chain that a just-deleted map element pointed to is
still "in use" (EBUSY) for a moment; the next sync retries (upstream kube-proxy defers
the same way). A failed transaction changes nothing in the kernel, so what was last
written stays true. Refusals are told apart by errno (nft_ops.TransactionError), never
by message text.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from kubeproxy.dataplane import nft_ops as nft
from kubeproxy.dataplane.base import Runner
from kubeproxy.dataplane.netlink import NetlinkTransport, find_netns
from kubeproxy.dataplane.nft_ops import Listing, Op, TransactionError, Transport
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.render.nft_ir import Element, SetDef
from kubeproxy.render.nftables import (
    TABLE,
    EndpointSlots,
    FamilyRuleset,
    NftRuleset,
    ServiceObjects,
)
from kubeproxy.util.gcpause import paused_gc

# Sets whose elements several Services may share: reference-counted.
K = TypeVar("K")
SHARED_SETS = frozenset({"cluster-ips", "hairpin-endpoints"})
FAMILIES = ("ip", "ip6")
log = logging.getLogger("kubeproxy.dataplane.nftables")


@dataclass
class SyncStats:
    full: bool = False
    ops: int = 0
    chains_written: int = 0
    chains_deleted: int = 0
    elements_added: int = 0
    elements_deleted: int = 0
    cleanup_failed: tuple[str, ...] = ()  # families ("ip", "ip6") whose stale chains stay


# -- what was last written -------------------------------------------------------------


@dataclass
class _FamilyState:
    fixed: str = ""  # digest of the fixed part last written
    fixed_rules: dict[str, int] = field(default_factory=dict)  # fixed chain -> rule count
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
        self.generation: int | None = None  # the ruleset generation after our last write
        # What damage() found, for the full sync that follows: family -> fixed chains
        # whose rules were changed from outside (None: a table is gone).
        self.damaged: dict[str, set[str]] | None = {}

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = NetlinkTransport(find_netns(self.runner))
        return self._transport

    def sync(self, ruleset: NftRuleset, changed: Iterable[NamespacedName] | None = None
             ) -> SyncStats:
        """Apply ``ruleset``: fully, or only the objects of the ``changed`` Services."""
        self.generation = None  # until this sync succeeds
        with paused_gc():
            stats = self._sync(ruleset, changed)
        self.generation = self.transport.generation()
        return stats

    def damage(self) -> str | None:
        """What was changed from outside in the tables we wrote, or None (also when
        nothing was written yet). Cheap while nobody else commits (module docstring)."""
        if self.state is None:
            return None
        generation = self.transport.generation()
        if generation == self.generation:
            return None
        for family, st in self.state.items():
            if not st.fixed:
                continue  # a family we do not use
            counts = self.transport.rule_counts(family, st.fixed_rules)
            if counts is None:
                self.damaged = None
                return f"nftables table {family} {TABLE} is gone"
            for chain, want in sorted(st.fixed_rules.items()):
                if counts[chain] != want:
                    if self.damaged is not None:
                        self.damaged.setdefault(family, set()).add(chain)
                    return (f"nftables chain {family} {TABLE} {chain} holds {counts[chain]}"
                            f" rules, {want} were written")
        self.generation = generation  # someone else's transaction: ours is intact
        return None

    def _sync(self, ruleset: NftRuleset, changed: Iterable[NamespacedName] | None
              ) -> SyncStats:
        fams: dict[str, FamilyRuleset] = {f.family: f for f in ruleset.families}
        full = changed is None or self.state is None or any(
            self.state[name].fixed != _fixed_digest(fam) for name, fam in fams.items())
        stats = SyncStats(full=full)
        if full and self._repairable(fams):
            assert self.state is not None
            # Only fixed chains were found changed: rewrite them, and bring every
            # Service to the ruleset from what was written (module docstring).
            diffs = [_Diff(fam, self.state[name], self.stale[name], stats)
                     for name, fam in fams.items()]
            ops = [op for d in diffs for op in _fixed_chain_ops(d.fam)]
            ops += [op for d in diffs for op in d.ops(
                sorted(set(d.fam.services) | set(d.st.services)))]
            stats.ops = len(ops)
            self.transport.commit(ops)
            for d in diffs:
                d.apply()
        elif full:
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
        self.damaged = {}
        return stats

    def _repairable(self, fams: dict[str, FamilyRuleset]) -> bool:
        """Whether a full sync may repair what damage() found instead of writing the
        whole table: only fixed chains were changed, both tables' fixed parts and
        families are as last written."""
        damaged, state = self.damaged, self.state
        return bool(damaged) and state is not None and all(
            name in fams for name in damaged or ()) and all(
            state[name].fixed == _fixed_digest(fam) for name, fam in fams.items())

    def cleanup(self) -> int:
        """Delete both kube-proxy tables (if present): everything this proxy wrote.
        Returns how many tables were deleted."""
        deleted = 0
        for family in FAMILIES:
            try:
                self.transport.commit([nft.DeleteTable(family)])
                deleted += 1
            except TransactionError as err:
                if err.errno != errno.ENOENT:  # ENOENT: no table, nothing to delete
                    raise
        self.state = None
        self.generation = None
        self.damaged = {}
        self.stale = {f: set() for f in FAMILIES}
        return deleted

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
                    yield nft.DeleteTable(family)
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
        yield nft.AddTable(family)
        if listing is not None and self.state is None:
            # Base chains may have changed hook or priority: recreate them, as upstream.
            for chain in fam.chains:
                if chain.hook is not None and chain.name in old_chains:
                    yield nft.DeleteChain(family, chain.name)
        yield from (nft.AddSet(family, sdef) for sdef in set_defs.values())
        for chain in chains:
            yield nft.AddChain(family, chain)
            if chain.name in old_chains and (chain.hook is None or self.state is not None):
                yield nft.FlushChain(family, chain.name)
        stale = old_chains - wanted_chains
        yield from (nft.FlushChain(family, name) for name in sorted(stale))
        stale_out |= stale
        stale_out -= wanted_chains
        for name in sorted(old_sets - set(set_defs)):
            yield nft.DeleteSet(family, name)
        for name in sorted(old_sets & set(set_defs)):
            if set_defs[name].timeout is None:  # keep session affinity state
                yield nft.FlushSet(family, name)
        for chain in chains:
            yield from (nft.AddRule(family, chain.name, r) for r in chain.rules)
        stats.chains_written += len(chains)
        yield from _full_elements(fam, services, set_defs, st, stats)
        st.fixed = _fixed_digest(fam)
        st.fixed_rules = {c.name: len(c.rules) for c in fam.chains}
        st.services = {svc: o for svc, o in services.items() if o != _EMPTY}

    # -- stale chains ----------------------------------------------------------------

    def _delete_stale(self, stats: SyncStats) -> None:
        """Delete flushed chains in a transaction of their own (see module docstring)."""
        ops: list[Op] = [nft.DeleteChain(f, name) for f in FAMILIES
                         for name in sorted(self.stale[f])]
        if not ops:
            return
        try:
            self.transport.commit(ops)
        except TransactionError as err:
            stats.cleanup_failed = tuple(f for f in FAMILIES if self.stale[f])
            if err.errno == errno.EBUSY:
                return  # still referenced for a moment (Linux < 6.2): the next sync retries
            if err.errno != errno.ENOENT:
                raise
            # Some are gone already (someone else deleted them): retry with the rest.
            for f in FAMILIES:
                listing = self.transport.listing(f)
                self.stale[f] &= listing.chains if listing else frozenset()
            return
        stats.chains_deleted += len(ops)
        self.stale = {f: set() for f in FAMILIES}


# A kernel without nf_tables refuses the socket or the transaction with one of these.
NO_NFTABLES = frozenset({errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP})


def delete_tables(runner: Runner, transport: Transport | None = None) -> int:
    """Delete both kube-proxy tables if present (the nftables and ebpf modes' leftovers);
    how many were. A kernel without nf_tables has none (logged at debug level)."""
    try:
        return NftablesDataPlane(runner, transport).cleanup()
    except TransactionError as err:
        if err.errno not in NO_NFTABLES:
            raise
    except OSError as err:  # no NETLINK_NETFILTER socket at all
        if err.errno not in NO_NFTABLES:
            raise
    log.debug("the kernel has no nf_tables: no kube-proxy table to delete")
    return 0


def listed(runner: Runner) -> str:
    """``nft list table`` of each family's ``kube-proxy`` table that exists: what the
    nftables and ebpf modes' ``rules()`` print (reading back is the one use of ``nft``)."""
    out = []
    for family in FAMILIES:
        res = runner.run(["nft", "list", "table", family, TABLE])
        if res.returncode == 0:
            out.append(res.stdout)
    return "".join(out)


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
            _add(st.shared[name], deltas)
        for key, owner in self.owners.items():
            if owner is None:
                st.owners.pop(key, None)
            else:
                st.owners[key] = owner
        _add(st.map_sizes, self.sizes)
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
                chain_ops += [nft.AddChain(family, chain), nft.FlushChain(family, chain.name)]
                rule_ops += [nft.AddRule(family, chain.name, r) for r in chain.rules]
                self.chains[chain.name] = True
                self.stats.chains_written += 1
            for name in sorted(old_chains.keys() - {c.name for c in new.chains}):
                chain_ops.append(nft.FlushChain(family, name))
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
                out.append(nft.DeleteElements(family, self.sdef(name), tuple(dels[name])))
                self.stats.elements_deleted += len(dels[name])
        out += [nft.DeleteSet(family, name) for name in sorted(del_sets)]
        out += [nft.AddSet(family, sdef) for _, sdef in sorted(add_sets.items())]
        out += rule_ops
        for name in sorted(adds):
            out.append(nft.AddElements(family, self.sdef(name), tuple(adds[name])))
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


def _fixed_chain_ops(fam: FamilyRuleset) -> Iterator[Op]:
    """Every fixed chain of the table, rewritten (add, flush, its rules)."""
    for chain in fam.chains:
        yield nft.AddChain(fam.family, chain)
        yield nft.FlushChain(fam.family, chain.name)
    for chain in fam.chains:
        yield from (nft.AddRule(fam.family, chain.name, r) for r in chain.rules)


def _full_elements(fam: FamilyRuleset, services: dict[NamespacedName, ServiceObjects],
                   set_defs: dict[str, SetDef], st: _FamilyState, stats: SyncStats
                   ) -> Iterator[Op]:
    """Every element of a full sync: the fixed ones, then every Service's (the first
    claim of a key wins); endpoint slots and hairpin pairs are spelled out while they
    are encoded. Records owners, shared-element users and map sizes in ``st``."""
    family = fam.family
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
        yield nft.AddElements(family, set_defs[set_name], elems)
        stats.elements_added += len(elems)
    for name in sorted(slots):
        size = sum(len(g.endpoints) for g in slots[name])
        yield nft.AddElements(family, set_defs[name],
                              (e for g in slots[name] for e in g.elements()))
        stats.elements_added += size
        st.map_sizes[name] = size
    if hairpin:
        yield nft.AddElements(family, set_defs["hairpin-endpoints"],
                              (Element((ip, ip)) for ip in hairpin))
        stats.elements_added += len(hairpin)


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


def _add(counts: Counter[K], deltas: Counter[K]) -> None:
    """counts += deltas, dropping what falls to zero, touching only the deltas' keys
    (Counter's += walks every key: 10,000 of them on each one-service sync)."""
    for key, delta in deltas.items():
        total = counts[key] + delta
        if total > 0:
            counts[key] = total
        else:
            counts.pop(key, None)
