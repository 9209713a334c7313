"""Two nodes: cross-node Service traffic and the traffic policies that depend on the node.

node-1 (zone-a) runs a1, a2 and client-1; node-2 (zone-b) runs b1 and client-2. The
external client's Service external/LB IPs are routed to node-1.
"""

from __future__ import annotations

import pytest

from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab, mode_tag

pytestmark = pytest.mark.kernel

OUTSIDE = "203.0.113.2"


def pod(name: str, node: str, app: str) -> str:
    ports = "[{name: c, ports: [{containerPort: 8080}]}]" if app == "web" else "[{name: c}]"
    return f"""
---
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec: {{nodeName: {node}, containers: {ports}}}
"""


LAB = (
    """
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}
---
kind: Node
metadata: {name: node-2, labels: {topology.kubernetes.io/zone: zone-b}}
"""
    + pod("a1", "node-1", "web")
    + pod("a2", "node-1", "web")
    + pod("b1", "node-2", "web")
    + pod("client-1", "node-1", "client")
    + pod("client-2", "node-2", "client")
    + """
---
kind: Service
metadata: {name: spread}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
kind: Service
metadata: {name: local-ext}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30100}]
status:
  loadBalancer:
    ingress: [{ip: 5.6.7.8}]
---
kind: Service
metadata: {name: local-int}
spec:
  internalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""
)


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktnod{mode_tag(mode)}", LAB, mode=mode)


def pod_ip(lab: Lab, name: str) -> str:
    return lab.address_of(name)


def test_pods_on_both_nodes_answer_without_masquerade(lab: Lab) -> None:
    for client in ("client-1", "client-2"):
        result = lab.probe(client, "spread", 80, n=60)
        assert (result.ok, sorted(result.backends)) == (60, ["a1", "a2", "b1"]), result
        assert result.client_addresses == (pod_ip(lab, client),)


# (id, target, node port or LB port, local backends)
EXTERNAL_LOCAL = [
    ("nodeport-node-1", "node-1", 30100, ["a1", "a2"]),
    ("nodeport-node-2", "node-2", 30100, ["b1"]),
    ("lb-ip-routed-to-node-1", "5.6.7.8", 80, ["a1", "a2"]),
]


@pytest.mark.parametrize(
    ("target", "port", "backends"),
    [c[1:] for c in EXTERNAL_LOCAL],
    ids=[c[0] for c in EXTERNAL_LOCAL],
)
def test_external_traffic_policy_local(
    lab: Lab, target: str, port: int, backends: list[str]
) -> None:
    result = lab.probe("external", target, port, n=40)
    assert (result.ok, sorted(result.backends)) == (40, backends), result
    assert result.client_addresses == (OUTSIDE,)  # the real client address: no masquerade


@pytest.mark.parametrize(("client", "backends"), [("client-1", ["a1", "a2"]), ("client-2", ["b1"])])
def test_internal_traffic_policy_local(lab: Lab, client: str, backends: list[str]) -> None:
    result = lab.probe(client, "local-int", 80, n=40)
    assert (result.ok, sorted(result.backends)) == (40, backends), result
