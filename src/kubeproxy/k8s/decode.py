"""Kubernetes objects (dicts, as kubectl writes them) -> the frozen model.

This is the only code that reads raw API objects. Each decoder raises FieldError for
the first bad field; :func:`decode_objects` wraps that into InvalidObject (kind,
namespace/name, field), records it, skips the object and carries on, so one bad
Service never stops the others from being proxied.

Objects kube-proxy must ignore are dropped here without an error, as upstream's
informers never deliver them: Services and EndpointSlices labelled
``service.kubernetes.io/service-proxy-name`` or ``service.kubernetes.io/headless``,
headless and ExternalName Services, FQDN EndpointSlices.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

from kubeproxy.errors import FieldError, InvalidObject
from kubeproxy.model import (
    PROTOCOLS,
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    Node,
    Protocol,
    Service,
    ServicePortSpec,
    ServiceType,
    TrafficPolicy,
    check_label_value,
    parse_cidr,
    parse_ip,
)

SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
HEADLESS = "service.kubernetes.io/headless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
DEFAULT_AFFINITY_TIMEOUT = 10800


def decode_objects(objects: Iterable[Mapping[str, Any]]) -> Cluster:
    """Decode every object we understand; skip (and report) invalid ones."""
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    nodes: list[Node] = []
    errors: list[InvalidObject] = []
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, Mapping) else None
        if kind not in ("Service", "EndpointSlice", "Node"):
            continue  # Pods, Namespaces, ...: not kube-proxy's business
        try:
            if kind == "Service":
                if (svc := decode_service(obj)) is not None:
                    services.append(svc)
            elif kind == "EndpointSlice":
                if (eps := decode_endpoint_slice(obj)) is not None:
                    slices.append(eps)
            else:
                nodes.append(decode_node(obj))
        except FieldError as err:
            errors.append(InvalidObject(str(kind), object_ref(obj), err.field_path, err.message))
    return Cluster(tuple(services), tuple(slices), tuple(nodes), tuple(errors))


def object_ref(obj: Mapping[str, Any]) -> str:
    """ "namespace/name" for error messages, bounded and printable whatever the input."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    parts = [meta.get("namespace"), meta.get("name")]
    text = "/".join(p for p in parts if isinstance(p, str)) or "<unnamed>"
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 120 else text[:117] + "..."


# --- small typed accessors -------------------------------------------------------


def _map(obj: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FieldError(path, "must be an object")
    return value


def _list(obj: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError(path, "must be a list")
    return value


def _str(obj: Mapping[str, Any], key: str, path: str, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise FieldError(path, "must be a string")
    return value


def _int(obj: Mapping[str, Any], key: str, path: str, default: int = 0) -> int:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(path, f"{value!r:.60} is not an integer")
    return value


def _bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(path, "must be true or false")
    return value


def _protocol(obj: Mapping[str, Any], path: str) -> Protocol:
    value = _str(obj, "protocol", path, "TCP")
    for proto in PROTOCOLS:
        if value == proto:
            return proto
    raise FieldError(path, f"{value!r:.60} is not TCP, UDP or SCTP")


def _labels(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    return _map(meta, "labels", "metadata.labels")


def _meta(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str]:
    meta = _map(obj, "metadata", "metadata")
    name = _str(meta, "name", "metadata.name")
    if not name:
        raise FieldError("metadata.name", "is required")
    namespace = _str(meta, "namespace", "metadata.namespace", "default")
    return meta, namespace, name


# --- Service ---------------------------------------------------------------------


def decode_service(obj: Mapping[str, Any]) -> Service | None:
    meta, namespace, name = _meta(obj)
    labels = _labels(meta)
    if SERVICE_PROXY_NAME in labels:
        return None  # served by another proxy
    spec = _map(obj, "spec", "spec")
    svc_type = _service_type(spec)
    if svc_type is ServiceType.EXTERNAL_NAME:
        return None
    cluster_ips = _cluster_ips(spec)
    if not cluster_ips:
        return None  # headless: DNS only
    ports = tuple(
        _service_port(p, f"spec.ports[{i}]", svc_type)
        for i, p in enumerate(_list(spec, "ports", "spec.ports"))
    )
    status = _map(obj, "status", "status")
    lb = _map(status, "loadBalancer", "status.loadBalancer")
    lb_ips: list[IPAddress] = []
    if svc_type is ServiceType.LOAD_BALANCER:
        for i, ingress in enumerate(_list(lb, "ingress", "status.loadBalancer.ingress")):
            path = f"status.loadBalancer.ingress[{i}]"
            if not isinstance(ingress, Mapping):
                raise FieldError(path, "must be an object")
            if _str(ingress, "ipMode", f"{path}.ipMode", "VIP") == "Proxy":
                continue  # the load balancer proxies; traffic arrives for the node
            if "ip" in ingress:
                lb_ips.append(parse_ip(ingress["ip"], f"{path}.ip"))
    affinity_timeout: int | None = None
    if _str(spec, "sessionAffinity", "spec.sessionAffinity", "None") == "ClientIP":
        cfg = _map(_map(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig"),
                   "clientIP", "spec.sessionAffinityConfig.clientIP")
        affinity_timeout = _int(cfg, "timeoutSeconds",
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                DEFAULT_AFFINITY_TIMEOUT)
    external = svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
    return Service(
        namespace=namespace,
        name=name,
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=tuple(
            parse_ip(ip, f"spec.externalIPs[{i}]")
            for i, ip in enumerate(_list(spec, "externalIPs", "spec.externalIPs"))
        ),
        load_balancer_ips=tuple(lb_ips),
        load_balancer_source_ranges=tuple(
            parse_cidr(r, f"spec.loadBalancerSourceRanges[{i}]")
            for i, r in enumerate(_list(spec, "loadBalancerSourceRanges",
                                        "spec.loadBalancerSourceRanges"))
        ) if svc_type is ServiceType.LOAD_BALANCER else (),
        external_traffic_policy=_policy(spec, "externalTrafficPolicy"),
        internal_traffic_policy=_policy(spec, "internalTrafficPolicy"),
        health_check_node_port=_int(spec, "healthCheckNodePort", "spec.healthCheckNodePort")
        if external else 0,
        session_affinity_timeout=affinity_timeout,
        traffic_distribution=_str(spec, "trafficDistribution", "spec.trafficDistribution")
        or None,
    )


def _service_type(spec: Mapping[str, Any]) -> ServiceType:
    value = _str(spec, "type", "spec.type", "ClusterIP")
    try:
        return ServiceType(value)
    except ValueError:
        raise FieldError("spec.type", f"{value!r:.60} is not a Service type") from None


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    ips = _list(spec, "clusterIPs", "spec.clusterIPs")
    field_name = "spec.clusterIPs"
    single = _str(spec, "clusterIP", "spec.clusterIP")
    if ips and single and ips[0] != single:
        raise FieldError("spec.clusterIP", f"{single!r:.60} must equal spec.clusterIPs[0]")
    if not ips:
        ips = [single] if single else []
        field_name = "spec.clusterIP"
    if not ips or ips[0] == "None":
        return ()
    parsed = tuple(parse_ip(ip, f"{field_name}[{i}]") for i, ip in enumerate(ips))
    if len({ip.version for ip in parsed}) != len(parsed):
        raise FieldError(field_name, "at most one address per family")
    return parsed


def _service_port(port: object, path: str, svc_type: ServiceType) -> ServicePortSpec:
    if not isinstance(port, Mapping):
        raise FieldError(path, "must be an object")
    try:
        return ServicePortSpec(
            name=_str(port, "name", f"{path}.name"),
            protocol=_protocol(port, f"{path}.protocol"),
            port=_int(port, "port", f"{path}.port"),
            node_port=_int(port, "nodePort", f"{path}.nodePort")
            if svc_type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) else 0,
        )
    except FieldError as err:
        if err.field_path.startswith(path):
            raise
        raise FieldError(f"{path}.{err.field_path}", err.message) from None


def _policy(spec: Mapping[str, Any], key: str) -> TrafficPolicy:
    value = _str(spec, key, f"spec.{key}", "Cluster")
    if value == "Local":
        return TrafficPolicy.LOCAL
    if value == "Cluster":
        return TrafficPolicy.CLUSTER
    raise FieldError(f"spec.{key}", f"{value!r:.60} is not Cluster or Local")


# --- EndpointSlice ---------------------------------------------------------------


def decode_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice | None:
    meta, namespace, name = _meta(obj)
    labels = _labels(meta)
    if SERVICE_PROXY_NAME in labels or HEADLESS in labels:
        return None
    address_type = _str(obj, "addressType", "addressType")
    if address_type == "FQDN":
        return None
    if address_type not in ("IPv4", "IPv6"):
        raise FieldError("addressType", f"{address_type!r:.60} is not IPv4, IPv6 or FQDN")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise FieldError(f"metadata.labels[{SERVICE_NAME_LABEL}]", "is required")
    ports: list[EndpointPort] = []
    for i, port in enumerate(_list(obj, "ports", "ports")):
        path = f"ports[{i}]"
        if not isinstance(port, Mapping):
            raise FieldError(path, "must be an object")
        if port.get("port") is None:
            continue  # "all ports" slices are not proxied
        try:
            ports.append(EndpointPort(
                name=_str(port, "name", f"{path}.name"),
                port=_int(port, "port", f"{path}.port"),
                protocol=_protocol(port, f"{path}.protocol"),
            ))
        except FieldError as err:
            if err.field_path.startswith(path):
                raise
            raise FieldError(f"{path}.{err.field_path}", err.message) from None
    endpoints = tuple(
        _endpoint(ep, f"endpoints[{i}]")
        for i, ep in enumerate(_list(obj, "endpoints", "endpoints"))
    )
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        family=4 if address_type == "IPv4" else 6,
        ports=tuple(ports),
        endpoints=endpoints,
    )


def _endpoint(ep: object, path: str) -> Endpoint:
    if not isinstance(ep, Mapping):
        raise FieldError(path, "must be an object")
    addresses = _list(ep, "addresses", f"{path}.addresses")
    if not addresses:
        raise FieldError(f"{path}.addresses", "must hold at least one address")
    cond = _map(ep, "conditions", f"{path}.conditions")
    # Upstream: nil ready means ready; nil serving means "same as ready".
    ready = _bool(cond, "ready", f"{path}.conditions.ready", True)
    serving = _bool(cond, "serving", f"{path}.conditions.serving", ready)
    terminating = _bool(cond, "terminating", f"{path}.conditions.terminating", False)
    hints = _map(ep, "hints", f"{path}.hints")
    zone_hints = _hint_names(hints, "forZones", f"{path}.hints.forZones")
    node_hints = _hint_names(hints, "forNodes", f"{path}.hints.forNodes")
    # Interned: 100,000 endpoints name a handful of nodes and zones (memory, issue 12).
    node_name = sys.intern(_str(ep, "nodeName", f"{path}.nodeName")) or None
    zone = sys.intern(_str(ep, "zone", f"{path}.zone")) or None
    return Endpoint(
        address=parse_ip(addresses[0], f"{path}.addresses[0]"),
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=node_name,
        zone=zone,
        zone_hints=zone_hints,
        node_hints=node_hints,
    )


_NO_NAMES: frozenset[str] = frozenset()


def _hint_names(hints: Mapping[str, Any], key: str, path: str) -> frozenset[str]:
    names: set[str] = set()
    for i, item in enumerate(_list(hints, key, path)):
        if not isinstance(item, Mapping):
            raise FieldError(f"{path}[{i}]", "must be an object")
        names.add(_str(item, "name", f"{path}[{i}].name"))
    # One shared empty set: each new empty frozenset costs 216 bytes, twice per endpoint.
    return frozenset(names) if names else _NO_NAMES


# --- Node ------------------------------------------------------------------------


def decode_node(obj: Mapping[str, Any]) -> Node:
    meta = _map(obj, "metadata", "metadata")
    name = _str(meta, "name", "metadata.name")
    labels = _labels(meta)
    label_items: list[tuple[str, str]] = []
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FieldError("metadata.labels", "keys and values must be strings")
        if key == ZONE_LABEL:
            check_label_value(value, f"metadata.labels[{ZONE_LABEL}]")
        label_items.append((key, value))
    spec = _map(obj, "spec", "spec")
    cidrs = _list(spec, "podCIDRs", "spec.podCIDRs")
    cidr_field = "spec.podCIDRs"
    if not cidrs and (single := _str(spec, "podCIDR", "spec.podCIDR")):
        cidrs, cidr_field = [single], "spec.podCIDR"
    status = _map(obj, "status", "status")
    internal: list[IPAddress] = []
    external: list[IPAddress] = []
    for i, addr in enumerate(_list(status, "addresses", "status.addresses")):
        path = f"status.addresses[{i}]"
        if not isinstance(addr, Mapping):
            raise FieldError(path, "must be an object")
        kind = _str(addr, "type", f"{path}.type")
        if kind == "InternalIP":
            internal.append(parse_ip(addr.get("address"), f"{path}.address"))
        elif kind == "ExternalIP":
            external.append(parse_ip(addr.get("address"), f"{path}.address"))
    taints = _list(spec, "taints", "spec.taints")
    return Node(
        name=name,
        labels=tuple(sorted(label_items)),
        addresses=tuple(internal + external),
        pod_cidrs=tuple(parse_cidr(c, f"{cidr_field}[{i}]") for i, c in enumerate(cidrs)),
        deleting=meta.get("deletionTimestamp") is not None,
        to_be_deleted=any(isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT
                          for t in taints),
    )
