"""Readiness and termination taking effect on a running lab, then round-robin.

Each change is an API write (pods/status, a DELETE with a grace period); the lab agent's
endpoint controller rewrites the EndpointSlices, every node's proxy re-programs its rules,
and the command returns once they did: the probes right after show the data plane following.
"""

from __future__ import annotations

import time

import pytest

from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab, mode_tag

pytestmark = pytest.mark.kernel


def lab_yaml(pods: list[str]) -> str:
    text = "kind: Node\nmetadata: {name: node-1}\n"
    for name in pods:
        text += f"""---
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}
"""
    text += """---
kind: Pod
metadata: {name: client}
spec: {containers: [{name: c}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""
    return text


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktchg{mode_tag(mode)}", lab_yaml(["c1", "c2", "c3"]), mode=mode)


def backends(lab: Lab, n: int = 40) -> list[str]:
    result = lab.probe("client", "web", 80, n=n, timeout=0.5)
    assert result.ok == n, result
    return sorted(result.backends)


def test_readiness_and_termination(lab: Lab) -> None:
    assert backends(lab) == ["c1", "c2", "c3"]
    lab.set_pod_ready("c2", False)
    assert backends(lab) == ["c1", "c3"]
    lab.set_pod_ready("c2", True)
    assert backends(lab) == ["c1", "c2", "c3"]

    # Terminating: not used while ready endpoints exist ...
    lab.delete_pod("c3", grace=120)
    assert lab.find_pod("c3").terminating
    assert backends(lab) == ["c1", "c2"]
    # ... but used when only serving-and-terminating ones are left (upstream fallback).
    lab.set_pod_ready("c1", False)
    lab.set_pod_ready("c2", False)
    assert backends(lab) == ["c3"]

    # A new delete with no grace ends the pod now: nothing usable -> REJECT.
    lab.delete_pod("c3", grace=0)
    assert "default/c3" not in pod_keys(lab)
    assert not any(ns.endswith(".c3") for ns in lab.net.list_namespaces(lab.prefix))
    refused = lab.probe("client", "web", 80, n=3, timeout=0.5)
    assert (refused.ok, refused.refused) == (0, 3), refused

    lab.set_pod_ready("c1", True)
    assert backends(lab, 10) == ["c1"]


def test_deleted_pod_goes_away_after_its_grace_period(lab: Lab) -> None:
    lab.set_pod_ready("c2", True)
    # A grace period long enough that the Pod is surely still terminating when looked at
    # below, even on a loaded machine; the agent (kubelet) finishes it.
    deadline = lab.delete_pod("c2", grace=5.0)
    assert lab.find_pod("c2").terminating
    assert backends(lab, 10) == ["c1"]
    while "default/c2" in pod_keys(lab) and time.time() < deadline + 15:
        time.sleep(0.2)
    assert "default/c2" not in pod_keys(lab)
    lab.settle()
    assert not any(ns.endswith(".c2") for ns in lab.net.list_namespaces(lab.prefix))
    assert backends(lab, 10) == ["c1"]


def pod_keys(lab: Lab) -> set[str]:
    return {p.key for p in lab.pods()}


@pytest.fixture(scope="module")
def rr_lab(mode: str, make_lab: MakeLab) -> Lab:
    pods = ["r1", "r2", "r3", "r4"]
    return make_lab(f"ktrr{mode_tag(mode)}", lab_yaml(pods), mode=mode, lb_algorithm="round-robin")


def test_round_robin_spreads_exactly(rr_lab: Lab) -> None:
    result = rr_lab.probe("client", "web", 80, n=100)
    assert result.backends == {"r1": 25, "r2": 25, "r3": 25, "r4": 25}, result
