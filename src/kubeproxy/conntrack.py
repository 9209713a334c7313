"""Stale UDP conntrack flows: which entries a sync leaves pointing at the wrong place.

Theory of operation
-------------------
UDP has no connection teardown, so a conntrack entry lives as long as the client keeps
sending, and while it lives the kernel reuses its NAT decision without reading the
rules again. After a sync has changed the rules, upstream kube-proxy therefore deletes
(pkg/proxy/conntrack/cleanup.go) the UDP entries that would keep traffic on a path the
rules no longer take. :func:`stale_udp_flows` compares the node view the previous
successful sync wrote with the one the current sync wrote (one family) and answers
with data, never I/O; ``dataplane/conntrack.py`` executes the answer.

A UDP service port's *frontends* are ClusterIP:port, each externalIP:port, each
load-balancer IP:port and, when it has one, its NodePort on any address. Three cases:

* **An endpoint stopped serving**: it was in the previous view's endpoints of the port
  and is not in the current one. Entries to any frontend whose reply source (the DNAT
  target) is that endpoint's IP are deleted, so the client's next packet is balanced
  again instead of vanishing into a pod that is gone.
* **A service became reachable**: a class of its traffic (internal = ClusterIP,
  external = the rest) had no endpoints before and has some now. While it had none,
  packets were rejected or dropped, and the entries they created carry no DNAT; every
  entry to those frontends is deleted so that clients stop hitting the cached verdict.
  A view that is missing (the daemon's first sync) counts as "no endpoints anywhere",
  as upstream's empty endpoints map does after a restart.
* **A frontend went away** (service port deleted, IP or NodePort changed): every entry
  to it is deleted, as upstream does with the ClusterIPs of deleted UDP services.

"No longer serving" is "no longer in the node view's endpoints": the view already holds
every policy decision (readiness, terminating fallback, topology, traffic policy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from kubeproxy.model import Family, IPAddress, NamespacedName, ServicePortName
from kubeproxy.nodeview import EndpointView, NodeView, Route, ServicePortView


class Reason(Enum):
    ENDPOINT_GONE = "endpoint-gone"  # the DNAT target no longer serves the service
    NEWLY_ACTIVE = "newly-active"  # the frontend had no endpoints and now has some
    FRONTEND_GONE = "frontend-gone"  # the service port or this frontend was removed


@dataclass(frozen=True, slots=True)
class Frontend:
    """Where a UDP client sends: address:port, or port on any address (a NodePort)."""

    port: int
    address: IPAddress | None = None  # None: any address (NodePort)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"frontend port {self.port} out of range")

    def __str__(self) -> str:
        if self.address is None:
            return f"*:{self.port}"
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StaleFlow:
    """Delete UDP entries whose original destination is ``frontend`` and, when
    ``endpoint`` is set, whose reply source (the DNAT target) is ``endpoint``."""

    family: Family
    frontend: Frontend
    endpoint: IPAddress | None  # None: every entry to the frontend
    service: ServicePortName  # for logs
    reason: Reason

    def __post_init__(self) -> None:
        for ip in (self.frontend.address, self.endpoint):
            if ip is not None and ip.version != self.family:
                raise ValueError(f"{ip} is not an IPv{self.family} address")

    def __str__(self) -> str:
        target = f" -> {self.endpoint}" if self.endpoint is not None else ""
        return f"udp {self.frontend}{target} ({self.service}, {self.reason.value})"


def frontends(spv: ServicePortView) -> tuple[tuple[Frontend, bool], ...]:
    """The port's frontends, each with True when it carries internal (ClusterIP) traffic."""
    out = [(Frontend(spv.port, spv.cluster_ip), True)]
    out += [(Frontend(spv.port, ip), False)
            for ip in (*spv.external_ips, *spv.load_balancer_ips)]
    if spv.node_port:
        out.append((Frontend(spv.node_port), False))
    return tuple(out)


def _routed(spv: ServicePortView, route: Route) -> tuple[EndpointView, ...]:
    """The endpoints a class of traffic reaches (none when dropped or rejected)."""
    if route is Route.CLUSTER:
        return spv.cluster_endpoints
    if route is Route.LOCAL:
        return spv.local_endpoints
    return ()


def _reachable(spv: ServicePortView | None, internal: bool) -> bool:
    if spv is None:
        return False
    return bool(_routed(spv, spv.internal if internal else spv.external))


def _udp(view: NodeView | None, only: Iterable[NamespacedName] | None = None
         ) -> dict[ServicePortName, ServicePortView]:
    if view is None:
        return {}
    ports = view.services if only is None else (
        s for ref in only for s in view.ports_of(ref))
    return {s.name: s for s in ports if s.name.protocol == "UDP"}


def stale_udp_flows(previous: NodeView | None, current: NodeView,
                    only: Iterable[NamespacedName] | None = None) -> tuple[StaleFlow, ...]:
    """The UDP conntrack entries to delete after ``current`` was written over ``previous``.

    Sorted and without redundancy: a frontend that is flushed whole gets no per-endpoint
    deletes as well. ``only``: the services that may have changed (a partial sync's);
    the others are not looked at, so the work follows the change.
    """
    if previous is not None and previous.family != current.family:
        raise ValueError("previous and current node views are of different families")
    family = current.family
    only = None if only is None else sorted(only)
    before, now = _udp(previous, only), _udp(current, only)
    flows: list[StaleFlow] = []

    live: set[Frontend] = set()
    for name, spv in now.items():
        old = before.get(name)
        live.update(f for f, _ in frontends(spv))
        for frontend, internal in frontends(spv):
            if _reachable(spv, internal) and not _reachable(old, internal):
                flows.append(StaleFlow(family, frontend, None, name, Reason.NEWLY_ACTIVE))
        if old is None:
            continue
        serving = {e.target for e in spv.all_endpoints}
        gone = sorted({e.ip for e in old.all_endpoints if e.target not in serving}, key=int)
        flows += [StaleFlow(family, frontend, ip, name, Reason.ENDPOINT_GONE)
                  for frontend, _ in frontends(spv) for ip in gone]

    unused = [(name, frontend) for name, old in before.items()
              for frontend, _ in frontends(old) if frontend not in live]
    if unused and only is not None:  # another (unchanged) service may serve it now
        live.update(f for spv in _udp(current).values() for f, _ in frontends(spv))
    flows += [StaleFlow(family, frontend, None, name, Reason.FRONTEND_GONE)
              for name, frontend in unused if frontend not in live]
    return _simplify(flows)


def _simplify(flows: Iterable[StaleFlow]) -> tuple[StaleFlow, ...]:
    flows = list(flows)
    whole = {f.frontend for f in flows if f.endpoint is None}
    seen: set[tuple[Frontend, IPAddress | None]] = set()
    out: list[StaleFlow] = []
    for flow in flows:
        key = (flow.frontend, flow.endpoint)
        if key in seen or (flow.endpoint is not None and flow.frontend in whole):
            continue
        seen.add(key)
        out.append(flow)
    return tuple(sorted(out, key=_order))


def _order(flow: StaleFlow) -> tuple[int, int, int, int]:
    address, endpoint = flow.frontend.address, flow.endpoint
    return (address is None, int(address) if address is not None else 0, flow.frontend.port,
            -1 if endpoint is None else int(endpoint))
