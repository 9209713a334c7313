"""A strict, in-memory set of the ebpf mode's kernel maps: the ebpf data plane's MapStore
in tests.

Theory of operation
-------------------
:class:`FakeMaps` holds one dict per map of :data:`kubeproxy.render.ebpf.MAPS`. Like the
kernel it refuses an unknown map (ENOENT from BPF_OBJ_GET), a key or value of the wrong
size (EINVAL), an insert past ``max_entries`` (E2BIG) and the deletion of a missing key
(ENOENT). Beyond the kernel, it checks after *every* single update or delete what the
socket programs rely on while they run concurrently with the proxy (that is what makes
the data plane's write order matter): every slot 0 with count n has slots 1..n, every
slot names a backend the backend map holds, every slot 0 has its rev-NAT entry. A
violation raises :class:`InconsistentMaps` naming the frontend. ``attached`` stands for
the programs' links on the cgroup (a test detaches one by removing its name).
"""

from __future__ import annotations

import errno
import os

from kubeproxy.errors import DataPlaneError
from kubeproxy.render import ebpf as r


class InconsistentMaps(AssertionError):
    """A state a concurrent connect() could see and mishandle."""


class FakeMaps:
    def __init__(self) -> None:
        self.maps: dict[str, dict[bytes, bytes]] = {name: {} for name in r.MAPS}
        self.ops = 0
        self.attached: set[str] = set()  # programs attached to the (fake) cgroup

    def _map(self, name: str, key: bytes, value: bytes | None = None) -> dict[bytes, bytes]:
        if name not in self.maps:
            raise _error(errno.ENOENT, f"no map {name}")
        spec = r.MAPS[name]
        if len(key) != spec.key_size or (value is not None and len(value) != spec.value_size):
            raise _error(errno.EINVAL, f"{name}: wrong key/value size")
        return self.maps[name]

    def update(self, name: str, key: bytes, value: bytes) -> None:
        m = self._map(name, key, value)
        if key not in m and len(m) >= r.MAPS[name].max_entries:
            raise _error(errno.E2BIG, f"{name} is full")
        m[key] = value
        self.ops += 1
        self.check()

    def delete(self, name: str, key: bytes) -> None:
        m = self._map(name, key)
        if key not in m:
            raise _error(errno.ENOENT, f"{name}: no such key {key.hex()}")
        del m[key]
        self.ops += 1
        self.check()

    def dump(self, name: str, key_size: int, value_size: int) -> dict[bytes, bytes]:
        spec = r.MAPS[name]
        assert (key_size, value_size) == (spec.key_size, spec.value_size), name
        return dict(self._map(name, bytes(key_size)))

    def check(self) -> None:
        for family in (4, 6):
            svc = self.maps[r.svc_map(family)]
            for key, value in svc.items():
                address, port, proto, slot = r.unpack_service_key(key)
                if slot != 0:
                    continue
                _, count, rev_nat, _ = r.unpack_service_value(value)
                where = f"{address}:{port}/{proto}"
                if r.pack_id(rev_nat) not in self.maps[r.rnat_map(family)]:
                    raise InconsistentMaps(f"{where}: rev-NAT {rev_nat} missing")
                for n in range(1, count + 1):
                    entry = svc.get(r.pack_service_key(address, port, proto, n))
                    if entry is None:
                        raise InconsistentMaps(f"{where}: slot {n} of {count} missing")
                    bid = r.unpack_service_value(entry)[0]
                    if r.pack_id(bid) not in self.maps[r.be_map(family)]:
                        raise InconsistentMaps(f"{where}: slot {n}: backend {bid} missing")


def _error(code: int, message: str) -> DataPlaneError:
    err = DataPlaneError(f"bpf: {message}: {os.strerror(code)}")
    err.__cause__ = OSError(code, os.strerror(code))
    return err
