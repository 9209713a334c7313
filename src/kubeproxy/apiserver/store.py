"""The in-memory object store: etcd plus the generic registry, with no I/O at all.

Theory of operation. `Store` is the one object the rest of the API server holds (behind
the Hub's lock): it builds the three parts and passes each call to the part that does it.

- storage.py keeps the objects, numbers every change with the global resourceVersion,
  and answers lists, watches (events since a resourceVersion) and snapshots;
- registry.py does the write verbs: validation and defaulting per kind, optimistic
  concurrency, grace periods and finalizers, reaping, Service allocations;
- controllers.py does, inside each write, what kube-controller-manager would do soon
  after it: the `default` ServiceAccount and ClusterRole aggregation.

Reads go straight to storage, writes through the registry, which calls the controllers
after every commit. A new store holds the initial namespaces and upstream's bootstrap
RBAC policy; `restore` loads a snapshot (`dump`) and lets the controllers catch up with
it. The clock and the random source are injected, so unit tests are exact.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubeproxy.apiserver import rbac, resources, services
from kubeproxy.apiserver.controllers import Controllers
from kubeproxy.apiserver.registry import Clock, DeleteResult, Registry
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.selectors import FieldSelector, LabelSelector
from kubeproxy.apiserver.storage import Events, ListResult, Storage

Obj = dict[str, Any]

INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class StoreConfig:
    history: int = 1000  # changes kept for watches; older resourceVersions get 410
    network: services.ServiceNetwork = field(
        default_factory=lambda: services.ServiceNetwork(ipaddress.IPv4Network("10.96.0.0/16"))
    )

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError("history must hold at least one change")


class Store:
    def __init__(self, config: StoreConfig | None = None, *, clock: Clock = time.time,
                 rng: random.Random | None = None) -> None:
        self.config = config or StoreConfig()
        self._storage = Storage(self.config.history)
        self._controllers = Controllers()
        self._registry = Registry(self._storage, self.config.network, clock=clock,
                                  rng=rng or random.Random(), react=self._controllers.react)
        for name in INITIAL_NAMESPACES:
            self.create(resources.NAMESPACES, None, {"metadata": {"name": name}})
        self._controllers.bootstrap_rbac(self._registry)  # upstream's bootstrap RBAC policy

    # ---- snapshots -------------------------------------------------------------------

    def dump(self) -> Obj:
        """The whole state as one JSON-able document (shares the objects: serialize it
        before the store changes again)."""
        return self._storage.dump()

    @classmethod
    def restore(cls, snapshot: Obj, config: StoreConfig | None = None, *,
                clock: Clock = time.time, rng: random.Random | None = None) -> Store:
        """A store holding what ``snapshot`` (from ``dump``) held; ValueError if it is not
        a snapshot this version wrote."""
        store = cls(config, clock=clock, rng=rng)
        store._registry.load(snapshot)
        store._controllers.reconcile(store._registry)
        return store

    # ---- reading (storage.py) --------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._storage.resource_version

    @property
    def oldest_watchable(self) -> int:
        return self._storage.oldest_watchable

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        return self._storage.get(res, namespace, name)

    def find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object itself (shared, not copied: read it only), or None."""
        return self._storage.find(res, namespace, name)

    def policy(self) -> rbac.Policy:
        """The RBAC objects as they are now (shared, not copied: read them only)."""
        objects = self._storage.objects
        return rbac.Policy.of(objects(resources.CLUSTERROLES).values(),
                              objects(resources.ROLES).values(),
                              objects(resources.CLUSTERROLEBINDINGS).values(),
                              objects(resources.ROLEBINDINGS).values())

    def list(self, res: Resource, namespace: str | None, *, labels: LabelSelector | None = None,
             fields: FieldSelector | None = None, limit: int | None = None,
             continue_token: str | None = None) -> ListResult:
        return self._storage.list(res, namespace, labels=labels, fields=fields, limit=limit,
                                  continue_token=continue_token)

    def initial_events(self, res: Resource, namespace: str | None, labels: LabelSelector,
                       fields: FieldSelector) -> Events:
        """Synthetic ADDED events for the current state (a watch without resourceVersion)."""
        return self._storage.initial_events(res, namespace, labels, fields)

    def events_since(self, res: Resource, namespace: str | None, after: int,
                     labels: LabelSelector, fields: FieldSelector) -> Events:
        """Changes after resourceVersion `after`, as the watcher should see them."""
        return self._storage.events_since(res, namespace, after, labels, fields)

    # ---- writing (registry.py) -------------------------------------------------------

    def create(self, res: Resource, namespace: str | None, body: Obj, *,
               dry_run: bool = False) -> Obj:
        return self._registry.create(res, namespace, body, dry_run=dry_run)

    def update(self, res: Resource, namespace: str | None, name: str, body: Obj, *,
               subresource: str | None = None, dry_run: bool = False) -> Obj:
        return self._registry.update(res, namespace, name, body, subresource=subresource,
                                     dry_run=dry_run)

    def patch(self, res: Resource, namespace: str | None, name: str,
              apply: Callable[[Obj], Obj], *, subresource: str | None = None,
              dry_run: bool = False) -> Obj:
        """Apply `apply` to the current object and update with the current RV as precondition."""
        return self._registry.patch(res, namespace, name, apply, subresource=subresource,
                                    dry_run=dry_run)

    def delete(self, res: Resource, namespace: str | None, name: str, *,
               grace: int | None = None, preconditions: Obj | None = None,
               dry_run: bool = False) -> DeleteResult:
        return self._registry.delete(res, namespace, name, grace=grace,
                                     preconditions=preconditions, dry_run=dry_run)

    def reap(self) -> int:
        """Remove objects whose grace period is over and that have no finalizers left."""
        return self._registry.reap()

    def next_deadline(self) -> float | None:
        return self._registry.next_deadline()
