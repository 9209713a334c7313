"""Which endpoints serve cluster traffic and which serve local traffic: one copy, pure.

This is upstream's CategorizeEndpoints (pkg/proxy/topology.go), the single place where
endpoint usability and topology are decided for every data plane:

* Cluster endpoints: ready ones, narrowed by topology hints when those apply; if none
  are ready anywhere, serving-and-terminating ones (without topology, as a best effort
  not to drop connections).
* Local endpoints (for a Local traffic policy): ready ones on this node, else serving
  and terminating ones on this node.
* Topology hints apply only when every ready endpoint carries a hint and at least one
  hint names this node (PreferSameNode: node hints) or this node's zone (zone hints).

As upstream's does, the answer tells "the service does not use this kind of endpoints"
(``None``: e.g. no local set for a service without a Local policy) from "it does, and
there are none" (``()``: a Local policy with no endpoint on this node, which drops the
traffic), and both from "no usable endpoint anywhere" (``has_any`` false, which rejects
it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kubeproxy.model import Endpoint


class Candidate(NamedTuple):
    """An endpoint of one service port, with its resolved port number."""

    endpoint: Endpoint
    port: int


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[Candidate, ...] | None  # None: the service never uses cluster endpoints
    local: tuple[Candidate, ...] | None  # None: the service never uses local endpoints
    has_any: bool  # some usable endpoint exists anywhere in the cluster


def categorize(
    candidates: Sequence[Candidate],
    *,
    node_name: str,
    zone: str,
    uses_cluster: bool,
    uses_local: bool,
    prefer_same_node: bool = True,
) -> Categorized:
    cluster: tuple[Candidate, ...] | None = None
    local: tuple[Candidate, ...] | None = None
    has_any = False
    if uses_cluster:
        mode = topology_mode(candidates, node_name, zone, prefer_same_node)
        if mode:
            cluster = tuple(c for c in candidates
                            if c.endpoint.ready and _in_topology(c.endpoint, mode, node_name,
                                                                 zone))
        else:
            cluster = tuple(c for c in candidates if c.endpoint.ready)
        if not cluster:
            cluster = tuple(c for c in candidates if c.endpoint.serving and c.endpoint.terminating)
        has_any = bool(cluster)
    if uses_local:
        mine = [c for c in candidates if c.endpoint.node_name == node_name]
        local = tuple(c for c in mine if c.endpoint.ready)
        if not local:
            local = tuple(c for c in mine if c.endpoint.serving and c.endpoint.terminating)
        has_any = has_any or any(
            c.endpoint.ready or (c.endpoint.serving and c.endpoint.terminating)
            for c in candidates
        )
    return Categorized(cluster, local, has_any)


def topology_mode(
    candidates: Sequence[Candidate], node_name: str, zone: str, prefer_same_node: bool
) -> str:
    """"" (no topology), "PreferSameNode" or "PreferSameZone", as upstream decides it."""
    ready = [c.endpoint for c in candidates if c.endpoint.ready]
    if not ready:
        return ""
    if prefer_same_node and all(ep.node_hints for ep in ready) and any(
        node_name in ep.node_hints for ep in ready
    ):
        return "PreferSameNode"
    if all(ep.zone_hints for ep in ready) and zone and any(zone in ep.zone_hints for ep in ready):
        return "PreferSameZone"
    return ""


def _in_topology(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == "PreferSameNode":
        return node_name in ep.node_hints
    if mode == "PreferSameZone":
        return zone in ep.zone_hints
    return True
