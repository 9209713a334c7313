"""Draining a work queue in batches: the event loops' one way of waiting.

The proxy daemon and the lab agent each run one thread that owns their state; other
threads (informers, timers, signal handlers) only put items on a ``queue.SimpleQueue``.
The owner waits for the first item, bounded by when its next timed work is due, then
takes whatever else is already queued without waiting, and handles the batch at once:
a burst of 1,000 updates costs one pass, not 1,000.
"""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def drain(q: queue.SimpleQueue[T], timeout: float | None) -> list[T]:
    """Block for the first item until ``timeout`` seconds (None: forever; 0: not at all),
    then take everything queued without blocking. Empty if nothing came in time."""
    items: list[T] = []
    try:
        items.append(q.get(timeout=timeout))
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items
