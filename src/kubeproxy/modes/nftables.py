"""nftables mode: upstream's ``kube-proxy`` tables, written in netlink batches.

Both families' node views render into one ruleset (tables ``ip kube-proxy`` and
``ip6 kube-proxy``; render/nftables.py) that one
:class:`~kubeproxy.dataplane.nftables.NftablesDataPlane` writes as a single kernel
transaction per sync (:class:`NftablesPlane` is the mode's data plane around it).
``nft`` is only used to read the tables back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from kubeproxy.dataplane.base import Keep, Runner
from kubeproxy.dataplane.nft_ops import Transport
from kubeproxy.dataplane.nftables import NftablesDataPlane, delete_tables, listed
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.modes.base import (
    NFTABLES_TABLES,
    Mode,
    Part,
    PlaneCounts,
    PlaneOptions,
    Presentation,
    Removed,
    intact,
)
from kubeproxy.nodeview import NodeView
from kubeproxy.render import nftables
from kubeproxy.render.names import nftables_chain_names
from kubeproxy.render.nftables import TABLE, NftRuleset
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import Packet, TraceResult

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


class NftablesPlane:
    """The mode's data plane: the NftablesDataPlane, the tables as ``show`` reads them
    back, and the stale-chain cleanup failures of the last sync."""

    def __init__(self, plane: NftablesDataPlane, show: Callable[[], str]) -> None:
        self.plane = plane
        self._show = show
        self._counts = PlaneCounts()  # of the last successful sync (metrics)

    def sync(self, ruleset: NftRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        stats = self.plane.sync(ruleset, changed)
        self._counts = PlaneCounts(cleanup_failures=tuple(
            FAMILY_NUMBERS[f] for f in stats.cleanup_failed))

    def counts(self) -> PlaneCounts:
        return self._counts

    def cleanup(self) -> None:
        self.plane.cleanup()

    def rules(self) -> str:
        return self._show()

    def intact(self) -> bool:
        """The ruleset generation, and our fixed chains' rule counts only when it moved
        (dataplane/nftables.py)."""
        return intact(self.plane.damage, "nftables: cannot check the tables", log)


def data_plane(runner: Runner, options: PlaneOptions) -> NftablesPlane:
    del options  # nothing to choose: one kernel interface
    return NftablesPlane(NftablesDataPlane(runner), lambda: listed(runner))


def fake() -> NftablesPlane:
    from kubeproxy.testing.nftables import FakeNftables, NoRunner

    kernel = FakeNftables()
    return NftablesPlane(NftablesDataPlane(NoRunner(), kernel), kernel.listed)


def cleanup(runner: Runner, options: PlaneOptions) -> None:
    data_plane(runner, options).cleanup()


def remove_tables(runner: Runner, options: PlaneOptions, keep: Keep,
                  transport: Transport | None = None) -> Removed:
    """The mode's Part: both kube-proxy tables (the ebpf mode's too: the same tables),
    over ``transport`` (default: netlink in the runner's namespace)."""
    del options, keep  # one kernel interface, and no other mode's object in the tables
    return {"tables": delete_tables(runner, transport)}


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
    sync_failures_metric="sync_proxy_rules_nftables_sync_failures_total",
    parts=(Part(NFTABLES_TABLES, remove_tables),),
)

PRESENTATION = Presentation(
    chain_names=nftables_chain_names,
    service_rules=lambda runner: ["nft", "list", "chain", "ip", TABLE, "services"])
