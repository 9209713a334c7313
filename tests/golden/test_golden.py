"""Golden names (upstream's hashes) and canonical dumps of the seed example's rules.

The dumps (tests/golden/data/, one per case in cases.py: iptables-save text and the
``nft -f`` script, random and round-robin) are compared, never written, here: to change
them, run ``python -m tests.golden.update`` and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest

from kubeproxy.render.ipt_names import endpoint_chain, service_chain
from tests.golden.cases import CASES, UPDATE_COMMAND, Case


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


def test_update_is_a_separate_step() -> None:
    """The old way (UPDATE_GOLDEN=1 pytest) rewrote the files and passed: refuse it."""
    if os.environ.get("UPDATE_GOLDEN"):
        pytest.fail(f"UPDATE_GOLDEN is not read by the tests any more: run `{UPDATE_COMMAND}`"
                    " to rewrite tests/golden/data/, review the diff, then run pytest")


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_golden(case: Case) -> None:
    assert case.path.exists(), f"{case.path} is missing: run `{UPDATE_COMMAND}`"
    text = case.render()
    assert text == case.path.read_text(), (
        f"{case.path.name} differs from the rendered rules: if the change is intended, "
        f"run `{UPDATE_COMMAND}` and review the diff")


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_dump_is_canonical(case: Case) -> None:
    """The same cluster given in another order renders the same text: the order of the
    manifest's documents (Services, slices, endpoints within a slice) is not in the dump."""
    objects = case.objects()
    shuffled = [_reversed_endpoints(obj) for obj in reversed(objects)]
    assert [o.get("kind") for o in shuffled] != [o.get("kind") for o in objects]
    assert case.render(shuffled) == case.render(objects)


def _reversed_endpoints(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    if obj.get("kind") == "EndpointSlice":
        return {**obj, "endpoints": list(reversed(obj.get("endpoints") or []))}
    return obj
