"""ebpf mode: socket load balancing in cgroup programs, nftables for north-south traffic.

The ruleset (render/ebpf.py) is the service-map entries of every family plus the
nftables renderer's ruleset for the same node views. The data plane
(dataplane/ebpf.py) loads bpf/sock_lb.o through libbpf, attaches its programs to the
cgroup the proxy is given (never the root cgroup unless the operator allows it), pins
programs' links and maps in a private bpffs, and keeps the maps up to date with bpf()
syscalls; the nftables part goes through the nftables data plane. ``cleanup`` detaches
the links, unpins everything, unmounts the bpffs and deletes the nftables tables.

Settings of the I/O edge (read from :class:`~kubeproxy.modes.base.PlaneOptions`):
``cgroup_path`` (default: the cgroup2 root from the mount table, refused unless
``allow_root_cgroup``), ``bpf_dir`` (the private bpffs, default /run/kubeproxy/bpf).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.base import Keep, Runner
from kubeproxy.dataplane.ebpf import EbpfDataPlane, MapStore, dump_text
from kubeproxy.dataplane.nft_ops import Transport
from kubeproxy.dataplane.nftables import NftablesDataPlane, delete_tables, listed
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.modes.base import (
    BPF_PROGRAMS,
    NFTABLES_TABLES,
    Mode,
    Part,
    PlaneCounts,
    PlaneOptions,
    Presentation,
    Removed,
    intact,
)
from kubeproxy.render import ebpf
from kubeproxy.render.ebpf import EbpfRuleset
from kubeproxy.render.names import nftables_chain_names
from kubeproxy.trace.ebpf import NFT_MARKER, trace_ebpf, trace_text
from kubeproxy.trace.result import Packet, TraceResult

# Package data (pyproject.toml), so an installed wheel finds it as the checkout does.
OBJECT = Path(str(resources.files("kubeproxy") / "bpf" / "sock_lb.o"))
DEFAULT_BPF_DIR = Path("/run/kubeproxy/bpf")


@dataclass(frozen=True)
class EbpfOptions:
    cgroup_path: Path | None = None  # None: the cgroup2 root (needs allow_root_cgroup)
    bpf_dir: Path = DEFAULT_BPF_DIR
    allow_root_cgroup: bool = False

    @classmethod
    def of(cls, options: PlaneOptions) -> EbpfOptions:
        return cls(cgroup_path=Path(options.cgroup_path) if options.cgroup_path else None,
                   bpf_dir=Path(options.bpf_dir or DEFAULT_BPF_DIR),
                   allow_root_cgroup=options.allow_root_cgroup)


def text(ruleset: EbpfRuleset, node: str) -> str:
    return ebpf.text(ruleset, node)


def trace(ruleset: EbpfRuleset, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    return trace_ebpf(ruleset, packet, local)


log = logging.getLogger("kubeproxy.modes.ebpf")


class EbpfPlane:
    """The mode's data plane: the maps' writer (EbpfDataPlane), plus the programs'
    lifecycle.

    ``attached()``: the programs of :data:`~kubeproxy.render.ebpf.PROGRAMS` attached to
    the cgroup now; ``unpinned()``: maps no longer pinned; ``remove()``: detach,
    unpin, unmount (the fake: empty the maps, detach)."""

    def __init__(self, plane: EbpfDataPlane, maps: MapStore, nft_text: Callable[[], str], *,
                 remove: Callable[[], None], attached: Callable[[], set[str]],
                 unpinned: Callable[[], list[str]] = list) -> None:
        self.plane, self._maps, self._nft_text = plane, maps, nft_text
        self._remove, self._attached, self._unpinned = remove, attached, unpinned

    def sync(self, ruleset: EbpfRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        self.plane.sync(ruleset, changed)

    def cleanup(self) -> None:
        self._remove()
        self.plane.written = None

    def intact(self) -> bool:
        """The nftables part's check (its generation id), then the programs': every link
        still attached to the cgroup and every map still pinned (one
        BPF_OBJ_GET_INFO_BY_FD per program and a stat per map, well under 1 ms). Damage
        to the programs makes the next sync re-attach them and rewrite the maps."""
        return intact(self._damage, "nftables: cannot check the tables", log)

    def counts(self) -> PlaneCounts:
        return PlaneCounts()  # nothing beyond success or failure

    def _damage(self) -> str | None:
        found = self.plane.nft.damage()
        if found is None and self.plane.written is not None:
            found = self._bpf_damage()
            if found is not None:
                self.plane.written = None  # re-attach and read the maps back
        return found

    def _bpf_damage(self) -> str | None:
        try:
            detached = sorted(set(ebpf.PROGRAMS) - self._attached())
            unpinned = self._unpinned()
        except DataPlaneError as err:
            return f"ebpf: cannot check the programs: {err}"
        if detached:
            return f"ebpf: programs {', '.join(detached)} are no longer attached"
        if unpinned:
            return f"ebpf: maps {', '.join(unpinned)} are no longer pinned"
        return None

    def rules(self) -> str:
        try:
            maps = dump_text(self._maps)
        except DataPlaneError:
            maps = ""  # nothing pinned (not yet synced, or cleaned up)
        programs = " ".join(sorted(self._attached())) or "(none)"
        return (f"# socket LB programs attached: {programs}\n# socket LB service map\n"
                f"{maps}{NFT_MARKER} (nft list)\n{self._nft_text()}")


def data_plane(runner: Runner, options: PlaneOptions) -> EbpfPlane:
    return ebpf_data_plane(runner, EbpfOptions.of(options))


def ebpf_data_plane(runner: Runner, opts: EbpfOptions) -> EbpfPlane:
    """The real data plane for the cgroup and bpffs in ``opts`` (tests name their own)."""
    cgroup = bpf_sys.check_cgroup(opts.cgroup_path or bpf_sys.cgroup2_root(),
                                  opts.allow_root_cgroup)
    maps = bpf_sys.PinnedMaps(opts.bpf_dir / bpf_sys.MAPS_DIR)
    links, pins = opts.bpf_dir / bpf_sys.LINKS_DIR, opts.bpf_dir / bpf_sys.MAPS_DIR

    def attach() -> None:
        bpf_sys.ensure_bpffs(opts.bpf_dir)
        maps.close()  # a map pinned anew (one was unpinned from outside) needs a new fd
        bpf_sys.load_and_attach(OBJECT, opts.bpf_dir, cgroup)

    def remove() -> None:
        plane.nft.cleanup()
        maps.close()
        bpf_sys.remove_bpffs(opts.bpf_dir)

    def attached() -> set[str]:
        return {name for name in ebpf.PROGRAMS if bpf_sys.link_attached(links / name)}

    def unpinned() -> list[str]:
        return [name for name in ebpf.MAPS if not (pins / name).exists()]

    plane = EbpfDataPlane(maps, NftablesDataPlane(runner), attach)
    return EbpfPlane(plane, maps, lambda: listed(runner), remove=remove, attached=attached,
                     unpinned=unpinned)


def fake() -> EbpfPlane:
    from kubeproxy.testing.ebpf import FakeMaps
    from kubeproxy.testing.nftables import FakeNftables, NoRunner

    kernel, maps = FakeNftables(), FakeMaps()

    def attach() -> None:
        maps.attached = set(ebpf.PROGRAMS)

    def remove() -> None:
        plane.cleanup()  # the nftables tables, the maps emptied
        maps.attached.clear()

    plane = EbpfDataPlane(maps, NftablesDataPlane(NoRunner(), kernel), attach)
    return EbpfPlane(plane, maps, kernel.listed, remove=remove,
                     attached=lambda: set(maps.attached))


def cleanup(runner: Runner, options: PlaneOptions) -> None:
    """Remove the nftables tables and our bpffs (links detached, pins gone): no cgroup
    check, since removing never attaches."""
    NftablesDataPlane(runner).cleanup()
    bpf_sys.remove_bpffs(EbpfOptions.of(options).bpf_dir)


def remove_tables(runner: Runner, options: PlaneOptions, keep: Keep,
                  transport: Transport | None = None) -> Removed:
    """The north-south half's Part: the kube-proxy tables (the nftables mode's too)."""
    del options, keep
    return {"tables": delete_tables(runner, transport)}


def remove_programs(runner: Runner, options: PlaneOptions, keep: Keep,
                    remove: Callable[[Path], tuple[int, int]] = bpf_sys.remove_bpffs
                    ) -> Removed:
    """The socket half's Part: the programs' links detached and unpinned, the maps
    unpinned, the private bpffs (``--bpf-dir``) unmounted and removed (``remove``). No
    bpffs there: nothing. The default directory is the host's: a proxy whose network
    namespace is not the host's (a lab node, a test) leaves it alone unless
    ``--bpf-dir`` names it, since pins are not per namespace and another proxy's could
    be there."""
    del keep
    opts = EbpfOptions.of(options)
    if not options.bpf_dir and not on_the_host(runner):
        log.debug("cleanup: %s left alone: not the host's network namespace and no "
                  "--bpf-dir", opts.bpf_dir)
        return {}
    links, maps = remove(opts.bpf_dir)
    return {"links": links, "maps": maps}


def on_the_host(runner: Runner) -> bool:
    """Whether the runner reaches the host's network namespace (that of PID 1 of our PID
    namespace: a host-network Pod's too). False when it cannot tell."""
    res = runner.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
    try:
        return res.returncode == 0 and int(res.stdout) == os.stat("/proc/1/ns/net").st_ino
    except (ValueError, OSError):
        return False


MODE: Mode[EbpfRuleset] = Mode(
    name="ebpf",
    render=ebpf.render,
    renderer=lambda: ebpf.render,  # the maps are diffed whole; nothing to remember
    text=text,
    trace=trace,
    trace_rules=trace_text,
    data_plane=data_plane,
    fake=fake,
    cleanup=cleanup,
    sync_failures_metric="sync_proxy_rules_ebpf_sync_failures_total",
    needs_cgroup=True,
    parts=(Part(NFTABLES_TABLES, remove_tables), Part(BPF_PROGRAMS, remove_programs)),
)

# The nftables part writes the per-service chains.
PRESENTATION = Presentation(chain_names=nftables_chain_names)
