"""The sync loop with a fake clock and a strict fake data plane: no sleeping anywhere.

The fake data plane keeps its own "kernel": per service, what it was last given. A full
sync replaces all of it; a partial sync may only rewrite the services it is told about.
After every successful sync the kernel must equal the cluster, so a partial sync that
forgets a changed service shows up as a mismatch, not as a passing test.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Cluster, NamespacedName, Service
from kubeproxy.sync import CHECK_PERIOD, FULL_SYNC_PERIOD, SyncLoop, SyncReport, SyncResult
from kubeproxy.tracker import Kind, Tracker, Update
from tests.builders import NODE
from tests.fakes import FakeClock
from tests.unit.test_tracker import eps, gone, nd, svc

MIN, PERIOD = 1.0, 30.0


@dataclass
class Call:
    at: float
    changed: frozenset[NamespacedName] | None  # None: full, recomputed from scratch
    write_all: bool = False  # full: everything written, only ``changed`` recomputed


@dataclass
class StrictDataPlane:
    clock: FakeClock
    kernel: dict[NamespacedName, object] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    fail: int = 0  # fail the next n syncs (all or nothing, as iptables-restore)
    flushed: bool = False  # someone emptied the kernel; only a full sync restores it
    checks: list[float] = field(default_factory=list)  # when intact() was asked

    def flush(self) -> None:
        """Someone else empties our rules (``iptables -t nat -F``, ``nft delete table``)."""
        self.kernel = {}
        self.flushed = True

    def intact(self) -> bool:
        self.checks.append(self.clock.now)
        return not self.flushed

    def sync(self, cluster: Cluster, changed: frozenset[NamespacedName] | None, *,
             write_all: bool = False) -> SyncReport:
        if self.calls:
            assert self.clock.now - self.calls[-1].at >= MIN, "synced faster than minSyncPeriod"
        self.calls.append(Call(self.clock.now, changed, write_all))
        if changed is not None and not write_all:
            assert changed, "a partial sync must name the services it rewrites"
            assert any(c.changed is None for c in self.calls), "partial before any full sync"
        if self.fail:
            self.fail -= 1
            raise DataPlaneError("iptables-restore: line 7 failed")
        want = state_of(cluster)
        if changed is None or write_all:
            self.kernel = want
            self.flushed = False
        else:
            for name in changed:
                if name in want:
                    self.kernel[name] = want[name]
                else:
                    self.kernel.pop(name, None)
        self.clock.now += 0.05  # a sync takes time
        return SyncReport()


def state_of(cluster: Cluster) -> dict[NamespacedName, object]:
    """Per service: its spec and its endpoints (what its chains depend on)."""
    out: dict[NamespacedName, object] = {}
    services: dict[NamespacedName, Service] = {s.ref: s for s in cluster.services}
    for ref in services.keys() | {e.service for e in cluster.slices}:
        out[ref] = (services.get(ref),
                    sorted((e.name, e.endpoints) for e in cluster.slices if e.service == ref),
                    cluster.nodes)
    return out


@dataclass
class Rig:
    clock: FakeClock
    tracker: Tracker
    plane: StrictDataPlane
    loop: SyncLoop
    results: list[SyncResult] = field(default_factory=list)

    def feed(self, *updates: Update) -> None:
        for update in updates:
            if self.tracker.update(update):
                self.loop.trigger()

    def list_done(self, *, services: list[Update] | None = None,
                  slices: list[Update] | None = None,
                  nodes: Sequence[Update] | None = ()) -> None:
        """The initial lists that finished (None: not yet); the Node's is done (empty)
        unless a test says otherwise."""
        lists: tuple[tuple[Kind, list[Update] | None], ...] = (
            ("Service", services), ("EndpointSlice", slices),
            ("Node", None if nodes is None else list(nodes)))
        for kind, items in lists:
            if items is not None:
                changed = self.tracker.replace(kind, items)
                self.loop.initial_list_done(kind)
                if changed:
                    self.loop.trigger()

    def advance(self, seconds: float) -> None:
        """What the daemon does: sleep until the next deadline (a run or a flush
        check), run if due, check if due, repeat."""
        end = self.clock.now + seconds
        while True:
            run, check = self.loop.next_run(), self.loop.next_check()
            due = min((d for d in (run, check) if d is not None), default=None)
            if due is None or due > end:
                break
            self.clock.now = max(self.clock.now, due)
            result = self.loop.run_if_due()
            assert (result is not None) == (run is not None and run <= self.clock.now)
            if result is not None:
                self.results.append(result)
                if result.ok and not self.plane.flushed:  # a partial run cannot repair
                    assert self.plane.kernel == state_of(self.tracker.cluster())
            if self.loop.check_due():
                self.loop.checked(self.plane.intact())
        self.clock.now = max(self.clock.now, end)

    def kinds(self) -> list[str]:
        return ["full" if c.changed is None or c.write_all
                else ",".join(sorted(map(str, c.changed))) for c in self.plane.calls]


def rig(**kw: float) -> Rig:
    clock = FakeClock()
    tracker = Tracker(NODE)
    plane = StrictDataPlane(clock)
    loop = SyncLoop(tracker, plane, clock, **{"min_sync_period": MIN, "sync_period": PERIOD,
                                              **kw})
    return Rig(clock, tracker, plane, loop)


def started(**kw: float) -> Rig:
    r = rig(**kw)
    r.list_done(services=[svc("a"), svc("b", "172.30.0.42")],
                slices=[eps("a-1", "a", "10.180.0.1")])
    r.advance(0)
    assert r.kinds() == ["full"]
    return r


def test_nothing_is_written_before_all_initial_lists() -> None:
    r = rig()
    r.feed(svc("early"))
    r.list_done(services=[svc("a")], nodes=None)
    r.advance(100)
    assert r.plane.calls == [] and r.loop.next_run() is None
    r.list_done(slices=[], nodes=None)
    r.advance(100)
    assert r.plane.calls == [], "the Node's list is still running (upstream waits for it)"
    r.list_done()
    r.advance(0)
    assert r.kinds() == ["full"], "the first sync follows the last list at once"


def test_a_change_waits_for_min_sync_period_then_is_partial() -> None:
    r = started()
    t0 = r.plane.calls[0].at
    r.clock.now = t0 + 0.3
    r.feed(eps("a-1", "a", "10.180.0.2"))
    assert r.loop.next_run() == t0 + MIN
    assert r.loop.run_if_due() is None
    r.advance(0.8)
    assert r.kinds() == ["full", "ns1/a"]
    assert r.plane.calls[1].at == t0 + MIN


def test_repeated_triggers_coalesce_into_one_partial_sync() -> None:
    r = started()
    for i in range(20):
        r.feed(eps("a-1", "a", f"10.180.0.{i + 2}"), svc(f"s{i}", f"172.30.1.{i}"))
        r.advance(0.04)
    r.advance(2)
    assert len(r.plane.calls) == 2
    changed = r.plane.calls[1].changed
    assert changed is not None and len(changed) == 21


def test_a_full_resync_every_full_sync_period_without_changes() -> None:
    r = started(full_sync_period=PERIOD)
    r.advance(PERIOD * 3 + 1)
    assert r.kinds() == ["full"] * 4
    gaps = [b.at - a.at for a, b in itertools.pairwise(r.plane.calls)]
    assert all(g == pytest.approx(PERIOD) for g in gaps)


def test_partial_syncs_do_not_push_the_periodic_full_sync_back() -> None:
    r = started(full_sync_period=PERIOD)
    for _ in range(40):
        r.feed(svc("a", port=81 + len(r.plane.calls)))
        r.advance(1)
    fulls = [c.at for c in r.plane.calls if c.changed is None]
    assert len(fulls) == 2 and fulls[1] - fulls[0] == pytest.approx(PERIOD, abs=MIN)


def test_upstream_cadence_partial_every_sync_period_full_every_hour() -> None:
    r = started()
    assert r.loop.full_sync_period == FULL_SYNC_PERIOD == 3600.0
    r.advance(PERIOD * 2 + 1)
    assert r.kinds() == ["full"], "periodic runs with nothing changed do not call the plane"
    assert [x.skipped for x in r.results] == [False, True, True]
    r.feed(svc("c", "172.30.0.43"))
    r.advance(FULL_SYNC_PERIOD)
    assert r.kinds() == ["full", "ns1/c", "full"]
    # The first periodic run once the hour is over: up to one sync_period late.
    assert FULL_SYNC_PERIOD <= r.plane.calls[2].at - r.plane.calls[0].at \
        <= FULL_SYNC_PERIOD + PERIOD


def test_a_failed_sync_is_retried_as_a_full_one_with_a_back_off() -> None:
    r = started(min_sync_period=0.0)
    r.plane.fail = 3
    r.clock.now += 5
    r.feed(svc("c", "172.30.0.43"))
    r.advance(0)
    assert r.results[-1].error is not None and "iptables-restore" in r.results[-1].error
    # min_sync_period 0 does not make a hot loop: 1 s, then 2 s, then 4 s.
    for retry_in in (1.0, 2.0, 4.0):
        start = r.plane.calls[-1].at
        assert r.results[-1].retry_in == retry_in
        assert r.loop.next_run() == start + retry_in
        r.advance(retry_in - 0.01)
        assert r.plane.calls[-1].at == start, "not retried before the back-off"
        r.advance(0.01)
    assert r.kinds() == ["full", "ns1/c", "full", "full", "full"]
    assert r.results[-1].ok and r.results[-1].full
    assert r.results[-1].retry_in is None


def test_the_back_off_is_capped_at_sync_period_and_a_trigger_still_runs() -> None:
    r = started()
    r.plane.fail = 100
    r.clock.now += 5
    r.feed(svc("c", "172.30.0.43"))
    r.advance(200)
    gaps = [b.at - a.at for a, b in itertools.pairwise(r.plane.calls[1:])]
    assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and set(gaps[5:]) == {PERIOD}
    # A change does not wait for the retry: it runs (full) as soon as min_sync_period
    # allows, as upstream's runner does.
    assert r.clock.now - r.plane.calls[-1].at > MIN
    now = r.clock.now
    r.feed(svc("d", "172.30.0.44"))
    r.advance(0)
    last = r.plane.calls[-1]
    assert last.at == now and last.write_all
    assert last.changed == frozenset({NamespacedName("ns1", "d")})


def test_a_node_change_makes_the_next_sync_full() -> None:
    r = started()
    r.clock.now += 5
    r.feed(nd(zone="z1"))
    r.advance(1)
    assert r.kinds() == ["full", "full"]


def test_changes_that_cancel_out_do_not_call_the_data_plane() -> None:
    r = started()
    r.clock.now += 5
    r.feed(svc("a", port=99), svc("a"))
    r.advance(1)
    assert r.kinds() == ["full"]
    assert r.results[-1].skipped and r.loop.oldest_pending is None


def test_health_bookkeeping() -> None:
    r = rig()
    r.feed(svc("a"))
    assert r.loop.oldest_pending is None, "nothing is queued before the initial lists"
    r.list_done(services=[svc("a")], slices=[])
    ready_at = r.clock.now
    assert r.loop.oldest_pending == ready_at
    r.plane.fail = 1
    r.advance(0)
    assert r.loop.oldest_pending == ready_at and r.loop.last_success is None
    r.advance(MIN)
    assert r.loop.oldest_pending is None and r.loop.last_success == r.clock.now
    r.clock.now += 3
    r.feed(svc("b", "172.30.0.42"))
    assert r.loop.oldest_pending == r.clock.now


@pytest.mark.parametrize("seed", range(8))
def test_random_event_streams_converge(seed: int) -> None:
    """Any interleaving of events, failures and time: kernel == cluster after each success,
    syncs at least MIN apart (checked by the plane), never longer than PERIOD apart."""
    rng = random.Random(seed)
    r = started()
    for _ in range(300):
        choice = rng.random()
        name = f"s{rng.randrange(6)}"
        if choice < 0.3:
            r.feed(svc(name, f"172.30.2.{rng.randrange(6)}", rng.choice([80, 81])))
        elif choice < 0.6:
            r.feed(eps(f"{name}-{rng.randrange(2)}", rng.choice([name, "s0"]),
                       f"10.180.0.{rng.randrange(3)}"))
        elif choice < 0.7:
            r.feed(gone(rng.choice(["Service", "EndpointSlice"]), name))
        elif choice < 0.75:
            r.feed(Update("Node", NamespacedName("", NODE),
                          nd(zone=rng.choice(["z1", "z2"])).obj))
        elif choice < 0.8:
            r.plane.fail = 1
        r.advance(rng.choice([0.0, 0.1, 0.5, 1.0, 3.0]))
    r.advance(PERIOD)
    starts = [c.at for c in r.plane.calls]
    assert all(b - a <= PERIOD + 1e-9 for a, b in itertools.pairwise(starts))
    assert r.plane.kernel == state_of(r.tracker.cluster())
    assert any(c.changed is not None for c in r.plane.calls), "some syncs were partial"


# --- flush detection ------------------------------------------------------------------


def test_no_checks_before_the_first_sync() -> None:
    r = rig()
    r.list_done(services=[svc("a")])
    assert r.loop.next_check() is None
    r.advance(10)
    assert r.plane.checks == [] and r.loop.next_check() is None


def test_checks_run_every_check_period_between_syncs() -> None:
    r = started(full_sync_period=FULL_SYNC_PERIOD)
    t0 = r.clock.now
    r.advance(10.5)
    assert r.plane.checks == [pytest.approx(t0 + 0.05 + i) for i in range(1, 11)]
    assert r.kinds() == ["full"], "an intact plane is not rewritten"


def test_a_sync_postpones_the_next_check() -> None:
    r = started()
    r.clock.now += 0.5
    r.feed(svc("c", "172.30.0.43"))
    r.advance(1.6)
    assert r.kinds() == ["full", "ns1/c"]
    assert r.plane.checks == [pytest.approx(r.plane.calls[1].at + 0.05 + CHECK_PERIOD)]


@pytest.mark.parametrize("after", [0.01, 0.3, 0.99, 7.5])
def test_a_flush_is_found_and_repaired_by_a_full_sync(after: float) -> None:
    """Found at the next check (<= CHECK_PERIOD), repaired by a full run at once (the
    partial run the loop would otherwise do could not restore an emptied kernel: the
    plane's kernel == cluster check after each run would fail)."""
    r = started()
    r.clock.now += after
    flushed_at = r.clock.now
    r.plane.flush()
    r.advance(CHECK_PERIOD + MIN)
    assert r.kinds() == ["full", "full"]
    assert r.plane.calls[1].at - flushed_at <= CHECK_PERIOD + 1e-9
    assert r.plane.calls[1].at - r.plane.calls[0].at >= MIN, "minSyncPeriod still holds"
    r.advance(5)
    assert r.kinds() == ["full", "full"] and not r.plane.flushed
    # The views are still right: the repair writes everything, recomputing nothing.
    assert r.plane.calls[1].write_all and r.plane.calls[1].changed == frozenset()


def test_only_the_first_run_a_node_change_and_the_hourly_run_recompute_from_scratch() -> None:
    r = started(full_sync_period=PERIOD * 4)
    r.clock.now += 5
    r.feed(nd(zone="z1"))  # recomputed: node-level input
    r.advance(1)
    r.plane.flush()  # repaired: written whole, not recomputed
    r.advance(CHECK_PERIOD + MIN)
    r.advance(PERIOD * 4)  # the hourly run
    scratch = [c.changed is None for c in r.plane.calls]
    assert [c.changed is None or c.write_all for c in r.plane.calls] == [True] * 4
    assert scratch == [True, True, False, True], r.plane.calls


def test_a_partial_sync_does_not_hide_a_flush() -> None:
    """A partial run between the flush and the next check rewrites only its services;
    the check after it still finds the flush."""
    r = started()
    r.clock.now += 0.5
    r.plane.flush()
    r.clock.now += 0.4
    r.feed(svc("c", "172.30.0.43"))
    r.advance(MIN + CHECK_PERIOD)
    assert r.kinds() == ["full", "ns1/c", "full"]
    assert r.plane.calls[2].at == pytest.approx(r.plane.calls[1].at + 0.05 + CHECK_PERIOD)
    assert not r.plane.flushed


def test_a_failed_repair_is_retried() -> None:
    r = started()
    r.clock.now += 2.5
    r.plane.flush()
    r.plane.fail = 1
    r.advance(CHECK_PERIOD + MIN + 0.1)
    assert r.kinds() == ["full", "full", "full"]
    assert not r.results[-2].ok and r.results[-1].ok and not r.plane.flushed
