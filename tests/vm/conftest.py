"""Guest tests: each one boots a throwaway QEMU guest through tools/vmrun.

The ``vm`` marker (registered here) labels them; ``tag`` gives a test its own
environment tag, and after the test no process carrying it (vmrun, qemu) may be left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.vm.guest import live_processes, new_tag, require_guest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a throwaway QEMU guest via tools/vmrun (see docs/vm.md)"
    )


@pytest.fixture
def tag() -> Iterator[str]:
    """This test's tag for run_in_guest; fails the test if a tagged process outlives it."""
    require_guest()
    value = new_tag()
    yield value
    deadline = time.monotonic() + 5  # a SIGKILLed parent's child needs a moment to die
    while (left := live_processes(value)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # ours (tagged); then fail the test
    assert not left, f"processes left behind by the test (PIDs): {left}"
