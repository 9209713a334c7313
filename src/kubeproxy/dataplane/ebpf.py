"""The ebpf data plane: keep the socket-LB maps (and the nftables part) equal to a ruleset.

Theory of operation
-------------------
A sync turns each :class:`~kubeproxy.render.ebpf.SockService` into map entries and
writes the difference against what the maps hold, in an order that keeps every state a
``connect()`` can observe usable (Cilium's order): new backends, then rev-NAT entries,
then slots 1..n, then slot 0 (whose count makes the slots visible); deletions go the
other way (slot 0 shrinks or goes first, then the slots past it, then rev-NAT entries and
backends nothing points to). BPF maps have no transactions: a failure leaves the maps
mixed but always consistent in that sense, and the next sync re-reads the kernel and is
full. The nftables part is :class:`~kubeproxy.dataplane.nftables.NftablesDataPlane`'s.

Backend ids and rev-NAT indexes are allocated here, stably (a backend keeps its id while
any service uses it, so a changed service never repoints a live id). The first sync (and
the first after a failure) reads the maps back and rebuilds the allocations from them,
which is how a restarted proxy takes over: the programs stay attached through their
pinned links and the maps keep their entries (``attach`` reuses both).

Every sync writes the whole difference, so a partial sync (``changed``) equals a full
one by construction; ``changed`` only narrows the nftables part.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.render import ebpf as r
from kubeproxy.render.ebpf import EbpfRuleset, Flag

Backend = tuple[IPAddress, int, str]  # address, port, protocol
Frontend = tuple[IPAddress, int, str]
Contents = dict[str, dict[bytes, bytes]]  # map name -> key -> value
FAMILIES: tuple[Family, ...] = (4, 6)
PROXY_MAPS = tuple(name for name, spec in r.MAPS.items() if spec.owner == "proxy")


class MapStore(Protocol):
    """The kernel's maps, by name (the real one: bpf_sys.PinnedMaps)."""

    def update(self, name: str, key: bytes, value: bytes) -> None: ...
    def delete(self, name: str, key: bytes) -> None: ...
    def dump(self, name: str, key_size: int, value_size: int) -> dict[bytes, bytes]: ...


@dataclass
class _Ids:
    """Stable small integers for keys, reusing freed ones lowest first (O(log n) a new
    key: a sync of 100,000 backends must not scan the ids in use for each)."""

    limit: int
    by_key: dict[object, int]

    def __post_init__(self) -> None:
        used = set(self.by_key.values())
        self._next = max(used, default=0) + 1
        self._free = [i for i in range(1, self._next) if i not in used]  # sorted: a heap

    def get(self, key: object) -> int:
        if key not in self.by_key:
            if self._free:
                free = heapq.heappop(self._free)
            else:
                free, self._next = self._next, self._next + 1
            if free > self.limit:
                raise DataPlaneError(f"out of ids (limit {self.limit})")
            self.by_key[key] = free
        return self.by_key[key]

    def keep(self, keys: set[object]) -> None:
        self.by_key = {k: v for k, v in self.by_key.items() if k in keys}
        self.__post_init__()


class EbpfDataPlane:
    """Keeps the socket-LB maps and the nftables tables equal to the rulesets given."""

    def __init__(self, maps: MapStore, nft: NftablesDataPlane,
                 attach: Callable[[], None]) -> None:
        self.maps, self.nft, self._attach = maps, nft, attach
        self.written: Contents | None = None  # None: read the kernel first
        self.backends = _Ids((1 << 32) - 1, {})
        self.rev_nat = _Ids(r.MAX_REV_NAT, {})

    def sync(self, ruleset: EbpfRuleset, changed: Iterable[NamespacedName] | None = None
             ) -> None:
        self.nft.sync(ruleset.nft, changed)
        if self.written is None:
            self._attach()
            self._read_back()
        assert self.written is not None
        try:
            self._write(self._desired(ruleset))
        except Exception:
            self.written = None
            raise

    def cleanup(self) -> None:
        """Empty the proxy's maps and the nftables tables (the mode's cleanup unpins)."""
        self.nft.cleanup()
        self._read_back()
        self._write({name: {} for name in PROXY_MAPS})

    # -- reading back ----------------------------------------------------------------

    def _read_back(self) -> None:
        written = {name: self.maps.dump(name, r.MAPS[name].key_size, r.MAPS[name].value_size)
                   for name in PROXY_MAPS}
        backends: dict[object, int] = {}
        rev_nat: dict[object, int] = {}
        for family in FAMILIES:
            for key, value in written[r.be_map(family)].items():
                backends[r.unpack_backend(value)] = r.unpack_id(key)
            for key, value in written[r.svc_map(family)].items():
                address, port, proto, slot = r.unpack_service_key(key)
                if slot == 0:
                    rev_nat[(address, port, proto)] = r.unpack_service_value(value)[2]
        self.backends, self.rev_nat = _Ids(self.backends.limit, backends), _Ids(
            self.rev_nat.limit, rev_nat)
        self.written = written

    # -- what the maps must hold -------------------------------------------------------

    def _desired(self, ruleset: EbpfRuleset) -> Contents:
        out: Contents = {name: {} for name in PROXY_MAPS}
        used_backends: set[object] = set()
        used_fronts: set[object] = set()
        for fam in ruleset.families:
            svc, be, rnat = r.svc_map(fam.family), r.be_map(fam.family), r.rnat_map(fam.family)
            for s in fam.services:
                index = self.rev_nat.get(s.frontend)
                used_fronts.add(s.frontend)
                for slot, (address, port) in enumerate(s.backends, 1):
                    backend: Backend = (address, port, s.proto)
                    bid = self.backends.get(backend)
                    used_backends.add(backend)
                    out[be][r.pack_id(bid)] = r.pack_backend(*backend)
                    out[svc][r.pack_service_key(s.address, s.port, s.proto, slot)] = (
                        r.pack_service_value(bid, 0, index, Flag(0)))
                out[svc][r.pack_service_key(s.address, s.port, s.proto, 0)] = (
                    r.pack_service_value(s.affinity_timeout, len(s.backends), index, s.flags))
                out[rnat][r.pack_id(index)] = r.pack_rev_nat(s.address, s.port, index)
        self.backends.keep(used_backends)
        self.rev_nat.keep(used_fronts)
        return out

    def _write(self, desired: Contents) -> None:
        assert self.written is not None
        old = self.written
        for family in FAMILIES:  # additions and changes: backends, rev-NAT, slots, slot 0
            svc = r.svc_map(family)
            self._upsert(r.be_map(family), old, desired)
            self._upsert(r.rnat_map(family), old, desired)
            self._upsert(svc, old, desired, lambda k: _slot(k) != 0)
            self._upsert(svc, old, desired, lambda k: _slot(k) == 0)
        for family in FAMILIES:  # removals: slot 0, then slots, rev-NAT, backends
            svc = r.svc_map(family)
            self._remove(svc, old, desired, lambda k: _slot(k) == 0)
            self._remove(svc, old, desired, lambda k: _slot(k) != 0)
            self._remove(r.rnat_map(family), old, desired)
            self._remove(r.be_map(family), old, desired)

    def _upsert(self, name: str, old: Contents, new: Contents,
                which: Callable[[bytes], bool] = lambda k: True) -> None:
        for key, value in new[name].items():
            if which(key) and old[name].get(key) != value:
                self.maps.update(name, key, value)
                old[name][key] = value

    def _remove(self, name: str, old: Contents, new: Contents,
                which: Callable[[bytes], bool] = lambda k: True) -> None:
        for key in [k for k in old[name] if k not in new[name] and which(k)]:
            self.maps.delete(name, key)
            del old[name][key]


def _slot(key: bytes) -> int:
    return r.unpack_service_key(key)[3]


def dump_text(maps: MapStore) -> str:
    """The service maps as ``render`` prints them (ids resolved to addresses, sorted)."""
    lines = []
    for family in FAMILIES:
        contents = {name: maps.dump(name, r.MAPS[name].key_size, r.MAPS[name].value_size)
                    for name in (r.svc_map(family), r.be_map(family))}
        backends = {r.unpack_id(k): r.unpack_backend(v)
                    for k, v in contents[r.be_map(family)].items()}
        slots: dict[Frontend, dict[int, bytes]] = {}
        for key, value in contents[r.svc_map(family)].items():
            address, port, proto, slot = r.unpack_service_key(key)
            slots.setdefault((address, port, proto), {})[slot] = value
        for (address, port, proto), entry in sorted(slots.items()):
            if 0 not in entry:
                continue
            timeout, count, _, flags = r.unpack_service_value(entry[0])
            picked = []
            for slot in range(1, count + 1):
                bid = r.unpack_service_value(entry[slot])[0] if slot in entry else 0
                address_port = backends.get(bid)
                picked.append(address_port[:2] if address_port else (address, 0))
            lines.append(r.frontend_line(address, port, proto, flags, timeout, picked))
    return "".join(line + "\n" for line in lines)
