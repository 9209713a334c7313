"""Server-side printing: `meta.k8s.io/v1` Table responses for `kubectl get`.

kubectl asks for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` and prints
whatever columns the server returns, so the columns here are upstream's
(pkg/printers/internalversion/printers.go): same names, same priorities (priority 1
columns only show with `-o wide`), same cell formatting (`80:30080/TCP`, `<none>`,
`<pending>`, `Terminating`, ages like `5m12s`). Each row carries the object's metadata
(PartialObjectMetadata) unless the client asked for `includeObject=None|Object`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver.resources import Resource

Obj = dict[str, Any]


@dataclass(frozen=True)
class Column:
    name: str
    cell: Callable[[Obj, float], Any]  # (object, now) -> cell value
    priority: int = 0
    type: str = "string"
    format: str = ""
    description: str = ""


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours = s // 60, s // 3600
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def _parse_time(stamp: str) -> float:
    import calendar
    import time

    return float(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))


def _age(obj: Obj, now: float) -> str:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    return human_duration(now - _parse_time(stamp)) if stamp else "<unknown>"


def _name(obj: Obj, now: float) -> str:
    del now
    return str(obj.get("metadata", {}).get("name", ""))


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _or_none(value: Any) -> str:
    return str(value) if value not in (None, "", []) else "<none>"


# ---- Pods ---------------------------------------------------------------------------------


def _pod_ready(pod: Obj, now: float) -> str:
    del now
    total = len(_get(pod, "spec", "containers") or [])
    ready = sum(1 for c in _get(pod, "status", "containerStatuses") or [] if c.get("ready"))
    return f"{ready}/{total}"


def _pod_status(pod: Obj, now: float) -> str:
    del now
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Pending"
    for c in reversed(status.get("containerStatuses") or []):
        state = c.get("state") or {}
        waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
        if waiting.get("reason"):
            reason = waiting["reason"]
        elif terminated.get("reason"):
            reason = terminated["reason"]
        elif terminated:
            reason = f"ExitCode:{terminated.get('exitCode', 0)}"
    if _get(pod, "metadata", "deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return str(reason)


def _pod_restarts(pod: Obj, now: float) -> str:
    del now
    statuses = _get(pod, "status", "containerStatuses") or []
    return str(sum(int(c.get("restartCount", 0)) for c in statuses))


def _pod_gates(pod: Obj, now: float) -> str:
    del now
    gates = _get(pod, "spec", "readinessGates") or []
    if not gates:
        return "<none>"
    true = {c.get("type") for c in _get(pod, "status", "conditions") or []
            if c.get("status") == "True"}
    return f"{sum(1 for g in gates if g.get('conditionType') in true)}/{len(gates)}"


# ---- Services -----------------------------------------------------------------------------


def _svc_external(svc: Obj, now: float) -> str:
    del now
    spec = svc.get("spec") or {}
    external = list(spec.get("externalIPs") or [])
    kind = spec.get("type")
    if kind == "ExternalName":
        return str(spec.get("externalName", ""))
    if kind == "LoadBalancer":
        ingress = _get(svc, "status", "loadBalancer", "ingress") or []
        lb = [i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")]
        joined = ",".join(external + lb)
        if len(joined) > 16 and lb:
            joined = joined[:13] + "..."
        return joined or "<pending>"
    return ",".join(external) or "<none>"


def _svc_ports(svc: Obj, now: float) -> str:
    del now
    parts = []
    for p in _get(svc, "spec", "ports") or []:
        node = f":{p['nodePort']}" if p.get("nodePort") else ""
        parts.append(f"{p.get('port')}{node}/{p.get('protocol', 'TCP')}")
    return ",".join(parts) or "<none>"


def _selector(svc: Obj, now: float) -> str:
    del now
    sel = _get(svc, "spec", "selector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"


# ---- Nodes --------------------------------------------------------------------------------


def _node_status(node: Obj, now: float) -> str:
    del now
    conditions = {c.get("type"): c.get("status") for c in _get(node, "status", "conditions") or []}
    ready = conditions.get("Ready")
    words = ["Unknown" if ready is None else "Ready" if ready == "True" else "NotReady"]
    if _get(node, "spec", "unschedulable"):
        words.append("SchedulingDisabled")
    return ",".join(words)


def _node_roles(node: Obj, now: float) -> str:
    del now
    roles = set()
    for key, value in (_get(node, "metadata", "labels") or {}).items():
        if key.startswith("node-role.kubernetes.io/") and key.split("/", 1)[1]:
            roles.add(key.split("/", 1)[1])
        elif key == "kubernetes.io/role" and value:
            roles.add(value)
    return ",".join(sorted(roles)) or "<none>"


def _node_address(kind: str) -> Callable[[Obj, float], str]:
    def cell(node: Obj, now: float) -> str:
        del now
        for addr in _get(node, "status", "addresses") or []:
            if addr.get("type") == kind:
                return str(addr.get("address"))
        return "<none>"

    return cell


def _node_info(key: str, default: str = "<unknown>") -> Callable[[Obj, float], str]:
    def cell(node: Obj, now: float) -> str:
        del now
        return str(_get(node, "status", "nodeInfo", key) or default)

    return cell


# ---- EndpointSlices -----------------------------------------------------------------------


def _slice_ports(es: Obj, now: float) -> str:
    del now
    ports = es.get("ports") or []
    if not ports:
        return "<unset>"
    return ",".join(str(p["port"]) if p.get("port") is not None else "<unset>" for p in ports)


def _slice_endpoints(es: Obj, now: float) -> str:
    del now
    addresses = [a for ep in es.get("endpoints") or [] for a in ep.get("addresses") or []]
    if not addresses:
        return "<unset>"
    shown = ",".join(addresses[:3])
    return shown + (f" + {len(addresses) - 3} more..." if len(addresses) > 3 else "")


def _field(*path: str) -> Callable[[Obj, float], str]:
    def cell(obj: Obj, now: float) -> str:
        del now
        value = _get(obj, *path)
        return "" if value is None else str(value)

    return cell


def _field_or_none(*path: str) -> Callable[[Obj, float], str]:
    def cell(obj: Obj, now: float) -> str:
        del now
        return _or_none(_get(obj, *path))

    return cell


# ---- DaemonSets, ConfigMaps, ServiceAccounts, RBAC ---------------------------------------


def _count(*path: str) -> Callable[[Obj, float], int]:
    def cell(obj: Obj, now: float) -> int:
        del now
        return sum(len(_get(obj, p) or []) for p in path)

    return cell


def _int_field(*path: str) -> Callable[[Obj, float], int]:
    def cell(obj: Obj, now: float) -> int:
        del now
        return int(_get(obj, *path) or 0)

    return cell


def _node_selector(ds: Obj, now: float) -> str:
    del now
    sel = _get(ds, "spec", "template", "spec", "nodeSelector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"


def _containers(attr: str) -> Callable[[Obj, float], str]:
    def cell(ds: Obj, now: float) -> str:
        del now
        return ",".join(str(c.get(attr, "")) for c in
                        _get(ds, "spec", "template", "spec", "containers") or [])

    return cell


def _label_selector(ds: Obj, now: float) -> str:
    del now
    sel = _get(ds, "spec", "selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op, key = e.get("operator"), e.get("key")
        values = ",".join(e.get("values") or [])
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": str(key), "DoesNotExist": f"!{key}"}.get(op, str(key)))
    return ",".join(terms) or "<none>"


def _role_ref(binding: Obj, now: float) -> str:
    del now
    ref = binding.get("roleRef") or {}
    return f"{ref.get('kind', '')}/{ref.get('name', '')}"


def _subjects(kind: str) -> Callable[[Obj, float], str]:
    def cell(binding: Obj, now: float) -> str:
        del now
        names = [(f"{s.get('namespace', '')}/{s.get('name')}" if kind == "ServiceAccount"
                  else str(s.get("name")))
                 for s in binding.get("subjects") or [] if s.get("kind") == kind]
        return ", ".join(names)

    return cell


def _created_at(obj: Obj, now: float) -> str:
    del now
    return str(_get(obj, "metadata", "creationTimestamp") or "")


_NAME = Column("Name", _name, format="name", description="Name must be unique within a "
               "namespace.")
_AGE = Column("Age", _age, description="CreationTimestamp is a timestamp representing the "
              "server time when this object was created.")

_CORE_COLUMNS: Mapping[str, tuple[Column, ...]] = {
    "Pod": (
        _NAME,
        Column("Ready", _pod_ready, description="The aggregate readiness state of this pod."),
        Column("Status", _pod_status, description="The aggregate status of the containers."),
        Column("Restarts", _pod_restarts, description="The number of times the containers "
               "in this pod have been restarted."),
        _AGE,
        Column("IP", _field_or_none("status", "podIP"), 1, description="IP address of the pod."),
        Column("Node", _field_or_none("spec", "nodeName"), 1,
               description="Name of the node the pod is scheduled on."),
        Column("Nominated Node", _field_or_none("status", "nominatedNodeName"), 1),
        Column("Readiness Gates", _pod_gates, 1),
    ),
    "Service": (
        _NAME,
        Column("Type", _field("spec", "type"), description="The type of the service."),
        Column("Cluster-IP", _field_or_none("spec", "clusterIP"),
               description="The cluster IP of the service."),
        Column("External-IP", _svc_external, description="The external IP of the service."),
        Column("Port(s)", _svc_ports, description="The ports of the service."),
        _AGE,
        Column("Selector", _selector, 1, description="The selector of the service."),
    ),
    "Node": (
        _NAME,
        Column("Status", _node_status, description="The status of the node."),
        Column("Roles", _node_roles, description="The roles of the node."),
        _AGE,
        Column("Version", _field("status", "nodeInfo", "kubeletVersion"),
               description="Kubelet version reported by the node."),
        Column("Internal-IP", _node_address("InternalIP"), 1),
        Column("External-IP", _node_address("ExternalIP"), 1),
        Column("OS-Image", _node_info("osImage"), 1),
        Column("Kernel-Version", _node_info("kernelVersion"), 1),
        Column("Container-Runtime", _node_info("containerRuntimeVersion"), 1),
    ),
    "Namespace": (
        _NAME,
        Column("Status", _field("status", "phase"), description="The status of the namespace."),
        _AGE,
    ),
    "EndpointSlice": (
        _NAME,
        Column("AddressType", _field("addressType"), description="The address type."),
        Column("Ports", _slice_ports, description="The ports of the slice."),
        Column("Endpoints", _slice_endpoints, description="The endpoint addresses."),
        _AGE,
    ),
}


_BINDING = (
    _NAME,
    Column("Role", _role_ref, description="The role of the binding."),
    _AGE,
    Column("Users", _subjects("User"), 1, description="The users of the binding."),
    Column("Groups", _subjects("Group"), 1, description="The groups of the binding."),
    Column("ServiceAccounts", _subjects("ServiceAccount"), 1,
           description="The service accounts of the binding."),
)
_ROLE = (_NAME, Column("Created At", _created_at, type="date",
                       description="The creation timestamp of the role."))
COLUMNS: Mapping[str, tuple[Column, ...]] = {
    **_CORE_COLUMNS,
    "DaemonSet": (
        _NAME,
        Column("Desired", _int_field("status", "desiredNumberScheduled"), type="integer",
               description="The desired number of daemon pods."),
        Column("Current", _int_field("status", "currentNumberScheduled"), type="integer",
               description="The current number of daemon pods."),
        Column("Ready", _int_field("status", "numberReady"), type="integer",
               description="The number of daemon pods that are ready."),
        Column("Up-to-date", _int_field("status", "updatedNumberScheduled"), type="integer",
               description="The number of daemon pods that are up to date."),
        Column("Available", _int_field("status", "numberAvailable"), type="integer",
               description="The number of daemon pods that are available."),
        Column("Node Selector", _node_selector, description="The node selector."),
        _AGE,
        Column("Containers", _containers("name"), 1, description="Names of each container."),
        Column("Images", _containers("image"), 1, description="Images of each container."),
        Column("Selector", _label_selector, 1, description="The label selector."),
    ),
    "ConfigMap": (_NAME, Column("Data", _count("data", "binaryData"), type="integer",
                                description="The number of data entries."), _AGE),
    "ServiceAccount": (_NAME, Column("Secrets", _count("secrets"), type="integer",
                                     description="The number of secrets."), _AGE),
    "ClusterRole": _ROLE,
    "Role": _ROLE,
    "ClusterRoleBinding": _BINDING,
    "RoleBinding": _BINDING,
}


def _row_object(res: Resource, obj: Obj, include: str) -> Obj | None:
    if include == "None":
        return None
    if include == "Object":
        return {"kind": res.kind, "apiVersion": res.api_version, **obj}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata", {})}


def to_table(res: Resource, objs: list[Obj], *, now: float, include: str = "Metadata",
             list_meta: Obj | None = None) -> Obj:
    columns = COLUMNS[res.kind]
    rows = []
    for obj in objs:
        row: Obj = {"cells": [c.cell(obj, now) for c in columns]}
        embedded = _row_object(res, obj, include)
        if embedded is not None:
            row["object"] = embedded
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta or {},
        "columnDefinitions": [
            {"name": c.name, "type": c.type, "format": c.format, "description": c.description,
             "priority": c.priority}
            for c in columns
        ],
        "rows": rows,
    }
