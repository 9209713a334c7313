"""The lab's endpoint controller, as tables: (pods, services, nodes, statuses) -> slices."""

from __future__ import annotations

from typing import Any

import pytest

from kubeproxy.lab.controller import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    PodStatus,
    endpoint_slices,
)
from kubeproxy.lab.manifest import Node, Pod, Service, parse_node, parse_pod, parse_service
from kubeproxy.util.jsontypes import JSON


def pod(
    name: str,
    ip: str | None,
    labels: dict[str, str] | None = None,
    node: str = "node-1",
    ports: list[JSON] | None = None,
    namespace: str = "default",
) -> Pod:
    raw: JSON = {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
        "status": {"podIP": ip} if ip else {},
    }
    return parse_pod(raw)


def service(
    name: str = "web",
    ports: list[JSON] | None = None,
    selector: dict[str, str] | None = None,
    **spec: Any,
) -> Service:
    raw: JSON = {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": {"team": "a"}},
        "spec": {
            "selector": {"app": "web"} if selector is None else selector,
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
            **spec,
        },
    }
    return parse_service(raw)


def node(name: str, zone: str | None = None) -> Node:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return parse_node({"kind": "Node", "metadata": {"name": name, "labels": labels}})


def endpoints(slices: list[JSON]) -> dict[str, tuple[bool, bool, bool]]:
    """pod name -> (ready, serving, terminating) over all slices."""
    out = {}
    for s in slices:
        for ep in s["endpoints"]:
            c = ep["conditions"]
            out[ep["targetRef"]["name"]] = (c["ready"], c["serving"], c["terminating"])
    return out


CONDITION_CASES = [
    # (name, statuses, publishNotReadyAddresses, expected conditions of pod a)
    ("ready pod", PodStatus(ready=True), False, (True, True, False)),
    ("not ready pod", PodStatus(ready=False), False, (False, False, False)),
    ("terminating, was ready", PodStatus(True, True), False, (False, True, True)),
    ("terminating, not ready", PodStatus(False, True), False, (False, False, True)),
    ("not ready, publishNotReady", PodStatus(ready=False), True, (True, False, False)),
    ("terminating, publishNotReady", PodStatus(True, True), True, (True, True, True)),
]


@pytest.mark.parametrize(
    ("status", "publish", "expected"),
    [c[1:] for c in CONDITION_CASES],
    ids=[c[0] for c in CONDITION_CASES],
)
def test_conditions(status: PodStatus, publish: bool, expected: tuple[bool, bool, bool]) -> None:
    svc = service(publishNotReadyAddresses=publish)
    slices = endpoint_slices(
        [svc], [pod("a", "10.244.1.2")], [node("node-1")], {"default/a": status}
    )
    assert endpoints(slices) == {"a": expected}


SELECTION_CASES = [
    ("label match", pod("a", "10.244.1.2"), ["a"]),
    ("label mismatch", pod("a", "10.244.1.2", {"app": "db"}), []),
    ("extra labels are fine", pod("a", "10.244.1.2", {"app": "web", "x": "y"}), ["a"]),
    ("other namespace", pod("a", "10.244.1.2", namespace="other"), []),
    ("no IP yet", pod("a", None), []),
]


@pytest.mark.parametrize(
    ("the_pod", "expected"), [c[1:] for c in SELECTION_CASES], ids=[c[0] for c in SELECTION_CASES]
)
def test_selection(the_pod: Pod, expected: list[str]) -> None:
    slices = endpoint_slices([service()], [the_pod], [node("node-1")], {})
    assert sorted(endpoints(slices)) == expected


def test_slice_shape_labels_node_and_zone() -> None:
    slices = endpoint_slices(
        [service()],
        [pod("a", "10.244.1.2"), pod("b", "10.244.2.2", node="node-2")],
        [node("node-1", "zone-a"), node("node-2")],
        {},
    )
    assert len(slices) == 1
    s = slices[0]
    assert s["apiVersion"] == "discovery.k8s.io/v1" and s["addressType"] == "IPv4"
    labels = s["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "web"
    assert labels[MANAGED_BY_LABEL] == CONTROLLER_NAME
    assert labels["team"] == "a"  # the Service's labels are copied, as upstream does
    assert s["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    a, b = s["endpoints"]
    assert (a["addresses"], a["nodeName"], a["zone"]) == (["10.244.1.2"], "node-1", "zone-a")
    assert (b["addresses"], b["nodeName"], "zone" in b) == (["10.244.2.2"], "node-2", False)


def test_named_target_port_resolves_per_pod_and_groups_slices() -> None:
    svc = service(ports=[{"name": "web", "port": 80, "targetPort": "http"}])
    pods = [
        pod("a", "10.244.1.2", ports=[{"name": "http", "containerPort": 8080}]),
        pod("b", "10.244.1.3", ports=[{"name": "http", "containerPort": 9090}]),
        pod("c", "10.244.1.4", ports=[{"name": "http", "containerPort": 8080}]),
        # Same name, other protocol: does not resolve, the pod has no port in the slice.
        pod("d", "10.244.1.5", ports=[{"name": "http", "containerPort": 8080, "protocol": "UDP"}]),
    ]
    slices = endpoint_slices([svc], pods, [node("node-1")], {})
    by_port = {
        tuple(p["port"] for p in s["ports"]): sorted(e["targetRef"]["name"] for e in s["endpoints"])
        for s in slices
    }
    assert by_port == {(8080,): ["a", "c"], (9090,): ["b"], (): ["d"]}


def test_selectorless_headless_and_external_name() -> None:
    pods = [pod("a", "10.244.1.2")]
    nodes = [node("node-1")]
    assert endpoint_slices([service(selector={})], pods, nodes, {}) == []
    ext = service(type="ExternalName", externalName="example.org")
    assert endpoint_slices([ext], pods, nodes, {}) == []
    (headless,) = endpoint_slices([service(clusterIP="None")], pods, nodes, {})
    assert headless["metadata"]["labels"]["service.kubernetes.io/headless"] == ""


def test_no_matching_pods_gives_an_empty_placeholder_slice() -> None:
    (s,) = endpoint_slices([service(selector={"app": "none"})], [], [node("node-1")], {})
    assert s["endpoints"] == [] and s["ports"] == []


def test_more_than_100_endpoints_are_split() -> None:
    pods = [pod(f"p{i}", f"10.244.{i // 250}.{i % 250 + 2}") for i in range(150)]
    slices = endpoint_slices([service()], pods, [node("node-1")], {})
    assert sorted(len(s["endpoints"]) for s in slices) == [50, 100]
    assert len({s["metadata"]["name"] for s in slices}) == 2
