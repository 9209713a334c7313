"""Which endpoints serve cluster and local traffic: upstream's TestCategorizeEndpoints.

One table of named cases over :func:`kubeproxy.topology.categorize`. Each row gives a
service port's endpoints (on this node, "node1" in zone-a, or on "node2"), which kinds of
endpoints the service uses, and the expected answer:

* ``cluster`` / ``local``: the endpoints, in order; ``None`` means the service does not
  use that kind of endpoints at all, ``()`` that it does and there are none (a Local
  policy with nothing on this node drops the traffic);
* ``has_any``: a usable endpoint exists somewhere (false rejects the traffic). It is
  true whenever an expected set is non-empty; ``only_remote`` marks the rows where it is
  true although this node uses none of them (upstream's onlyRemoteEndpoints);
* ``mode``: the topology mode the hints select ("", PreferSameZone, PreferSameNode).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from kubeproxy.model import Endpoint
from kubeproxy.topology import Candidate, categorize, topology_mode

HERE, THERE = "node1", "node2"
ZONE = "zone-a"

# Which kinds of endpoints the service uses: (uses_cluster, uses_local), as the node view
# derives them from the traffic policies.
CLUSTER = (True, False)  # both policies Cluster
ITP_LOCAL = (False, True)  # internalTrafficPolicy=Local, not externally accessible
ETP_LOCAL = (True, True)  # externalTrafficPolicy=Local (a NodePort, external IP or LB)
BOTH_LOCAL = (True, True)  # both Local: external destinations still short-circuit pods


def ep(ip: str, node: str | None = HERE, *, ready: bool = True, serving: bool | None = None,
       terminating: bool = False, zones: tuple[str, ...] = (),
       nodes: tuple[str, ...] = ()) -> Candidate:
    """An endpoint on port 80; ``serving`` defaults to ``ready``, as the API does."""
    return Candidate(Endpoint(
        ipaddress.ip_address(ip), ready=ready,
        serving=ready if serving is None else serving, terminating=terminating,
        node_name=node, zone_hints=frozenset(zones), node_hints=frozenset(nodes)), 80)


def st(ip: str, node: str | None = HERE, **kw: tuple[str, ...]) -> Candidate:
    """A serving-and-terminating endpoint (not ready)."""
    return ep(ip, node, ready=False, serving=True, terminating=True, **kw)


@dataclass(frozen=True)
class Case:
    name: str
    endpoints: tuple[Candidate, ...]
    cluster: tuple[str, ...] | None
    local: tuple[str, ...] | None
    uses: tuple[bool, bool] = CLUSTER
    only_remote: bool = False
    mode: str = ""
    zone: str = ZONE
    prefer_same_node: bool = True

    @property
    def has_any(self) -> bool:
        return bool(self.cluster) or bool(self.local) or self.only_remote


A, B, C, D = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"


def t(*ips: str) -> tuple[str, ...]:
    return tuple(f"{ip}:80" for ip in ips)


CASES = [
    # --- Cluster policy: ready, serving, terminating ------------------------------------
    Case("cluster-all-ready", (ep(A), ep(B, THERE)), t(A, B), None),
    Case("cluster-some-ready", (ep(A, ready=False), ep(B, THERE)), t(B), None),
    Case("cluster-no-endpoints", (), (), None),
    Case("cluster-none-ready-none-serving", (ep(A, ready=False), ep(B, ready=False)),
         (), None),
    Case("cluster-all-serving-terminating-fallback", (st(A), st(B, THERE)), t(A, B), None),
    Case("cluster-ready-wins-over-serving-terminating", (st(A), ep(B, THERE), st(C)),
         t(B), None),
    Case("cluster-terminating-but-not-serving-unusable",
         (ep(A, ready=False, serving=False, terminating=True),), (), None),
    Case("cluster-serving-not-terminating-not-ready-unusable",
         (ep(A, ready=False, serving=True),), (), None),
    Case("cluster-fallback-keeps-only-serving-terminating",
         (st(A), ep(B, ready=False), ep(C, ready=False, serving=False, terminating=True)),
         t(A), None),
    Case("cluster-endpoint-without-node-name", (ep(A, None),), t(A), None),
    # --- internalTrafficPolicy=Local, internal-only service ---------------------------
    Case("itp-local-no-endpoints", (), None, (), ITP_LOCAL),
    Case("itp-local-all-remote", (ep(A, THERE), ep(B, THERE)), None, (), ITP_LOCAL,
         only_remote=True),
    Case("itp-local-all-local", (ep(A), ep(B)), None, t(A, B), ITP_LOCAL),
    Case("itp-local-some-local", (ep(A), ep(B, THERE)), None, t(A), ITP_LOCAL),
    Case("itp-local-endpoint-without-node-is-remote", (ep(A, None),), None, (), ITP_LOCAL,
         only_remote=True),
    Case("itp-local-falls-back-to-local-serving-terminating", (st(A), st(B, THERE)),
         None, t(A), ITP_LOCAL),
    Case("itp-local-remote-ready-does-not-stop-local-fallback", (st(A), ep(B, THERE)),
         None, t(A), ITP_LOCAL),
    Case("itp-local-ready-wins-over-serving-terminating", (st(A), ep(B)), None, t(B),
         ITP_LOCAL),
    Case("itp-local-only-remote-serving-terminating", (st(A, THERE),), None, (), ITP_LOCAL,
         only_remote=True),
    Case("itp-local-local-unusable-only", (ep(A, ready=False),), None, (), ITP_LOCAL),
    Case("itp-local-topology-ignored", (ep(A, zones=("zone-b",)), ep(B, THERE, zones=(ZONE,))),
         None, t(A), ITP_LOCAL, mode="PreferSameZone"),
    # --- externalTrafficPolicy=Local: cluster endpoints too (pods short-circuit) -------
    Case("etp-local-some-local", (ep(A), ep(B, THERE)), t(A, B), t(A), ETP_LOCAL),
    Case("etp-local-all-remote", (ep(A, THERE), ep(B, THERE)), t(A, B), (), ETP_LOCAL),
    Case("etp-local-no-endpoints", (), (), (), ETP_LOCAL),
    Case("etp-local-all-remote-and-terminating", (st(A, THERE), st(B, THERE)), t(A, B), (),
         ETP_LOCAL, only_remote=True),
    Case("etp-local-remote-ready-local-serving-terminating",
         (ep(A, THERE), ep(B, ready=False), st(C), st(D, THERE)), t(A), t(C), ETP_LOCAL),
    Case("etp-local-local-fallback-independent-of-cluster", (st(A), st(B, THERE)),
         t(A, B), t(A), ETP_LOCAL),
    Case("etp-local-topology-ignored-for-local",
         (ep(A, zones=(ZONE,)), ep(B, zones=("zone-b",)), ep(C, THERE, zones=("zone-c",)),
          ep(D, THERE, zones=(ZONE,))),
         t(A, D), t(A, B), ETP_LOCAL, mode="PreferSameZone"),
    Case("both-local-some-local", (ep(A), ep(B, THERE)), t(A, B), t(A), BOTH_LOCAL),
    Case("both-local-all-remote", (ep(A, THERE), ep(B, THERE)), t(A, B), (), BOTH_LOCAL),
    # --- topology hints by zone (PreferClose / PreferSameZone) --------------------------
    Case("zone-hints-filter-to-this-zone",
         (ep(A, zones=(ZONE,)), ep(B, zones=("zone-b",)), ep(C, zones=("zone-c",)),
          ep(D, zones=(ZONE,))), t(A, D), None, mode="PreferSameZone"),
    Case("zone-hints-several-per-endpoint",
         (ep(A, zones=("zone-a", "zone-b")), ep(B, zones=("zone-b",)),
          ep(C, zones=("zone-c", "zone-a"))), t(A, C), None, mode="PreferSameZone"),
    Case("zone-hints-ignored-when-a-ready-endpoint-has-none",
         (ep(A, zones=(ZONE,)), ep(B, zones=("zone-b",)), ep(C)), t(A, B, C), None),
    Case("zone-hints-unready-endpoint-without-hint-does-not-count",
         (ep(A, zones=(ZONE,)), ep(B, zones=("zone-b",)), ep(C, ready=False)), t(A), None,
         mode="PreferSameZone"),
    Case("zone-hints-ignored-when-none-for-this-zone",
         (ep(A, zones=("zone-b",)), ep(B, zones=("zone-c",))), t(A, B), None),
    Case("zone-hints-ignored-when-node-has-no-zone", (ep(A, zones=(ZONE,)),), t(A), None,
         zone=""),
    Case("zone-hints-ignored-when-only-unready-endpoints-are-in-zone",
         (ep(A, ready=False, zones=(ZONE,)), ep(B, zones=("zone-b",)),
          ep(C, zones=("zone-c",))), t(B, C), None),
    Case("zone-hints-drop-unready-endpoint-in-zone",
         (ep(A, zones=(ZONE,)), ep(B, zones=("zone-b",)), ep(C, ready=False, zones=(ZONE,))),
         t(A), None, mode="PreferSameZone"),
    Case("zone-hints-no-ready-endpoint-fallback-ignores-hints",
         (st(A, zones=("zone-b",)), st(B, zones=(ZONE,))), t(A, B), None),
    # --- topology hints by node (PreferSameNode) -----------------------------------------
    Case("node-hints-filter-to-this-node",
         (ep(A, nodes=(HERE,)), ep(B, THERE, nodes=(THERE,))), t(A), None,
         mode="PreferSameNode"),
    Case("node-hints-win-over-zone-hints",
         (ep(A, nodes=(HERE,), zones=(ZONE,)), ep(B, THERE, nodes=(THERE,), zones=(ZONE,))),
         t(A), None, mode="PreferSameNode"),
    Case("node-hints-none-for-this-node-fall-back-to-zone",
         (ep(A, THERE, nodes=(THERE,), zones=(ZONE,)),
          ep(B, "node3", nodes=("node3",), zones=("zone-b",))), t(A), None,
         mode="PreferSameZone"),
    Case("node-hints-missing-on-one-endpoint-fall-back-to-zone",
         (ep(A, nodes=(HERE,), zones=("zone-b",)), ep(B, THERE, zones=(ZONE,))), t(B), None,
         mode="PreferSameZone"),
    Case("node-hints-ignored-without-the-gate",
         (ep(A, nodes=(HERE,), zones=("zone-b",)), ep(B, THERE, nodes=(THERE,), zones=(ZONE,))),
         t(B), None, mode="PreferSameZone", prefer_same_node=False),
    Case("node-hints-none-for-this-node-no-zone-hints", (ep(A, THERE, nodes=(THERE,)),),
         t(A), None),
    Case("node-hints-with-local-policy",
         (ep(A, nodes=(THERE,)), ep(B, THERE, nodes=(HERE,))), t(B), t(A), ETP_LOCAL,
         mode="PreferSameNode"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_categorize(case: Case) -> None:
    uses_cluster, uses_local = case.uses
    got = categorize(case.endpoints, node_name=HERE, zone=case.zone, uses_cluster=uses_cluster,
                     uses_local=uses_local, prefer_same_node=case.prefer_same_node)

    def names(cands: tuple[Candidate, ...] | None) -> tuple[str, ...] | None:
        return None if cands is None else tuple(f"{c.endpoint.address}:{c.port}"
                                                 for c in cands)

    assert (names(got.cluster), names(got.local), got.has_any) == (
        case.cluster, case.local, case.has_any)
    assert topology_mode(case.endpoints, HERE, case.zone, case.prefer_same_node) == case.mode


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)
