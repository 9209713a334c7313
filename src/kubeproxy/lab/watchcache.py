"""A cache of one kind of raw API object, kept current by list + watch (the agent's eyes).

Like client-go's reflector and the proxy's own informers (``sources/informer.py``), but
the agent wants the raw objects, so nothing is decoded: one thread lists the kind, then
watches from the list's resourceVersion with bookmarks; ADDED / MODIFIED / DELETED
events change the cache, a BOOKMARK only moves ``resource_version`` forward, a 410 Gone
or a broken stream means a fresh list after a short pause. After every change it calls
``notify(kind, changed)`` (``changed`` False for a bookmark), which wakes the agent.

The lab's API server sends a bookmark every 0.2 s, so a watch that shows nothing for
``STALL_TIMEOUT`` is hung (an API server stopped, not closed): the cache gives it up and
lists again, like any broken stream. An API server that restarted (on the same port,
with the same objects) is found the same way: its streams end, requests fail until it
is back, then the cache watches again from its resourceVersion (or lists again).
``connections`` counts the lists and watches the server answered, which is how ``lab
restart-apiserver`` knows the agent has reconnected.

``resource_version`` is how far the cache has seen: every change to this kind up to it
is in the cache; ``progress`` pairs it with a count of changes, so that the agent can
tell "seen, and acted on" from "seen, not yet acted on". The lab's API server sends
bookmarks every fraction of a second, so it follows the API's resourceVersion closely
even for a kind that does not change, which is what lets the convergence wait ask "has
the agent acted on everything up to R?".
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.processes import time_scale
from kubeproxy.sources.client import ClientError, WatchStream
from kubeproxy.util.jsontypes import JSON

log = logging.getLogger("kubeproxy.lab.watchcache")
WATCH_TIMEOUT = 300
RETRY_DELAY = 0.5
STALL_TIMEOUT = 5.0  # seconds without an event or a bookmark (sent every 0.2 s): hung

Key = tuple[str, str]  # (namespace or "", name)
Notify = Callable[[str, bool], None]


@dataclass(frozen=True)
class Snapshot:
    """The cache at one moment: its objects, how far it had seen, how many changes."""

    items: list[JSON]
    resource_version: int
    changes: int


def key_of(obj: JSON) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class WatchCache:
    def __init__(self, api: LabApi, kind: str, notify: Notify) -> None:
        self.api = api
        self.kind = kind
        self._notify = notify
        self._lock = threading.Lock()
        self._cache: dict[Key, JSON] = {}
        self._rv = 0
        self._changes = 0  # counts lists and ADDED/MODIFIED/DELETED events
        self._connections = 0  # lists and watches the server answered
        self._synced = False
        self._stopping = threading.Event()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)

    # ---- what the agent reads

    def snapshot(self) -> Snapshot:
        with self._lock:
            items = [copy.deepcopy(o) for _, o in sorted(self._cache.items())]
            return Snapshot(items, self._rv, self._changes)

    def progress(self) -> tuple[int, int]:
        """(resourceVersion seen, number of cache changes so far), read together."""
        with self._lock:
            return self._rv, self._changes

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._synced

    # ---- life

    def start(self) -> WatchCache:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._list()
                while not self._stopping.is_set():
                    self._watch_once()
            except (LabApiError, ClientError) as exc:
                if self._stopping.is_set():
                    return
                log.info("%s: %s; listing again", self.kind, exc)
                self._stopping.wait(RETRY_DELAY)

    def _list(self) -> None:
        items, rv = self.api.list(self.kind)
        with self._lock:
            self._cache = {key_of(o): o for o in items}
            self._rv = int(rv or 0)
            self._changes += 1
            self._connections += 1
            self._synced = True
        self._notify(self.kind, True)

    def _watch_once(self) -> None:
        stream = self.api.watch(
            self.kind, str(self.resource_version), WATCH_TIMEOUT, STALL_TIMEOUT * time_scale()
        )
        self._stream = stream
        with self._lock:
            self._connections += 1
        with stream:
            for event in stream:
                if self._stopping.is_set():
                    return
                self._handle(event)

    def _handle(self, event: JSON) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            raise LabApiError(code, str(obj.get("reason") or ""), str(obj.get("message") or ""))
        rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
        changed = kind != "BOOKMARK"
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                obj.setdefault("kind", self.kind)
                self._cache[key_of(obj)] = obj
            elif kind == "DELETED":
                self._cache.pop(key_of(obj), None)
            self._rv = max(self._rv, rv)
            self._changes += changed
        self._notify(self.kind, changed)
