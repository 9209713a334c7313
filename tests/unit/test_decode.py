"""Decoding Kubernetes objects: valid shapes, invalid ones, and hostile input."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.errors import ManifestError
from kubeproxy.k8s import decode_objects, parse_manifest_text
from kubeproxy.model import ServiceType, TrafficPolicy
from tests.builders import Obj, endpoint, endpoint_slice, node, render_iptables, service


def test_service_fields() -> None:
    svc = service("svc1", type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)],
                  lb_ips=["5.6.7.8", {"ip": "1.2.3.4", "ipMode": "Proxy"}],
                  externalIPs=["192.168.99.11"], externalTrafficPolicy="Local",
                  healthCheckNodePort=30000, sessionAffinity="ClientIP",
                  loadBalancerSourceRanges=["203.0.113.0/25"])
    cluster = decode_objects([svc])
    assert not cluster.errors
    (s,) = cluster.services
    assert s.type is ServiceType.LOAD_BALANCER
    assert s.load_balancer_ips == (ipaddress.ip_address("5.6.7.8"),)  # ipMode Proxy skipped
    assert s.external_traffic_policy is TrafficPolicy.LOCAL
    assert s.session_affinity_timeout == 10800
    assert s.health_check_node_port == 30000
    assert s.ports[0].node_port == 3001


def test_list_and_multidoc() -> None:
    text = """
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a, namespace: x},
   spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"},
 "spec": {"clusterIP": "10.0.0.2", "ports": [{"port": 81}]}}
---
"""
    cluster = decode_objects(parse_manifest_text(text))
    assert [(s.namespace, s.name) for s in cluster.services] == [("x", "a"), ("default", "b")]


def test_unparseable_file() -> None:
    with pytest.raises(ManifestError, match="not valid YAML"):
        parse_manifest_text("a: [1, 2", "bad.yaml")


def _set(obj: Obj, path: str, value: Any) -> Obj:
    out = copy.deepcopy(obj)
    node_: Any = out
    keys = path.split(".")
    for key in keys[:-1]:
        node_ = node_[int(key)] if key.isdigit() else node_[key]
    last = keys[-1]
    if last.isdigit():
        node_[int(last)] = value
    else:
        node_[last] = value
    return out


SVC = service("svc1")
SLICE = endpoint_slice("svc1", [endpoint("10.180.0.1")])
HOSTILE = [
    'x" -j ACCEPT',
    "x\n-A KUBE-SERVICES -j ACCEPT",
    "-j ACCEPT",
    "a" * 10_000,
    "x'; rm -rf /",
    "UPPER",
    "",
]
INVALID = [
    # (id, object, field named in the error)
    ("bad-cluster-ip", _set(_set(SVC, "spec.clusterIP", "300.1.1.1"), "spec.clusterIPs",
                            ["300.1.1.1"]), "spec.clusterIPs[0]"),
    ("cluster-ip-mismatch", _set(SVC, "spec.clusterIP", "10.0.0.9"), "spec.clusterIP"),
    ("bad-cluster-ips", _set(SVC, "spec.clusterIPs", ["172.30.0.41", "10.0.0.2"]),
     "spec.clusterIPs"),
    ("port-too-big", _set(SVC, "spec.ports.0.port", 70000), "spec.ports[0].port"),
    ("port-zero", _set(SVC, "spec.ports.0.port", 0), "spec.ports[0].port"),
    ("port-string", _set(SVC, "spec.ports.0.port", "80"), "spec.ports[0].port"),
    ("nodeport-negative", _set(service("s", type="NodePort", ports=[("p", 80, "TCP", 3001)]),
                               "spec.ports.0.nodePort", -1), "spec.ports[0].nodePort"),
    ("bad-protocol", _set(SVC, "spec.ports.0.protocol", "ICMP"), "spec.ports[0].protocol"),
    ("bad-type", _set(SVC, "spec.type", "Magic"), "spec.type"),
    ("bad-policy", _set(SVC, "spec.externalTrafficPolicy", "Nearby"),
     "spec.externalTrafficPolicy"),
    ("bad-external-ip", _set(SVC, "spec.externalIPs", ["1.2.3"]), "spec.externalIPs[0]"),
    ("bad-source-range", _set(service("s", type="LoadBalancer"), "spec.loadBalancerSourceRanges",
                              ["10.0.0.0/33"]), "spec.loadBalancerSourceRanges[0]"),
    ("bad-affinity-timeout", _set(_set(SVC, "spec.sessionAffinity", "ClientIP"),
                                  "spec.sessionAffinityConfig",
                                  {"clientIP": {"timeoutSeconds": 0}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    ("duplicate-port", _set(SVC, "spec.ports", [{"name": "a", "port": 1}, {"name": "a",
                                                                           "port": 2}]),
     "spec.ports[1]"),
    ("unnamed-ports", _set(SVC, "spec.ports", [{"port": 1}, {"name": "a", "port": 2}]),
     "spec.ports"),
    ("slice-bad-ip", _set(SLICE, "endpoints.0.addresses", ["10.180.0.300"]),
     "endpoints[0].addresses[0]"),
    ("slice-wrong-family", _set(SLICE, "endpoints.0.addresses", ["fd00::1"]),
     "endpoints[0].addresses[0]"),
    ("slice-bad-port", _set(SLICE, "ports.0.port", 65536), "ports[0].port"),
    ("slice-no-service-label", _set(SLICE, "metadata.labels", {}),
     "metadata.labels[kubernetes.io/service-name]"),
    ("slice-bad-address-type", _set(SLICE, "addressType", "IPv5"), "addressType"),
    ("slice-ready-string", _set(SLICE, "endpoints.0.conditions", {"ready": "yes"}),
     "endpoints[0].conditions.ready"),
    ("node-bad-cidr", _set(node(), "spec.podCIDRs", ["10.0.0.0/99"]), "spec.podCIDRs[0]"),
    ("node-bad-address", _set(node(), "status.addresses", [{"type": "InternalIP",
                                                             "address": "x"}]),
     "status.addresses[0].address"),
    ("spec-not-object", _set(SVC, "spec", ["x"]), "spec"),
] + [(f"hostile-name-{i}", _set(SVC, "metadata.name", h), "metadata.name")
     for i, h in enumerate(HOSTILE)] + [
    (f"hostile-namespace-{i}", _set(SVC, "metadata.namespace", h), "metadata.namespace")
    for i, h in enumerate(HOSTILE) if h] + [
    (f"hostile-port-name-{i}", _set(SVC, "spec.ports.0.name", h), "spec.ports[0].name")
    for i, h in enumerate(HOSTILE) if h] + [
    (f"hostile-slice-port-name-{i}", _set(SLICE, "ports.0.name", h), "ports[0].name")
    for i, h in enumerate(HOSTILE) if h] + [
    (f"hostile-service-label-{i}", _set(SLICE, "metadata.labels",
                                        {"kubernetes.io/service-name": h}),
     "metadata.labels[kubernetes.io/service-name]") for i, h in enumerate(HOSTILE) if h]


@pytest.mark.parametrize(("obj", "field"), [(o, f) for _, o, f in INVALID],
                         ids=[i for i, _, _ in INVALID])
def test_invalid_object_is_reported_and_skipped(obj: Obj, field: str) -> None:
    good = service("good", cluster_ip="172.30.0.99")
    good_slice = endpoint_slice("good", [endpoint("10.180.0.99")])
    cluster = decode_objects([obj, good, good_slice, node()])
    assert len(cluster.errors) == 1, cluster.errors
    err = cluster.errors[0]
    assert err.field_path == field, str(err)
    assert err.kind == obj["kind"]
    assert len(str(err)) < 400  # bounded, whatever the input
    assert "\n" not in str(err)
    # Everything else still works, and the bad object contributes nothing at all.
    config = ProxyConfig(hostname="node1")
    text = render_iptables(cluster, config)[4].save_text()
    assert "172.30.0.99" in text and "10.180.0.99:80" in text
    baseline = decode_objects([good, good_slice, node()])
    assert text == render_iptables(baseline, config)[4].save_text()


def test_every_line_of_hostile_render_is_well_formed() -> None:
    objects = [o for _, o, _ in INVALID] + [service("good"), node()]
    cluster = decode_objects(objects)
    text = render_iptables(cluster, ProxyConfig(hostname="node1"))[4].save_text()
    for line in text.splitlines():
        assert line.startswith(("*", ":", "-A ", "COMMIT")), line
        assert line.count('"') % 2 == 0, line
