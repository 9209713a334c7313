"""One node, many Services: the core's packet-flow table again, with real packets.

Each row is "from SOURCE to TARGET:PORT reaches {pods}, seen as CLIENT", or "... gets
FAILURE" where FAILURE is the probe's failure kind (kubeproxy.lab.probe): ``refused`` is
what a REJECT sends back (ICMP port-unreachable), ``timeout`` is a DROP (no answer at all).
A failure row asserts every request failed that one way, so a REJECT that became a DROP
(or the other way round) fails the test.
The lab is shared by the module (one per mode); no test here changes it.
"""

from __future__ import annotations

import pytest

from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab, mode_tag

pytestmark = pytest.mark.kernel

WEB = ["web-1", "web-2", "web-3"]
NODE_GW = "10.244.1.1"  # node-1's cbr0: the masquerade source towards its pods
CLIENT = "10.244.1.5"  # pod "client" (web-1..3 are .2-.4)
WEB_1 = "10.244.1.2"  # pod web-1
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
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
# externalTrafficPolicy=Local with an endpoint, but on another node (node-2 is not in the
# lab: the slice is hand-written): node-1 has no local endpoint, so external traffic is
# dropped there (upstream: DROP, not REJECT, because the Service does have endpoints),
# while cluster-internal traffic still reaches the endpoint (web-1's address).
kind: Service
metadata: {{name: local-elsewhere}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-elsewhere-1
  labels: {{kubernetes.io/service-name: local-elsewhere}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- addresses: [{WEB_1}]
  conditions: {{ready: true}}
  nodeName: node-2
"""


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktsvc{mode_tag(mode)}", LAB, mode=mode)


# (id, from, to, port, proto, backends expected, client addresses expected)
# Declared differences of a mode, by (source, target): the client addresses seen.
# Socket LB connects a pod straight to itself: hairpin needs no masquerade.
CLIENTS_BY_MODE: dict[tuple[str, str], dict[str, list[str]]] = {
    ("web-1", "self"): {"ebpf": [WEB_1]},
}

REACHES = [
    ("clusterip-from-pod", "client", "web", 80, "tcp", WEB, [CLIENT]),
    ("clusterip-from-node", "node-1", "web", 80, "tcp", WEB, [NODE_GW]),
    ("hairpin-is-masqueraded", "web-1", "self", 80, "tcp", ["web-1"], [NODE_GW]),
    ("udp", "client", "web-udp", 53, "udp", WEB, [CLIENT]),
    ("nodeport-from-outside", "external", "node-1", 30080, "tcp", WEB, [NODE_GW]),
    ("external-ip-from-outside", "external", "192.168.99.10", 80, "tcp", WEB, [NODE_GW]),
    ("lb-ip-allowed-source", "external", "1.2.3.4", 80, "tcp", WEB, [NODE_GW]),
    ("etp-local-elsewhere", "client", "local-elsewhere", 80, "tcp", ["web-1"], [CLIENT]),
]


@pytest.mark.parametrize(
    ("source", "target", "port", "proto", "backends", "clients"),
    [r[1:] for r in REACHES],
    ids=[r[0] for r in REACHES],
)
def test_reaches(
    lab: Lab,
    mode: str,
    source: str,
    target: str,
    port: int,
    proto: str,
    backends: list[str],
    clients: list[str],
) -> None:
    result = lab.probe(source, target, port, proto=proto, n=60)
    assert (result.ok, sorted(result.backends)) == (60, backends), result
    want = CLIENTS_BY_MODE.get((source, target), {}).get(mode, clients)
    assert list(result.client_addresses) == want


# (id, from, source address or None, to, port, proto, failure kind expected)
FAILS = [
    # No endpoints at all: REJECT, from a pod (FORWARD) and from the node itself (OUTPUT).
    ("no-endpoints-from-pod", "client", None, "empty", 80, "tcp", "refused"),
    ("no-endpoints-from-node", "node-1", None, "empty", 80, "tcp", "refused"),
    ("no-endpoints-udp", "client", None, "empty", 53, "udp", "refused"),
    # loadBalancerSourceRanges: a client outside them is dropped.
    ("lb-ip-blocked-source", "external", BLOCKED, "1.2.3.4", 80, "tcp", "timeout"),
    # externalTrafficPolicy=Local, endpoints elsewhere only: external traffic is dropped.
    ("etp-local-no-local-endpoint", "external", None, "node-1", 30090, "tcp", "timeout"),
]


# Declared differences of a mode for a FAILS row, by (source, target, port): the backends
# reached instead and the client addresses they see. IPVS falls back to the cluster
# endpoints when a Local policy has no local endpoints (upstream PR 97081, docs/ipvs.md);
# the lab's endpoint really runs on node-1, so its reply finds the way back, and the
# client is not masqueraded (eTP=Local).
INSTEAD_BY_MODE: dict[tuple[str, str, int], dict[str, tuple[list[str], list[str]]]] = {
    ("external", "node-1", 30090): {"ipvs": (["web-1"], [OUTSIDE])},
}


@pytest.mark.parametrize(
    ("source", "source_ip", "target", "port", "proto", "kind"),
    [f[1:] for f in FAILS],
    ids=[f[0] for f in FAILS],
)
def test_fails(
    lab: Lab,
    mode: str,
    source: str,
    source_ip: str | None,
    target: str,
    port: int,
    proto: str,
    kind: str,
) -> None:
    instead = INSTEAD_BY_MODE.get((source, target, port), {}).get(mode)
    if instead is not None:
        result = lab.probe(source, target, port, proto=proto, n=6, source_ip=source_ip)
        got = (result.ok, sorted(result.backends), list(result.client_addresses))
        assert got == (6, *instead), result
        return
    result = lab.probe(source, target, port, proto=proto, n=3, timeout=0.5, source_ip=source_ip)
    assert (result.ok, result.failures()) == (0, failures(kind, 3)), result


def failures(kind: str, n: int) -> dict[str, int]:
    """The probe's failure counts when all n requests failed as ``kind``."""
    return {k: n if k == kind else 0 for k in ProbeResult(0, 0).failures()}


def test_source_ranges_guard_the_lb_ip_only(lab: Lab) -> None:
    allowed = lab.probe("external", "1.2.3.4", 80, n=5, source_ip=OUTSIDE)
    assert allowed.ok == 5, allowed
    # The blocked client (dropped at the LB IP, see FAILS) reaches the Service's node port.
    node_port = lab.service("web-lb")["spec"]["ports"][0]["nodePort"]
    via_node_port = lab.probe("external", "node-1", node_port, n=5, source_ip=BLOCKED)
    assert via_node_port.ok == 5, via_node_port


def test_session_affinity_keeps_one_client_on_one_pod(lab: Lab) -> None:
    result = lab.probe("client", "web-aff", 80, n=30)
    assert result.ok == 30 and len(result.backends) == 1, result
    again = lab.probe("client", "web-aff", 80, n=10)
    assert again.backends == {next(iter(result.backends)): 10}


# Upstream's nftables proxier rejects traffic to a ClusterIP port no Service has
# (cluster-ips-check); its iptables proxier leaves it alone, so the node routes it onto
# the lab network, where no one answers (ARP for the ClusterIP fails after ~3 s). IPVS
# mode's KUBE-IPVS-FILTER rejects new connections to a kube-ipvs0 address on a port no
# virtual server has (upstream issue 72236).
UNUSED_PORT = {"nftables": "refused", "iptables": "timeout", "ebpf": "refused",
               "ipvs": "refused"}


def test_unused_port_of_a_cluster_ip(lab: Lab, mode: str) -> None:
    result = lab.probe("client", "web", 81, n=2, timeout=0.5)
    assert (result.ok, result.failures()) == (0, failures(UNUSED_PORT[mode], 2)), result
