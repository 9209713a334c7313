"""Per-kind rules applied on create and update: defaults, carry-over, validation.

Upstream calls these "strategies" (pkg/registry/<group>/<kind>/strategy.go). The
registry (registry.py) calls a kind's `default` on create (`carry_over` on update) and
then `validate`, which returns the field `Cause`s the registry turns into one 422
Invalid error. The rules kept
are the ones clients notice: names, labels, ports and IPs, required fields, immutable
fields (most of a Pod's spec, a Service's ClusterIP, an EndpointSlice's addressType),
what the main resource may change versus the `status` subresource, and the defaults
kubectl users see in `get -o yaml` (pod `phase: Pending`, namespace `phase: Active`, ...).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import names, services
from kubeproxy.apiserver.errors import Cause

Obj = dict[str, Any]


@dataclass(frozen=True)
class Context:
    """What a strategy may know beyond the object: the service network and allocations."""

    network: services.ServiceNetwork
    taken: services.Allocations


@dataclass(frozen=True)
class Strategy:
    name_check: Callable[[str], list[str]]
    default: Callable[[Obj, Context], None]
    validate: Callable[[Obj, Obj | None, Context], list[Cause]]
    carry_over: Callable[[Obj, Obj], None]  # (old, new) on update of the main resource
    has_status: bool = True  # status is only written through the status subresource
    keep_status_on_create: bool = False


def _noop_default(obj: Obj, ctx: Context) -> None:
    del obj, ctx


def _noop_carry(old: Obj, new: Obj) -> None:
    del old, new


# ---- common metadata ----------------------------------------------------------------------


ANNOTATIONS_SIZE_LIMIT = 256 * 1024  # upstream's TotalAnnotationSizeLimitB: keys + values


def validate_metadata(obj: Obj, name_check: Callable[[str], list[str]]) -> list[Cause]:
    meta = obj.get("metadata") or {}
    errs: list[Cause] = []
    name = meta.get("name")
    if not name:
        errs.append(Cause("metadata.name", "Required value: name or generateName is required",
                          "FieldValueRequired"))
    else:
        errs += [Cause("metadata.name", f"Invalid value: {name!r}: {m}") for m in name_check(name)]
    for key, value in (meta.get("labels") or {}).items():
        errs += [Cause("metadata.labels", f"Invalid value: {key!r}: {m}")
                 for m in names.qualified_name(key)]
        if not isinstance(value, str):
            errs.append(Cause("metadata.labels", f"Invalid value: {value!r}: must be a string"))
        else:
            errs += [Cause("metadata.labels", f"Invalid value: {value!r}: {m}")
                     for m in names.label_value(value)]
    annotations = meta.get("annotations") or {}
    for key in annotations:
        errs += [Cause("metadata.annotations", f"Invalid value: {key!r}: {m}")
                 for m in names.qualified_name(key.lower())]
    size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_SIZE_LIMIT:  # upstream's ValidateAnnotationsSize: bytes, as Go's len
        errs.append(Cause("metadata.annotations", "Too long: may not be more than "
                          f"{ANNOTATIONS_SIZE_LIMIT} bytes", "FieldValueTooLong"))
    return errs


# ---- Namespace ------------------------------------------------------------------------------


def _namespace_default(obj: Obj, ctx: Context) -> None:
    del ctx
    meta = obj.setdefault("metadata", {})
    meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta.get("name", "")
    spec = obj.setdefault("spec", {})
    spec.setdefault("finalizers", ["kubernetes"])
    status = obj.setdefault("status", {})
    status.setdefault("phase", "Active")


# ---- Node ---------------------------------------------------------------------------------

_NODE_ADDRESS_TYPES = ("Hostname", "InternalIP", "ExternalIP", "InternalDNS", "ExternalDNS")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _node_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del old, ctx
    errs: list[Cause] = []
    spec = obj.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or []) + ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr)
        except ValueError:
            errs.append(Cause("spec.podCIDRs", f"Invalid value: {cidr!r}: must be a valid CIDR"))
    for i, taint in enumerate(spec.get("taints") or []):
        if taint.get("effect") not in _TAINT_EFFECTS:
            errs.append(Cause(f"spec.taints[{i}].effect",
                              f'Unsupported value: "{taint.get("effect")}"',
                              "FieldValueNotSupported"))
    for i, addr in enumerate((obj.get("status") or {}).get("addresses") or []):
        if addr.get("type") not in _NODE_ADDRESS_TYPES:
            errs.append(Cause(f"status.addresses[{i}].type",
                              f'Unsupported value: "{addr.get("type")}"',
                              "FieldValueNotSupported"))
    return errs


def _node_default(obj: Obj, ctx: Context) -> None:
    del ctx
    spec = obj.setdefault("spec", {})
    if spec.get("podCIDR") and not spec.get("podCIDRs"):
        spec["podCIDRs"] = [spec["podCIDR"]]
    obj.setdefault("status", {}).setdefault("daemonEndpoints", {"kubeletEndpoint": {"Port": 0}})


# ---- Pod ----------------------------------------------------------------------------------

_RESTART_POLICIES = ("Always", "OnFailure", "Never")


def _pod_default(obj: Obj, ctx: Context) -> None:
    del ctx
    spec = obj.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            image = str(c.get("image", ""))
            latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            resources = c.setdefault("resources", {})
            if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
                requests = resources.setdefault("requests", {})  # upstream: requests = limits
                for name, value in resources["limits"].items():
                    requests.setdefault(name, value)
            for port in c.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
    status = obj.setdefault("status", {})
    status.setdefault("phase", "Pending")
    status.setdefault("qosClass", _qos_class(spec))


def _qos_class(spec: Obj) -> str:
    """Guaranteed when every container limits cpu and memory at its requests."""
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("limits") or r.get("requests") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        for name in ("cpu", "memory"):
            if name not in limits or str(requests.get(name)) != str(limits[name]):
                return "Burstable"
    return "Guaranteed"


def _pod_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del ctx
    spec = obj.get("spec") or {}
    errs: list[Cause] = []
    containers = spec.get("containers") or []
    if not containers:
        errs.append(Cause("spec.containers", "Required value", "FieldValueRequired"))
    seen: set[str] = set()
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key) or []):
            errs += _container_errors(f"spec.{key}[{i}]", c, seen)
    if spec.get("restartPolicy") not in _RESTART_POLICIES:
        errs.append(Cause("spec.restartPolicy", f'Unsupported value: "{spec.get("restartPolicy")}"',
                          "FieldValueNotSupported"))
    if spec.get("nodeName"):
        errs += [Cause("spec.nodeName", f"Invalid value: {spec['nodeName']!r}: {m}")
                 for m in names.dns1123_subdomain(spec["nodeName"])]
    if old is not None and _mutable_pod_spec(old.get("spec") or {}) != _mutable_pod_spec(spec):
        errs.append(Cause("spec", "Forbidden: pod updates may not change fields other than "
                          "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                          "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
                          "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it "
                          "to be set to 1 if it was previously negative)",
                          "FieldValueForbidden"))
    return errs


def _container_errors(path: str, c: Any, seen: set[str]) -> list[Cause]:
    if not isinstance(c, dict):
        return [Cause(path, "Invalid value: must be an object")]
    errs: list[Cause] = []
    name = c.get("name")
    if not name:
        errs.append(Cause(f"{path}.name", "Required value", "FieldValueRequired"))
    else:
        errs += [Cause(f"{path}.name", f"Invalid value: {name!r}: {m}")
                 for m in names.dns1123_label(name)]
        if name in seen:
            errs.append(Cause(f"{path}.name", f'Duplicate value: "{name}"', "FieldValueDuplicate"))
        seen.add(name)
    if not c.get("image"):
        errs.append(Cause(f"{path}.image", "Required value", "FieldValueRequired"))
    for j, port in enumerate(c.get("ports") or []):
        number = port.get("containerPort")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            errs.append(Cause(f"{path}.ports[{j}].containerPort",
                              f"Invalid value: {number}: must be between 1 and 65535, inclusive"))
        if port.get("protocol") not in services.PROTOCOLS:
            errs.append(Cause(f"{path}.ports[{j}].protocol",
                              f'Unsupported value: "{port.get("protocol")}"',
                              "FieldValueNotSupported"))
    return errs


def _mutable_pod_spec(spec: Obj) -> Obj:
    """The pod spec with the fields an update may change blanked out."""
    masked = copy.deepcopy(spec)
    for key in ("containers", "initContainers"):
        for c in masked.get(key) or []:
            if isinstance(c, dict):
                c.pop("image", None)
    for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds",
                "schedulingGates"):
        masked.pop(key, None)
    return masked


# ---- EndpointSlice -------------------------------------------------------------------------

_ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


def _slice_default(obj: Obj, ctx: Context) -> None:
    del ctx
    for port in obj.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")


def _slice_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del ctx
    errs: list[Cause] = []
    kind = obj.get("addressType")
    if kind not in _ADDRESS_TYPES:
        errs.append(Cause("addressType", f'Unsupported value: "{kind}": supported values: '
                          '"FQDN", "IPv4", "IPv6"', "FieldValueNotSupported"))
    if old is not None and old.get("addressType") != kind:
        errs.append(Cause("addressType", f'Invalid value: "{kind}": field is immutable'))
    endpoints = obj.get("endpoints") or []
    if len(endpoints) > 1000:
        errs.append(Cause("endpoints", "Too many: must have at most 1000 items",
                          "FieldValueTooMany"))
    for i, ep in enumerate(endpoints):
        errs += _endpoint_errors(f"endpoints[{i}]", ep, kind)
    ports = obj.get("ports") or []
    for i, port in enumerate(ports):
        number = port.get("port")
        if number is not None and (not isinstance(number, int) or not 0 <= number <= 65535):
            errs.append(Cause(f"ports[{i}].port",
                              f"Invalid value: {number}: must be between 0 and 65535, inclusive"))
        if port.get("protocol") not in services.PROTOCOLS:
            errs.append(Cause(f"ports[{i}].protocol",
                              f'Unsupported value: "{port.get("protocol")}"',
                              "FieldValueNotSupported"))
        if port.get("name"):
            errs += [Cause(f"ports[{i}].name", f"Invalid value: {port['name']!r}: {m}")
                     for m in names.dns1123_label(port["name"])]
    return errs


def _endpoint_errors(path: str, ep: Any, kind: Any) -> list[Cause]:
    if not isinstance(ep, dict):
        return [Cause(path, "Invalid value: must be an object")]
    errs: list[Cause] = []
    addresses = ep.get("addresses") or []
    if not 1 <= len(addresses) <= 100:
        errs.append(Cause(f"{path}.addresses", "Required value: must contain at least 1 and at "
                          "most 100 addresses", "FieldValueRequired"))
    for j, addr in enumerate(addresses):
        version = {"IPv4": 4, "IPv6": 6}.get(str(kind))
        if version is None:
            continue
        try:
            ok = ipaddress.ip_address(addr).version == version
        except ValueError:
            ok = False
        if not ok:
            errs.append(Cause(f"{path}.addresses[{j}]",
                              f"Invalid value: {addr!r}: must be a valid {kind} address"))
    if ep.get("nodeName"):
        errs += [Cause(f"{path}.nodeName", f"Invalid value: {ep['nodeName']!r}: {m}")
                 for m in names.dns1123_subdomain(ep["nodeName"])]
    return errs


# ---- the table ------------------------------------------------------------------------------


def _service_default(obj: Obj, ctx: Context) -> None:
    services.default(obj, ctx.network, ctx.taken)


def _service_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    return services.validate(obj, old, ctx.network, ctx.taken)


def _no_rules(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del obj, old, ctx
    return []


STRATEGIES: Mapping[str, Strategy] = {
    # kind: name syntax, defaults, validation, update carry-over
    "Namespace": Strategy(names.dns1123_label, _namespace_default, _no_rules, _noop_carry),
    "Node": Strategy(names.dns1123_subdomain, _node_default, _node_validate, _noop_carry,
                     keep_status_on_create=True),
    "Pod": Strategy(names.dns1123_subdomain, _pod_default, _pod_validate, _noop_carry),
    "Service": Strategy(names.dns1035_label, _service_default, _service_validate,
                        services.carry_over),
    "EndpointSlice": Strategy(names.dns1123_subdomain, _slice_default, _slice_validate,
                              _noop_carry, has_status=False),
}

# What kinds.py reuses for pod templates (a DaemonSet's spec.template).
pod_defaults = _pod_default


def pod_spec_errors(pod: Obj, ctx: Context) -> list[Cause]:
    return _pod_validate(pod, None, ctx)
