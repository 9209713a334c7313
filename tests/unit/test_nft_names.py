"""Names of the per-service nftables objects: upstream kube-proxy's, character for character."""

from __future__ import annotations

import ipaddress

import pytest

from kubeproxy.model import NamespacedName, ServicePortName
from kubeproxy.nodeview import endpoint_view
from kubeproxy.render.nft_names import (
    ENDPOINT_GROUPS,
    NAME_MAX,
    chain_base,
    endpoint_base,
    endpoint_group,
    endpoint_map,
)


def spn(ns: str, name: str, port: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName(NamespacedName(ns, name), port, proto)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "want"), [
    # Upstream's own examples (pkg/proxy/nftables/proxier.go and its tests).
    (spn("ns1", "svc1", "p80"), "ULMVA6XW-ns1/svc1/tcp/p80"),
    (spn("ns1", "svc1", "", "UDP"), chain_base(spn("ns1", "svc1", "", "UDP"))),
])
def test_service_port_chain_base(name: ServicePortName, want: str) -> None:
    assert chain_base(name) == want


def test_unnamed_port_keeps_the_trailing_slash() -> None:
    assert chain_base(spn("ns1", "svc1", "", "UDP")).endswith("-ns1/svc1/udp/")


def test_endpoint_base_is_upstreams() -> None:
    ep = endpoint_view(ipaddress.ip_address("10.180.0.1"), 80, True)
    want = "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert endpoint_base(spn("ns1", "svc1", "p80"), ep) == want


def test_ipv6_endpoint_colons_become_dots() -> None:
    ep = endpoint_view(ipaddress.ip_address("fd00::1"), 80, True)
    assert endpoint_base(spn("ns1", "svc1", "p80"), ep).endswith("__fd00..1/80")


def test_long_names_are_cut_to_fit() -> None:
    long = spn("n" * 63, "s" * 63, "p" * 63)
    ep = endpoint_view(ipaddress.ip_address("fd00:1234:5678:9abc:def0:1234:5678:9abc"),
                       65535, True)
    base = endpoint_base(long, ep)
    assert base.endswith("...") and len("affinity-" + base) < NAME_MAX
    assert len("service-" + chain_base(long)) < NAME_MAX


def test_endpoint_groups_are_stable_and_in_range() -> None:
    groups = {endpoint_group(spn("ns", f"s{i}", "p")) for i in range(2000)}
    assert groups <= set(range(ENDPOINT_GROUPS)) and len(groups) > 200
    assert endpoint_group(spn("ns1", "svc1", "p80")) == endpoint_group(spn("ns1", "svc1", "p80"))
    assert endpoint_map(0x2C) == "endpoints-2c"
