"""The sync loop: when to write rules, and whether to write all of them or a few.

Theory of operation
-------------------
This is upstream's BoundedFrequencyRunner plus the proxier's full/partial bookkeeping,
as a state machine its caller drives. The daemon folds events into the tracker and calls
:meth:`SyncLoop.trigger` when something changed; it sleeps until :meth:`SyncLoop.next_run`
(or until the next event) and then calls :meth:`SyncLoop.run_if_due`. Nothing here
sleeps or does I/O, and time comes from the injected clock, so tests drive hours of
fake time through the loop instantly.

The rules:

* Nothing is written before the initial lists of Services AND EndpointSlices are done
  (writing earlier would briefly REJECT every service whose slices are not listed yet).
* Runs start at least ``min_sync_period`` apart. A trigger asks for a run at the first
  allowed moment; triggers before that moment coalesce into that one run.
* Without triggers, a run happens ``sync_period`` after the previous one started.
* A run is *full* (the data plane makes all of its rules right and removes stale ones)
  when it is the first, when the previous one failed, when this Node changed, when the
  data plane found its rules changed from outside, or when ``full_sync_period`` (an
  hour, as upstream's ``FullSyncPeriod``) has passed since the last full one from
  scratch. Otherwise it is *partial*: the data plane gets only the services changed
  since the previous run; with none changed, the data plane is not called at all
  (upstream's cadence: partial runs every ``sync_period``, a full one every hour or
  after a failure). The node views are recomputed from scratch (``changed`` None) only
  on the first run, a Node change and the hourly one; after a failure or damage from
  outside the views are still right, so only the changed services are recomputed and
  the data plane is told to write everything (``write_all``): at 10,000 services that
  saves the ~1 s of recomputing and re-rendering every service from a repair.
* A failed run (DataPlaneError) is retried, full (the changes the failed run took from
  the tracker are covered that way), with a back-off: 1 s (or ``min_sync_period`` if
  longer) after it started, doubling with each failure in a row up to ``sync_period``
  (upstream retries after ``sync_period``; a back-off repairs a passing failure sooner
  without a hot loop when ``min_sync_period`` is 0). A trigger still runs at
  ``min_sync_period``, as upstream's runner does.
* Flush detection: between runs, once rules were written, the caller asks the data plane
  whether they are still intact (``DataPlane.intact()``) at :meth:`SyncLoop.next_check`,
  every ``check_period`` (1 s) after the last check or successful run, and reports the
  answer with :meth:`SyncLoop.checked`. A False answer (someone flushed a chain or
  deleted a table) is :meth:`SyncLoop.request_full`: a full run as soon as
  ``min_sync_period`` allows. So a flush is repaired within about ``check_period`` plus
  one full sync, instead of waiting for the hourly full sync.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Cluster, Family, NamespacedName
from kubeproxy.nodeview import NodeView
from kubeproxy.tracker import Changes, Kind, Tracker

Clock = Callable[[], float]  # monotonic seconds
FULL_SYNC_PERIOD = 3600.0  # upstream's proxyutil.FullSyncPeriod
RETRY_FIRST = 1.0  # seconds before the first retry of a failed run (then doubling)
CHECK_PERIOD = 1.0  # how often the data plane is asked whether its rules are intact


@dataclass(frozen=True)
class SyncReport:
    """What a data plane tells the loop about a successful sync (for metrics)."""

    # Per family, (internal, external): service ports whose Local traffic policy leaves
    # this node without endpoints (nodeview.no_local_endpoints).
    no_local: Mapping[Family, tuple[int, int]] = field(default_factory=dict)
    # The node views the sync wrote (conntrack cleanup and health-check ports follow them).
    views: Mapping[Family, NodeView] = field(default_factory=dict)


class Syncer(Protocol):
    """Renders the cluster and writes it; ``changed`` None = full sync
    (:class:`kubeproxy.proxier.Proxier`, or a test's fake)."""

    def sync(self, cluster: Cluster, changed: frozenset[NamespacedName] | None, *,
             write_all: bool = False) -> SyncReport:
        """``changed`` None: recompute and write everything. A set: recompute those
        services; write them alone, or everything with ``write_all``."""


@dataclass(frozen=True)
class SyncResult:
    started: float  # monotonic
    duration: float
    full: bool
    changes: Changes  # what the tracker reported for this run
    service_count: int  # services rendered (all of them, on partial syncs too)
    report: SyncReport | None = None  # None when the run failed or was skipped
    error: str | None = None
    retry_in: float | None = None  # failed: seconds from its start to the retry

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def skipped(self) -> bool:
        """A partial run with nothing changed: the data plane was not called."""
        return self.ok and self.report is None

    @property
    def changed(self) -> frozenset[NamespacedName]:
        return self.changes.services


class SyncLoop:
    def __init__(self, tracker: Tracker, proxier: Syncer, clock: Clock, *,
                 min_sync_period: float = 1.0, sync_period: float = 30.0,
                 full_sync_period: float = FULL_SYNC_PERIOD,
                 check_period: float = CHECK_PERIOD) -> None:
        if sync_period <= 0 or min_sync_period < 0 or check_period <= 0:
            raise ValueError("sync_period and check_period must be > 0 and "
                             "min_sync_period >= 0")
        self._tracker = tracker
        self._proxier = proxier
        self._clock = clock
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.full_sync_period = full_sync_period
        self.check_period = check_period
        self._last_check: float | None = None
        self._synced: set[Kind] = set()
        self._ready_at: float | None = None
        self._last_start: float | None = None
        self._last_full: float | None = None
        self._wanted = False  # a trigger since the last run started
        self._needs_full = True
        self._failures = 0  # failed runs in a row
        self._retry_at: float | None = None  # after a failure: when to run again
        self.oldest_pending: float | None = None  # first trigger not yet written (healthz)
        self.last_success: float | None = None  # end of the last successful run

    # --- inputs -------------------------------------------------------------------

    def initial_list_done(self, kind: Kind) -> None:
        """A source finished its first list; rules may be written once all three are done
        (the Node too, as upstream waits for its Node: without it, NodePort addresses
        (``primary``), the local-traffic detector and topology would be written wrong
        for a moment)."""
        self._synced.add(kind)
        if self._ready_at is None and self.ready:
            self._ready_at = self._clock()
            self.oldest_pending = self._ready_at

    def trigger(self) -> None:
        """Something changed in the tracker: ask for a run (coalesced)."""
        self._wanted = True
        if self.ready and self.oldest_pending is None:
            self.oldest_pending = self._clock()

    @property
    def ready(self) -> bool:
        return {"Service", "EndpointSlice", "Node"} <= self._synced

    # --- scheduling ---------------------------------------------------------------

    def next_run(self) -> float | None:
        """When the next run is due (monotonic); None while the initial lists are running."""
        if self._ready_at is None:
            return None
        if self._last_start is None:
            return self._ready_at
        due = self._last_start + self.sync_period
        if self._wanted:
            due = min(due, self._last_start + self.min_sync_period)
        if self._retry_at is not None:
            due = min(due, self._retry_at)
        return due

    def next_check(self) -> float | None:
        """When the data plane should next be asked whether its rules are intact; None
        before anything was written and while a full run is wanted anyway."""
        if self.last_success is None or self._needs_full:
            return None
        return max(self.last_success, self._last_check or 0.0) + self.check_period

    def check_due(self) -> bool:
        due = self.next_check()
        return due is not None and self._clock() >= due

    def checked(self, intact: bool) -> None:
        """The caller asked the data plane (``DataPlane.intact()``); False: its rules
        were changed from outside, so a full run follows."""
        self._last_check = self._clock()
        if not intact:
            self.request_full()

    def request_full(self) -> None:
        """Make the next run full and due as soon as ``min_sync_period`` allows."""
        self._needs_full = True
        self._wanted = True

    def run_if_due(self) -> SyncResult | None:
        due = self.next_run()
        now = self._clock()
        if due is None or now < due:
            return None
        return self._run(now)

    # --- running ------------------------------------------------------------------

    def _run(self, start: float) -> SyncResult:
        changes = self._tracker.apply()
        recompute = (changes.full or self._last_full is None
                     or start - self._last_full >= self.full_sync_period)
        full = recompute or self._needs_full
        self._last_start = start
        self._wanted = False
        cluster = self._tracker.cluster()
        count = len(cluster.services)
        if not full and not changes.services:
            self._succeeded(start, False)
            return SyncResult(start, 0.0, False, changes, count)
        try:
            report = self._proxier.sync(cluster, None if recompute else changes.services,
                                        write_all=full)
        except DataPlaneError as err:
            self._needs_full = True
            self._failures += 1
            retry_in = min(self.sync_period, max(self.min_sync_period, RETRY_FIRST)
                           * 2 ** (self._failures - 1))
            self._retry_at = start + retry_in
            return SyncResult(start, self._clock() - start, full, changes, count,
                              error=str(err), retry_in=retry_in)
        self._succeeded(start, recompute)
        return SyncResult(start, self._clock() - start, full, changes, count, report)

    def _succeeded(self, start: float, recomputed: bool) -> None:
        self._needs_full = False
        self._failures = 0
        self._retry_at = None
        if recomputed:
            self._last_full = start
        self.oldest_pending = None
        self.last_success = self._clock()
