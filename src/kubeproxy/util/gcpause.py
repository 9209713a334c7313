"""Pausing the cyclic garbage collector around large, cycle-free allocations.

A render (or an nftables batch encode) allocates ~10 objects per endpoint and no
reference cycles; with the collector running, each generation-0 threshold crossing
rescans the ever-growing young objects, which doubled the time of a 10,000-service
render (bench/render.py). Pausing it is safe: nothing cyclic is built meanwhile, and the
collector runs again as soon as the block ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (re-enabled only if it was enabled)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
