"""The lab's endpoint controller: Pods + Services + Nodes -> EndpointSlices.

It does what kube-controller-manager's EndpointSlice controller does, for one moment in
time (pure; the caller re-runs it after every change):

- only Services with a selector (and not ExternalName) get slices; the selector must be a
  subset of the Pod's labels, in the Service's namespace; Pods without an IP are skipped;
- conditions (upstream ``podToEndpoint``): ``serving`` = the Pod is Ready,
  ``terminating`` = the Pod has a deletionTimestamp, ``ready`` = serving and not
  terminating (or ``publishNotReadyAddresses``);
- ``nodeName`` from the Pod, ``zone`` from the Node's ``topology.kubernetes.io/zone``;
- each ServicePort's targetPort is resolved per Pod (``FindPort``): a number is used as is,
  a name is looked up in the Pod's containers[].ports[] with the same protocol; a Pod
  where a name does not resolve simply lacks that port. Endpoints are grouped into slices
  by their resolved port list, at most 100 per slice, like upstream;
- a selector Service with no matching Pods gets one empty slice (upstream's placeholder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kubeproxy.lab.manifest import SERVICE_NAME_LABEL, Node, Pod, Service, ServicePort
from kubeproxy.util.jsontypes import JSON

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
MAX_ENDPOINTS_PER_SLICE = 100


@dataclass(frozen=True)
class PodStatus:
    """What the lab knows of a Pod's life: kubelet's Ready condition and deletion."""

    ready: bool = True
    terminating: bool = False


# A resolved port of one endpoint: (service port name, port, protocol, appProtocol).
_Port = tuple[str, int, str, str | None]


def find_port(pod: Pod, port: ServicePort) -> int | None:
    """Upstream podutil.FindPort: the Pod's port for a ServicePort, None if unresolvable."""
    if isinstance(port.target_port, int):
        return port.target_port
    for cp in pod.ports:
        if cp.name == port.target_port and cp.protocol == port.protocol:
            return cp.port
    return None


def selects(service: Service, pod: Pod) -> bool:
    if not service.selector or service.namespace != pod.namespace:
        return False
    return all(pod.labels.get(k) == v for k, v in service.selector.items())


def endpoint_slices(
    services: Sequence[Service],
    pods: Sequence[Pod],
    nodes: Sequence[Node],
    statuses: Mapping[str, PodStatus],
) -> list[JSON]:
    """All EndpointSlices the controller would hold, sorted by namespace/name."""
    zones = {n.name: n.zone for n in nodes}
    out: list[JSON] = []
    for svc in services:
        if not svc.selector or svc.type == "ExternalName":
            continue
        out.extend(_service_slices(svc, pods, zones, statuses))
    return sorted(out, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"]))


def _service_slices(
    svc: Service,
    pods: Sequence[Pod],
    zones: Mapping[str, str | None],
    statuses: Mapping[str, PodStatus],
) -> list[JSON]:
    groups: dict[tuple[_Port, ...], list[JSON]] = {}
    for pod in sorted(pods, key=lambda p: _ip_key(p.pod_ip)):
        if pod.pod_ip is None or not selects(svc, pod):
            continue
        ports: list[_Port] = []
        for sp in svc.ports:
            number = find_port(pod, sp)
            if number is not None:
                ports.append((sp.name, number, sp.protocol, sp.app_protocol))
        status = statuses.get(pod.key, PodStatus())
        groups.setdefault(tuple(ports), []).append(_endpoint(svc, pod, status, zones))
    if not groups:
        return [_slice(svc, (), [], 0)]
    slices: list[JSON] = []
    for ports_key, endpoints in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        for chunk in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            part = endpoints[chunk : chunk + MAX_ENDPOINTS_PER_SLICE]
            slices.append(_slice(svc, ports_key, part, chunk // MAX_ENDPOINTS_PER_SLICE))
    return slices


def _endpoint(svc: Service, pod: Pod, status: PodStatus, zones: Mapping[str, str | None]) -> JSON:
    serving = status.ready
    terminating = status.terminating
    ready = svc.publish_not_ready or (serving and not terminating)
    ep: JSON = {
        "addresses": [pod.pod_ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
    }
    if pod.node_name:
        ep["nodeName"] = pod.node_name
        zone = zones.get(pod.node_name)
        if zone:
            ep["zone"] = zone
    return ep


def _slice(svc: Service, ports: tuple[_Port, ...], endpoints: list[JSON], chunk: int) -> JSON:
    digest = hashlib.sha256(f"{svc.key}|{ports!r}|{chunk}".encode()).hexdigest()[:5]
    svc_labels = (svc.raw.get("metadata") or {}).get("labels") or {}
    labels: dict[str, str] = {
        k: v for k, v in svc_labels.items() if k not in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL)
    }
    labels[SERVICE_NAME_LABEL] = svc.name
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    if svc.headless:
        labels[HEADLESS_LABEL] = ""
    port_list: list[JSON] = []
    for name, number, protocol, app_protocol in ports:
        p: JSON = {"name": name, "port": number, "protocol": protocol}
        if app_protocol:
            p["appProtocol"] = app_protocol
        port_list.append(p)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc.name}-{digest}",
            "namespace": svc.namespace,
            "labels": labels,
            "ownerReferences": [_owner(svc)],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": port_list,
    }


def _owner(svc: Service) -> JSON:
    ref: JSON = {"apiVersion": "v1", "kind": "Service", "name": svc.name, "controller": True}
    uid = (svc.raw.get("metadata") or {}).get("uid")
    if uid:  # a Service read from the API server: point at that very object
        ref["uid"] = uid
        ref["blockOwnerDeletion"] = True
    return ref


def _ip_key(ip: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split(".")) if ip else ()


# ---------------------------------------------------------------- writing them back

# The parts of a slice the controller owns; anything else (uid, resourceVersion, the
# trigger-time annotation) does not make two slices different.
_COMPARED = ("addressType", "endpoints", "ports")


def _owned(slice_: JSON) -> tuple[object, ...]:
    meta = slice_.get("metadata") or {}
    return (
        meta.get("labels") or {},
        meta.get("ownerReferences") or [],
        *(slice_.get(k) or [] for k in _COMPARED),
    )


def is_managed(slice_: JSON) -> bool:
    labels = (slice_.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_BY_LABEL) == CONTROLLER_NAME


def slice_changes(
    desired: Sequence[JSON], existing: Sequence[JSON]
) -> tuple[list[JSON], list[JSON], list[JSON]]:
    """What to write so the API holds exactly ``desired`` among the controller's slices.

    ``existing`` is every EndpointSlice in the API; only those labelled managed-by this
    controller are its own (a user's slice of a selector-less Service is left alone).
    Returns (to create, to update: desired with the current resourceVersion, to delete).
    """
    ours = {_slice_key(s): s for s in existing if is_managed(s)}
    others = {_slice_key(s) for s in existing if not is_managed(s)}
    creates: list[JSON] = []
    updates: list[JSON] = []
    for want in desired:
        key = _slice_key(want)
        have = ours.pop(key, None)
        if have is None:
            if key not in others:  # never take over a slice someone else wrote
                creates.append(want)
        elif _owned(have) != _owned(want):
            meta = dict(want["metadata"])
            meta["resourceVersion"] = (have.get("metadata") or {}).get("resourceVersion")
            updates.append({**want, "metadata": meta})
    return creates, updates, sorted(ours.values(), key=_slice_key)


def _slice_key(slice_: JSON) -> tuple[str, str]:
    meta = slice_.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")
