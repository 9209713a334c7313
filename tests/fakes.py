"""Fakes shared by several test modules.

``FakeClock`` is the injected clock of the sync loop and the API store: a callable
returning seconds, which moves only when a test moves it, so no test sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    """A wall clock that stands still until told: ``clock()`` is ``clock.now``."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
