"""Kubernetes YAML -> the lab's typed records.

The lab reads what a user would ``kubectl apply``: Nodes, Pods, Services and (for
selector-less Services only) EndpointSlices. Raw objects stay plain dicts (the core parses
Services and EndpointSlices itself); this module pulls out only what the lab needs and
validates it, naming the object and the field on error. Pure: no I/O but parsing text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml

from kubeproxy.lab.errors import LabManifestError
from kubeproxy.util.jsontypes import JSON

ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
# Kinds the lab accepts but has nothing to do with.
IGNORED_KINDS = frozenset({"Namespace"})


@dataclass(frozen=True)
class ContainerPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    node_name: str | None
    pod_ip: str | None
    ports: tuple[ContainerPort, ...]
    raw: JSON = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str
    target_port: int | str
    node_port: int | None
    app_protocol: str | None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: str
    selector: Mapping[str, str] | None
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    publish_not_ready: bool
    raw: JSON = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


@dataclass(frozen=True)
class Node:
    name: str
    pod_cidr: str | None
    labels: Mapping[str, str]
    raw: JSON = field(repr=False, compare=False)

    @property
    def zone(self) -> str | None:
        return self.labels.get(ZONE_LABEL) or None


@dataclass(frozen=True)
class LabObjects:
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    services: tuple[Service, ...]
    # User-given EndpointSlices, only those of selector-less Services.
    slices: tuple[JSON, ...]
    # Human-readable notes on what was ignored (e.g. slices of selector Services).
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------- loading documents


def load_documents(texts: Iterable[tuple[str, str]]) -> list[JSON]:
    """Parse (source name, YAML text) pairs into objects; ``kind: List`` is flattened."""
    out: list[JSON] = []
    for source, text in texts:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise LabManifestError(f"{source}: not valid YAML: {exc}") from exc
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise LabManifestError(f"{source}: document {index + 1} is not a mapping")
            if doc.get("kind") == "List" or (
                str(doc.get("kind", "")).endswith("List") and "items" in doc
            ):
                items = doc.get("items") or []
                if not isinstance(items, list):
                    raise LabManifestError(f"{source}: document {index + 1}: items is not a list")
                out.extend(_as_mapping(item, f"{source}: items[]") for item in items)
            else:
                out.append(doc)
    return out


def _as_mapping(value: object, where: str) -> JSON:
    if not isinstance(value, dict):
        raise LabManifestError(f"{where}: expected a mapping")
    return value


# ---------------------------------------------------------------- field helpers


class _Obj:
    """Field access on one raw object, producing errors that name it."""

    def __init__(self, raw: JSON) -> None:
        self.raw = raw
        meta = raw.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise LabManifestError(f"{raw.get('kind', 'object')}: metadata.name is required")
        self.name: str = meta["name"]
        namespace = meta.get("namespace", "default")
        if not isinstance(namespace, str) or not namespace:
            raise LabManifestError(f"{raw.get('kind')} {self.name}: metadata.namespace is invalid")
        self.namespace: str = namespace
        self.label = f"{raw.get('kind')} {namespace}/{self.name}"

    def fail(self, path: str, message: str) -> LabManifestError:
        return LabManifestError(f"{self.label}: {path} {message}")

    def mapping(self, value: object, path: str) -> JSON:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, "must be a mapping")
        return value

    def str_map(self, value: object, path: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.mapping(value, path).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise self.fail(f"{path}.{k}", "must be a string")
            out[k] = v
        return out

    def items(self, value: object, path: str) -> list[JSON]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, "must be a list")
        return [self.mapping(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def port(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.fail(path, f"must be a port number 1-65535, got {value!r}")
        return value

    def protocol(self, value: object, path: str) -> str:
        proto = "TCP" if value is None else value
        if proto not in PROTOCOLS:
            raise self.fail(path, f"must be one of {', '.join(PROTOCOLS)}, got {value!r}")
        return str(proto)

    def ipv4(self, value: object, path: str) -> str:
        try:
            return str(ipaddress.IPv4Address(str(value)))
        except ValueError as exc:
            raise self.fail(path, f"must be an IPv4 address, got {value!r}") from exc


# ---------------------------------------------------------------- per kind


def parse_pod(raw: JSON) -> Pod:
    o = _Obj(raw)
    meta = o.mapping(raw.get("metadata"), "metadata")
    spec = o.mapping(raw.get("spec"), "spec")
    status = o.mapping(raw.get("status"), "status")
    ports: list[ContainerPort] = []
    for ci, container in enumerate(o.items(spec.get("containers"), "spec.containers")):
        for pi, p in enumerate(o.items(container.get("ports"), f"spec.containers[{ci}].ports")):
            path = f"spec.containers[{ci}].ports[{pi}]"
            name = p.get("name", "")
            if not isinstance(name, str):
                raise o.fail(f"{path}.name", "must be a string")
            ports.append(
                ContainerPort(
                    name=name,
                    port=o.port(p.get("containerPort"), f"{path}.containerPort"),
                    protocol=o.protocol(p.get("protocol"), f"{path}.protocol"),
                )
            )
    node_name = spec.get("nodeName")
    if node_name is not None and not isinstance(node_name, str):
        raise o.fail("spec.nodeName", "must be a string")
    pod_ip = status.get("podIP")
    return Pod(
        namespace=o.namespace,
        name=o.name,
        labels=o.str_map(meta.get("labels"), "metadata.labels"),
        node_name=node_name or None,
        pod_ip=o.ipv4(pod_ip, "status.podIP") if pod_ip else None,
        ports=tuple(ports),
        raw=raw,
    )


def parse_service(raw: JSON) -> Service:
    o = _Obj(raw)
    spec = o.mapping(raw.get("spec"), "spec")
    status = o.mapping(raw.get("status"), "status")
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise o.fail("spec.type", f"is not a Service type: {svc_type!r}")
    ports: list[ServicePort] = []
    for i, p in enumerate(o.items(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        port = o.port(p.get("port"), f"{path}.port")
        target = p.get("targetPort", port)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, int):
            target = o.port(target, f"{path}.targetPort")
        elif not isinstance(target, str) or not target:
            raise o.fail(f"{path}.targetPort", "must be a port number or a port name")
        node_port = p.get("nodePort")
        name = p.get("name", "")
        app_protocol = p.get("appProtocol")
        if not isinstance(name, str):
            raise o.fail(f"{path}.name", "must be a string")
        if app_protocol is not None and not isinstance(app_protocol, str):
            raise o.fail(f"{path}.appProtocol", "must be a string")
        ports.append(
            ServicePort(
                name=name,
                port=port,
                protocol=o.protocol(p.get("protocol"), f"{path}.protocol"),
                target_port=target,
                node_port=None if node_port is None else o.port(node_port, f"{path}.nodePort"),
                app_protocol=app_protocol,
            )
        )
    selector = spec.get("selector")
    cluster_ip = spec.get("clusterIP")
    if cluster_ip not in (None, "", "None"):
        cluster_ip = o.ipv4(cluster_ip, "spec.clusterIP")
    external_ips = tuple(
        o.ipv4(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(spec.get("externalIPs") or [])
    )
    lb = o.mapping(status.get("loadBalancer"), "status.loadBalancer")
    lb_ips = tuple(
        o.ipv4(ing["ip"], f"status.loadBalancer.ingress[{i}].ip")
        for i, ing in enumerate(o.items(lb.get("ingress"), "status.loadBalancer.ingress"))
        if ing.get("ip")
    )
    return Service(
        namespace=o.namespace,
        name=o.name,
        type=str(svc_type),
        selector=o.str_map(selector, "spec.selector") if selector else None,
        cluster_ip=cluster_ip or None,
        ports=tuple(ports),
        external_ips=external_ips,
        lb_ips=lb_ips,
        publish_not_ready=bool(spec.get("publishNotReadyAddresses", False)),
        raw=raw,
    )


def parse_node(raw: JSON) -> Node:
    o = _Obj(raw)
    meta = o.mapping(raw.get("metadata"), "metadata")
    spec = o.mapping(raw.get("spec"), "spec")
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not isinstance(cidrs, list):
        raise o.fail("spec.podCIDRs", "must be a list")
    pod_cidr: str | None = None
    for i, cidr in enumerate(cidrs):
        try:
            net = ipaddress.ip_network(str(cidr), strict=True)
        except ValueError as exc:
            raise o.fail(f"spec.podCIDRs[{i}]", f"is not a CIDR: {cidr!r}") from exc
        if net.version == 4 and pod_cidr is None:
            if net.prefixlen > 30:
                raise o.fail(f"spec.podCIDRs[{i}]", f"is too small for pods: {cidr}")
            pod_cidr = str(net)
    label = o.label.replace(f" {o.namespace}/", " ")
    if cidrs and pod_cidr is None:
        raise LabManifestError(f"{label}: spec.podCIDRs has no IPv4 CIDR (the lab is IPv4 only)")
    return Node(
        name=o.name,
        pod_cidr=pod_cidr,
        labels=o.str_map(meta.get("labels"), "metadata.labels"),
        raw=raw,
    )


def slice_service_name(raw: JSON) -> str | None:
    meta = raw.get("metadata") or {}
    labels = meta.get("labels") or {}
    name = labels.get(SERVICE_NAME_LABEL)
    return name if isinstance(name, str) else None


def parse_objects(docs: Iterable[JSON]) -> LabObjects:
    """Sort documents by kind, parse them, and keep only slices the lab should honour."""
    nodes: list[Node] = []
    pods: list[Pod] = []
    services: list[Service] = []
    raw_slices: list[JSON] = []
    for doc in docs:
        kind = doc.get("kind")
        if kind == "Node":
            nodes.append(parse_node(doc))
        elif kind == "Pod":
            pods.append(parse_pod(doc))
        elif kind == "Service":
            services.append(parse_service(doc))
        elif kind == "EndpointSlice":
            _Obj(doc)  # validates metadata
            raw_slices.append(doc)
        elif kind in IGNORED_KINDS:
            continue
        else:
            name = (doc.get("metadata") or {}).get("name", "?")
            raise LabManifestError(
                f"{kind} {name}: kind {kind!r} is not supported by the lab "
                "(use Node, Pod, Service, EndpointSlice)"
            )
    _unique("Node", [n.name for n in nodes])
    _unique("Pod", [p.key for p in pods])
    _unique("Service", [s.key for s in services])
    by_key = {s.key: s for s in services}
    slices: list[JSON] = []
    notes: list[str] = []
    for raw in raw_slices:
        o = _Obj(raw)
        svc_name = slice_service_name(raw)
        svc = by_key.get(f"{o.namespace}/{svc_name}") if svc_name else None
        if svc is not None and svc.selector:
            notes.append(
                f"EndpointSlice {o.namespace}/{o.name} ignored: Service {svc.key} has a "
                "selector, the lab's endpoint controller computes its slices"
            )
            continue
        slices.append(raw)
    return LabObjects(tuple(nodes), tuple(pods), tuple(services), tuple(slices), tuple(notes))


def _unique(kind: str, keys: list[str]) -> None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise LabManifestError(f"{kind} {key}: defined twice")
        seen.add(key)
