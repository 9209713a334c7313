"""Informers: keep one resource in sync with list + watch, and hand out decoded updates.

Theory of operation
-------------------
One :class:`Informer` per resource, each on its own thread, like client-go's reflector:

1. **List** everything matching the selectors (paged) and emit one :class:`Replace`
   carrying every item, decoded; the consumer replaces that kind's state with it (so
   objects deleted while we were not watching disappear) and, the first time, learns
   that the initial list is done.
2. **Watch** from the list's resourceVersion with bookmarks allowed. Each ADDED /
   MODIFIED / DELETED event becomes one :class:`~kubeproxy.tracker.Update`. Every event
   and every BOOKMARK moves the informer's resourceVersion forward.
3. When the server ends the watch normally (``timeoutSeconds``), watch again from that
   resourceVersion: nothing is missed and nothing is listed twice.
4. When the watch *hangs* -- no event and no bookmark within ``stall_timeout`` (an API
   server that was stopped, not closed: the connection stays open, nothing arrives) --
   or the stream breaks, or the server cannot be reached: close it, wait a backoff
   delay (growing, jittered, reset by a successful watch) and watch again from the
   last resourceVersion, as client-go's reflector does. Nothing is lost: the server
   replays what happened since, or says 410.
5. When the server says **410 Gone** (the resourceVersion fell out of its history) or
   answers with an error status: back off and start again at 1, a fresh list.

Which list, as client-go's reflector chooses (``relistResourceVersion``): the first is
``resourceVersion=0``, served from the API server's watch cache instead of etcd (the
server may then ignore ``limit``); a relist asks for "not older than" the last
resourceVersion seen, without ``limit`` so the watch cache can serve it too; and only
when that list itself is refused with 410 does the next one ask for ``""``, a
consistent read (paged).

The stall bound defaults to 2 x upstream's bookmark interval (kube-apiserver sends a
BOOKMARK on a quiet watch about once a minute), so a quiet but healthy watch is never
taken for a hung one; a server with a faster heartbeat (the lab's: 0.2 s) can be given a
tighter bound.

Resync (upstream's informer resync period, kube-proxy's ``configSyncPeriod``): the
informer keeps what it last delivered of each object (its cache, as client-go's
indexer); :meth:`Informer.resync` delivers every one of them again as an update. The
cache is changed and the items are emitted under one lock, so a resync's updates
never overtake an event the informer emitted before them. Who calls it, and when, is
the consumer's business (daemon.py: every configSyncPeriod, on its own clock).

Raw objects are decoded here, at the edge (:func:`to_update`): the consumer only ever
sees model objects; an invalid one arrives as an update with ``error`` set and no object.
``stop()`` wakes the thread out of a quiet watch by closing its stream.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from kubeproxy.errors import FieldError, InvalidObject
from kubeproxy.k8s.decode import (
    decode_endpoint_slice,
    decode_node,
    decode_service,
    object_ref,
)
from kubeproxy.model import NamespacedName
from kubeproxy.sources.client import (
    ClientError,
    GoneError,
    Obj,
    StatusError,
    TransportError,
    WatchStalled,
    WatchStream,
)
from kubeproxy.tracker import Kind, Model, Update

log = logging.getLogger("kubeproxy.informer")
T = TypeVar("T")
STALL_TIMEOUT = 120.0  # seconds: 2 x kube-apiserver's bookmark interval (1 minute)

TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
# What upstream kube-proxy's informers select.
SERVICE_SELECTOR = "!service.kubernetes.io/service-proxy-name"
SLICE_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


@dataclass(frozen=True)
class Resource:
    kind: Kind
    path: str
    label_selector: str = ""
    field_selector: str = ""


def resources(node_name: str) -> tuple[Resource, ...]:
    """The three informers of a proxy: Services, EndpointSlices, and this Node."""
    return (
        Resource("Service", "/api/v1/services", SERVICE_SELECTOR),
        Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", SLICE_SELECTOR),
        Resource("Node", "/api/v1/nodes", field_selector=f"metadata.name={node_name}"),
    )


@dataclass(frozen=True)
class Replace:
    """A complete (re)list of one kind."""

    kind: Kind
    updates: tuple[Update, ...]


class ApiClient(Protocol):
    def list_all(self, path: str, *, label_selector: str = "", field_selector: str = "",
                 page_size: int = 500, resource_version: str = "") -> tuple[list[Obj], str]:
        ...

    def list_converted(self, path: str, convert: Callable[[Obj], T], *,
                       label_selector: str = "", field_selector: str = "",
                       page_size: int = 500, resource_version: str = "") -> tuple[list[T], str]:
        ...

    def watch(self, path: str, *, resource_version: str, timeout_seconds: int,
              label_selector: str = "", field_selector: str = "",
              stall_timeout: float | None = None) -> WatchStream: ...


# --- decoding at the edge ---------------------------------------------------------

_DECODERS: dict[Kind, Callable[[Mapping[str, Any]], Model | None]] = {
    "Service": decode_service,
    "EndpointSlice": decode_endpoint_slice,
    "Node": decode_node,
}


def to_update(kind: Kind, obj: Mapping[str, Any], deleted: bool = False) -> Update | None:
    """A raw object -> its Update; None when it has no usable name (reported by caller)."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace", "")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    key = NamespacedName("" if kind == "Node" else namespace or "default", name)
    if deleted:
        return Update(kind, key, None)
    try:
        model = _DECODERS[kind](obj)
    except FieldError as err:
        invalid = InvalidObject(kind, object_ref(obj), err.field_path, err.message)
        return Update(kind, key, None, error=invalid)
    trigger = _trigger_time(meta) if kind == "EndpointSlice" else None
    return Update(kind, key, model, trigger_time=trigger)


def _trigger_time(meta: Mapping[str, Any]) -> float | None:
    annotations = meta.get("annotations")
    value = annotations.get(TRIGGER_TIME) if isinstance(annotations, Mapping) else None
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# --- backoff ----------------------------------------------------------------------


class Backoff:
    """Exponential delays with jitter: initial, x factor each time, up to cap."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.2, rng: random.Random | None = None) -> None:
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self._rng = rng or random.Random()
        self._next = initial

    def next(self) -> float:
        delay = min(self._next, self.cap)
        self._next = min(self._next * self.factor, self.cap)
        return delay * (1 + self.jitter * self._rng.random())

    def reset(self) -> None:
        self._next = self.initial


# --- the informer -----------------------------------------------------------------


class Informer:
    def __init__(self, client: ApiClient, resource: Resource,
                 emit: Callable[[Update | Replace], None], *, page_size: int = 500,
                 watch_timeout: tuple[int, int] = (300, 600),
                 stall_timeout: float = STALL_TIMEOUT,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        if stall_timeout <= 0:
            raise ValueError("stall_timeout must be > 0")
        self.client = client
        self.resource = resource
        self._emit = emit
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.stall_timeout = stall_timeout
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        self.resource_version = ""
        self._rv_unavailable = False  # the last list got 410: next, a consistent read
        self.lists = 0  # completed lists (the first one and every relist)
        # What was last delivered of each object (for resync); guarded by _emit_lock,
        # which is also held while emitting, so the queue's order is the cache's.
        self._cache: dict[NamespacedName, Update] = {}
        self._emit_lock = threading.Lock()
        self.stalls = 0  # watches given up for showing no life within stall_timeout

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self.run, daemon=True,
                                        name=f"informer-{self.resource.kind}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """List, then watch until something goes wrong; back off; watch again from the
        last resourceVersion after a transport failure, relist after any other."""
        kind = self.resource.kind
        listed = False
        while not self._stop.is_set():
            try:
                if not listed:
                    self._list()
                    listed = True
                while not self._stop.is_set():
                    self._watch_once()
            except GoneError as err:
                listed = False
                log.info("%s watch: %s; relisting", kind, err)
            except TransportError as err:
                if self._stop.is_set():
                    return
                if isinstance(err, WatchStalled):
                    self.stalls += 1
                log.warning("%s informer: %s; %s", kind, err,
                            f"watching again from resourceVersion {self.resource_version}"
                            if listed else "listing again")
            except ClientError as err:
                listed = False
                if self._stop.is_set():
                    return
                log.warning("%s informer: %s; relisting", kind, err)
            except Exception:  # a bug: keep the proxy alive, and say where
                listed = False
                log.exception("%s informer failed; relisting", kind)
            self._stop.wait(self._backoff.next())

    def resync(self) -> int:
        """Deliver every object held again, as an update (in key order); how many.
        Safe from any thread. Nothing before the first list."""
        with self._emit_lock:
            held = sorted(self._cache.values(), key=lambda u: u.key)
            for update in held:
                self._emit(replace(update, trigger_time=None) if update.trigger_time
                           else update)
        return len(held)

    def relist_resource_version(self) -> str:
        """client-go's choice: "0" first (the watch cache), then "not older than" the
        last seen, "" (a consistent read) after the list itself got 410."""
        if self._rv_unavailable:
            return ""
        return self.resource_version or "0"

    def _list(self) -> None:
        res = self.resource
        rv = self.relist_resource_version()
        # As client-go: a relist at a resourceVersion goes unpaged, so that the watch
        # cache can serve it (a paged one at a resourceVersion must be exact: etcd).
        page_size = 0 if rv not in ("", "0") else self.page_size
        try:
            converted, rv = self.client.list_converted(
                res.path, self._update, label_selector=res.label_selector,
                field_selector=res.field_selector, page_size=page_size, resource_version=rv)
        except GoneError:
            self._rv_unavailable = True
            raise
        self._rv_unavailable = False
        updates = [u for u in converted if u is not None]
        self.resource_version = rv
        self.lists += 1
        with self._emit_lock:
            self._cache = {u.key: u for u in updates}
            self._emit(Replace(res.kind, tuple(updates)))

    def _update(self, obj: Obj) -> Update | None:
        update = to_update(self.resource.kind, obj)
        if update is None:
            log.warning("%s %s: metadata.name: missing; ignored", self.resource.kind,
                        object_ref(obj))
        return update

    def _watch_once(self) -> None:
        """One watch request, from the current resourceVersion to the stream's end."""
        res = self.resource
        stream = self.client.watch(res.path, resource_version=self.resource_version,
                                   timeout_seconds=self._rng.randint(*self.watch_timeout),
                                   label_selector=res.label_selector,
                                   field_selector=res.field_selector,
                                   stall_timeout=self.stall_timeout)
        with self._lock:
            self._stream = stream
        if self._stop.is_set():
            stream.close()
        try:
            with stream:
                for event in stream:
                    self._handle(event)
        finally:
            with self._lock:
                self._stream = None
        self._backoff.reset()  # a watch that ended normally: the server is fine

    def _handle(self, event: Obj) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            raise (GoneError if code == 410 else StatusError)(
                code if isinstance(code, int) else 500, str(obj.get("reason") or "Error"),
                str(obj.get("message") or ""))
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            log.warning("%s watch: unknown event type %r ignored", self.resource.kind, kind)
            return
        if kind != "BOOKMARK":
            update = to_update(self.resource.kind, obj, deleted=kind == "DELETED")
            if update is None:
                log.warning("%s %s: metadata.name: missing; ignored", self.resource.kind,
                            object_ref(obj))
            else:
                with self._emit_lock:
                    if update.obj is None and update.error is None:
                        self._cache.pop(update.key, None)
                    else:
                        self._cache[update.key] = update
                    self._emit(update)
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        self._backoff.reset()
