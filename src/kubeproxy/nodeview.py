"""The node view: everything one node must do for one IP family, decided once.

Theory of operation
-------------------
:func:`build_node_view` takes the parsed cluster, the node's name and the proxy
configuration, and answers every policy question upstream's proxiers answer inline:
which frontends a service port has in this family, which endpoints serve cluster and
local traffic (via :mod:`kubeproxy.topology`), whether internal and external traffic is
forwarded, dropped or rejected, when traffic is masqueraded, whether a load-balancer
firewall applies. Renderers (iptables, nftables, ...) only translate this view into
their own syntax; none of them re-decides policy, so the data planes cannot drift.

Node-wide decisions live on :class:`NodeView` and :class:`NodePorts`: which ClusterIP
traffic is masqueraded (``--masquerade-all`` wins over local-traffic detection), which
destinations NodePorts answer on, and whether localhost NodePorts are offered (IPv4
only, since they need ``route_localnet``; the loopback range is otherwise excluded, and
``::1`` always is), with the CVE-2020-8558 guard that comes with them.

The names follow upstream's ``syncProxyRules``: ``internal`` is ClusterIP traffic,
``external`` is NodePort / externalIP / load-balancer traffic, the "cluster chain" holds
the cluster endpoints and the "local chain" the node-local ones.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import NamedTuple

from kubeproxy.config.types import PRIMARY, DetectLocalMode, LBAlgorithm, ProxyConfig
from kubeproxy.model import (
    Cluster,
    EndpointSlice,
    Family,
    IPAddress,
    IPNetwork,
    NamespacedName,
    Node,
    Service,
    ServicePortName,
    ServicePortSpec,
    ServiceType,
    TrafficPolicy,
    family_of,
)
from kubeproxy.topology import Candidate, categorize


class Route(Enum):
    """Where a class of traffic goes."""

    CLUSTER = "cluster"  # to the cluster-endpoints chain
    LOCAL = "local"  # to the local-endpoints chain
    DROP = "drop"  # Local policy with no local endpoints
    REJECT = "reject"  # no usable endpoints at all


class ClusterIPMasquerade(Enum):
    """Which ClusterIP traffic is masqueraded on its way in (upstream's internal chain)."""

    ALL = "all"  # --masquerade-all: every packet, whatever its source
    NOT_LOCAL = "not-local"  # what does not come from a local pod (detect-local)
    NONE = "none"  # local pods cannot be told apart: upstream writes no rule


class EndpointView(NamedTuple):
    ip: IPAddress
    port: int
    local: bool
    addr: str  # str(ip), computed once: renderers format it many times
    ready: bool = True  # False: a serving-and-terminating endpoint used as a fallback

    @property
    def target(self) -> str:
        """"ip:port", or "[ip]:port" for IPv6. Computed when asked (a renderer asks
        once per endpoint and memoizes its output): 100,000 kept strings are ~6 MiB."""
        return f"[{self.addr}]:{self.port}" if self.ip.version == 6 else \
            f"{self.addr}:{self.port}"

    def __str__(self) -> str:
        return self.target


def endpoint_view(ip: IPAddress, port: int, local: bool, addr: str = "") -> EndpointView:
    return EndpointView(ip, port, local, addr or str(ip))


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """How "traffic from a local pod" is recognized (upstream detectLocalMode)."""

    cidrs: tuple[IPNetwork, ...] = ()  # ClusterCIDR / NodeCIDR modes
    interface: str = ""  # BridgeInterface: exact name; InterfaceNamePrefix: a prefix
    prefix: bool = False

    @property
    def implemented(self) -> bool:
        return bool(self.cidrs or self.interface)


@dataclass(frozen=True, slots=True)
class ServicePortView:
    """One service port in one family, with every policy decision made."""

    name: ServicePortName
    cluster_ip: IPAddress
    port: int
    node_port: int
    external_ips: tuple[IPAddress, ...]
    load_balancer_ips: tuple[IPAddress, ...]
    source_ranges: tuple[IPNetwork, ...]
    health_check_node_port: int
    affinity_timeout: int | None
    cluster_endpoints: tuple[EndpointView, ...]  # the cluster chain's endpoints (may be ())
    local_endpoints: tuple[EndpointView, ...]  # the local chain's endpoints (may be ())
    has_endpoints: bool  # usable endpoints exist somewhere in the cluster
    internal: Route  # ClusterIP traffic
    external: Route  # NodePort / externalIP / LB traffic that is not short-circuited
    external_policy_local: bool
    uses_external_chain: bool  # an "external destinations" chain is written
    firewall: bool  # loadBalancerSourceRanges are enforced on the LB IPs
    firewall_allows_node: bool  # a source range holds a node IP: allow LB IPs as sources

    @property
    def protocol(self) -> str:
        """Lower-case protocol, as rule text spells it."""
        return self.name.protocol.lower()

    @property
    def all_endpoints(self) -> tuple[EndpointView, ...]:
        """Every endpoint some chain of this port may send to (one per-endpoint chain)."""
        if not self.local_endpoints:
            return self.cluster_endpoints
        if not self.cluster_endpoints:
            return self.local_endpoints
        seen = {e.target for e in self.cluster_endpoints}
        return self.cluster_endpoints + tuple(e for e in self.local_endpoints
                                              if e.target not in seen)

    @property
    def uses_cluster_chain(self) -> bool:
        return bool(self.cluster_endpoints)

    @property
    def uses_local_chain(self) -> bool:
        return bool(self.local_endpoints)

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)


@dataclass(frozen=True, slots=True)
class NodePorts:
    """Where NodePorts are open: every local address, or the listed ones.

    Loopback destinations are special: 127.0.0.1:NODEPORT works only with localhost
    NodePorts (IPv4 only: the kernel routes DNATed loopback traffic with
    ``route_localnet``, which IPv6 lacks), and offering them needs the CVE-2020-8558
    guard against remote packets addressed to 127.0.0.0/8. Otherwise the loopback range
    is excluded from "every local address" and dropped from the listed ones. A data
    plane that cannot offer localhost NodePorts (nftables, as upstream) reads
    :meth:`without_localhost`.
    """

    match_all: bool
    loopback: IPNetwork  # this family's loopback range
    addresses: tuple[IPAddress, ...] = ()  # selected by nodePortAddresses, loopback too
    localhost: bool = False  # localhost NodePorts are offered (and guarded)

    @property
    def routable(self) -> tuple[IPAddress, ...]:
        """The listed addresses outside the loopback range."""
        return tuple(ip for ip in self.addresses if ip not in self.loopback)

    @property
    def destinations(self) -> tuple[IPAddress, ...]:
        """The listed addresses NodePorts match (loopback ones only with localhost NodePorts)."""
        return self.addresses if self.localhost else self.routable

    @property
    def guard(self) -> IPNetwork | None:
        """What a match on every local address must exclude (None: nothing)."""
        return None if self.localhost else self.loopback

    def without_localhost(self) -> NodePorts:
        """The same NodePorts for a data plane that offers no localhost NodePorts."""
        return replace(self, localhost=False) if self.localhost else self


@dataclass(frozen=True, slots=True)
class NodeView:
    family: Family
    node_name: str
    node_ips: tuple[IPAddress, ...]
    local_detector: LocalDetector
    masquerade_all: bool  # the setting; renderers read cluster_ip_masquerade
    cluster_ip_masquerade: ClusterIPMasquerade  # which ClusterIP traffic is masqueraded
    masquerade_mark: int
    nodeports: NodePorts
    localhost_nodeports: bool  # the setting, for IPv4; renderers read nodeports.localhost
    lb_algorithm: LBAlgorithm
    services: tuple[ServicePortView, ...]  # sorted by name

    @property
    def total_endpoints(self) -> int:
        return sum(len(s.all_endpoints) for s in self.services)

    def ports_of(self, ref: NamespacedName) -> tuple[ServicePortView, ...]:
        """One service's port views, found by bisection (``services`` is sorted by
        service first), so a partial sync's follow-up work does not scan the node."""
        services = self.services
        lo = bisect.bisect_left(services, ref, key=_service_of)
        hi = bisect.bisect_right(services, ref, lo=lo, key=_service_of)
        return services[lo:hi]

    def by_service(self) -> dict[NamespacedName, list[ServicePortView]]:
        out: dict[NamespacedName, list[ServicePortView]] = defaultdict(list)
        for spv in self.services:
            out[spv.name.service].append(spv)
        return out


def _service_of(spv: ServicePortView) -> NamespacedName:
    return spv.name.service


def families_in_use(cluster: Cluster, config: ProxyConfig) -> list[Family]:
    """IPv4 always; IPv6 when any service, node address or cluster CIDR is IPv6."""
    return families_of(cluster.services, cluster, config)


def families_of(services: Iterable[Service], cluster: Cluster, config: ProxyConfig
                ) -> list[Family]:
    """:func:`families_in_use` looking only at ``services`` among the cluster's."""
    v6 = (any(ip.version == 6 for s in services for ip in s.cluster_ips)
          or any(ip.version == 6 for n in cluster.nodes for ip in n.addresses)
          or any(c.version == 6 for c in config.cluster_cidrs))
    return [4, 6] if v6 else [4]


def node_views(cluster: Cluster, config: ProxyConfig) -> list[NodeView]:
    """This node's view of every IP family in use (what a mode renders)."""
    return [build_node_view(cluster, config, f) for f in families_in_use(cluster, config)]


def build_node_view(cluster: Cluster, config: ProxyConfig, family: Family) -> NodeView:
    node = _node(cluster, config)
    node_ips = tuple(ip for ip in node.addresses if ip.version == family)
    slices = _slices_by_service(cluster.slices, family)
    views: list[ServicePortView] = []
    for svc in cluster.services:
        views += _service_views(svc, slices.get(svc.ref, ()), node, node_ips, family)
    views.sort(key=lambda v: (v.name.service.namespace, v.name.service.name, v.name.port,
                              v.name.protocol))
    return _node_wide(config, node, node_ips, family, tuple(views))


class NodeViewCache:
    """:func:`build_node_view` with memory, for a proxy that syncs one cluster again and
    again: ``build(cluster, changed)`` recomputes only the port views of the ``changed``
    services and reuses every other one (the same objects, so renderers can memoize on
    them too). Everything is recomputed when ``changed`` is None (a full sync) or when
    this node changed (labels, addresses: every service may be affected). The result
    equals ``build_node_view(cluster, config, family)`` (tests/unit/test_incremental.py).
    """

    def __init__(self, config: ProxyConfig, family: Family) -> None:
        self.config = config
        self.family = family
        self._node: Node | None = None
        self._view: NodeView | None = None
        self._ports: dict[NamespacedName, tuple[ServicePortView, ...]] = {}
        self._order: list[NamespacedName] = []  # _ports' keys, sorted
        self._seq: list[tuple[ServicePortView, ...]] = []  # _ports' values, in that order
        self._no_local: dict[NamespacedName, tuple[int, int]] = {}  # nonzero ones only
        self.no_local = (0, 0)  # :func:`no_local_endpoints` of the last view, kept up to date

    def build(self, cluster: Cluster, changed: frozenset[NamespacedName] | None) -> NodeView:
        node = _node(cluster, self.config)
        if changed is None or self._view is None or node != self._node:
            return self._build_all(cluster, node)
        family, node_ips = self.family, self._view.node_ips
        index = cluster.lookup()
        for ref in changed:
            svc = index.services.get(ref)
            slices = tuple(sorted((eps for eps in index.slices.get(ref, {}).values()
                                   if eps.family == family), key=lambda e: e.name))
            ports = _service_views(svc, slices, node, node_ips, family) if svc else ()
            self._set(ref, tuple(ports))
        services = tuple(itertools.chain.from_iterable(self._seq))
        self._view = replace(self._view, services=services)
        return self._view

    def _build_all(self, cluster: Cluster, node: Node) -> NodeView:
        view = build_node_view(cluster, self.config, self.family)
        grouped: dict[NamespacedName, list[ServicePortView]] = defaultdict(list)
        for spv in view.services:
            grouped[spv.name.service].append(spv)
        self._ports = {ref: tuple(views) for ref, views in grouped.items()}
        self._order = list(grouped)  # build_node_view sorts by service first
        self._seq = list(self._ports.values())
        self._no_local = {ref: n for ref, ports in self._ports.items()
                          if (n := no_local_endpoints(ports)) != (0, 0)}
        self.no_local = no_local_endpoints(view.services)
        self._node, self._view = node, view
        return view

    def _set(self, ref: NamespacedName, ports: tuple[ServicePortView, ...]) -> None:
        old = self._no_local.pop(ref, (0, 0))
        new = no_local_endpoints(ports)
        if new != (0, 0):
            self._no_local[ref] = new
        self.no_local = (self.no_local[0] - old[0] + new[0], self.no_local[1] - old[1] + new[1])
        had = ref in self._ports
        at = bisect.bisect_left(self._order, ref)
        if ports:
            self._ports[ref] = ports
            if had:
                self._seq[at] = ports
            else:
                self._order.insert(at, ref)
                self._seq.insert(at, ports)
        elif had:
            del self._ports[ref], self._order[at], self._seq[at]


def no_local_endpoints(ports: Iterable[ServicePortView]) -> tuple[int, int]:
    """(internal, external): how many of ``ports`` have a Local traffic policy that
    leaves this node without endpoints (upstream's no_local_endpoints_total gauge)."""
    internal = external = 0
    for spv in ports:
        internal += spv.internal is Route.DROP
        external += spv.external_policy_local and spv.external is Route.DROP
    return internal, external


def single_balancer_endpoints(route: Route, spv: ServicePortView) -> tuple[EndpointView, ...]:
    """The endpoints of a load balancer that serves every client of one class of
    traffic alike (IPVS: one virtual server per frontend, no short-circuit, no DROP):
    upstream's IPVS syncEndpoint. A Local route takes the local endpoints; a Local
    policy without local endpoints (DROP) falls back to the cluster endpoints (PR 97081,
    so local pods keep access); REJECT takes none."""
    if route is Route.LOCAL:
        return spv.local_endpoints
    if route is Route.REJECT:
        return ()
    return spv.cluster_endpoints  # CLUSTER, or DROP


def _node(cluster: Cluster, config: ProxyConfig) -> Node:
    return cluster.node(config.hostname) or Node(name=config.hostname or "localhost")


def _service_views(svc: Service, slices: tuple[EndpointSlice, ...], node: Node,
                   node_ips: tuple[IPAddress, ...], family: Family) -> list[ServicePortView]:
    """One Service's port views in this family, sorted by port name and protocol."""
    cluster_ip = next((ip for ip in svc.cluster_ips if ip.version == family), None)
    if cluster_ip is None:
        return []
    views = [_port_view(svc, spec, cluster_ip, slices, node, node_ips, family)
             for spec in svc.ports]
    views.sort(key=lambda v: (v.name.port, v.name.protocol))
    return views


def _node_wide(config: ProxyConfig, node: Node, node_ips: tuple[IPAddress, ...],
               family: Family, services: tuple[ServicePortView, ...]) -> NodeView:
    detector = _local_detector(config, node, family)
    localhost = config.localhost_nodeports and family == 4
    return NodeView(
        family=family,
        node_name=node.name,
        node_ips=node_ips,
        local_detector=detector,
        masquerade_all=config.masquerade_all,
        cluster_ip_masquerade=_cluster_ip_masquerade(config, detector),
        masquerade_mark=config.masquerade_mark,
        nodeports=_nodeports(config, node_ips, family, localhost),
        localhost_nodeports=localhost,
        lb_algorithm=config.lb_algorithm,
        services=services,
    )


def _slices_by_service(
    slices: Iterable[EndpointSlice], family: Family
) -> dict[NamespacedName, tuple[EndpointSlice, ...]]:
    out: dict[NamespacedName, list[EndpointSlice]] = defaultdict(list)
    for eps in slices:
        if eps.family == family:
            out[eps.service].append(eps)
    return {k: tuple(sorted(v, key=lambda s: s.name)) for k, v in out.items()}


def _candidates(spec: ServicePortSpec, slices: Iterable[EndpointSlice]) -> list[Candidate]:
    """Endpoints of one service port over all its slices, matched by port name.

    An address may appear in several slices (during a controller's rewrite); the
    first ready copy wins, as in upstream's EndpointSliceCache.
    """
    # Keyed by the address as an integer: hashing ipaddress objects is slow, and one
    # family's addresses compare the same way as integers.
    found: dict[tuple[int, int], Candidate] = {}
    new = tuple.__new__  # NamedTuple construction without its Python-level __new__
    for eps in slices:
        for port in eps.ports:
            if port.name != spec.name or port.protocol != spec.protocol:
                continue
            number = port.port
            for ep in eps.endpoints:
                key = (int(ep.address), number)
                old = found.get(key)
                if old is None or (ep.ready and not old.endpoint.ready):
                    found[key] = new(Candidate, (ep, number))
    return [found[k] for k in sorted(found)]


def _port_view(
    svc: Service,
    spec: ServicePortSpec,
    cluster_ip: IPAddress,
    slices: tuple[EndpointSlice, ...],
    node: Node,
    node_ips: tuple[IPAddress, ...],
    family: Family,
) -> ServicePortView:
    external_ips = tuple(ip for ip in svc.external_ips if ip.version == family)
    lb_ips = tuple(ip for ip in svc.load_balancer_ips if ip.version == family)
    source_ranges = tuple(r for r in svc.load_balancer_source_ranges if r.version == family)
    externally_accessible = bool(spec.node_port or external_ips or lb_ips)
    internal_local = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    external_local = (externally_accessible
                      and svc.external_traffic_policy is TrafficPolicy.LOCAL)
    # Cluster endpoints are needed for Cluster policies and for short-circuiting
    # in-cluster traffic to external destinations even under external Local policy.
    uses_cluster = not internal_local or externally_accessible
    uses_local = internal_local or external_local
    cat = categorize(_candidates(spec, slices), node_name=node.name, zone=node.zone,
                     uses_cluster=uses_cluster, uses_local=uses_local)

    def views(cands: Iterable[Candidate]) -> tuple[EndpointView, ...]:
        # endpoint_view(), inlined for the hot path (one call per endpoint per sync).
        here, new, out = node.name, tuple.__new__, []
        for ep, port in cands:
            out.append(new(EndpointView, (ep.address, port, ep.node_name == here,
                                          ep.address_text, ep.ready)))
        return tuple(out)

    cluster_eps = views(cat.cluster) if cat.cluster is not None else ()
    local_eps = views(cat.local) if cat.local is not None else ()
    has = cat.has_any

    def route(local_policy: bool) -> Route:
        if not has:
            return Route.REJECT
        if local_policy:
            return Route.LOCAL if local_eps else Route.DROP
        return Route.CLUSTER

    firewall = has and bool(lb_ips) and bool(source_ranges)
    return ServicePortView(
        name=ServicePortName(svc.ref, spec.name, spec.protocol),
        cluster_ip=cluster_ip,
        port=spec.port,
        node_port=spec.node_port,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        source_ranges=source_ranges,
        health_check_node_port=svc.health_check_node_port
        if svc.type is ServiceType.LOAD_BALANCER and external_local else 0,
        affinity_timeout=svc.session_affinity_timeout,
        cluster_endpoints=cluster_eps,
        local_endpoints=local_eps,
        has_endpoints=has,
        internal=route(internal_local),
        external=route(external_local),
        external_policy_local=external_local,
        uses_external_chain=has and externally_accessible,
        firewall=firewall,
        firewall_allows_node=firewall and any(ip in r for r in source_ranges for ip in node_ips),
    )


def _local_detector(config: ProxyConfig, node: Node, family: Family) -> LocalDetector:
    mode = config.detect_local_mode
    if mode is DetectLocalMode.CLUSTER_CIDR:
        return LocalDetector(cidrs=tuple(c for c in config.cluster_cidrs if c.version == family))
    if mode is DetectLocalMode.NODE_CIDR:
        return LocalDetector(cidrs=tuple(c for c in node.pod_cidrs if c.version == family))
    if mode is DetectLocalMode.BRIDGE_INTERFACE:
        return LocalDetector(interface=config.bridge_interface)
    return LocalDetector(interface=config.interface_name_prefix, prefix=True)


def _cluster_ip_masquerade(config: ProxyConfig, detector: LocalDetector) -> ClusterIPMasquerade:
    if config.masquerade_all:
        return ClusterIPMasquerade.ALL  # wins over local-traffic detection
    return ClusterIPMasquerade.NOT_LOCAL if detector.implemented else ClusterIPMasquerade.NONE


_LOOPBACK: dict[Family, tuple[IPNetwork, IPAddress]] = {
    4: (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Address("127.0.0.1")),
    6: (ipaddress.IPv6Network("::1/128"), ipaddress.IPv6Address("::1")),
}


def _nodeports(config: ProxyConfig, node_ips: tuple[IPAddress, ...], family: Family,
               localhost: bool) -> NodePorts:
    """Where NodePorts answer; ``localhost``: localhost NodePorts are wanted (IPv4)."""
    loopback, loopback_ip = _LOOPBACK[family]
    if not config.nodeport_addresses:
        return NodePorts(match_all=True, loopback=loopback, localhost=localhost)
    if config.nodeport_addresses == (PRIMARY,):
        addresses = node_ips[:1]
    else:
        cidrs = [c for c in config.nodeport_cidrs() if family_of(c) == family]
        if any(c.prefixlen == 0 for c in cidrs):
            return NodePorts(match_all=True, loopback=loopback, localhost=localhost)
        addresses = tuple(ip for ip in (*node_ips, loopback_ip) if any(ip in c for c in cidrs))
    # Offered only where a loopback address is listed.
    localhost = localhost and any(ip in loopback for ip in addresses)
    return NodePorts(match_all=False, addresses=addresses, loopback=loopback,
                     localhost=localhost)
