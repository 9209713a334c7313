"""The lab agent against a real (in-process) API server, with iproute2 recorded: no root.

The agent's passes run here step by step: Pods scheduled, given IPs and reported Running;
readiness and deletion reaching the EndpointSlices; LoadBalancer IPs and the external
client's routes; Pods that cannot run saying why. Pod servers are not started (the
starter says "nothing to serve"), namespaces and links are only recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kubeproxy.apiserver.server import ApiServer, ServerConfig
from kubeproxy.lab import layout, objects
from kubeproxy.lab.agent import Agent
from kubeproxy.lab.api import LabApi
from kubeproxy.lab.manifest import SERVICE_NAME_LABEL, load_documents, parse_objects
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.state import LabState, LabStore
from kubeproxy.util.jsontypes import JSON

LAB = """
kind: Node
metadata: {name: node-1}
---
kind: Node
metadata: {name: node-2, labels: {topology.kubernetes.io/zone: z2}}
---
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {nodeName: node-1, containers: [{ports: [{containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec: {nodeName: node-2, containers: [{ports: [{containerPort: 8080}]}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


class FakeIp:
    """Records iproute2 calls; keeps the list of namespaces so exists() tells the truth."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.namespaces: set[str] = set()

    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> str:
        self.calls.append(" ".join(argv))
        if list(argv[:3]) == ["ip", "netns", "add"]:
            self.namespaces.add(argv[3])
        elif list(argv[:3]) == ["ip", "netns", "delete"]:
            self.namespaces.discard(argv[3])
        elif list(argv[:3]) == ["ip", "netns", "list"]:
            return "".join(f"{ns}\n" for ns in sorted(self.namespaces))
        return ""


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.config = ServerConfig(bookmark_interval=0.05, reap_interval=0.05,
                                   state_file=str(tmp / "apiserver.json"))
        self.server = ApiServer(self.config).start()
        self.api = LabApi(self.server.url)
        plan = layout.plan("u", parse_objects(load_documents([("lab", LAB)])))
        bodies, _ = objects.api_objects(plan, [])
        for body in bodies:
            self.api.create(body)
        self.state = LabState(
            name="u", mode="iptables", lb_algorithm="random", cluster_cidr=plan.cluster_cidr,
            service_cidr=plan.service_cidr, external_node=None, switch_ns=plan.switch_ns,
            nodes=plan.nodes, external=plan.external,
        )  # fmt: skip
        self.ip = FakeIp()
        self.agent = Agent(LabStore("u", tmp), self.state, self.api, Netns(self.ip), lambda p: None)
        self.agent.start()
        self.settle()

    def settle(self, timeout: float = 10.0) -> None:
        """Step the agent until it acted on everything the API holds now."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.agent.step(0.1)
            acted = self.agent.acted_on()
            if (
                self.agent.idle
                and len(acted) == 4
                and min(acted.values()) >= self.api.resource_version()
            ):
                return
        raise AssertionError(f"the agent did not settle: {self.agent.errors}")

    def pod(self, name: str) -> JSON:
        return self.api.get("Pod", "default", name)

    def endpoints(self, service: str = "web") -> dict[str, JSON]:
        items, _ = self.api.list("EndpointSlice", "default")
        mine = [s for s in items if s["metadata"]["labels"].get(SERVICE_NAME_LABEL)
                == service]  # fmt: skip
        return {e["targetRef"]["name"]: e for s in mine for e in s.get("endpoints") or []}

    def restart_server(self) -> None:
        """Stop the API server and start another on the same port, from its state file."""
        port = self.server.port
        self.server.stop()
        self.server = ApiServer(replace(self.config, port=port)).start()

    def close(self) -> None:
        self.agent.close()
        self.server.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def test_pods_run_with_their_planned_ips_and_become_endpoints(lab: Harness) -> None:
    for name, ip, host in (("web-1", "10.244.1.2", "192.168.0.2"),
                           ("web-2", "10.244.2.2", "192.168.0.3")):  # fmt: skip
        status = lab.pod(name)["status"]
        assert (status["phase"], status["podIP"], status["hostIP"]) == ("Running", ip, host)
        assert objects.is_ready(lab.pod(name))
    assert "ip -n kpl-u-pod-default.web-1 addr add 10.244.1.2/24 dev eth0" in lab.ip.calls
    eps = lab.endpoints()
    assert {n: e["conditions"] for n, e in eps.items()} == {
        "web-1": {"ready": True, "serving": True, "terminating": False},
        "web-2": {"ready": True, "serving": True, "terminating": False},
    }
    assert eps["web-2"]["zone"] == "z2" and eps["web-2"]["nodeName"] == "node-2"


def test_readiness_reaches_the_slice(lab: Harness) -> None:
    lab.api.mutate("Pod", "default", "web-1",
                   lambda cur: objects.with_ready(cur, False, time.time()), "status")  # fmt: skip
    lab.settle()
    assert lab.endpoints()["web-1"]["conditions"]["ready"] is False
    assert lab.pod("web-1")["status"]["podIP"] == "10.244.1.2"  # the agent left it alone


def test_deleted_pod_terminates_then_goes(lab: Harness) -> None:
    lab.api.delete("Pod", "default", "web-2", grace=1)
    lab.settle()
    assert lab.endpoints()["web-2"]["conditions"] == {
        "ready": False, "serving": True, "terminating": True,
    }  # fmt: skip
    deadline = time.monotonic() + 10
    while "kpl-u-pod-default.web-2" in lab.ip.namespaces and time.monotonic() < deadline:
        lab.agent.step(0.1)
    lab.settle()
    assert "kpl-u-pod-default.web-2" not in lab.ip.namespaces
    assert set(lab.endpoints()) == {"web-1"}
    assert "ip -n kpl-u-node-node-2 neigh flush to 10.244.2.2 dev cbr0" in lab.ip.calls


def test_unbound_pod_is_scheduled_by_recreation(lab: Harness) -> None:
    lab.api.create({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "new", "labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
    lab.settle()
    pod = lab.pod("new")
    assert pod["spec"]["nodeName"] in ("node-1", "node-2")
    assert pod["status"]["phase"] == "Running"
    node = pod["spec"]["nodeName"]
    assert pod["status"]["podIP"] == {"node-1": "10.244.1.3", "node-2": "10.244.2.3"}[node]
    assert set(lab.endpoints()) == {"web-1", "web-2", "new"}


def test_pod_on_a_missing_node_stays_pending_and_says_why(lab: Harness) -> None:
    lab.api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "lost"},
            "spec": {"nodeName": "node-9", "containers": [{"name": "c", "image": "x"}]},
        }
    )
    lab.settle()
    status = lab.pod("lost")["status"]
    assert status["phase"] == "Pending"
    assert "not a node of lab 'u'" in status["conditions"][0]["message"]


def test_load_balancer_gets_an_ip_and_a_route_then_slices_follow_the_service(
    lab: Harness,
) -> None:
    lab.api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
                    "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                             "ports": [{"port": 80, "targetPort": 8080}]}})  # fmt: skip
    lab.settle()
    svc = lab.api.get("Service", "default", "lb")
    assert svc["status"]["loadBalancer"]["ingress"][0]["ip"] == "192.168.100.10"
    route = "ip -n kpl-u-external route add 192.168.100.10/32 via 192.168.0.2 src 203.0.113.2"
    assert route in lab.ip.calls
    assert set(lab.endpoints("lb")) == {"web-1", "web-2"}
    lab.api.delete("Service", "default", "lb")
    lab.settle()
    assert lab.endpoints("lb") == {}


def test_agent_follows_an_api_server_restart(lab: Harness) -> None:
    """Same port, same objects (the state file): the caches reach the new server (a
    watch from their resourceVersion, or a list), and a Service created after the
    restart gets its slices."""
    before = {k: c.connections for k, c in lab.agent.caches.items()}
    uid = lab.pod("web-1")["metadata"]["uid"]
    lab.restart_server()
    assert lab.pod("web-1")["metadata"]["uid"] == uid, "the objects came back"
    lab.api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late"},
                    "spec": {"selector": {"app": "web"},
                             "ports": [{"port": 80, "targetPort": 8080}]}})  # fmt: skip
    lab.settle()
    assert set(lab.endpoints("late")) == {"web-1", "web-2"}
    assert all(c.connections > before[k] for k, c in lab.agent.caches.items())
