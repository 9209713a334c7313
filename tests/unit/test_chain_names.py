"""render/names.py against the renderers' real output: the same chains, both ways.

For every case of the diagram tests (the seed, Local policies, no endpoints, source
ranges, external IPs) and every mode: each name ChainNames gives is a chain of the
rendered text, and each per-service chain of the rendered text is named by ChainNames
for some service port, in the role its prefix says.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from kubeproxy import modes
from kubeproxy.render import nftables
from kubeproxy.render.names import ChainNames
from tests.unit.test_lab_diagram import (
    CASE_IDS,
    CASES,
    CHAINS_PER_ENDPOINT,
    Case,
    lab_views,
    rendered_chains,
)


def _b32(text: str, n: int) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:n]


# The seed's my-service:http, as upstream names it (proxier.go of each mode).
SEED_SERVICE_CHAIN = {
    "iptables": "KUBE-SVC-" + _b32("default/my-service:httptcp", 16),
    "nftables": f"service-{_b32('default/my-service/tcp/http', 8)}-default/my-service/tcp/http",
}
SEED_SERVICE_CHAIN["ebpf"] = SEED_SERVICE_CHAIN["nftables"]  # its north-south part
# Chains every table has (some look like per-service ones: service-endpoints-check).
FIXED = {*nftables.FIXED_CHAINS, *(name for name, *_ in nftables.BASE_CHAINS)}
# Per-service chain prefixes by mode -> the ChainNames role they are.
ROLES = {
    "iptables": {"KUBE-SVC-": "service", "KUBE-SVL-": "local", "KUBE-EXT-": "external",
                 "KUBE-FW-": "firewall", "KUBE-SEP-": "endpoints"},
    "nftables": {"service-": "service", "local-": "local", "external-": "external",
                 "firewall-": "firewall", "endpoint-": "endpoints"},
}
ROLES["ebpf"] = ROLES["nftables"]
ROLES["ipvs"] = {}  # virtual servers and ipset entries, no per-service chains
# Chains ipvs mode writes that look like iptables' per-service ones: none may.
IPVS_LIKE = tuple(ROLES["iptables"])


def by_role(names: ChainNames) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {
        role: {n} for role in ("service", "local", "external", "firewall")
        if (n := getattr(names, role)) is not None}
    out["endpoints"] = set(names.endpoints.values())
    return out


@pytest.mark.parametrize("mode", modes.NAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_names_are_the_rendered_per_service_chains(case: Case, mode: str) -> None:
    _, views = lab_views(case, mode)
    chain_names = modes.presentation(mode).chain_names
    named: dict[str, set[str]] = {}
    for view in views:
        for spv in view.services:
            for role, found in by_role(chain_names(spv)).items():
                named.setdefault(role, set()).update(found)
    real = rendered_chains(mode, views, case.node) - FIXED
    per_service = {role: {c for c in real if c.startswith(prefix)}
                   for prefix, role in ROLES[mode].items()}
    for role in ROLES[mode].values():
        assert named.get(role, set()) == per_service[role], role
    if not ROLES[mode]:  # a mode without per-service chains names none, writes none
        assert all(not found for found in named.values()), named
        assert not {c for c in real if c.startswith(IPVS_LIKE)}


@pytest.mark.parametrize("mode", modes.NAMES)
def test_seed_names(mode: str) -> None:
    """The seed's two ports: a service chain each, the NodePort an external chain, and
    (iptables only) a chain per endpoint keyed by the endpoint."""
    _, views = lab_views(CASES[0], mode)
    names = {str(spv.name): modes.presentation(mode).chain_names(spv) for spv in views[0].services}
    plain, nodeport = names["default/my-service:http"], names["default/my-service-nodeport:http"]
    virtual = modes.presentation(mode).virtual_servers
    if virtual is not None:  # no chains: a virtual server per frontend, every pod real
        assert plain.all() == nodeport.all() == ()
        spv = next(s for s in views[0].services if str(s.name) == "default/my-service:http")
        [vs] = virtual(views[0], spv)
        assert (vs.frontend, vs.firewall) == ("ClusterIP", None)
        assert vs.addresses == (f"{spv.cluster_ip}:80/tcp",)
        assert set(vs.reals) == {"10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"}
        return
    assert (plain.local, plain.external, plain.firewall) == (None, None, None)
    assert plain.service and nodeport.service and nodeport.external
    endpoints = {"10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"}
    # Upstream's name, and no endpoint chains where the mode has none (nftables:
    # endpoints are map elements, not chains).
    assert plain.service == SEED_SERVICE_CHAIN[mode]
    assert set(plain.endpoints) == (endpoints if CHAINS_PER_ENDPOINT[mode] else set())
    assert set(plain.endpoints.values()).isdisjoint(nodeport.endpoints.values())
