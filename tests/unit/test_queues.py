"""drain(): block for the first item (up to the timeout), then take what is queued.

Threads only where the case is about blocking: a putter thread whose put lands while
drain is waiting. Timeouts are short and asserted from below only (drain waited at
least that long), so a slow machine cannot make a case fail.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from kubeproxy.util.queues import drain

# (id, items queued before drain, timeout, expected batch)
CASES = [
    ("empty-no-wait", [], 0.0, []),
    ("empty-short-wait", [], 0.01, []),
    ("one", [1], 0.0, [1]),
    ("all-queued-in-order", [1, 2, 3], 0.0, [1, 2, 3]),
    ("all-queued-no-timeout", [1, 2, 3], None, [1, 2, 3]),
    ("none-is-an-item", [None, 1], 0.0, [None, 1]),
]


@pytest.mark.parametrize(
    ("queued", "timeout", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_drain(queued: list[int | None], timeout: float | None, want: list[int | None]) -> None:
    q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for item in queued:
        q.put(item)
    assert drain(q, timeout) == want
    assert q.empty()  # everything queued was taken


def test_empty_queue_waits_for_the_timeout() -> None:
    q: queue.SimpleQueue[int] = queue.SimpleQueue()
    start = time.monotonic()
    assert drain(q, 0.05) == []
    assert time.monotonic() - start >= 0.05


def test_blocks_until_the_first_item_then_does_not_wait_for_more() -> None:
    q: queue.SimpleQueue[int] = queue.SimpleQueue()

    def put_two() -> None:
        q.put(1)
        q.put(2)

    later = threading.Timer(0.05, put_two)
    later.start()
    try:
        start = time.monotonic()
        batch = drain(q, None)  # no timeout: only the put can end the wait
        waited = time.monotonic() - start
    finally:
        later.join()
    assert waited >= 0.04
    # The Timer puts 1 then 2; drain may wake between them. Either way nothing is lost
    # and the order holds.
    assert batch + drain(q, 0.0) == [1, 2]


def test_items_put_after_drain_returned_wait_for_the_next_one() -> None:
    q: queue.SimpleQueue[str] = queue.SimpleQueue()
    q.put("a")
    assert drain(q, 0.0) == ["a"]
    q.put("b")
    assert drain(q, 0.0) == ["b"]
