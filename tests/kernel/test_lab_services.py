"""One node, many Services: the core's packet-flow table again, with real packets.

Each row is "from SOURCE to TARGET:PORT reaches {pods}, seen as CLIENT" or a failure kind.
The lab is shared by the module (one per mode); no test here changes it.
"""

from __future__ import annotations

import pytest

from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab

pytestmark = pytest.mark.kernel

WEB = ["web-1", "web-2", "web-3"]
NODE_GW = "10.244.1.1"  # node-1's cbr0: the masquerade source towards its pods
CLIENT = "10.244.1.5"  # pod "client" (web-1..3 are .2-.4)
OUTSIDE, BLOCKED = "203.0.113.2", "203.0.113.130"

PODS = "".join(
    f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web, instance: {name}}}}}
spec:
  nodeName: node-1
  containers:
  - name: web
    ports:
    - {{name: http, containerPort: 8080}}
    - {{name: dns, containerPort: 5353, protocol: UDP}}
"""
    for name in WEB
)

LAB = f"""
apiVersion: v1
kind: Node
metadata: {{name: node-1}}
{PODS}
---
kind: Pod
metadata: {{name: client, labels: {{app: client}}}}
spec: {{nodeName: node-1, containers: [{{name: c}}]}}
---
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
kind: Service
metadata: {{name: self}}
spec:
  selector: {{instance: web-1}}
  ports: [{{port: 80, targetPort: 8080}}]
---
kind: Service
metadata: {{name: web-udp}}
spec:
  selector: {{app: web}}
  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: dns}}]
---
kind: Service
metadata: {{name: web-np}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
---
kind: Service
metadata: {{name: web-ext}}
spec:
  selector: {{app: web}}
  externalIPs: [192.168.99.10]
  ports: [{{port: 80, targetPort: 8080}}]
---
kind: Service
metadata: {{name: web-lb}}
spec:
  type: LoadBalancer
  selector: {{app: web}}
  loadBalancerSourceRanges: [203.0.113.0/25]
  ports: [{{port: 80, targetPort: 8080}}]
status:
  loadBalancer:
    ingress: [{{ip: 1.2.3.4}}]
---
kind: Service
metadata: {{name: web-aff}}
spec:
  selector: {{app: web}}
  sessionAffinity: ClientIP
  ports: [{{port: 80, targetPort: 8080}}]
---
kind: Service
metadata: {{name: empty}}
spec:
  selector: {{app: nothing}}
  ports: [{{port: 80, targetPort: 8080}}]
"""


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktsvc{mode[0]}", LAB, mode=mode)


# (id, from, to, port, proto, backends expected, client addresses expected)
REACHES = [
    ("clusterip-from-pod", "client", "web", 80, "tcp", WEB, [CLIENT]),
    ("clusterip-from-node", "node-1", "web", 80, "tcp", WEB, [NODE_GW]),
    ("hairpin-is-masqueraded", "web-1", "self", 80, "tcp", ["web-1"], [NODE_GW]),
    ("udp", "client", "web-udp", 53, "udp", WEB, [CLIENT]),
    ("nodeport-from-outside", "external", "node-1", 30080, "tcp", WEB, [NODE_GW]),
    ("external-ip-from-outside", "external", "192.168.99.10", 80, "tcp", WEB, [NODE_GW]),
    ("lb-ip-allowed-source", "external", "1.2.3.4", 80, "tcp", WEB, [NODE_GW]),
]


@pytest.mark.parametrize(
    ("source", "target", "port", "proto", "backends", "clients"),
    [r[1:] for r in REACHES],
    ids=[r[0] for r in REACHES],
)
def test_reaches(
    lab: Lab,
    source: str,
    target: str,
    port: int,
    proto: str,
    backends: list[str],
    clients: list[str],
) -> None:
    result = lab.probe(source, target, port, proto=proto, n=60)
    assert (result.ok, sorted(result.backends)) == (60, backends), result
    assert list(result.client_addresses) == clients


def test_no_endpoints_is_refused(lab: Lab) -> None:
    result = lab.probe("client", "empty", 80, n=3, timeout=0.5)
    assert (result.ok, result.refused) == (0, 3), result


def test_source_ranges_drop_a_blocked_client(lab: Lab) -> None:
    allowed = lab.probe("external", "1.2.3.4", 80, n=5, source_ip=OUTSIDE)
    assert allowed.ok == 5, allowed
    blocked = lab.probe("external", "1.2.3.4", 80, n=3, timeout=0.5, source_ip=BLOCKED)
    assert (blocked.ok, blocked.timeout) == (0, 3), blocked
    # Source ranges guard the LB IP only, not the node port of the same Service.
    node_port = lab.service("web-lb")["spec"]["ports"][0]["nodePort"]
    via_node_port = lab.probe("external", "node-1", node_port, n=5, source_ip=BLOCKED)
    assert via_node_port.ok == 5, via_node_port


def test_session_affinity_keeps_one_client_on_one_pod(lab: Lab) -> None:
    result = lab.probe("client", "web-aff", 80, n=30)
    assert result.ok == 30 and len(result.backends) == 1, result
    again = lab.probe("client", "web-aff", 80, n=10)
    assert again.backends == {next(iter(result.backends)): 10}


def test_unused_port_of_a_cluster_ip_gets_no_answer(lab: Lab) -> None:
    result = lab.probe("client", "web", 81, n=2, timeout=0.5)
    assert result.ok == 0, result
