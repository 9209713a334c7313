"""The registry: the write verbs over storage, as upstream's generic registry store does.

Theory of operation. `create`, `update`, `patch` and `delete` turn a request body into
the object to store: metadata set or carried over (UID, creationTimestamp, generation),
the kind's strategy applied (strategy.py, kinds.py: defaults, carry-over, validation
into one 422 Invalid), and the result handed to storage.py at `commit`. The clock and
the random source (UIDs, generateName suffixes) are injected, so unit tests are exact.

Updates carry optimistic concurrency: a body whose metadata.resourceVersion is not the
current one is a 409 Conflict; a body without one is an unconditional update. Writes
that change nothing do not bump the resourceVersion, as upstream skips them.

Deletion is immediate except for Pods (upstream's graceful deletion) and objects with
finalizers: those get metadata.deletionTimestamp (and deletionGracePeriodSeconds) and a
MODIFIED event; the object goes away (DELETED) when the grace period has elapsed and no
finalizer is left (`reap`, driven by the server with the injected clock), or at once on
a second delete with gracePeriodSeconds=0. Deleting a namespace deletes what is in it.

Services' cluster IPs and node ports are allocated by their strategy from what the
other Services hold; the registry keeps that count up to date at every commit instead
of scanning all Services per request. After every commit it calls `react`, which is
how the controllers (controllers.py) see each change inside the write that made it.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, TypeVar

from kubeproxy.apiserver import errors, resources, services
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.kinds import STRATEGIES
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.storage import Key, Storage, object_key
from kubeproxy.apiserver.strategy import Context, validate_metadata

Obj = dict[str, Any]
Clock = Callable[[], float]
Causes = list[errors.Cause]
# Called after every commit with (the registry, resource, ADDED/MODIFIED/DELETED, key).
React = Callable[["Registry", Resource, str, Key], None]

PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # upstream's generateName alphabet


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


class Registry:
    def __init__(self, storage: Storage, network: services.ServiceNetwork, *, clock: Clock,
                 rng: random.Random, react: React) -> None:
        self._storage = storage
        self._network = network
        self._clock = clock
        self._rng = rng
        self._react = react
        # What each Service holds (cluster IPs, node ports), and how many hold each value;
        # built on first need, then kept up to date by commit.
        self._held: dict[Key, tuple[frozenset[str], frozenset[int]]] | None = None
        self._ip_count: Counter[str] = Counter()
        self._port_count: Counter[int] = Counter()
        self._emptying: set[str] = set()  # namespaces whose contents are being deleted

    @property
    def storage(self) -> Storage:
        return self._storage

    def load(self, snapshot: Obj) -> None:
        """Storage.load, and the allocations counted again from the objects loaded."""
        self._storage.load(snapshot)
        self._held = None

    def emptying(self, namespace: str) -> bool:
        """Whether ``namespace`` is being deleted with its contents right now."""
        return namespace in self._emptying

    # ---- allocations -----------------------------------------------------------------

    def _context(self, exclude: Key | None = None) -> Context:
        """The allocations of every Service but ``exclude``: kept up to date as Services
        change (a scan per request made loading 10,000 Services quadratic)."""
        held = self._holdings()
        own = held.get(exclude, (frozenset(), frozenset())) if exclude else None
        ips: _Taken[str] = _Taken(self._ip_count, own[0] if own else frozenset())
        ports: _Taken[int] = _Taken(self._port_count, own[1] if own else frozenset())
        return Context(self._network, services.Allocations(ips, ports))

    def _holdings(self) -> dict[Key, tuple[frozenset[str], frozenset[int]]]:
        if self._held is None:
            self._held, self._ip_count, self._port_count = {}, Counter(), Counter()
            for key, svc in self._storage.objects(resources.SERVICES).items():
                self._hold(key, svc)
        return self._held

    def _hold(self, key: Key, svc: Obj | None) -> None:
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

    # ---- writing ---------------------------------------------------------------------

    def commit(self, res: Resource, kind: str, obj: Obj, prev: Obj | None) -> Obj:
        """Store ``obj`` (handed over) and return a copy of it as committed; then let the
        controllers react."""
        self._storage.commit(res, kind, obj, prev)
        key = object_key(obj)
        if res.key == resources.SERVICES.key and self._held is not None:
            self._hold(key, None if kind == "DELETED" else obj)
        out = copy.deepcopy(obj)
        self._react(self, res, kind, key)
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
            if ("", meta["namespace"]) not in self._storage.objects(resources.NAMESPACES):
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
        if object_key(obj) in self._storage.objects(res):
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
        return self.commit(res, "ADDED", obj, None)

    def _generate_name(self, res: Resource, meta: Obj) -> str:
        for _ in range(100):
            suffix = "".join(self._rng.choice(_SUFFIX_ALPHABET) for _ in range(5))
            name = str(meta["generateName"])[:58] + suffix
            if (meta.get("namespace", ""), name) not in self._storage.objects(res):
                return name
        raise errors.ApiError(500, "InternalError", "could not generate a unique name")

    def update(self, res: Resource, namespace: str | None, name: str, body: Obj, *,
               subresource: str | None = None, dry_run: bool = False) -> Obj:
        old = self._storage.find(res, namespace, name)
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
                self._storage.deadlines.get((res.key, *object_key(new)), 0.0) <= self._clock():
            return self.commit(res, "DELETED", new, old)
        return self.commit(res, "MODIFIED", new, old)

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
            ctx = self._context(exclude=object_key(old))
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
        current = self._storage.get(res, namespace, name)
        patched = apply(copy.deepcopy(current))
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise errors.bad_request("the patch produced an object without metadata")
        if patched["metadata"].get("resourceVersion") in (None, ""):
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.update(res, namespace, name, patched, subresource=subresource,
                           dry_run=dry_run)

    # ---- deleting --------------------------------------------------------------------

    def delete(self, res: Resource, namespace: str | None, name: str, *,
               grace: int | None = None, preconditions: Obj | None = None,
               dry_run: bool = False) -> DeleteResult:
        old = self._storage.find(res, namespace, name)
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
            return DeleteResult(self.commit(res, "DELETED", obj, old), True)
        deadline = now + grace
        deadlines = self._storage.deadlines
        previous = deadlines.get((res.key, namespace or "", name))
        if previous is not None and previous <= deadline and meta.get("deletionTimestamp"):
            return DeleteResult(copy.deepcopy(old), False)  # already going, not sooner
        deadlines[(res.key, namespace or "", name)] = deadline
        meta["deletionTimestamp"] = timestamp(deadline)
        meta["deletionGracePeriodSeconds"] = grace
        return DeleteResult(self.commit(res, "MODIFIED", obj, old), False)

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
                objects = self._storage.objects(res)
                for key in [k for k in objects if k[0] == namespace]:
                    obj = copy.deepcopy(objects[key])
                    self.commit(res, "DELETED", obj, objects[key])
        finally:
            self._emptying.discard(namespace)

    def reap(self) -> int:
        """Remove objects whose grace period is over and that have no finalizers left."""
        now, removed = self._clock(), 0
        deadlines = self._storage.deadlines
        for (res_key, namespace, name), deadline in sorted(deadlines.items()):
            if deadline > now:
                continue
            res = resources.BY_KEY[res_key]
            current = self._storage.find(res, namespace, name)
            if current is None:
                deadlines.pop((res_key, namespace, name), None)
            elif not current["metadata"].get("finalizers"):
                self.commit(res, "DELETED", copy.deepcopy(current), current)
                removed += 1
        return removed

    def next_deadline(self) -> float | None:
        return min(self._storage.deadlines.values(), default=None)


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
