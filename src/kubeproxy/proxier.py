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

from typing import Any

from kubeproxy.config.types import ProxyConfig
from kubeproxy.model import Cluster, Family, NamespacedName
from kubeproxy.modes.base import DataPlane, Mode
from kubeproxy.nodeview import NodeViewCache, families_in_use, families_of
from kubeproxy.sync import SyncReport
from kubeproxy.util.gcpause import paused_gc


class Proxier:
    def __init__(self, mode: Mode[Any], config: ProxyConfig, plane: DataPlane[Any]) -> None:
        self.mode = mode
        self.config = config
        self.plane = plane
        self.families: set[Family] = set()
        self.views: dict[Family, NodeViewCache] = {}
        self.render = mode.renderer()

    def sync(self, cluster: Cluster, changed: frozenset[NamespacedName] | None, *,
             write_all: bool = False) -> SyncReport:
        """Recompute the views of the ``changed`` services (all: None) and write them,
        or everything with ``write_all`` (sync.Syncer)."""
        families = sorted(self.families | set(self._families(cluster, changed)))
        with paused_gc():
            caches = [self._cache(f) for f in families]
            views = {c.family: c.build(cluster, changed) for c in caches}
            ruleset = self.render(list(views.values()))
        self.plane.sync(ruleset, None if write_all else changed)
        self.families.update(families)
        return SyncReport(no_local={c.family: c.no_local for c in caches}, views=views)

    def _families(self, cluster: Cluster, changed: frozenset[NamespacedName] | None
                  ) -> list[Family]:
        """The families in use: a family once in use stays, so a partial sync only looks
        at the changed services (and the node, and the config) for a new one."""
        if changed is None:
            return families_in_use(cluster, self.config)
        if 6 in self.families:
            return sorted(self.families)
        index = cluster.lookup()
        services = (index.services[ref] for ref in changed if ref in index.services)
        return families_of(services, cluster, self.config)

    def _cache(self, family: Family) -> NodeViewCache:
        cache = self.views.get(family)
        if cache is None:
            cache = self.views[family] = NodeViewCache(self.config, family)
        return cache
