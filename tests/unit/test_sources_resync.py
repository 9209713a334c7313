"""configSyncPeriod: informers re-deliver what they hold, every period (0: never).

Upstream's shared informers are built with ``configSyncPeriod`` as their resync period:
every period each cached object is handed to the handlers again as an update (old ==
new), and the proxier's change trackers find nothing changed. Here the informer keeps
what it last delivered (``Informer.resync``) and the daemon calls it on its own
injected clock. The informer runs against the strict fake API server of
test_informer.py (every request scripted); the daemon's timing runs on ``FakeClock``.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.app.daemon import Daemon
from kubeproxy.config.types import ProxyConfig
from kubeproxy.errors import ConfigError, InvalidObject
from kubeproxy.health.server import Health, Metrics
from kubeproxy.model import NamespacedName, Node
from kubeproxy.proxier import Proxier
from kubeproxy.sources.client import Client
from kubeproxy.sources.informer import Replace
from kubeproxy.sources.kubeconfig import ClusterAccess
from kubeproxy.tracker import Update
from kubeproxy.util.queues import drain
from tests.fakes import FakeClock
from tests.unit.test_informer import (
    LIST0,
    Expect,
    MakeFake,
    Reply,
    Sink,
    ev,
    fake,
    informer,
    items_list,
    svc_obj,
    watch_q,
)

__all__ = ["fake"]  # the strict fake API server fixture, shared with test_informer.py


def ports(update: Update) -> list[int]:
    assert update.obj is not None and update.kind == "Service"
    return [p.port for p in update.obj.ports]  # type: ignore[union-attr]


def test_resync_delivers_every_held_object_again(fake: MakeFake) -> None:
    bad = svc_obj("bad", "3")
    bad["spec"]["ports"][0]["port"] = 0  # invalid: reported, held, reported again
    api = fake([
        Expect("/api/v1/services", LIST0,
               Reply(body=items_list("5", svc_obj("a", "4"), svc_obj("b", "4"), bad))),
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("MODIFIED", svc_obj("a", "6", port=81)),
                             ev("ADDED", svc_obj("c", "7")),
                             ev("DELETED", svc_obj("b", "8"))], hold=True)),
    ])
    sink = Sink()
    inf = informer(Client(ClusterAccess(api.url)), sink)
    assert inf.resync() == 0 and sink.items == [], "nothing before the first list"
    inf.start()
    try:
        sink.wait(lambda: len(sink.items) == 4)
        before = sink.tracker.cluster()
        sink.tracker.apply()
        assert inf.resync() == 3
        with sink.cond:
            again = sink.items[4:]
    finally:
        inf.stop()
    assert all(isinstance(u, Update) for u in again)
    got = [(u.key.name, u.obj is not None, u.error is not None)
           for u in again if isinstance(u, Update)]
    assert got == [("a", True, False), ("bad", False, True), ("c", True, False)]
    assert ports(again[0]) == [81], "the last version delivered, not the listed one"  # type: ignore[arg-type]
    assert sink.tracker.cluster() == before and sink.tracker.apply().empty, \
        "re-delivered unchanged objects change nothing (upstream: no sync)"


def test_resync_after_a_relist_holds_only_the_new_list(fake: MakeFake) -> None:
    api = fake([
        Expect("/api/v1/services", LIST0,
               Reply(body=items_list("5", svc_obj("a", "4"), svc_obj("b", "4")))),
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("ERROR", {"kind": "Status", "code": 410,
                                          "reason": "Expired", "message": "too old"})])),
        Expect("/api/v1/services", {"labelSelector": LIST0["labelSelector"],
                                    "resourceVersion": "5"},
               Reply(body=items_list("9", svc_obj("b", "9", port=82)))),
        Expect("/api/v1/services", watch_q("9"), Reply(events=[], hold=True)),
    ])
    sink = Sink()
    inf = informer(Client(ClusterAccess(api.url)), sink).start()
    try:
        sink.wait(lambda: inf.lists == 2 and api.served == 4)
        assert inf.resync() == 1
        with sink.cond:
            last = sink.items[-1]
    finally:
        inf.stop()
    assert isinstance(last, Update) and last.key.name == "b" and ports(last) == [82]


# --- the daemon's side: when, on an injected clock --------------------------------


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return 7


def daemon(clock: Callable[[], float], resync: Callable[[], int] | None, period: float,
           **kw: Any) -> Daemon:
    config = ProxyConfig(hostname="node1", config_sync_period=period, **kw)
    mode = modes.get(config.mode)
    return Daemon(config, Proxier(mode, config, mode.fake()), health=Health(60.0),
                  metrics=Metrics(config.mode), clock=clock, resync=resync)


@pytest.mark.parametrize(("period", "times", "calls", "next_at"), [
    # (configSyncPeriod, clock readings at each turn, resyncs done by then, next due)
    (60.0, [0, 59.9], 0, 60.0),
    (60.0, [0, 60], 1, 120.0),
    (60.0, [0, 60, 61, 119.9], 1, 120.0),  # the next one is a period after the last
    (60.0, [0, 60, 120, 180], 3, 240.0),
    (60.0, [0, 500], 1, 560.0),  # a late turn resyncs once, not once per missed period
    (0.0, [0, 60, 10_000], 0, None),  # 0: never
])
def test_daemon_resyncs_every_period(period: float, times: list[float], calls: int,
                                     next_at: float | None) -> None:
    clock, resync = FakeClock(0.0), Counter()
    d = daemon(clock, resync, period)
    for t in times:
        clock.now = t
        assert d.step(drain(d.queue, 0))
    assert resync.calls == calls == d.resyncs
    assert d.next_resync == next_at


def test_negative_config_sync_period_is_refused() -> None:
    with pytest.raises(ConfigError, match="configSyncPeriod"):
        ProxyConfig(config_sync_period=-1.0)


def test_the_daemon_wakes_for_a_resync_with_nothing_queued() -> None:
    """run() waits on the queue until the next deadline; the resync is one of them."""
    resync = Counter()
    d = daemon(time.monotonic, resync, 0.05)
    thread = threading.Thread(target=d.run)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while resync.calls < 3:
            assert time.monotonic() < deadline, "no resync within 10s"
            time.sleep(0.01)  # polling, bounded by the deadline above
    finally:
        d.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_resynced_updates_are_folded_without_a_sync() -> None:
    """Re-delivered objects go through the queue and change nothing: no sync, and an
    invalid one is reported again."""
    clock = FakeClock(0.0)
    svc_key = NamespacedName("ns1", "bad")
    invalid = InvalidObject("Service", "ns1/bad", "spec.ports[0].port", "must be 1-65535")
    held = [Update("Node", NamespacedName("", "node1"),
                   Node("node1", addresses=(ipaddress.ip_address("192.168.0.2"),))),
            Update("Service", svc_key, None, error=invalid)]
    box: list[Daemon] = []

    def resync() -> int:
        for u in held:
            box[0].emit(u)
        return len(held)

    d = daemon(clock, resync, 60.0, min_sync_period=0.0, sync_period=1000.0)
    box.append(d)
    reported: list[InvalidObject] = []
    d.tracker._report = reported.append  # the daemon logs them; count here
    for kind in ("Service", "EndpointSlice", "Node"):
        d.emit(Replace(kind, tuple(u for u in held if u.kind == kind)))
    assert d.step(drain(d.queue, 0))
    assert d.loop.last_success is not None and len(reported) == 1
    synced = d.loop.last_success
    clock.now = 60
    assert d.step(drain(d.queue, 0)) and d.resyncs == 1
    clock.now = 61
    assert d.step(drain(d.queue, 0))  # the turn that folds the re-delivered updates
    assert len(reported) == 2, "the invalid Service is reported again"
    assert d.loop.last_success == synced, "nothing changed: no sync"
