"""The store across a restart: dump / restore, and the server's state file.

A restored store holds the same objects, UIDs and resourceVersions; its watch history
is gone, so a watch from an older version gets 410 (relist) and one from a version the
server never reached gets 504 "Too large resource version" (relist), never silence.
"""

from __future__ import annotations

import json
import random
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.apiserver import ApiServer, ServerConfig
from kubeproxy.apiserver import resources as r
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.selectors import FieldSelector, LabelSelector
from kubeproxy.apiserver.store import Store
from kubeproxy.util.jsontypes import JSON
from tests.fakes import FakeClock

NO_LABELS, NO_FIELDS = LabelSelector(), FieldSelector()


def pod(name: str) -> JSON:
    return {"metadata": {"name": name},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}}


def svc(name: str, ip: str) -> JSON:
    return {"metadata": {"name": name}, "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


def populated() -> tuple[Store, FakeClock]:
    clock = FakeClock()
    store = Store(clock=clock, rng=random.Random(3))
    store.create(r.SERVICES, "default", svc("web", "10.96.0.10"))
    store.create(r.PODS, "default", pod("a"))
    store.create(r.PODS, "default", pod("b"))
    store.delete(r.PODS, "default", "b", grace=30)  # pending: terminating for 30 s
    return store, clock


def restored(store: Store, clock: FakeClock) -> Store:
    """Through JSON text, as the state file carries it."""
    return Store.restore(json.loads(json.dumps(store.dump())), clock=clock,
                         rng=random.Random(4))


def test_restore_keeps_objects_uids_and_resource_versions() -> None:
    store, clock = populated()
    again = restored(store, clock)
    assert again.resource_version == store.resource_version
    for res in (r.NAMESPACES, r.SERVICES, r.PODS):
        assert again.list(res, None).items == store.list(res, None).items
    created = again.create(r.SERVICES, "default", svc("next", "10.96.0.11"))
    assert int(created["metadata"]["resourceVersion"]) == store.resource_version + 1


def test_restore_adds_missing_bootstrap_rbac_only() -> None:
    store, clock = populated()
    snapshot = json.loads(json.dumps(store.dump()))
    bindings = snapshot["objects"][r.CLUSTERROLEBINDINGS.key]
    node_proxier = next(b for b in bindings if b["metadata"]["name"] == "system:node-proxier")
    node_proxier["subjects"] = []  # changed by an admin: kept as it is
    snapshot["objects"][r.CLUSTERROLES.key] = [  # a snapshot from before RBAC: restored
        role for role in snapshot["objects"][r.CLUSTERROLES.key]
        if role["metadata"]["name"] != "system:node-proxier"]
    again = Store.restore(snapshot, clock=clock, rng=random.Random(4))
    assert again.get(r.CLUSTERROLES, None, "system:node-proxier")["rules"]
    assert again.get(r.CLUSTERROLEBINDINGS, None, "system:node-proxier")["subjects"] == []
    assert again.resource_version == store.resource_version + 1  # one object created


def test_restore_keeps_allocations_and_pending_deletions() -> None:
    store, clock = populated()
    again = restored(store, clock)
    with pytest.raises(ApiError) as err:
        again.create(r.SERVICES, "default", svc("clash", "10.96.0.10"))
    assert err.value.code == 422 and "already allocated" in err.value.message
    assert again.get(r.PODS, "default", "b")["metadata"]["deletionTimestamp"]
    clock.advance(31)
    assert again.reap() == 1
    with pytest.raises(ApiError, match="not found"):
        again.get(r.PODS, "default", "b")


@dataclass(frozen=True)
class WatchFrom:
    name: str
    offset: int  # from the restored resourceVersion
    code: int | None  # None: served (no events)


WATCHES = [
    WatchFrom("the current version: served, nothing missed", 0, None),
    WatchFrom("an older version: history is gone, 410", -1, 410),
    WatchFrom("a version never reached (a server that lost state): 504", 5, 504),
]


@pytest.mark.parametrize("case", WATCHES, ids=[c.name for c in WATCHES])
def test_watch_after_restore(case: WatchFrom) -> None:
    store, clock = populated()
    again = restored(store, clock)
    after = again.resource_version + case.offset
    if case.code is None:
        assert again.events_since(r.PODS, None, after, NO_LABELS, NO_FIELDS) == []
        return
    with pytest.raises(ApiError) as err:
        again.events_since(r.PODS, None, after, NO_LABELS, NO_FIELDS)
    assert err.value.code == case.code


def _damaged(change: str) -> dict[str, Any]:
    store, _ = populated()
    snap: dict[str, Any] = json.loads(json.dumps(store.dump()))
    if change == "version":
        snap["version"] = 99
    elif change == "resource":
        snap["objects"]["widgets"] = []
    elif change == "future object":
        snap["objects"]["pods"][0]["metadata"]["resourceVersion"] = "9999"
    elif change == "missing key":
        del snap["deletions"]
    return snap


@pytest.mark.parametrize(("change", "message"), [
    ("version", "snapshot version 99"),
    ("resource", "unknown resource 'widgets'"),
    ("future object", "newer than the snapshot"),
    ("missing key", "not a store snapshot"),
])
def test_damaged_snapshots_are_refused(change: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Store.restore(_damaged(change))


def test_server_state_file_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    config = ServerConfig(bookmark_interval=0.2, state_file=str(state))
    server = ApiServer(config).start()
    try:
        body = json.dumps(svc("web", "10.96.0.20")).encode()
        req = urllib.request.Request(server.url + "/api/v1/namespaces/default/services", body,
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            created = json.loads(resp.read())
        # On disk before the answer came back.
        saved = json.loads(state.read_text())
        assert [s["metadata"]["uid"] for s in saved["objects"]["services"]] == [
            created["metadata"]["uid"]]
        port, rv = server.port, server.store.resource_version
    finally:
        server.stop()
    again = ApiServer(ServerConfig(port=port, bookmark_interval=0.2,
                                   state_file=str(state))).start()
    try:
        assert again.port == port and again.store.resource_version == rv
        with urllib.request.urlopen(again.url + "/api/v1/namespaces/default/services/web",
                                    timeout=10) as resp:
            assert json.loads(resp.read())["metadata"]["uid"] == created["metadata"]["uid"]
    finally:
        again.stop()


def test_damaged_state_file_stops_the_server(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    with pytest.raises(ValueError, match="state file"):
        ApiServer(ServerConfig(state_file=str(state)))
