"""The in-memory object store: etcd plus the generic registry, with no I/O at all.

Theory of operation. Every change to any object bumps one global counter, the
resourceVersion (like etcd's revision), stamps it on the object and appends a `Change`
to a bounded history. Lists are answered from the current objects; watches are answered
from the history: a watch from resourceVersion R gets every change after R, filtered by
namespace and selectors exactly as kube-apiserver's watch cache filters them (an object
that stops matching a selector arrives as DELETED, one that starts matching as ADDED).
When R is older than the oldest change still held the answer is 410 Expired, which is what
makes clients relist; the history length is configurable so tests can force it.

Updates carry optimistic concurrency: a body whose metadata.resourceVersion is not the
current one is a 409 Conflict; a body without one is an unconditional update. Writes
that change nothing do not bump the resourceVersion, as upstream skips them.

Deletion is immediate except for Pods (upstream's graceful deletion) and objects with
finalizers: those get metadata.deletionTimestamp (and deletionGracePeriodSeconds) and a
MODIFIED event; the object goes away (DELETED) when the grace period has elapsed and no
finalizer is left (`reap`, driven by the server with the injected clock), or at once on
a second delete with gracePeriodSeconds=0. The clock and the random source (UIDs,
generateName suffixes) are injected, so unit tests are exact.

Two controllers' work is done here, at once, inside the write that calls for it: every
namespace gets a `default` ServiceAccount when it is created (and gets it back when it
is deleted), as kube-controller-manager's ServiceAccount controller does; and every
ClusterRole with an `aggregationRule` is rewritten (MODIFIED) to hold the rules of the
ClusterRoles its selectors match whenever a ClusterRole changes (the clusterrole
aggregation controller; escalation.py).

`dump` / `Store.restore` carry the state across a process restart (the lab's API server
keeps a snapshot file): the objects, the resourceVersion counter and pending deletions.
The history is not kept, as etcd compacts: a restored store can serve watches from its
current resourceVersion on; an older one gets 410 (relist), a newer one 504 "Too large
resource version" (relist), so a client never silently misses a change.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import json
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kubeproxy.apiserver import errors, escalation, rbac, resources, services
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.kinds import STRATEGIES
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.selectors import FieldSelector, LabelSelector
from kubeproxy.apiserver.strategy import Context, validate_metadata

Obj = dict[str, Any]
Clock = Callable[[], float]

PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
DEFAULT_SERVICE_ACCOUNT = "default"  # made in every namespace (the SA controller's)
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
SNAPSHOT_VERSION = 1
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # upstream's generateName alphabet


@dataclass(frozen=True)
class StoreConfig:
    history: int = 1000  # changes kept for watches; older resourceVersions get 410
    network: services.ServiceNetwork = field(
        default_factory=lambda: services.ServiceNetwork(ipaddress.IPv4Network("10.96.0.0/16"))
    )

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError("history must hold at least one change")


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
Causes = list[errors.Cause]


@dataclass(frozen=True)
class ListResult:
    items: list[Obj]
    resource_version: int
    continue_token: str = ""
    remaining: int | None = None


@dataclass(frozen=True)
class DeleteResult:
    obj: Obj
    deleted: bool  # False when deletion is pending (grace period or finalizers)


def timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


H = TypeVar("H", str, int)


class _Taken(AbstractSet[H]):
    """Values held by some Service other than the one asking (counts minus its own)."""

    def __init__(self, counts: Counter[H], own: frozenset[H]) -> None:
        self._counts: Counter[H] = counts
        self._own: frozenset[H] = own

    def __contains__(self, value: object) -> bool:
        count: int = self._counts.get(value, 0)  # type: ignore[call-overload]
        return count - (value in self._own) > 0

    def __iter__(self) -> Iterator[H]:
        return (v for v in self._counts if v in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def _sort_key(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


class Store:
    def __init__(self, config: StoreConfig | None = None, *, clock: Clock = time.time,
                 rng: random.Random | None = None) -> None:
        self.config = config or StoreConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._rv = 0
        self._floor = 0  # resourceVersion of the newest change no longer in history
        self._history: deque[Change] = deque()
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r.key: {} for r in
                                                                   resources.RESOURCES}
        self._deadlines: dict[tuple[str, str, str], float] = {}
        # What each Service holds (cluster IPs, node ports), and how many hold each value;
        # built on first need, then kept up to date by _commit.
        self._held: dict[tuple[str, str], tuple[frozenset[str], frozenset[int]]] | None = None
        self._ip_count: Counter[str] = Counter()
        self._port_count: Counter[int] = Counter()
        self._aggregating = False  # _aggregate is writing: no nested aggregation
        self._emptying: set[str] = set()  # namespaces whose contents are being deleted
        for name in INITIAL_NAMESPACES:
            self.create(resources.NAMESPACES, None, {"metadata": {"name": name}})
        self._bootstrap_rbac()  # upstream's bootstrap RBAC policy

    # ---- snapshots -------------------------------------------------------------------

    def dump(self) -> Obj:
        """The whole state as one JSON-able document (shares the objects: serialize it
        before the store changes again)."""
        return {
            "version": SNAPSHOT_VERSION,
            "resourceVersion": self._rv,
            "objects": {key: [obj for _, obj in sorted(objs.items())]
                        for key, objs in sorted(self._objects.items())},
            "deletions": [[res, ns, name, deadline]
                          for (res, ns, name), deadline in sorted(self._deadlines.items())],
        }

    @classmethod
    def restore(cls, snapshot: Obj, config: StoreConfig | None = None, *,
                clock: Clock = time.time, rng: random.Random | None = None) -> Store:
        """A store holding what ``snapshot`` (from ``dump``) held; ValueError if it is not
        a snapshot this version wrote."""
        store = cls(config, clock=clock, rng=rng)
        try:
            if snapshot["version"] != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {snapshot['version']!r}, "
                                 f"expected {SNAPSHOT_VERSION}")
            rv = int(snapshot["resourceVersion"])
            objects: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in store._objects}
            for key, items in snapshot["objects"].items():
                if key not in objects:
                    raise ValueError(f"unknown resource {key!r}")
                for obj in items:
                    if int(obj["metadata"]["resourceVersion"]) > rv:
                        raise ValueError(f"{key} {_key(obj)}: newer than the snapshot")
                    objects[key][_key(obj)] = obj
            deadlines = {(str(r), str(ns), str(name)): float(at)
                         for r, ns, name, at in snapshot["deletions"]}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a store snapshot: {exc!r}") from exc
        store._rv = store._floor = rv
        store._history.clear()
        store._objects = objects
        store._held = None  # the allocations are counted again from these objects
        store._deadlines = deadlines
        store._bootstrap_rbac()  # a snapshot older than RBAC lacks them (upstream: reconciled)
        for _, name in list(store._objects[resources.NAMESPACES.key]):
            store._default_service_account(name)  # as the ServiceAccount controller would
        store._aggregate()
        return store

    def _bootstrap_rbac(self) -> None:
        """Create the bootstrap roles and bindings that are missing (not those changed)."""
        for key, body in rbac.bootstrap_objects():
            res = resources.BY_KEY[key]
            if ("", body["metadata"]["name"]) not in self._objects[key]:
                self.create(res, None, body)

    def _default_service_account(self, namespace: str) -> None:
        """The ServiceAccount controller's job: every namespace has a `default` one."""
        namespaced = self._objects[resources.SERVICEACCOUNTS.key]
        if ("", namespace) in self._objects[resources.NAMESPACES.key] and \
                namespace not in self._emptying and \
                (namespace, DEFAULT_SERVICE_ACCOUNT) not in namespaced:
            self.create(resources.SERVICEACCOUNTS, namespace,
                        {"metadata": {"name": DEFAULT_SERVICE_ACCOUNT}})

    def _aggregate(self) -> None:
        """The ClusterRole aggregation controller's job, done at once: every ClusterRole
        with an aggregationRule holds the rules of the ClusterRoles it selects
        (escalation.aggregated_rules); repeated until nothing changes, since an
        aggregated role may itself be selected by another."""
        if self._aggregating:
            return
        self._aggregating = True
        try:
            roles = self._objects[resources.CLUSTERROLES.key]
            for _ in range(len(roles) + 1):
                by_name = {name: obj for (_, name), obj in roles.items()}
                stale = [(obj, rules) for obj in by_name.values()
                         if (rules := escalation.aggregated_rules(obj, by_name)) is not None
                         and rules != (obj.get("rules") or [])]
                if not stale:
                    return
                for obj, rules in stale:
                    new = copy.deepcopy(obj)
                    new["rules"] = copy.deepcopy(rules)
                    self._commit(resources.CLUSTERROLES, "MODIFIED", new, obj)
        finally:
            self._aggregating = False

    # ---- reading ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_watchable(self) -> int:
        return self._floor

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        obj = self._objects[res.key].get((namespace or "", name))
        if obj is None:
            raise errors.not_found(res.plural, name, res.group)
        return copy.deepcopy(obj)

    def find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object itself (shared, not copied: read it only), or None."""
        return self._objects[res.key].get((namespace or "", name))

    def policy(self) -> rbac.Policy:
        """The RBAC objects as they are now (shared, not copied: read them only)."""
        objs = self._objects
        return rbac.Policy.of(objs[resources.CLUSTERROLES.key].values(),
                              objs[resources.ROLES.key].values(),
                              objs[resources.CLUSTERROLEBINDINGS.key].values(),
                              objs[resources.ROLEBINDINGS.key].values())

    def list(self, res: Resource, namespace: str | None, *, labels: LabelSelector | None = None,
             fields: FieldSelector | None = None, limit: int | None = None,
             continue_token: str | None = None) -> ListResult:
        rv, start = self._rv, ""
        if continue_token:
            rv, start = self._decode_continue(continue_token)
        matching = [obj for key, obj in sorted(self._objects[res.key].items(),
                                               key=lambda kv: _sort_key(kv[0]))
                    if _sort_key(key) > start and self._matches(obj, namespace, labels, fields)]
        if limit is None or limit <= 0 or len(matching) <= limit:
            return ListResult(copy.deepcopy(matching), rv)
        page = matching[:limit]
        token = self._encode_continue(rv, _sort_key(_key(page[-1])))
        return ListResult(copy.deepcopy(page), rv, token, len(matching) - limit)

    @staticmethod
    def _matches(obj: Obj, namespace: str | None, labels: LabelSelector | None,
                 fields: FieldSelector | None) -> bool:
        meta = obj["metadata"]
        if namespace and meta.get("namespace") != namespace:
            return False
        if labels is not None and not labels.matches(meta.get("labels")):
            return False
        return fields is None or fields.matches(obj)

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

    def _context(self, exclude: tuple[str, str] | None = None) -> Context:
        """The allocations of every Service but ``exclude``: kept up to date as Services
        change (a scan per request made loading 10,000 Services quadratic)."""
        held = self._holdings()
        own = held.get(exclude, (frozenset(), frozenset())) if exclude else None
        ips: _Taken[str] = _Taken(self._ip_count, own[0] if own else frozenset())
        ports: _Taken[int] = _Taken(self._port_count, own[1] if own else frozenset())
        return Context(self.config.network, services.Allocations(ips, ports))

    def _holdings(self) -> dict[tuple[str, str], tuple[frozenset[str], frozenset[int]]]:
        if self._held is None:
            self._held, self._ip_count, self._port_count = {}, Counter(), Counter()
            for key, svc in self._objects[resources.SERVICES.key].items():
                self._hold(key, svc)
        return self._held

    def _hold(self, key: tuple[str, str], svc: Obj | None) -> None:
        """Record what Service ``key`` holds now (None: it is gone)."""
        assert self._held is not None
        old_ips, old_ports = self._held.pop(key, (frozenset(), frozenset()))
        self._ip_count.subtract(old_ips)
        self._port_count.subtract(old_ports)
        if svc is None:
            return
        spec = svc.get("spec") or {}
        ips = frozenset(ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]
                        if ip and ip != "None")
        ports = {p["nodePort"] for p in spec.get("ports") or [] if p.get("nodePort")}
        if spec.get("healthCheckNodePort"):
            ports.add(spec["healthCheckNodePort"])
        self._held[key] = (ips, frozenset(ports))
        self._ip_count.update(ips)
        self._port_count.update(ports)

    def _commit(self, res: Resource, kind: str, obj: Obj, prev: Obj | None) -> Obj:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(obj)
        if kind == "DELETED":
            self._objects[res.key].pop(key, None)
            self._deadlines.pop((res.key, *key), None)
        else:
            self._objects[res.key][key] = obj
        if res.key == resources.SERVICES.key and self._held is not None:
            self._hold(key, None if kind == "DELETED" else obj)
        if len(self._history) >= self.config.history:
            self._floor = self._history.popleft().rv
        self._history.append(Change(self._rv, res.key, kind, obj, prev))
        out = copy.deepcopy(obj)
        if res is resources.CLUSTERROLES:
            self._aggregate()
        elif res is resources.NAMESPACES and kind == "ADDED":
            self._default_service_account(key[1])
        elif (res is resources.SERVICEACCOUNTS and kind == "DELETED"
              and key[1] == DEFAULT_SERVICE_ACCOUNT):
            self._default_service_account(key[0])  # the controller puts it back
        return out

    def _invalid(self, res: Resource, obj: Obj, causes: Causes) -> ApiError:
        return errors.invalid(res.kind, obj.get("metadata", {}).get("name", ""), causes, res.group)

    def create(self, res: Resource, namespace: str | None, body: Obj, *,
               dry_run: bool = False) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if res.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            if ("", meta["namespace"]) not in self._objects[resources.NAMESPACES.key]:
                raise errors.not_found("namespaces", meta["namespace"])
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(res, meta)
        strategy = STRATEGIES[res.kind]
        if strategy.has_status and not strategy.keep_status_on_create:
            obj.pop("status", None)
        causes = validate_metadata(obj, strategy.name_check)
        if causes:
            raise self._invalid(res, obj, causes)
        if _key(obj) in self._objects[res.key]:
            raise errors.already_exists(res.plural, meta["name"], res.group)
        ctx = self._context()
        strategy.default(obj, ctx)
        causes = strategy.validate(obj, None, ctx)
        if causes:
            raise self._invalid(res, obj, causes)
        now = self._clock()
        for drop in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink",
                     "managedFields", "resourceVersion"):
            meta.pop(drop, None)
        meta["uid"] = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        meta["creationTimestamp"] = timestamp(now)
        meta["generation"] = 1
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        if dry_run:
            return obj
        return self._commit(res, "ADDED", obj, None)

    def _generate_name(self, res: Resource, meta: Obj) -> str:
        for _ in range(100):
            suffix = "".join(self._rng.choice(_SUFFIX_ALPHABET) for _ in range(5))
            name = str(meta["generateName"])[:58] + suffix
            if (meta.get("namespace", ""), name) not in self._objects[res.key]:
                return name
        raise errors.ApiError(500, "InternalError", "could not generate a unique name")

    def update(self, res: Resource, namespace: str | None, name: str, body: Obj, *,
               subresource: str | None = None, dry_run: bool = False) -> Obj:
        old = self._objects[res.key].get((namespace or "", name))
        if old is None:
            raise errors.not_found(res.plural, name, res.group)
        new = copy.deepcopy(body)
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        if meta.get("name", name) != name:
            raise errors.bad_request(f"the name of the object ({meta.get('name')}) does not "
                                     f"match the name on the URL ({name})")
        sent_rv = meta.get("resourceVersion")
        if sent_rv not in (None, "") and sent_rv != old["metadata"]["resourceVersion"]:
            raise errors.conflict(res.plural, name, errors.STALE, res.group)
        new = self._merge_update(res, old, new, subresource)
        if _comparable(new) == _comparable(old):
            return copy.deepcopy(old)  # no-op: upstream does not write
        if dry_run:
            return new
        deletion = new["metadata"].get("deletionTimestamp")
        if deletion and not new["metadata"].get("finalizers") and \
                self._deadlines.get((res.key, *_key(new)), 0.0) <= self._clock():
            return self._commit(res, "DELETED", new, old)
        return self._commit(res, "MODIFIED", new, old)

    def _merge_update(self, res: Resource, old: Obj, new: Obj, subresource: str | None) -> Obj:
        strategy = STRATEGIES[res.kind]
        meta = new["metadata"]
        for keep in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                     "deletionGracePeriodSeconds", "generation"):
            if keep in old["metadata"]:
                meta[keep] = old["metadata"][keep]
            else:
                meta.pop(keep, None)
        for drop in ("selfLink", "managedFields"):
            meta.pop(drop, None)
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status") or {}
            new = merged
        else:
            if strategy.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            strategy.carry_over(old, new)
            causes = validate_metadata(new, strategy.name_check)
            if causes:
                raise self._invalid(res, new, causes)
            ctx = self._context(exclude=_key(old))
            strategy.default(new, ctx)
            causes = strategy.validate(new, old, ctx)
            if causes:
                raise self._invalid(res, new, causes)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _spec_of(new) != _spec_of(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        return new

    def patch(self, res: Resource, namespace: str | None, name: str,
              apply: Callable[[Obj], Obj], *, subresource: str | None = None,
              dry_run: bool = False) -> Obj:
        """Apply `apply` to the current object and update with the current RV as precondition."""
        current = self.get(res, namespace, name)
        patched = apply(copy.deepcopy(current))
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise errors.bad_request("the patch produced an object without metadata")
        if patched["metadata"].get("resourceVersion") in (None, ""):
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.update(res, namespace, name, patched, subresource=subresource,
                           dry_run=dry_run)

    def delete(self, res: Resource, namespace: str | None, name: str, *,
               grace: int | None = None, preconditions: Obj | None = None,
               dry_run: bool = False) -> DeleteResult:
        old = self._objects[res.key].get((namespace or "", name))
        if old is None:
            raise errors.not_found(res.plural, name, res.group)
        _check_preconditions(res, old, preconditions or {})
        if res is resources.NAMESPACES and name in PROTECTED_NAMESPACES:
            raise errors.forbidden(res.plural, name, "this namespace may not be deleted")
        grace = self._grace(res, old, grace)
        obj = copy.deepcopy(old)
        meta = obj["metadata"]
        now = self._clock()
        pending = bool(meta.get("finalizers")) or grace > 0
        if dry_run:
            return DeleteResult(obj, not pending)
        if not pending:
            if res is resources.NAMESPACES:
                self._delete_namespace_contents(name)
            return DeleteResult(self._commit(res, "DELETED", obj, old), True)
        deadline = now + grace
        previous = self._deadlines.get((res.key, namespace or "", name))
        if previous is not None and previous <= deadline and meta.get("deletionTimestamp"):
            return DeleteResult(copy.deepcopy(old), False)  # already going, not sooner
        self._deadlines[(res.key, namespace or "", name)] = deadline
        meta["deletionTimestamp"] = timestamp(deadline)
        meta["deletionGracePeriodSeconds"] = grace
        return DeleteResult(self._commit(res, "MODIFIED", obj, old), False)

    @staticmethod
    def _grace(res: Resource, obj: Obj, requested: int | None) -> int:
        if res is not resources.PODS:
            return 0
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0  # nothing runs it: upstream deletes unscheduled pods at once
        if requested is None:
            requested = spec.get("terminationGracePeriodSeconds", 30)
        return max(0, int(requested))

    def _delete_namespace_contents(self, namespace: str) -> None:
        self._emptying.add(namespace)
        try:
            for res in resources.RESOURCES:
                if not res.namespaced:
                    continue
                for key in [k for k in self._objects[res.key] if k[0] == namespace]:
                    obj = copy.deepcopy(self._objects[res.key][key])
                    self._commit(res, "DELETED", obj, self._objects[res.key][key])
        finally:
            self._emptying.discard(namespace)

    def reap(self) -> int:
        """Remove objects whose grace period is over and that have no finalizers left."""
        now, removed = self._clock(), 0
        for (res_key, namespace, name), deadline in sorted(self._deadlines.items()):
            if deadline > now:
                continue
            res = resources.BY_KEY[res_key]
            current = self._objects[res_key].get((namespace, name))
            if current is None:
                self._deadlines.pop((res_key, namespace, name), None)
            elif not current["metadata"].get("finalizers"):
                self._commit(res, "DELETED", copy.deepcopy(current), current)
                removed += 1
        return removed

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)


def _check_preconditions(res: Resource, obj: Obj, pre: Obj) -> None:
    meta = obj["metadata"]
    for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
        want = pre.get(key)
        if want and want != meta.get(key):
            raise errors.conflict(res.plural, meta["name"],
                                  f"Precondition failed: {label} in precondition: {want}, "
                                  f"{label} in object meta: {meta.get(key)}", res.group)


def _spec_of(obj: Obj) -> Any:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _comparable(obj: Obj) -> Obj:
    out = dict(obj)
    out["metadata"] = {k: v for k, v in obj["metadata"].items()
                       if k not in ("resourceVersion", "generation")}
    return out


def _filtered(change: Change, namespace: str | None, labels: LabelSelector,
              fields: FieldSelector) -> WatchEvent | None:
    """Upstream cacheWatcher semantics: transitions across the selector become ADDED/DELETED."""

    def passes(obj: Obj | None) -> bool:
        return obj is not None and Store._matches(obj, namespace, labels, fields)

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
