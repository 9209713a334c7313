"""One watch stream: the events a watcher should see, as newline-delimited JSON lines.

`stream` is a generator the HTTP edge drains into a chunked response. Without a
resourceVersion (or with "0") it starts with synthetic ADDED events for what exists, like
kube-apiserver; `sendInitialEvents=true` does the same and then marks the end with a
BOOKMARK annotated `k8s.io/initial-events-end: "true"` (the watch-list protocol). From a
resourceVersion it replays the store's history after it; one that is too old produces a
single ERROR event carrying a 410 Expired Status, after which the stream ends, which is
what tells informers to relist. With `allowWatchBookmarks=true` a BOOKMARK carrying the
current resourceVersion is sent every `bookmark_interval` seconds. The stream ends at
`timeoutSeconds` or when the hub closes. It yields None whenever it wakes with nothing to
send, so the edge can notice a client that went away.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.selectors import FieldSelector, LabelSelector
from kubeproxy.apiserver.storage import WatchEvent
from kubeproxy.apiserver.store import Store

Obj = dict[str, Any]
Render = Callable[[Obj], Obj]  # object -> what goes in the event (Table, metadata, as-is)


@dataclass(frozen=True)
class WatchRequest:
    resource: Resource
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    resource_version: int | None  # None: start with the current state
    timeout: float
    bookmarks: bool
    initial_events_end: bool  # sendInitialEvents=true: mark the end of the initial state


def _line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _bookmark(res: Resource, rv: int, end_of_initial: bool = False) -> bytes:
    meta: Obj = {"resourceVersion": str(rv)}
    if end_of_initial:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return _line("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta})


def stream(hub: Hub, req: WatchRequest, render: Render, *, bookmark_interval: float,
           monotonic: Callable[[], float] = time.monotonic) -> Iterator[bytes | None]:
    res = req.resource
    start = monotonic()
    deadline = start + req.timeout

    def initial(store: Store) -> tuple[list[WatchEvent], int]:
        return store.initial_events(res, req.namespace, req.labels, req.fields), \
            store.resource_version

    if req.resource_version is None:
        events, cursor = hub.call(initial)
        for event in events:
            yield _line(event.type, render(event.obj))
        if req.initial_events_end:
            yield _bookmark(res, cursor, end_of_initial=True)
    else:
        cursor = req.resource_version
    last_bookmark = start
    while not hub.closed:
        def since(store: Store, after: int = cursor) -> tuple[list[WatchEvent], int]:
            return (store.events_since(res, req.namespace, after, req.labels, req.fields),
                    store.resource_version)

        try:
            events, cursor = hub.call(since)
        except ApiError as exc:
            yield _line("ERROR", exc.to_status())
            return
        for event in events:
            yield _line(event.type, render(event.obj))
        now = monotonic()
        if req.bookmarks and now - last_bookmark >= bookmark_interval:
            yield _bookmark(res, cursor)
            last_bookmark = now
        if now >= deadline:
            return
        if not events:
            yield None
        wake = min(deadline, last_bookmark + bookmark_interval if req.bookmarks else deadline)
        hub.wait(cursor, min(1.0, max(0.0, wake - now)))
