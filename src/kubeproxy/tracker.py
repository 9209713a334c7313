"""The change tracker: this proxy's Services, EndpointSlices and Node, and what changed.

Theory of operation
-------------------
Sources deliver objects already decoded into the model, as :class:`Update`s: the new
state of one object, or ``None`` when it was deleted, is not for this proxy (a
service-proxy-name label, headless, ExternalName) or is invalid. An invalid object is
reported (kind, namespace/name, field) through the ``report`` callback and then treated
exactly like a deleted one, so one bad object never stops the others from being proxied.

The tracker keeps the current state of every object and, for each object touched since
the last :meth:`Tracker.apply`, the value it had at that apply: its *previous* value.
Changes fold as (previous, current): an update that brings an object back to its
previous value cancels the pending change, so an object that flaps between two syncs
costs nothing (upstream's ``servicechangetracker.go`` / ``endpointschangetracker.go``).

:meth:`Tracker.apply` turns the pending changes into the set of services whose rules may
differ, and clears them: a Service change touches that service; an EndpointSlice change
touches the service of its previous and of its current version (a slice can move when
its ``kubernetes.io/service-name`` label changes). A change of this Node (labels for
topology, addresses, podCIDRs) may touch every service, so it is reported as ``full``.
:meth:`Tracker.cluster` builds the :class:`~kubeproxy.model.Cluster` the pipeline renders.

Pure: no I/O, no clock. Time values (EndpointSlice change-trigger times, for the network
programming latency metric) come in with the updates and go out with the changes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from kubeproxy.errors import InvalidObject
from kubeproxy.model import Cluster, ClusterIndex, EndpointSlice, NamespacedName, Node, Service

Kind = Literal["Service", "EndpointSlice", "Node"]
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")
Model = Service | EndpointSlice | Node
_TYPES: dict[Kind, type] = {"Service": Service, "EndpointSlice": EndpointSlice, "Node": Node}

T = TypeVar("T", Service, EndpointSlice, Node)


@dataclass(frozen=True)
class Update:
    """The new state of one object. ``obj`` is None when it is gone, filtered or invalid.

    ``key`` is the object's namespace/name (a Node's namespace is ""). ``trigger_time``
    is an EndpointSlice's ``endpoints.kubernetes.io/last-change-trigger-time`` (seconds
    since the epoch), when the controller set it.
    """

    kind: Kind
    key: NamespacedName
    obj: Model | None
    error: InvalidObject | None = None
    trigger_time: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _TYPES:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.obj is not None and not isinstance(self.obj, _TYPES[self.kind]):
            raise TypeError(f"{self.kind} update carries a {type(self.obj).__name__}")
        if self.error is not None and self.obj is not None:
            raise ValueError("an invalid object is absent: obj must be None")


@dataclass(frozen=True)
class Changes:
    """What :meth:`Tracker.apply` found since the previous apply."""

    services: frozenset[NamespacedName] = frozenset()
    full: bool = False  # this Node changed: every service's rules may differ
    service_changes: int = 0  # Service updates that changed something (metrics)
    endpoint_changes: int = 0  # EndpointSlice updates that changed something (metrics)
    trigger_times: tuple[float, ...] = ()  # of the slice changes that were not undone

    @property
    def empty(self) -> bool:
        return not self.services and not self.full


@dataclass
class _Table(Generic[T]):
    """Current objects of one kind, and the previous value of each touched one.

    ``keys`` and ``values`` hold ``current`` in key order, kept sorted as objects come,
    change and go (bisection), so a sync's :class:`Cluster` is a copy, not a sort and
    10,000 lookups.
    """

    current: dict[NamespacedName, T] = field(default_factory=dict)
    previous: dict[NamespacedName, T | None] = field(default_factory=dict)
    keys: list[NamespacedName] = field(default_factory=list)
    values: list[T] = field(default_factory=list)

    def set(self, key: NamespacedName, value: T | None) -> bool:
        """Record the new state; False when it is what we already hold."""
        old = self.current.get(key)
        if old == value:
            return False
        if key not in self.previous:
            self.previous[key] = old
        elif self.previous[key] == value:
            del self.previous[key]  # back where the last apply left it: nothing to do
        at = bisect.bisect_left(self.keys, key)
        if value is None:
            del self.current[key], self.keys[at], self.values[at]
        elif old is None:
            self.current[key] = value
            self.keys.insert(at, key)
            self.values.insert(at, value)
        else:
            self.current[key] = self.values[at] = value
        return True

    def take(self) -> list[tuple[T | None, T | None]]:
        """(previous, current) of every pending change, and forget them."""
        out = [(prev, self.current.get(key)) for key, prev in self.previous.items()]
        self.previous.clear()
        return out


def _ignore(error: InvalidObject) -> None:
    del error


class Tracker:
    """Folds updates; ``apply()`` says which services changed since the last apply."""

    def __init__(self, node_name: str,
                 report: Callable[[InvalidObject], None] = _ignore) -> None:
        self.node_name = node_name
        self._report = report
        self._services: _Table[Service] = _Table()
        self._slices: _Table[EndpointSlice] = _Table()
        self._nodes: _Table[Node] = _Table()
        self._service_changes = 0
        self._endpoint_changes = 0
        self._trigger_times: dict[NamespacedName, list[float]] = {}
        self._cluster: Cluster | None = None  # cached until the next change
        # Service -> its slices (slice key -> slice). An inner dict is replaced, never
        # changed, so a Cluster's shallow copy of this index stays true.
        self._by_service: dict[NamespacedName, dict[NamespacedName, EndpointSlice]] = {}

    # --- folding ------------------------------------------------------------------

    def update(self, update: Update) -> bool:
        """Fold one update; True when the tracked state changed."""
        if update.error is not None:
            self._report(update.error)
        changed = self._set(update.kind, update.key, update.obj)
        if changed and update.kind == "EndpointSlice":
            if update.key not in self._slices.previous:
                self._trigger_times.pop(update.key, None)  # the change was undone
            elif update.trigger_time is not None:
                self._trigger_times.setdefault(update.key, []).append(update.trigger_time)
        return changed

    def replace(self, kind: Kind, updates: Iterable[Update]) -> bool:
        """A fresh list of one kind: fold every item, and delete what is not listed."""
        changed = False
        listed: set[NamespacedName] = set()
        for update in updates:
            if update.kind != kind:
                raise ValueError(f"{update.kind} update in a {kind} list")
            listed.add(update.key)
            changed = self.update(update) or changed
        for key in [k for k in self._keys(kind) if k not in listed]:
            changed = self.update(Update(kind, key, None)) or changed
        return changed

    def _set(self, kind: Kind, key: NamespacedName, obj: Model | None) -> bool:
        if kind == "Service":
            assert obj is None or isinstance(obj, Service)
            changed = self._services.set(key, obj)
            self._service_changes += changed
        elif kind == "EndpointSlice":
            assert obj is None or isinstance(obj, EndpointSlice)
            old = self._slices.current.get(key)
            changed = self._slices.set(key, obj)
            self._endpoint_changes += changed
            if changed:
                self._index(key, old, obj)
        else:
            assert obj is None or isinstance(obj, Node)
            if key.name != self.node_name:
                return False  # only this node matters (the informer selects it anyway)
            changed = self._nodes.set(key, obj)
        if changed:
            self._cluster = None
        return changed

    def _index(self, key: NamespacedName, old: EndpointSlice | None,
               new: EndpointSlice | None) -> None:
        if old is not None:
            slices = {k: v for k, v in self._by_service[old.service].items() if k != key}
            if slices:
                self._by_service[old.service] = slices
            else:
                del self._by_service[old.service]
        if new is not None:
            self._by_service[new.service] = {**self._by_service.get(new.service, {}), key: new}

    def _keys(self, kind: Kind) -> list[NamespacedName]:
        if kind == "Service":
            return list(self._services.current)
        if kind == "EndpointSlice":
            return list(self._slices.current)
        return list(self._nodes.current)

    # --- applying -----------------------------------------------------------------

    def apply(self) -> Changes:
        """The services changed since the last apply (and the counters); clears them."""
        services: set[NamespacedName] = set()
        for prev_svc, cur_svc in self._services.take():
            services.update(s.ref for s in (prev_svc, cur_svc) if s is not None)
        for prev_eps, cur_eps in self._slices.take():
            services.update(e.service for e in (prev_eps, cur_eps) if e is not None)
        full = bool(self._nodes.take())
        times = tuple(sorted(t for ts in self._trigger_times.values() for t in ts))
        changes = Changes(frozenset(services), full, self._service_changes,
                          self._endpoint_changes, times)
        self._service_changes = self._endpoint_changes = 0
        self._trigger_times.clear()
        return changes

    @property
    def pending(self) -> tuple[int, int]:
        """(Service, EndpointSlice) changes waiting for the next apply."""
        return len(self._services.previous), len(self._slices.previous)

    # --- reading ------------------------------------------------------------------

    @property
    def node(self) -> Node | None:
        return self._nodes.current.get(NamespacedName("", self.node_name))

    @property
    def services(self) -> frozenset[NamespacedName]:
        return frozenset(self._services.current)

    def cluster(self) -> Cluster:
        """The current state as the pipeline's input (sorted, so renders are stable)."""
        if self._cluster is None:
            node = self.node
            self._cluster = Cluster(
                services=tuple(self._services.values),
                slices=tuple(self._slices.values),
                nodes=(node,) if node is not None else (),
                index=ClusterIndex(dict(self._services.current), dict(self._by_service)),
            )
        return self._cluster
