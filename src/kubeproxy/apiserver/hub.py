"""The one place where threads meet the store: a lock, and a condition watchers sleep on.

The store itself is single-threaded and pure. Every request thread goes through
`Hub.call`, which runs a function on the store under the lock and wakes all sleeping
watchers if the resourceVersion moved. Watch streams call `wait` with the last
resourceVersion they have seen; `close` wakes everyone for shutdown. `on_change` (the
snapshot writer, when there is one) runs under the same lock after every change, so
snapshots are written in order and a change is on disk before its request is answered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from kubeproxy.apiserver.store import Store

T = TypeVar("T")


class Hub:
    def __init__(self, store: Store, on_change: Callable[[Store], None] | None = None
                 ) -> None:
        self._store = store
        self._on_change = on_change
        self._cond = threading.Condition()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, fn: Callable[[Store], T]) -> T:
        with self._cond:
            before = self._store.resource_version
            try:
                return fn(self._store)
            finally:
                if self._store.resource_version != before:
                    if self._on_change is not None:
                        self._on_change(self._store)
                    self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the resourceVersion passes `seen`, `timeout` elapses or close()."""
        with self._cond:
            if not self._closed and self._store.resource_version == seen and timeout > 0:
                self._cond.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
