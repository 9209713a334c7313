"""Golden names (upstream's hashes) and a canonical dump of the seed example's rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeproxy.config import LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects, load_manifests
from kubeproxy.model import parse_cidr
from kubeproxy.pipeline import render_iptables
from kubeproxy.render.iptables import endpoint_chain, service_chain

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "data"


@pytest.mark.parametrize(("prefix", "port_name", "proto", "want"), [
    ("KUBE-SVC-", "ns1/svc1:p80", "TCP", "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ("KUBE-SVC-", "ns2/svc2:p80", "TCP", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
    ("KUBE-EXT-", "ns2/svc2:p80", "TCP", "KUBE-EXT-GNZBNJ2PO5MGZ6GT"),
    ("KUBE-SVL-", "ns2/svc2:p80", "TCP", "KUBE-SVL-GNZBNJ2PO5MGZ6GT"),
    ("KUBE-FW-", "ns5/svc5:p80", "TCP", "KUBE-FW-NUKIZ6OKUXPJNT4C"),
])
def test_service_chain_names(prefix: str, port_name: str, proto: str, want: str) -> None:
    assert service_chain(prefix, port_name, proto) == want


@pytest.mark.parametrize(("port_name", "endpoint", "want"), [
    ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
    ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
])
def test_endpoint_chain_names(port_name: str, endpoint: str, want: str) -> None:
    assert endpoint_chain(port_name, "TCP", endpoint) == want


@pytest.mark.parametrize("variant", ["random", "round-robin"])
def test_seed_golden(variant: str) -> None:
    cluster = decode_objects(load_manifests([ROOT / "examples" / "seed.yaml"]))
    config = ProxyConfig(hostname="node-1", cluster_cidrs=(parse_cidr("10.244.0.0/16", "t"),),
                         lb_algorithm=LBAlgorithm(variant))
    text = render_iptables(cluster, config)[4].save_text()
    path = GOLDEN / f"seed-{variant}.iptables"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"re-run with UPDATE_GOLDEN=1 and review {path}"
