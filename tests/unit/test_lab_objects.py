"""The pure parts of driving the lab through its API, as tables: what ``lab up`` creates,
pod status, pod IP allocation, slice writes, reading the proxies' metrics, finding things."""

from __future__ import annotations

import pytest

from kubeproxy.errors import LabError
from kubeproxy.lab import controller, layout, objects, view
from kubeproxy.lab.converge import parse_metrics
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.state import LabState
from kubeproxy.util.jsontypes import JSON

LAB = """
kind: Node
metadata: {name: node-1}
---
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{ports: [{containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: old}
spec: {containers: [{name: app, image: busybox}]}
status: {podIP: 10.244.1.50}
---
kind: Service
metadata: {name: lb, namespace: shop}
spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


def lab_plan() -> layout.Plan:
    return layout.plan("u", parse_objects(load_documents([("lab", LAB)])))


def test_up_creates_namespaces_first_and_carries_the_plan() -> None:
    bodies, statuses = objects.api_objects(lab_plan(), [])
    kinds = [(b["kind"], b["metadata"]["name"]) for b in bodies]
    assert kinds == [("Namespace", "shop"), ("Node", "node-1"), ("Service", "lb"),
                     ("Pod", "web"), ("Pod", "old")]  # fmt: skip
    web, old = bodies[3], bodies[4]
    assert web["spec"]["nodeName"] == "node-1" and "status" not in web
    assert web["spec"]["containers"][0] | {"ports": []} == {
        "name": "c0", "image": objects.LAB_IMAGE, "ports": [],
    }  # fmt: skip
    assert old["metadata"]["annotations"] == {objects.POD_IP_ANNOTATION: "10.244.1.50"}
    assert old["spec"]["containers"][0]["image"] == "busybox"
    node = bodies[1]
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "192.168.0.2"}
    assert objects.condition(node, "Ready") == "True"
    assert [s["status"]["loadBalancer"]["ingress"] for s in statuses] == [
        [{"ip": "192.168.100.10"}]
    ]


def pod(ready: bool | None = None) -> JSON:
    raw: JSON = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
    if ready is not None:
        raw = {**raw, "status": objects.running_status(raw, "10.244.1.2", "192.168.0.2", 0, 7)}
        if not ready:
            changed = objects.with_ready(raw, False, 1)
            assert changed is not None
            raw = changed
    return raw


def test_pod_status_running_and_readiness() -> None:
    running = pod(ready=True)
    status = running["status"]
    assert (status["phase"], status["podIP"], status["hostIP"]) == (
        "Running", "10.244.1.2", "192.168.0.2",
    )  # fmt: skip
    assert objects.is_ready(running) and status["containerStatuses"][0]["ready"]
    assert objects.with_ready(running, True, 5) is None  # nothing to write
    not_ready = pod(ready=False)
    assert not objects.is_ready(not_ready)
    assert objects.condition(not_ready, "ContainersReady") == "False"
    assert not not_ready["status"]["containerStatuses"][0]["ready"]
    assert objects.condition(not_ready, "PodScheduled") == "True"  # the rest is kept


NODE = layout.NodePlan("n", "kpl-u-node-n", "192.168.0.2", "10.244.1.0/29", "10.244.1.1",
                         "kn0", None)  # fmt: skip

# (id, used, requested, after, expected): .1 is the bridge, .2-.6 are pod addresses
ALLOCATIONS = [
    ("lowest-free", set(), None, None, "10.244.1.2"),
    ("requested-free", set(), "10.244.1.5", None, "10.244.1.5"),
    ("requested-taken", {"10.244.1.5"}, "10.244.1.5", None, "10.244.1.2"),
    ("requested-is-the-bridge", set(), "10.244.1.1", None, "10.244.1.2"),
    ("requested-elsewhere", set(), "10.9.9.9", None, "10.244.1.2"),
    ("after-the-last", set(), None, "10.244.1.3", "10.244.1.4"),
    ("wraps-around", {"10.244.1.2"}, None, "10.244.1.6", "10.244.1.3"),
    ("full", {f"10.244.1.{i}" for i in range(2, 7)}, None, None, None),
]


@pytest.mark.parametrize(
    ("used", "requested", "after", "expected"),
    [a[1:] for a in ALLOCATIONS],
    ids=[a[0] for a in ALLOCATIONS],
)
def test_free_pod_ip(
    used: set[str], requested: str | None, after: str | None, expected: str | None
) -> None:
    assert layout.free_pod_ip(NODE, used, requested, after) == expected


def managed(name: str, endpoints: list[JSON], rv: str = "5") -> JSON:
    return {
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                     "labels": {controller.MANAGED_BY_LABEL: controller.CONTROLLER_NAME}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [],
    }  # fmt: skip


EP = [{"addresses": ["10.244.1.2"]}]


def test_slice_changes() -> None:
    user = {"metadata": {"name": "mine", "namespace": "default"}, "endpoints": EP}
    existing = [managed("same", EP), managed("changed", []), managed("stale", EP), user]
    desired = [managed("same", EP, ""), managed("changed", EP, ""), managed("new", EP, ""),
               managed("mine", EP, "")]  # fmt: skip
    creates, updates, deletes = controller.slice_changes(desired, existing)
    assert [c["metadata"]["name"] for c in creates] == ["new"]  # "mine" is the user's
    assert [(u["metadata"]["name"], u["metadata"]["resourceVersion"]) for u in updates] == [
        ("changed", "5")
    ]
    assert [d["metadata"]["name"] for d in deletes] == ["stale"]


def test_parse_metrics() -> None:
    text = """# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds [ALPHA] x
# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge
kubeproxy_sync_proxy_rules_last_timestamp_seconds 1795672487.5
kubeproxy_sync_proxy_rules_service_changes_pending 1
kubeproxy_sync_proxy_rules_endpoint_changes_pending 2
kubeproxy_sync_proxy_rules_iptables_restore_failures_total 3
kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"} 0
"""
    sample = parse_metrics(text)
    assert (sample.last_sync, sample.pending, sample.failures) == (1795672487.5, 3, 3)
    assert parse_metrics("").last_sync == 0.0


def live(name: str, namespace: str = "default", ip: str | None = "10.244.1.2") -> view.LivePod:
    return view.LivePod(f"{namespace}/{name}", name, namespace, "node-1", ip, "Running", True,
                        False, None)  # fmt: skip


def test_finding_pods_services_and_addresses() -> None:
    plan = lab_plan()
    state = LabState(
        name="u", mode="iptables", lb_algorithm="random", cluster_cidr=plan.cluster_cidr,
        service_cidr=plan.service_cidr, external_node=None, switch_ns=plan.switch_ns,
        nodes=plan.nodes, external=plan.external,
    )  # fmt: skip
    pods = [live("web", "shop"), live("web", "other", "10.244.1.3"), live("db", ip=None)]
    services = [
        {"metadata": {"name": "lb", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.9"}}
    ]
    assert view.find_pod(pods, "other/web").ip == "10.244.1.3"
    with pytest.raises(LabError, match="ambiguous"):
        view.find_pod(pods, "web")
    with pytest.raises(LabError, match="no Pod"):
        view.find_pod(pods, "nope")
    assert view.address_of(state, pods, services, "lb.shop") == "10.96.0.9"
    assert view.address_of(state, pods, services, "node-1") == "192.168.0.2"
    assert view.address_of(state, pods, services, "1.2.3.4") == "1.2.3.4"
    with pytest.raises(LabError, match="no IP yet"):
        view.address_of(state, pods, services, "db")
    assert view.namespace_of(state, pods, "shop/web") == "kpl-u-pod-shop.web"
    assert view.namespace_of(state, pods, "external") == "kpl-u-external"
    with pytest.raises(LabError, match="not running"):
        view.namespace_of(state, pods, "db")
