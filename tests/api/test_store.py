"""The pure store: resourceVersions, concurrency, deletion, history and watch filtering.

No threads, no sockets, no sleeping: the clock is a FakeClock and the random source is
seeded, so every case is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.apiserver import resources as r
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.selectors import (
    FieldSelector,
    LabelSelector,
    parse_field_selector,
    parse_label_selector,
)
from kubeproxy.apiserver.store import Store, StoreConfig
from kubeproxy.util.jsontypes import JSON
from tests.fakes import FakeClock

NO_LABELS, NO_FIELDS = LabelSelector(), FieldSelector()


def make_store(history: int = 100) -> tuple[Store, FakeClock]:
    clock = FakeClock()
    return Store(StoreConfig(history=history), clock=clock, rng=random.Random(7)), clock


def pod(name: str, node: str | None = "node-a", labels: dict[str, str] | None = None,
        finalizers: list[str] | None = None) -> JSON:
    meta: JSON = {"name": name, "labels": labels or {}}
    if finalizers:
        meta["finalizers"] = finalizers
    spec: JSON = {"containers": [{"name": "c", "image": "img:1"}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": meta, "spec": spec}


def svc(name: str, **spec: Any) -> JSON:
    return {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}], **spec}}


def rv(obj: JSON) -> int:
    return int(obj["metadata"]["resourceVersion"])


def test_create_fills_metadata_and_bumps_one_global_resource_version() -> None:
    store, clock = make_store()
    start = store.resource_version
    a = store.create(r.PODS, "default", pod("a"))
    b = store.create(r.SERVICES, "default", svc("b"))
    assert (rv(a), rv(b)) == (start + 1, start + 2)
    assert a["metadata"]["namespace"] == "default"
    assert a["metadata"]["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert len(a["metadata"]["uid"]) == 36 and a["kind"] == "Pod" and a["apiVersion"] == "v1"
    assert a["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    del clock


def test_generate_name_appends_five_characters() -> None:
    store, _ = make_store()
    obj = store.create(r.PODS, "default", {**pod(""), "metadata": {"generateName": "web-"}})
    assert obj["metadata"]["name"].startswith("web-") and len(obj["metadata"]["name"]) == 9


@dataclass(frozen=True)
class CreateError:
    name: str
    res: r.Resource
    namespace: str | None
    body: JSON
    code: int
    reason: str


CREATE_ERRORS = [
    CreateError("missing namespace", r.PODS, "nope", pod("a"), 404, "NotFound"),
    CreateError("no name", r.PODS, "default", {"spec": pod("a")["spec"]}, 422, "Invalid"),
    CreateError("bad name", r.SERVICES, "default", svc("Bad_Name"), 422, "Invalid"),
    CreateError("bad label", r.PODS, "default", pod("a", labels={"a b": "x"}), 422, "Invalid"),
    CreateError("no containers", r.PODS, "default", {"metadata": {"name": "a"}, "spec": {}},
                422, "Invalid"),
    CreateError("slice without addressType", r.ENDPOINTSLICES, "default",
                {"metadata": {"name": "s"}, "endpoints": []}, 422, "Invalid"),
    CreateError("slice address of the wrong family", r.ENDPOINTSLICES, "default",
                {"metadata": {"name": "s"}, "addressType": "IPv4",
                 "endpoints": [{"addresses": ["fd00::1"]}]}, 422, "Invalid"),
]


@pytest.mark.parametrize("case", CREATE_ERRORS, ids=lambda c: c.name)
def test_create_rejects(case: CreateError) -> None:
    store, _ = make_store()
    with pytest.raises(ApiError) as err:
        store.create(case.res, case.namespace, case.body)
    assert (err.value.code, err.value.reason) == (case.code, case.reason)


def test_create_twice_is_already_exists() -> None:
    store, _ = make_store()
    store.create(r.PODS, "default", pod("a"))
    with pytest.raises(ApiError) as err:
        store.create(r.PODS, "default", pod("a"))
    assert (err.value.code, err.value.reason) == (409, "AlreadyExists")


def test_update_with_stale_resource_version_is_conflict() -> None:
    store, _ = make_store()
    first = store.create(r.SERVICES, "default", svc("s"))
    second = store.update(r.SERVICES, "default", "s",
                          {**first, "metadata": {**first["metadata"], "labels": {"a": "1"}}})
    assert rv(second) > rv(first)
    with pytest.raises(ApiError) as err:
        store.update(r.SERVICES, "default", "s",
                     {**first, "metadata": {**first["metadata"], "labels": {"a": "2"}}})
    assert (err.value.code, err.value.reason) == (409, "Conflict")
    assert "the object has been modified" in err.value.message


def test_update_without_resource_version_is_unconditional_and_keeps_allocations() -> None:
    store, _ = make_store()
    created = store.create(r.SERVICES, "default", svc("s", type="NodePort"))
    body = svc("s", type="NodePort")  # a manifest: no clusterIP, no nodePort, no RV
    body["metadata"]["labels"] = {"x": "y"}
    updated = store.update(r.SERVICES, "default", "s", body)
    assert updated["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    assert updated["spec"]["ports"][0]["nodePort"] == created["spec"]["ports"][0]["nodePort"]


def test_noop_update_does_not_bump_resource_version() -> None:
    store, _ = make_store()
    created = store.create(r.SERVICES, "default", svc("s"))
    same = store.update(r.SERVICES, "default", "s", created)
    assert rv(same) == rv(created) == store.resource_version


def test_status_only_changes_through_the_status_subresource() -> None:
    store, _ = make_store()
    created = store.create(r.PODS, "default", pod("a"))
    main = store.update(r.PODS, "default", "a", {**created, "status": {"phase": "Running"}})
    assert main["status"]["phase"] == "Pending"
    changed = {**created, "metadata": {**created["metadata"], "labels": {"new": "label"}},
               "status": {"phase": "Running", "podIP": "10.0.0.5"}}
    status = store.update(r.PODS, "default", "a", changed, subresource="status")
    assert status["status"] == {"phase": "Running", "podIP": "10.0.0.5"}
    assert status["metadata"]["labels"] == {}


def test_pod_spec_is_mostly_immutable() -> None:
    store, _ = make_store()
    created = store.create(r.PODS, "default", pod("a"))
    image = {**created, "spec": {**created["spec"],
                                 "containers": [{**created["spec"]["containers"][0],
                                                 "image": "img:2"}]}}
    assert store.update(r.PODS, "default", "a", image)["spec"]["containers"][0]["image"] == "img:2"
    moved = {**created, "metadata": {**created["metadata"], "resourceVersion": None},
             "spec": {**created["spec"], "nodeName": "node-b"}}
    with pytest.raises(ApiError) as err:
        store.update(r.PODS, "default", "a", moved)
    assert err.value.code == 422 and "pod updates may not change" in err.value.message


def test_graceful_pod_deletion_waits_for_the_clock() -> None:
    store, clock = make_store()
    store.create(r.PODS, "default", pod("a"))
    pending = store.delete(r.PODS, "default", "a", grace=30)
    assert not pending.deleted
    assert pending.obj["metadata"]["deletionGracePeriodSeconds"] == 30
    assert pending.obj["metadata"]["deletionTimestamp"] == "2023-11-14T22:13:50Z"
    clock.advance(29)
    assert store.reap() == 0
    clock.advance(1)
    assert store.reap() == 1
    with pytest.raises(ApiError):
        store.get(r.PODS, "default", "a")


def test_second_delete_with_zero_grace_removes_at_once() -> None:
    store, _ = make_store()
    store.create(r.PODS, "default", pod("a"))
    store.delete(r.PODS, "default", "a")  # the pod's own terminationGracePeriodSeconds: 30
    assert store.next_deadline() is not None
    final = store.delete(r.PODS, "default", "a", grace=0)
    assert final.deleted and store.next_deadline() is None


def test_unscheduled_pods_and_other_kinds_go_at_once() -> None:
    store, _ = make_store()
    store.create(r.PODS, "default", pod("a", node=None))
    store.create(r.SERVICES, "default", svc("s"))
    assert store.delete(r.PODS, "default", "a", grace=30).deleted
    assert store.delete(r.SERVICES, "default", "s").deleted


def test_finalizers_hold_an_object_until_removed() -> None:
    store, _ = make_store()
    store.create(r.PODS, "default", pod("a", node=None, finalizers=["example.com/hold"]))
    held = store.delete(r.PODS, "default", "a")
    assert not held.deleted and held.obj["metadata"]["deletionTimestamp"]
    current = store.get(r.PODS, "default", "a")
    current["metadata"]["finalizers"] = []
    store.update(r.PODS, "default", "a", current)
    with pytest.raises(ApiError):
        store.get(r.PODS, "default", "a")


def test_delete_preconditions() -> None:
    store, _ = make_store()
    store.create(r.SERVICES, "default", svc("s"))
    with pytest.raises(ApiError) as err:
        store.delete(r.SERVICES, "default", "s", preconditions={"uid": "not-it"})
    assert err.value.code == 409


def test_namespace_deletion_takes_its_objects_and_protected_ones_stay() -> None:
    store, _ = make_store()
    store.create(r.NAMESPACES, None, {"metadata": {"name": "team"}})
    store.create(r.SERVICES, "team", svc("s"))
    store.create(r.PODS, "team", pod("p"))
    store.delete(r.NAMESPACES, None, "team")
    assert store.list(r.SERVICES, None).items == [] and store.list(r.PODS, None).items == []
    with pytest.raises(ApiError) as err:
        store.delete(r.NAMESPACES, None, "default")
    assert err.value.code == 403


def test_list_pages_with_limit_and_continue() -> None:
    store, _ = make_store()
    for i in range(7):
        store.create(r.PODS, "default", pod(f"p{i}"))
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = store.list(r.PODS, "default", limit=3, continue_token=token)
        seen += [p["metadata"]["name"] for p in page.items]
        pages += 1
        if not page.continue_token:
            assert page.remaining is None
            break
        assert page.remaining == 7 - len(seen)
        token = page.continue_token
    assert seen == [f"p{i}" for i in range(7)] and pages == 3


def test_continue_token_too_old_is_gone_and_garbage_is_bad_request() -> None:
    store, _ = make_store(history=2)
    for i in range(3):
        store.create(r.PODS, "default", pod(f"p{i}"))
    token = store.list(r.PODS, "default", limit=1).continue_token
    for i in range(3):
        store.create(r.PODS, "default", pod(f"q{i}"))
    with pytest.raises(ApiError) as err:
        store.list(r.PODS, "default", limit=1, continue_token=token)
    assert err.value.code == 410
    with pytest.raises(ApiError) as err:
        store.list(r.PODS, "default", continue_token="!!!")
    assert err.value.code == 400


def test_watch_from_too_old_resource_version_is_gone() -> None:
    store, _ = make_store(history=3)
    start = store.resource_version
    for i in range(4):
        store.create(r.PODS, "default", pod(f"p{i}"))
    with pytest.raises(ApiError) as err:
        store.events_since(r.PODS, None, start, NO_LABELS, NO_FIELDS)
    assert (err.value.code, err.value.reason) == (410, "Expired")
    recent = store.events_since(r.PODS, None, store.resource_version - 3, NO_LABELS, NO_FIELDS)
    assert [e.obj["metadata"]["name"] for e in recent] == ["p1", "p2", "p3"]


def _relabel(store: Store, name: str, labels: dict[str, str]) -> None:
    current = store.get(r.PODS, "default", name)
    current["metadata"]["labels"] = labels
    store.update(r.PODS, "default", name, current)


def test_watch_turns_selector_transitions_into_added_and_deleted() -> None:
    store, _ = make_store()
    store.create(r.PODS, "default", pod("a", labels={"app": "x"}))
    start = store.resource_version
    _relabel(store, "a", {"app": "y"})  # leaves the selection
    _relabel(store, "a", {"app": "x"})  # comes back
    _relabel(store, "a", {"app": "x", "v": "2"})  # stays
    store.delete(r.PODS, "default", "a", grace=0)
    events = store.events_since(r.PODS, "default", start, parse_label_selector("app=x"), NO_FIELDS)
    assert [e.type for e in events] == ["DELETED", "ADDED", "MODIFIED", "DELETED"]
    assert all(rv(e.obj) > start for e in events)


def test_watch_filters_by_namespace_and_field() -> None:
    store, _ = make_store()
    store.create(r.NAMESPACES, None, {"metadata": {"name": "other"}})
    start = store.resource_version
    store.create(r.PODS, "default", pod("a", node="n1"))
    store.create(r.PODS, "default", pod("b", node="n2"))
    store.create(r.PODS, "other", pod("c", node="n1"))
    on_n1 = parse_field_selector("spec.nodeName=n1", r.PODS)
    names = [e.obj["metadata"]["name"]
             for e in store.events_since(r.PODS, None, start, NO_LABELS, on_n1)]
    assert names == ["a", "c"]
    names = [e.obj["metadata"]["name"]
             for e in store.events_since(r.PODS, "default", start, NO_LABELS, on_n1)]
    assert names == ["a"]


def test_initial_events_are_the_current_state() -> None:
    store, _ = make_store()
    store.create(r.SERVICES, "default", svc("b"))
    store.create(r.SERVICES, "default", svc("a"))
    events = store.initial_events(r.SERVICES, "default", NO_LABELS, NO_FIELDS)
    assert [(e.type, e.obj["metadata"]["name"]) for e in events] == [("ADDED", "a"),
                                                                     ("ADDED", "b")]


def test_dry_run_changes_nothing() -> None:
    store, _ = make_store()
    before = store.resource_version
    store.create(r.SERVICES, "default", svc("s"), dry_run=True)
    assert store.resource_version == before and store.list(r.SERVICES, "default").items == []
