"""The proxier: one sync of the cluster into the kernel, for any mode.

``Proxier(mode, config, plane).sync(cluster, changed)`` builds this node's views (all
policy, nodeview.py) for every IP family in use, renders them with the mode, and hands
the ruleset to the mode's data plane, whole or for the ``changed`` services only.

Work is proportional to what changed: the node views are kept across syncs and only
the ``changed`` services' port views are recomputed (``NodeViewCache``; everything on a
full sync or when this Node changed), and the mode's renderer (``Mode.renderer``) may
keep what it rendered for port views it has seen before. A
family once in use stays rendered, so when its last service goes, its rules are emptied
rather than orphaned. The report carries the views that were written, for what the
daemon does after a sync (conntrack cleanup, health-check node ports, metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubeproxy.config import ProxyConfig
from kubeproxy.gcpause import paused_gc
from kubeproxy.model import Cluster, Family, NamespacedName
from kubeproxy.modes.base import DataPlane, Mode
from kubeproxy.nodeview import NodeView, NodeViewCache, Route
from kubeproxy.pipeline import families_in_use
from kubeproxy.sync import SyncReport


class Proxier:
    def __init__(self, mode: Mode[Any], config: ProxyConfig, plane: DataPlane[Any]) -> None:
        self.mode = mode
        self.config = config
        self.plane = plane
        self.families: set[Family] = set()
        self.views: dict[Family, NodeViewCache] = {}
        self.render = mode.renderer()

    def sync(self, cluster: Cluster, changed: frozenset[NamespacedName] | None) -> SyncReport:
        families = sorted(self.families | set(families_in_use(cluster, self.config)))
        with paused_gc():
            views = {f: self._cache(f).build(cluster, changed) for f in families}
            ruleset = self.render(list(views.values()))
        self.plane.sync(ruleset, changed)
        self.families.update(families)
        return report(views)

    def _cache(self, family: Family) -> NodeViewCache:
        cache = self.views.get(family)
        if cache is None:
            cache = self.views[family] = NodeViewCache(self.config, family)
        return cache


def report(views: Mapping[Family, NodeView]) -> SyncReport:
    """The views written, and the service ports whose Local policy leaves this node
    without endpoints (DROP)."""
    internal = external = 0
    for view in views.values():
        for spv in view.services:
            internal += spv.internal is Route.DROP
            external += spv.external_policy_local and spv.external is Route.DROP
    return SyncReport(no_local_internal=internal, no_local_external=external, views=views)
