"""Storage: what etcd and the watch cache do for kube-apiserver, in memory, with no I/O.

Theory of operation. Every change to any object bumps one global counter, the
resourceVersion (like etcd's revision), stamps it on the object and appends a `Change`
to a bounded history. Lists are answered from the current objects; watches are answered
from the history: a watch from resourceVersion R gets every change after R, filtered by
namespace and selectors exactly as kube-apiserver's watch cache filters them (an object
that stops matching a selector arrives as DELETED, one that starts matching as ADDED).
When R is older than the oldest change still held the answer is 410 Expired, which is what
makes clients relist; the history length is configurable so tests can force it. A list
page's continue token carries the resourceVersion it was cut at, and goes stale (410)
the same way.

Storage knows no verbs: it takes whole objects at `commit` and never validates,
defaults or refuses one (that is registry.py, which also decides the pending deletions
kept here). Keeping the two apart leaves this module the only one that knows how
changes are numbered and replayed.

`dump` / `load` carry the state across a process restart (the lab's API server keeps a
snapshot file): the objects, the resourceVersion counter and pending deletions. The
history is not kept, as etcd compacts: a loaded storage can serve watches from its
current resourceVersion on; an older one gets 410 (relist), a newer one 504 "Too large
resource version" (relist), so a client never silently misses a change.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import errors, resources
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.selectors import FieldSelector, LabelSelector

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Deadlines = dict[tuple[str, str, str], float]  # (Resource.key, namespace, name) -> when

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Change:
    rv: int
    resource: str  # Resource.key
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj  # shared, never mutated
    prev: Obj | None


@dataclass(frozen=True)
class WatchEvent:
    type: str
    obj: Obj


Events = list[WatchEvent]


@dataclass(frozen=True)
class ListResult:
    items: list[Obj]
    resource_version: int
    continue_token: str = ""
    remaining: int | None = None


def object_key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def _sort_key(key: Key) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


def _matches(obj: Obj, namespace: str | None, labels: LabelSelector | None,
             fields: FieldSelector | None) -> bool:
    meta = obj["metadata"]
    if namespace and meta.get("namespace") != namespace:
        return False
    if labels is not None and not labels.matches(meta.get("labels")):
        return False
    return fields is None or fields.matches(obj)


class Storage:
    def __init__(self, history: int) -> None:
        self._history_limit = history
        self._rv = 0
        self._floor = 0  # resourceVersion of the newest change no longer in history
        self._history: deque[Change] = deque()
        self._objects: dict[str, dict[Key, Obj]] = {r.key: {} for r in resources.RESOURCES}
        # Pending deletions, written by the registry; kept here so snapshots carry them.
        self.deadlines: Deadlines = {}

    # ---- snapshots -------------------------------------------------------------------

    def dump(self) -> Obj:
        """The whole state as one JSON-able document (shares the objects: serialize it
        before the storage changes again)."""
        return {
            "version": SNAPSHOT_VERSION,
            "resourceVersion": self._rv,
            "objects": {key: [obj for _, obj in sorted(objs.items())]
                        for key, objs in sorted(self._objects.items())},
            "deletions": [[res, ns, name, deadline]
                          for (res, ns, name), deadline in sorted(self.deadlines.items())],
        }

    def load(self, snapshot: Obj) -> None:
        """Hold what ``snapshot`` (from ``dump``) held, and nothing else; ValueError (and
        no change) if it is not a snapshot this version wrote."""
        try:
            if snapshot["version"] != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {snapshot['version']!r}, "
                                 f"expected {SNAPSHOT_VERSION}")
            rv = int(snapshot["resourceVersion"])
            objects: dict[str, dict[Key, Obj]] = {k: {} for k in self._objects}
            for key, items in snapshot["objects"].items():
                if key not in objects:
                    raise ValueError(f"unknown resource {key!r}")
                for obj in items:
                    if int(obj["metadata"]["resourceVersion"]) > rv:
                        raise ValueError(f"{key} {object_key(obj)}: newer than the snapshot")
                    objects[key][object_key(obj)] = obj
            deadlines = {(str(r), str(ns), str(name)): float(at)
                         for r, ns, name, at in snapshot["deletions"]}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a store snapshot: {exc!r}") from exc
        self._rv = self._floor = rv
        self._history.clear()
        self._objects = objects
        self.deadlines = deadlines

    # ---- reading ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_watchable(self) -> int:
        return self._floor

    def objects(self, res: Resource) -> dict[Key, Obj]:
        """Every object of ``res`` by key (shared, not copied: read it only)."""
        return self._objects[res.key]

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        obj = self._objects[res.key].get((namespace or "", name))
        if obj is None:
            raise errors.not_found(res.plural, name, res.group)
        return copy.deepcopy(obj)

    def find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object itself (shared, not copied: read it only), or None."""
        return self._objects[res.key].get((namespace or "", name))

    def list(self, res: Resource, namespace: str | None, *, labels: LabelSelector | None = None,
             fields: FieldSelector | None = None, limit: int | None = None,
             continue_token: str | None = None) -> ListResult:
        rv, start = self._rv, ""
        if continue_token:
            rv, start = self._decode_continue(continue_token)
        matching = [obj for key, obj in sorted(self._objects[res.key].items(),
                                               key=lambda kv: _sort_key(kv[0]))
                    if _sort_key(key) > start and _matches(obj, namespace, labels, fields)]
        if limit is None or limit <= 0 or len(matching) <= limit:
            return ListResult(copy.deepcopy(matching), rv)
        page = matching[:limit]
        token = self._encode_continue(rv, _sort_key(object_key(page[-1])))
        return ListResult(copy.deepcopy(page), rv, token, len(matching) - limit)

    @staticmethod
    def _encode_continue(rv: int, start: str) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def _decode_continue(self, token: str) -> tuple[int, str]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = json.loads(raw)
            rv, start = int(data["rv"]), str(data["start"]).rstrip("\x00")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise errors.bad_request(f"continue key is not valid: {exc}") from exc
        if rv < self._floor:
            raise errors.gone("The provided continue parameter is too old to display a "
                              "consistent list result. You can start a new list without the "
                              "continue parameter.")
        return rv, start

    # ---- watching --------------------------------------------------------------------

    def initial_events(self, res: Resource, namespace: str | None, labels: LabelSelector,
                       fields: FieldSelector) -> Events:
        """Synthetic ADDED events for the current state (a watch without resourceVersion)."""
        return [WatchEvent("ADDED", obj) for obj in self.list(res, namespace, labels=labels,
                                                             fields=fields).items]

    def events_since(self, res: Resource, namespace: str | None, after: int,
                     labels: LabelSelector, fields: FieldSelector) -> Events:
        """Changes after resourceVersion `after`, as the watcher should see them."""
        if after < self._floor:
            raise errors.gone(f"too old resource version: {after} ({self._floor + 1})")
        if after > self._rv:
            raise errors.too_large_resource_version(after, self._rv)
        out: Events = []
        for change in self._history:
            if change.rv <= after or change.resource != res.key:
                continue
            event = _filtered(change, namespace, labels, fields)
            if event is not None:
                out.append(event)
        return out

    # ---- writing ---------------------------------------------------------------------

    def commit(self, res: Resource, kind: str, obj: Obj, prev: Obj | None) -> None:
        """Write ``obj`` at the next resourceVersion (``kind`` DELETED removes it, with
        its pending deletion) and record the change for watchers. ``obj`` is kept, not
        copied: the caller hands it over."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = object_key(obj)
        if kind == "DELETED":
            self._objects[res.key].pop(key, None)
            self.deadlines.pop((res.key, *key), None)
        else:
            self._objects[res.key][key] = obj
        if len(self._history) >= self._history_limit:
            self._floor = self._history.popleft().rv
        self._history.append(Change(self._rv, res.key, kind, obj, prev))


def _filtered(change: Change, namespace: str | None, labels: LabelSelector,
              fields: FieldSelector) -> WatchEvent | None:
    """Upstream cacheWatcher semantics: transitions across the selector become ADDED/DELETED."""

    def passes(obj: Obj | None) -> bool:
        return obj is not None and _matches(obj, namespace, labels, fields)

    if change.type == "DELETED":
        return WatchEvent("DELETED", change.obj) if passes(change.prev) else None
    now, before = passes(change.obj), passes(change.prev)
    if now and before:
        return WatchEvent(change.type, change.obj)
    if now:
        return WatchEvent("ADDED", change.obj)
    if before:
        assert change.prev is not None
        gone = copy.deepcopy(change.prev)
        gone["metadata"]["resourceVersion"] = str(change.rv)
        return WatchEvent("DELETED", gone)
    return None
