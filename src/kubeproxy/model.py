"""The cluster model: what kube-proxy knows about Services, EndpointSlices and its Node.

Theory of operation
-------------------
Raw Kubernetes objects (dicts from YAML, JSON or the API server) are translated into
the frozen dataclasses below by ``kubeproxy.k8s``; nothing past that boundary sees a
raw object. Every type validates itself when it is built (``__post_init__``), so an
object that exists is a valid object: names are DNS labels or subdomains, ports are in
range, addresses are parsed ``ipaddress`` values. Invalid input raises
:class:`InvalidObject`, naming the kind, the namespace/name and the offending field, and
the caller skips that one object.

Because every name that can reach rule text (namespace, service name, port name) is
checked here against Kubernetes' own grammar, renderers may write them into rule
comments and set/chain names without quoting tricks: a name holding a quote, a newline
or ``-j ACCEPT`` never gets this far.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from kubeproxy.errors import FieldError, InvalidObject

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Family = Literal[4, 6]
Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")

# Kubernetes' name grammars (k8s.io/apimachinery/pkg/util/validation).
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_dns_label(value: str, field_path: str) -> None:
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise FieldError(field_path, f"{_short(value)} is not a DNS-1123 label")


def check_dns_subdomain(value: str, field_path: str) -> None:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise FieldError(field_path, f"{_short(value)} is not a DNS-1123 subdomain")


def check_port_name(value: str, field_path: str) -> None:
    """Service port names are DNS labels; endpoint port names must match them."""
    if value and (len(value) > 63 or not _DNS1123_LABEL.match(value)):
        raise FieldError(field_path, f"{_short(value)} is not a valid port name")


def check_iana_svc_name(value: str, field_path: str) -> None:
    if len(value) > 15 or not _IANA_SVC_NAME.match(value) or "--" in value:
        raise FieldError(field_path, f"{_short(value)} is not a valid IANA service name")


def check_label_value(value: str, field_path: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise FieldError(field_path, f"{_short(value)} is not a valid label value")


def check_port(value: int, field_path: str, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise FieldError(field_path, f"{_short(value)} is not a port number ({low}-65535)")


def _short(value: object) -> str:
    """A printable, bounded rendering of a bad value for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_ip(value: object, field_path: str) -> IPAddress:
    if not isinstance(value, str):
        raise FieldError(field_path, f"{_short(value)} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise FieldError(field_path, f"{_short(value)} is not an IP address") from None


def parse_cidr(value: object, field_path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise FieldError(field_path, f"{_short(value)} is not a CIDR")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise FieldError(field_path, f"{_short(value)} is not a CIDR") from None


def family_of(ip: IPAddress | IPNetwork) -> Family:
    return 4 if ip.version == 4 else 6


class ServiceType(Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(Enum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


@dataclass(frozen=True, order=True, slots=True)
class NamespacedName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True, slots=True)
class ServicePortName:
    """Upstream's ServicePortName: "ns/name:port" ("ns/name" for an unnamed port)."""

    service: NamespacedName
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.service}:{self.port}" if self.port else str(self.service)


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    """One entry of a Service's spec.ports."""

    name: str
    protocol: Protocol
    port: int
    node_port: int = 0

    def __post_init__(self) -> None:
        check_port_name(self.name, "name")
        if self.protocol not in PROTOCOLS:
            raise FieldError("protocol", f"{_short(self.protocol)} is not TCP, UDP or SCTP")
        check_port(self.port, "port")
        check_port(self.node_port, "nodePort", allow_zero=True)


@dataclass(frozen=True, slots=True)
class Service:
    """A Service as kube-proxy sees it (both families; the node view splits them)."""

    namespace: str
    name: str
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePortSpec, ...]
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int = 0
    session_affinity_timeout: int | None = None  # seconds; None = no ClientIP affinity
    traffic_distribution: str | None = None

    def __post_init__(self) -> None:
        check_dns_label(self.namespace, "metadata.namespace")
        check_dns_label(self.name, "metadata.name")
        check_port(self.health_check_node_port, "spec.healthCheckNodePort", allow_zero=True)
        seen: set[tuple[str, str]] = set()
        for i, port in enumerate(self.ports):
            key = (port.name, port.protocol)
            if key in seen:
                raise FieldError(f"spec.ports[{i}]",
                                 f"duplicate port {port.name!r}/{port.protocol}")
            seen.add(key)
        if len(self.ports) > 1 and any(not p.name for p in self.ports):
            raise FieldError("spec.ports", "every port must be named when there are several")
        if self.session_affinity_timeout is not None and not (
            0 < self.session_affinity_timeout <= 86400
        ):
            raise FieldError(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{self.session_affinity_timeout} is not in 1-86400",
            )

    @property
    def ref(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    @property
    def headless(self) -> bool:
        return not self.cluster_ips


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: Protocol

    def __post_init__(self) -> None:
        check_port_name(self.name, "name")
        check_port(self.port, "port")
        if self.protocol not in PROTOCOLS:
            raise FieldError("protocol", f"{_short(self.protocol)} is not TCP, UDP or SCTP")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One entry of an EndpointSlice's endpoints (kube-proxy uses addresses[0])."""

    address: IPAddress
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    # str(address), computed once here: renderers print it on every sync.
    address_text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.address_text:
            object.__setattr__(self, "address_text", str(self.address))


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    family: Family
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]

    def __post_init__(self) -> None:
        check_dns_label(self.namespace, "metadata.namespace")
        check_dns_subdomain(self.name, "metadata.name")
        check_dns_label(self.service_name, "metadata.labels[kubernetes.io/service-name]")
        for i, ep in enumerate(self.endpoints):
            if family_of(ep.address) != self.family:
                raise FieldError(
                    f"endpoints[{i}].addresses[0]",
                    f"{ep.address} is not an IPv{self.family} address",
                )

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.service_name)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    addresses: tuple[IPAddress, ...] = ()  # InternalIP first, then ExternalIP
    pod_cidrs: tuple[IPNetwork, ...] = ()
    deleting: bool = False
    to_be_deleted: bool = False  # tainted ToBeDeletedByClusterAutoscaler

    def __post_init__(self) -> None:
        check_dns_subdomain(self.name, "metadata.name")

    @property
    def zone(self) -> str:
        return dict(self.labels).get("topology.kubernetes.io/zone", "")


@dataclass(frozen=True, slots=True)
class ClusterIndex:
    """Lookups by Service, for work on a few services of a large cluster (partial
    syncs): the Service itself, and its EndpointSlices by slice key."""

    services: Mapping[NamespacedName, Service]
    slices: Mapping[NamespacedName, Mapping[NamespacedName, EndpointSlice]]

    @classmethod
    def of(cls, services: Iterable[Service], slices: Iterable[EndpointSlice]
           ) -> ClusterIndex:
        by_service: dict[NamespacedName, dict[NamespacedName, EndpointSlice]] = {}
        for eps in slices:
            by_service.setdefault(eps.service, {})[NamespacedName(eps.namespace, eps.name)] = eps
        return cls({s.ref: s for s in services}, by_service)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Everything one node's proxy needs, as parsed; what the tracker folds into."""

    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    nodes: tuple[Node, ...] = ()
    errors: tuple[InvalidObject, ...] = field(default=(), compare=False)
    # Given by the tracker (kept up to date as objects change); else built on demand.
    index: ClusterIndex | None = field(default=None, compare=False, repr=False)

    def lookup(self) -> ClusterIndex:
        return self.index if self.index is not None else ClusterIndex.of(self.services,
                                                                         self.slices)

    def node(self, name: str) -> Node | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None
