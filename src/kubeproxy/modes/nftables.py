"""nftables mode: upstream's ``kube-proxy`` tables, written in netlink batches.

Both families' node views render into one ruleset (tables ``ip kube-proxy`` and
``ip6 kube-proxy``; render/nftables.py) that one
:class:`~kubeproxy.dataplane.nftables.NftablesDataPlane` writes as a single kernel
transaction per sync. ``nft`` is only used to read the tables back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kubeproxy.config.types import PRIMARY
from kubeproxy.dataplane.base import DataPlaneError, Runner
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.modes.base import Mode, PlaneCounts, PlaneOptions
from kubeproxy.nodeview import NodeView
from kubeproxy.render import nftables
from kubeproxy.render.names import nftables_chain_names
from kubeproxy.render.nftables import TABLE, NftRuleset
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import Packet, TraceResult

FAMILIES = ("ip", "ip6")
FAMILY_NUMBERS: dict[str, Family] = {"ip": 4, "ip6": 6}
log = logging.getLogger("kubeproxy.modes.nftables")


def render(views: Sequence[NodeView]) -> NftRuleset:
    return nftables.render(views)


def text(ruleset: NftRuleset, node: str) -> str:
    return f"# nftables rules for node {node} (nft -f format)\n" + ruleset.script()


def trace(ruleset: NftRuleset, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    return trace_nftables(ruleset.script(), packet, local)


def trace_rules(text: str, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    """``nft list table`` output reads as an ``nft -f`` script."""
    return trace_nftables(text, packet, local)


def _listed(runner: Runner) -> str:
    """``nft list table`` of each family's table that exists."""
    out = []
    for family in FAMILIES:
        res = runner.run(["nft", "list", "table", family, TABLE])
        if res.returncode == 0:
            out.append(res.stdout)
    return "".join(out)


class DataPlane:
    def __init__(self, plane: NftablesDataPlane, show: Callable[[], str]) -> None:
        self.plane = plane
        self._show = show
        self.counts = PlaneCounts()  # of the last successful sync (metrics)

    def sync(self, ruleset: NftRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        stats = self.plane.sync(ruleset, changed)
        self.counts = PlaneCounts(cleanup_failures=tuple(
            FAMILY_NUMBERS[f] for f in stats.cleanup_failed))

    def cleanup(self) -> None:
        self.plane.cleanup()

    def rules(self) -> str:
        return self._show()

    def intact(self) -> bool:
        """The ruleset generation, and our fixed chains' rule counts only when it moved
        (dataplane/nftables.py)."""
        try:
            found = self.plane.damage()
        except DataPlaneError as err:
            found = f"nftables: cannot check the tables: {err}"
        if found is not None:
            log.warning("%s (changed from outside)", found)
        return found is None


def plane_counts(plane: object) -> PlaneCounts:
    """The stale-chain cleanup failures of ``plane``'s last sync (metrics)."""
    return plane.counts if isinstance(plane, DataPlane) else PlaneCounts()


def data_plane(runner: Runner, options: PlaneOptions) -> DataPlane:
    del options  # nothing to choose: one kernel interface
    return DataPlane(NftablesDataPlane(runner), lambda: _listed(runner))


def fake() -> DataPlane:
    from kubeproxy.testing.nftables import FakeNftables, NoRunner

    kernel = FakeNftables()
    return DataPlane(NftablesDataPlane(NoRunner(), kernel),
                     lambda: "".join(kernel.text(family) for family in FAMILIES))


def cleanup(runner: Runner, options: PlaneOptions) -> None:
    data_plane(runner, options).cleanup()


MODE: Mode[NftRuleset] = Mode(
    name="nftables",
    render=render,
    renderer=nftables.Renderer,  # lazy, and remembers each Service's objects per port view
    text=text,
    trace=trace,
    trace_rules=trace_rules,
    data_plane=data_plane,
    fake=fake,
    cleanup=cleanup,
    chain_names=nftables_chain_names,
    sync_failures_metric="sync_proxy_rules_nftables_sync_failures_total",
    nodeport_default=(PRIMARY,),  # upstream: NodePorts on the Node's primary IPs only
    plane_counts=plane_counts,
)
