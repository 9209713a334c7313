"""The lab's DaemonSet controller, pure part: which Pods to create and delete, the status."""

from __future__ import annotations

from typing import Any

import pytest

from kubeproxy.lab import daemonsets
from kubeproxy.lab.daemonsets import orphans, plan, tolerates
from kubeproxy.util.jsontypes import JSON

UID = "ds-uid-1"


def ds(node_selector: JSON | None = None, tolerations: list[JSON] | None = None,
       generation: int = 2, status: JSON | None = None, strategy: str = "RollingUpdate",
       ) -> JSON:  # fmt: skip
    spec: JSON = {"containers": [{"name": "kube-proxy", "command": ["/usr/local/bin/kube-proxy"]}],
                  "hostNetwork": True}  # fmt: skip
    if node_selector:
        spec["nodeSelector"] = node_selector
    if tolerations is not None:
        spec["tolerations"] = tolerations
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "kube-proxy", "namespace": "kube-system", "uid": UID,
                     "generation": generation},
        "spec": {"selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                 "updateStrategy": {"type": strategy},
                 "template": {"metadata": {"labels": {"k8s-app": "kube-proxy"}}, "spec": spec}},
        "status": status or {},
    }  # fmt: skip


def node(name: str, labels: JSON | None = None, taints: list[JSON] | None = None) -> JSON:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", **(labels or {})}},
            "spec": {"taints": taints or []}}  # fmt: skip


def pod(name: str, node_name: str, *, uid: str = UID, created: str = "2025-01-01T00:00:00Z",
        phase: str = "Running", ready: bool = True, deleting: bool = False,
        generation: str = "2") -> JSON:  # fmt: skip
    meta: JSON = {"name": name, "namespace": "kube-system", "creationTimestamp": created,
                  "labels": {"k8s-app": "kube-proxy", "pod-template-generation": generation},
                  "ownerReferences": [{"kind": "DaemonSet", "name": "kube-proxy", "uid": uid,
                                       "controller": True}]}  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:01:00Z"
    return {"metadata": meta, "spec": {"nodeName": node_name},
            "status": {"phase": phase,
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip


N1, N2 = node("node-1"), node("node-2")
NOSCHED = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}

# (id, daemonset, nodes, pods, nodes to create on, pods to delete)
CASES: list[tuple[str, JSON, list[JSON], list[JSON], list[str], list[str]]] = [
    ("one-per-node", ds(), [N1, N2], [], ["node-1", "node-2"], []),
    ("already-running", ds(), [N1, N2], [pod("a", "node-1")], ["node-2"], []),
    ("node-selector", ds({"kubernetes.io/os": "linux", "zone": "a"}),
     [node("node-1", {"zone": "a"}), N2], [], ["node-1"], []),
    ("untolerated-taint", ds(), [node("node-1", taints=[NOSCHED]), N2], [], ["node-2"], []),
    ("exists-tolerates-all", ds(tolerations=[{"operator": "Exists"}]),
     [node("node-1", taints=[NOSCHED]), N2], [], ["node-1", "node-2"], []),
    ("prefer-no-schedule-never-blocks", ds(),
     [node("node-1", taints=[{"key": "x", "effect": "PreferNoSchedule"}])], [], ["node-1"], []),
    ("extra-pod-newest-goes", ds(), [N1],
     [pod("old", "node-1"), pod("new", "node-1", created="2025-02-01T00:00:00Z")], [], ["new"]),
    ("node-no-longer-wanted", ds(), [N1], [pod("a", "node-1"), pod("b", "node-9")], [], ["b"]),
    ("failed-pod-replaced", ds(), [N1], [pod("a", "node-1", phase="Failed")], ["node-1"], ["a"]),
    ("terminating-pod-replaced", ds(), [N1], [pod("a", "node-1", deleting=True)], ["node-1"], []),
    ("another-owners-pod-ignored", ds(), [N1], [pod("x", "node-1", uid="other")], ["node-1"], []),
    # A changed template (generation 3) rolls out one node at a time.
    ("template-changed-one-goes", ds(generation=3), [N1, N2],
     [pod("a", "node-1"), pod("b", "node-2")], [], ["a"]),
    ("rollout-waits-for-ready", ds(generation=3), [N1, N2],
     [pod("a", "node-1", generation="3", ready=False), pod("b", "node-2")], [], []),
    ("rollout-goes-on", ds(generation=3), [N1, N2],
     [pod("a", "node-1", generation="3"), pod("b", "node-2")], [], ["b"]),
    ("on-delete-waits-for-the-user", ds(generation=3, strategy="OnDelete"), [N1, N2],
     [pod("a", "node-1"), pod("b", "node-2")], [], []),
]  # fmt: skip


@pytest.mark.parametrize(("d", "nodes", "pods", "create", "delete"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_plan(d: JSON, nodes: list[JSON], pods: list[JSON], create: list[str],
              delete: list[str]) -> None:  # fmt: skip
    p = plan(d, nodes, pods)
    assert [b["spec"]["nodeName"] for b in p.create] == create
    assert p.delete == [("kube-system", n) for n in delete]


def test_created_pod_is_the_template_on_its_node() -> None:
    body = plan(ds(), [N1], []).create[0]
    assert body["metadata"] == {
        "generateName": "kube-proxy-", "namespace": "kube-system",
        "labels": {"k8s-app": "kube-proxy", "pod-template-generation": "2"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "kube-proxy",
                             "uid": UID, "controller": True, "blockOwnerDeletion": True}],
    }  # fmt: skip
    assert body["spec"]["nodeName"] == "node-1" and body["spec"]["hostNetwork"] is True
    assert body["spec"]["containers"][0]["command"] == ["/usr/local/bin/kube-proxy"]


def test_status_counts_and_is_written_only_when_it_changes() -> None:
    pods = [pod("a", "node-1"), pod("b", "node-2", ready=False), pod("c", "node-9")]
    status = plan(ds(), [N1, N2], pods).status
    assert status == {
        "desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberMisscheduled": 1,
        "numberReady": 1, "numberAvailable": 1, "numberUnavailable": 1,
        "updatedNumberScheduled": 2, "observedGeneration": 2,
    }  # fmt: skip
    assert plan(ds(status=status), [N1, N2], pods).status is None


def test_orphans_are_pods_of_a_deleted_daemonset() -> None:
    pods = [pod("a", "node-1"), pod("b", "node-1", uid="gone"),
            pod("c", "node-1", uid="gone", deleting=True), {"metadata": {"name": "plain"}}]
    assert orphans([ds()], pods) == [("kube-system", "b")]
    assert orphans([], pods) == [("kube-system", "a"), ("kube-system", "b")]


# (id, tolerations, taint, tolerated)
TOLERATIONS: list[tuple[str, list[Any], JSON, bool]] = [
    ("exists-no-key", [{"operator": "Exists"}], NOSCHED, True),
    ("exists-same-key", [{"key": NOSCHED["key"], "operator": "Exists"}], NOSCHED, True),
    ("exists-other-key", [{"key": "y", "operator": "Exists"}], NOSCHED, False),
    ("equal-value", [{"key": "k", "value": "v"}], {"key": "k", "value": "v", "effect": "NoExecute"},
     True),
    ("equal-other-value", [{"key": "k", "value": "w"}], {"key": "k", "value": "v"}, False),
    ("other-effect", [{"operator": "Exists", "effect": "NoExecute"}], NOSCHED, False),
    ("none", [], NOSCHED, False),
]  # fmt: skip


@pytest.mark.parametrize(("tols", "taint", "ok"), [t[1:] for t in TOLERATIONS],
                         ids=[t[0] for t in TOLERATIONS])  # fmt: skip
def test_tolerates(tols: list[JSON], taint: JSON, ok: bool) -> None:
    assert tolerates(tols, taint) is ok


def test_stop_kills_only_a_process_that_is_the_controller(tmp_path: Any) -> None:
    import subprocess

    from kubeproxy.lab.state import LabStore

    store = LabStore("x1", tmp_path)
    store.dir.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "30"])
    try:
        daemonsets.record(store, other.pid)
        daemonsets.stop(store)  # not a controller: left alone, the stale file removed
        assert other.poll() is None and not daemonsets.pid_file(store).exists()
    finally:
        other.kill()
        other.wait()
