"""The change tracker: folding (previous, current), cancelling changes, what apply() says."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kubeproxy.errors import InvalidObject
from kubeproxy.model import NamespacedName
from kubeproxy.sources.informer import to_update
from kubeproxy.tracker import Kind, Tracker, Update
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, service

Step = Update | tuple[Kind, list[Update]]  # an update, or a (re)list of one kind


def up(kind: Kind, obj: Obj, trigger: str | None = None) -> Update:
    if trigger is not None:
        obj["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time":
                                          trigger}
    update = to_update(kind, obj)
    assert update is not None
    return update


def svc(name: str, ip: str = "172.30.0.41", port: int = 80) -> Update:
    return up("Service", service(name, cluster_ip=ip, ports=[("p80", port, "TCP", 0)]))


def eps(name: str, service_name: str, *ips: str, trigger: str | None = None) -> Update:
    return up("EndpointSlice",
              endpoint_slice(service_name, [endpoint(ip) for ip in ips], name=name), trigger)


def gone(kind: Kind, name: str, ns: str = "ns1") -> Update:
    return Update(kind, NamespacedName("" if kind == "Node" else ns, name), None)


def nd(name: str = NODE, zone: str | None = None) -> Update:
    return up("Node", node(name, zone=zone))


def bad_service(name: str) -> Update:
    return up("Service", service(name, ports=[("p80", 70000, "TCP", 0)]))


@dataclass
class Case:
    name: str
    before: list[Step]  # folded and applied: what the last sync saw
    steps: list[Step]  # folded since
    changed: set[str]
    full: bool = False
    service_changes: int = 0
    endpoint_changes: int = 0
    reported: list[str] = field(default_factory=list)  # "kind ns/name field"


CASES = [
    Case("a new service", [], [svc("a")], {"ns1/a"}, service_changes=1),
    Case("nothing happened", [svc("a")], [], set()),
    Case("the same object again is no change", [svc("a")], [svc("a")], set()),
    Case("add then delete before a sync cancels out", [], [svc("a"), gone("Service", "a")],
         set(), service_changes=2),
    Case("update and back to the previous value cancels out", [svc("a")],
         [svc("a", port=81), svc("a")], set(), service_changes=2),
    Case("update, back, update again is a change", [svc("a")],
         [svc("a", port=81), svc("a"), svc("a", port=82)], {"ns1/a"}, service_changes=3),
    Case("delete a service", [svc("a"), svc("b", "172.30.0.42")], [gone("Service", "a")],
         {"ns1/a"}, service_changes=1),
    Case("a slice change touches its service", [svc("a"), eps("a-1", "a", "10.180.0.1")],
         [eps("a-1", "a", "10.180.0.1", "10.180.0.2")], {"ns1/a"}, endpoint_changes=1),
    Case("a slice moving to another service touches both",
         [svc("a"), svc("b", "172.30.0.42"), eps("s", "a", "10.180.0.1")],
         [eps("s", "b", "10.180.0.1")], {"ns1/a", "ns1/b"}, endpoint_changes=1),
    Case("a slice for a service we do not have still counts", [], [eps("x-1", "x", "10.0.0.1")],
         {"ns1/x"}, endpoint_changes=1),
    Case("this node changing is a full sync", [nd()], [nd(zone="z1")], set(), full=True),
    Case("this node appearing is a full sync", [], [nd()], set(), full=True),
    Case("this node deleted is a full sync", [nd()], [gone("Node", NODE)], set(), full=True),
    Case("other nodes are ignored", [], [nd("node2")], set()),
    Case("an invalid update is reported and removes the service", [svc("a")],
         [bad_service("a")], {"ns1/a"}, service_changes=1,
         reported=["Service ns1/a spec.ports[0].port"]),
    Case("an invalid new object is reported and changes nothing", [], [bad_service("a")], set(),
         reported=["Service ns1/a spec.ports[0].port"]),
    Case("a relist deletes what it does not list",
         [svc("a"), svc("b", "172.30.0.42")], [("Service", [svc("a")])], {"ns1/b"},
         service_changes=1),
    Case("a relist of the same state changes nothing", [svc("a"), eps("a-1", "a", "10.0.0.1")],
         [("Service", [svc("a")]), ("EndpointSlice", [eps("a-1", "a", "10.0.0.1")])], set()),
    Case("a relist only touches its own kind", [svc("a"), eps("a-1", "a", "10.0.0.1")],
         [("EndpointSlice", [])], {"ns1/a"}, endpoint_changes=1),
]


def fold(tracker: Tracker, steps: list[Step]) -> None:
    for step in steps:
        if isinstance(step, Update):
            tracker.update(step)
        else:
            tracker.replace(*step)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_apply(case: Case) -> None:
    reported: list[InvalidObject] = []
    tracker = Tracker(NODE, report=reported.append)
    fold(tracker, case.before)
    tracker.apply()
    reported.clear()
    fold(tracker, case.steps)
    changes = tracker.apply()
    assert {str(s) for s in changes.services} == case.changed
    assert changes.full == case.full
    assert (changes.service_changes, changes.endpoint_changes) == (case.service_changes,
                                                                   case.endpoint_changes)
    assert [f"{e.kind} {e.ref} {e.field_path}" for e in reported] == case.reported
    again = tracker.apply()
    assert again.empty and again.service_changes == 0, "apply() clears what it returned"


def test_cluster_is_the_current_state_sorted() -> None:
    tracker = Tracker(NODE)
    fold(tracker, [svc("b", "172.30.0.42"), svc("a"), eps("a-1", "a", "10.180.0.1"), nd(),
                   nd("node2"), bad_service("c")])
    cluster = tracker.cluster()
    assert [s.name for s in cluster.services] == ["a", "b"]
    assert [e.name for e in cluster.slices] == ["a-1"]
    assert [n.name for n in cluster.nodes] == [NODE]
    assert tracker.cluster() is cluster, "cached while nothing changes"
    tracker.update(gone("Service", "b"))
    assert [s.name for s in tracker.cluster().services] == ["a"]


def test_pending_counts_follow_cancellation() -> None:
    tracker = Tracker(NODE)
    tracker.update(svc("a"))
    tracker.update(eps("a-1", "a", "10.0.0.1"))
    assert tracker.pending == (1, 1)
    tracker.update(gone("EndpointSlice", "a-1"))
    assert tracker.pending == (1, 0)


@pytest.mark.parametrize(("steps", "times"), [
    ([eps("a-1", "a", "10.0.0.1", trigger="2024-01-01T00:00:10Z")], [1704067210.0]),
    ([eps("a-1", "a", "10.0.0.1", trigger="2024-01-01T00:00:10Z"),
      eps("a-1", "a", "10.0.0.2", trigger="2024-01-01T00:00:11.5Z")],
     [1704067210.0, 1704067211.5]),
    # Undone before the sync: no latency to report for it.
    ([eps("a-1", "a", "10.0.0.1", trigger="2024-01-01T00:00:10Z"), gone("EndpointSlice", "a-1")],
     []),
    ([eps("a-1", "a", "10.0.0.1", trigger="not a time")], []),
], ids=["one", "two", "cancelled", "unparsable"])
def test_trigger_times(steps: list[Step], times: list[float]) -> None:
    tracker = Tracker(NODE)
    fold(tracker, steps)
    assert list(tracker.apply().trigger_times) == times


def test_node_property_and_kind_checks() -> None:
    tracker = Tracker(NODE)
    assert tracker.node is None
    tracker.update(nd(zone="z1"))
    assert tracker.node is not None and tracker.node.zone == "z1"
    with pytest.raises(TypeError):
        Update("Service", NamespacedName("ns1", "a"), tracker.node)
    with pytest.raises(ValueError, match="in a Service list"):
        tracker.replace("Service", [nd()])
