"""Manifest parsing and topology planning for the lab (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubeproxy.lab import layout
from kubeproxy.lab.errors import LabManifestError
from kubeproxy.lab.manifest import load_documents, parse_objects

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed.yaml"

TWO_NODES = """
apiVersion: v1
kind: Node
metadata: {name: alpha, labels: {topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Node
metadata: {name: beta}
spec: {podCIDR: 10.244.7.0/24}
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: web}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: web}}
spec: {nodeName: alpha, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  externalIPs: [192.168.99.10]
  ports: [{port: 80, targetPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: fixed}
spec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}
"""


def plan_of(text: str, lab: str = "t", **options: Any) -> layout.Plan:
    objects = parse_objects(load_documents([("test.yaml", text)]))
    return layout.plan(lab, objects, layout.Options(**options))


def test_two_nodes_addresses_and_names() -> None:
    p = plan_of(TWO_NODES)
    alpha, beta = p.nodes
    assert (alpha.lab_ip, alpha.pod_cidr, alpha.gateway, alpha.zone) == (
        "192.168.0.2",
        "10.244.1.0/24",
        "10.244.1.1",
        "z1",
    )
    assert (beta.lab_ip, beta.pod_cidr) == ("192.168.0.3", "10.244.7.0/24")
    assert alpha.ns == "kpl-t-node-alpha" and p.switch_ns == "kpl-t-net"
    assert p.external.ns == "kpl-t-external"
    # Unplaced pods go round-robin over the nodes; IPs come from their node's podCIDR.
    placed = {pp.name: (pp.node, pp.ip) for pp in p.pods}
    assert placed == {
        "a": ("alpha", "10.244.1.2"),
        "b": ("beta", "10.244.7.2"),
        "c": ("alpha", "10.244.1.3"),
    }
    for ns in p.namespaces():
        assert ns.startswith("kpl-t-")
    for name in [pp.host_if for pp in p.pods] + [n.switch_port for n in p.nodes]:
        assert len(name) <= 15


def test_pod_listens_on_container_ports_and_numeric_target_ports() -> None:
    p = plan_of(TWO_NODES)
    a = next(pp for pp in p.pods if pp.name == "a")
    assert a.listen == ("8080/tcp", "8080/udp", "9090/tcp", "9090/udp")


def test_service_allocation_and_external_routes() -> None:
    p = plan_of(TWO_NODES)
    web, fixed = p.objects.services
    assert web.cluster_ip == "10.96.0.11"  # .10 is taken by "fixed"
    assert web.ports[0].node_port == 30000
    assert web.lb_ips == ("192.168.100.10",)
    assert fixed.cluster_ip == "10.96.0.10"
    assert p.external.via == "192.168.0.2"
    assert p.external.routes == ("192.168.99.10/32", "192.168.100.10/32")
    via_beta = plan_of(TWO_NODES, external_node="beta")
    assert via_beta.external.via == "192.168.0.3"


def test_resolved_objects_are_what_apply_reads() -> None:
    p = plan_of(TWO_NODES)
    alpha = p.objects.nodes[0].raw
    assert alpha["spec"]["podCIDR"] == "10.244.1.0/24"
    assert alpha["status"]["addresses"][0] == {"type": "InternalIP", "address": "192.168.0.2"}
    assert alpha["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z1"
    # Re-planning the resolved objects gives the same plan (state is stable).
    again = layout.plan("t", p.objects)
    assert again.pods == p.pods and again.nodes == p.nodes


def test_default_node_when_none_given() -> None:
    p = plan_of("kind: Pod\nmetadata: {name: solo}\nspec: {containers: []}\n")
    assert [n.name for n in p.nodes] == ["node-1"]
    assert p.pods[0].ip == "10.244.1.2"


def test_seed_example_plans() -> None:
    objects = parse_objects(load_documents([("seed", SEED.read_text())]))
    # The seed's slices belong to selector Services: the lab's controller owns those.
    assert objects.slices == () and len(objects.notes) == 2
    p = layout.plan("seed", objects)
    assert [pp.ip for pp in p.pods] == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]


def test_selectorless_service_keeps_user_slices() -> None:
    text = """
kind: Service
metadata: {name: manual}
spec: {ports: [{port: 80}]}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: manual-1, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.9]}]
"""
    objects = parse_objects(load_documents([("t", text)]))
    assert [s["metadata"]["name"] for s in objects.slices] == ["manual-1"]


ERROR_CASES = [
    ("bad lab name", "", {"lab": "Bad"}, "lab name"),
    (
        "unknown node",
        "kind: Pod\nmetadata: {name: p}\nspec: {nodeName: nope}\n",
        {},
        "Pod default/p: spec.nodeName 'nope'",
    ),
    (
        "bad port",
        "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: x}]}]}\n",
        {},
        "Pod default/p: spec.containers[0].ports[0].containerPort",
    ),
    (
        "pod IP outside node CIDR",
        "kind: Pod\nmetadata: {name: p}\nspec: {}\nstatus: {podIP: 10.9.9.9}\n",
        {},
        "status.podIP 10.9.9.9",
    ),
    (
        "podCIDR outside cluster CIDR",
        "kind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.9.0.0/24}\n",
        {},
        "Node n: spec.podCIDR 10.9.0.0/24 is outside",
    ),
    ("unsupported kind", "kind: Deployment\nmetadata: {name: d}\n", {}, "Deployment d"),
    (
        "bad service type",
        "kind: Service\nmetadata: {name: s}\nspec: {type: Weird}\n",
        {},
        "Service default/s: spec.type",
    ),
    (
        "duplicate",
        "kind: Pod\nmetadata: {name: p}\n---\nkind: Pod\nmetadata: {name: p}\n",
        {},
        "twice",
    ),
    ("not yaml", "kind: [", {}, "not valid YAML"),
]


@pytest.mark.parametrize(
    ("text", "kw", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors_name_the_object_and_field(text: str, kw: dict[str, str], message: str) -> None:
    with pytest.raises(LabManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_of(text, **kw)


def test_list_kind_is_flattened() -> None:
    docs = load_documents([("t", "kind: List\nitems:\n- {kind: Pod, metadata: {name: p}}\n")])
    assert [d["kind"] for d in docs] == ["Pod"]
