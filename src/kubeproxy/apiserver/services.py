"""Service defaulting, allocation and validation (upstream pkg/registry/core/service and
pkg/apis/core/validation), the part of the API kube-proxy depends on most.

On create the server fills in what a real cluster fills in: `type: ClusterIP`, port
`protocol: TCP`, `targetPort = port`, `sessionAffinity: None`, a ClusterIP from the
service CIDR, single-stack IPv4 families, traffic policies, and NodePorts (plus a
healthCheckNodePort for `LoadBalancer` + `externalTrafficPolicy: Local`) from the NodePort
range. Allocation is lowest-free rather than upstream's random choice, so labs are
reproducible; the first address of the CIDR stays reserved for the `kubernetes` Service
as upstream reserves it. On update, values the client left out are carried over (a PUT of
a manifest without clusterIP keeps the IP) and values the new type does not use are
dropped (NodePorts when going back to ClusterIP).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import names
from kubeproxy.apiserver.errors import Cause

TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


@dataclass(frozen=True)
class Allocations:
    """What other Services already hold; computed by the store per request."""

    cluster_ips: AbstractSet[str]
    node_ports: AbstractSet[int]


@dataclass(frozen=True)
class ServiceNetwork:
    cidr: ipaddress.IPv4Network
    node_port_first: int = 30000
    node_port_last: int = 32767


def _needs_node_ports(spec: dict[str, Any]) -> bool:
    if spec.get("type") == "NodePort":
        return True
    return spec.get("type") == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts", True)


def _externally_accessible(spec: dict[str, Any]) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer") or (
        spec.get("type") == "ClusterIP" and bool(spec.get("externalIPs"))
    )


def _needs_health_check(spec: dict[str, Any]) -> bool:
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _free_ips(net: ServiceNetwork, used: AbstractSet[str]) -> Iterator[str]:
    reserved = net.cidr.network_address + 1  # the `kubernetes` Service's address
    for ip in net.cidr.hosts():
        if ip != reserved and str(ip) not in used:
            yield str(ip)


def _free_ports(net: ServiceNetwork, used: set[int]) -> Iterator[int]:
    return (p for p in range(net.node_port_first, net.node_port_last + 1) if p not in used)


def default(obj: dict[str, Any], net: ServiceNetwork, taken: Allocations) -> None:
    """Defaults and allocations of a Service being created or updated (after carry-over)."""
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            if port.get("targetPort") in (None, 0, ""):
                port["targetPort"] = port.get("port")
    if spec["type"] == "ExternalName":
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy",
                    "internalTrafficPolicy"):
            spec.pop(key, None)
    else:
        if spec.get("clusterIP") in (None, "") and not spec.get("clusterIPs"):
            spec["clusterIP"] = next(_free_ips(net, taken.cluster_ips), "")
        elif spec.get("clusterIP") in (None, ""):
            spec["clusterIP"] = spec["clusterIPs"][0]
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = spec.setdefault("sessionAffinityConfig", {}).setdefault("clientIP", {})
        cfg.setdefault("timeoutSeconds", 10800)
    if _externally_accessible(spec):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if spec["type"] == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    _allocate_node_ports(spec, net, taken)
    status = obj.setdefault("status", {})
    if isinstance(status, dict):
        status.setdefault("loadBalancer", {})


def _allocate_node_ports(spec: dict[str, Any], net: ServiceNetwork, taken: Allocations) -> None:
    used = set(taken.node_ports)
    ports = [p for p in spec.get("ports") or [] if isinstance(p, dict)]
    used.update(p["nodePort"] for p in ports if isinstance(p.get("nodePort"), int))
    if _needs_node_ports(spec):
        by_port: dict[Any, int] = {}  # the same port number on two protocols shares a NodePort
        for p in ports:
            if p.get("nodePort"):
                by_port.setdefault(p.get("port"), p["nodePort"])
        free = _free_ports(net, used)
        for p in ports:
            if not p.get("nodePort"):
                p["nodePort"] = by_port.get(p.get("port")) or next(free, 0)
                by_port[p.get("port")] = p["nodePort"]
                used.add(p["nodePort"])
    if _needs_health_check(spec) and not spec.get("healthCheckNodePort"):
        spec["healthCheckNodePort"] = next(_free_ports(net, used), 0)


def carry_over(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Update: keep allocated values the client omitted; drop ones the new type lacks."""
    ospec, nspec = old.get("spec") or {}, new.get("spec")
    if not isinstance(nspec, dict):
        return
    ntype = nspec.get("type", "ClusterIP")
    if ntype != "ExternalName" and ospec.get("type") != "ExternalName":
        if nspec.get("clusterIP") in (None, "") and ospec.get("clusterIP"):
            nspec["clusterIP"] = ospec["clusterIP"]
        if not nspec.get("clusterIPs") and ospec.get("clusterIPs"):
            nspec["clusterIPs"] = list(ospec["clusterIPs"])
    old_node_ports = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                      for p in ospec.get("ports") or [] if isinstance(p, dict)}
    needs = _needs_node_ports({**nspec, "type": ntype})
    for p in nspec.get("ports") or []:
        if not isinstance(p, dict):
            continue
        was = old_node_ports.get((p.get("port"), p.get("protocol", "TCP")))
        if needs and not p.get("nodePort") and was:
            p["nodePort"] = was
        if not needs and p.get("nodePort") and p.get("nodePort") == was:
            del p["nodePort"]
    health = ospec.get("healthCheckNodePort")
    if _needs_health_check({**nspec, "type": ntype}):
        if not nspec.get("healthCheckNodePort") and health:
            nspec["healthCheckNodePort"] = health
    elif nspec.get("healthCheckNodePort") == health:
        nspec.pop("healthCheckNodePort", None)


def validate(obj: dict[str, Any], old: dict[str, Any] | None, net: ServiceNetwork,
             taken: Allocations) -> list[Cause]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [Cause("spec", "Required value", "FieldValueRequired")]
    errs: list[Cause] = []
    stype = spec.get("type")
    if stype not in TYPES:
        errs.append(_unsupported("spec.type", stype, TYPES))
    errs += _validate_ports(spec, net, taken)
    errs += _validate_ips(spec, old, net, taken)
    errs += _validate_policies(spec)
    if stype == "ExternalName":
        ext = spec.get("externalName")
        if not ext:
            errs.append(Cause("spec.externalName", "Required value", "FieldValueRequired"))
        else:
            errs += [Cause("spec.externalName", f"Invalid value: {ext!r}: {m}")
                     for m in names.dns1123_subdomain(str(ext).rstrip("."))]
    for key, value in (spec.get("selector") or {}).items():
        errs += [Cause("spec.selector", f"Invalid value: {key!r}: {m}")
                 for m in names.qualified_name(key)]
        errs += [Cause("spec.selector", f"Invalid value: {value!r}: {m}")
                 for m in names.label_value(str(value))]
    return errs


def _unsupported(path: str, value: Any, allowed: tuple[str, ...]) -> Cause:
    quoted = ", ".join(f'"{a}"' for a in allowed)
    return Cause(path, f'Unsupported value: "{value}": supported values: {quoted}',
                 "FieldValueNotSupported")


def _validate_ports(spec: dict[str, Any], net: ServiceNetwork, taken: Allocations) -> list[Cause]:
    errs: list[Cause] = []
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and spec.get("type") != "ExternalName" and not headless:
        errs.append(Cause("spec.ports", "Required value", "FieldValueRequired"))
    seen_names: set[str] = set()
    seen_ports: set[tuple[Any, Any]] = set()
    own_node_ports: dict[int, Any] = {}
    for i, p in enumerate(ports):
        path = f"spec.ports[{i}]"
        name = p.get("name") or ""
        if len(ports) > 1 and not name:
            errs.append(Cause(f"{path}.name", "Required value", "FieldValueRequired"))
        if name:
            errs += [Cause(f"{path}.name", f"Invalid value: {name!r}: {m}")
                     for m in names.dns1123_label(name)]
            if name in seen_names:
                errs.append(Cause(f"{path}.name", f'Duplicate value: "{name}"',
                                  "FieldValueDuplicate"))
            seen_names.add(name)
        port = p.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            errs.append(Cause(f"{path}.port",
                              f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
        proto = p.get("protocol")
        if proto not in PROTOCOLS:
            errs.append(_unsupported(f"{path}.protocol", proto, PROTOCOLS))
        if (port, proto) in seen_ports:
            errs.append(Cause(path, f'Duplicate value: {{"port":{port},"protocol":"{proto}"}}',
                              "FieldValueDuplicate"))
        seen_ports.add((port, proto))
        errs += _validate_target_port(f"{path}.targetPort", p.get("targetPort"))
        errs += _validate_node_port(path, p, spec, net, taken, own_node_ports)
    return errs


def _validate_target_port(path: str, target: Any) -> list[Cause]:
    if isinstance(target, int) and not isinstance(target, bool):
        if not 1 <= target <= 65535:
            return [Cause(path, f"Invalid value: {target}: must be between 1 and 65535, inclusive")]
        return []
    if isinstance(target, str) and _IANA_SVC_NAME.match(target) and re.search("[a-z]", target):
        return []
    return [Cause(path, f"Invalid value: {target!r}: must contain only lowercase alphanumerics "
                  "or '-', at most 15 characters, with at least one letter")]


def _validate_node_port(path: str, p: dict[str, Any], spec: dict[str, Any], net: ServiceNetwork,
                        taken: Allocations, own: dict[int, Any]) -> list[Cause]:
    node_port = p.get("nodePort")
    if not node_port:
        return []
    if spec.get("type") not in ("NodePort", "LoadBalancer"):
        return [Cause(f"{path}.nodePort", f"Forbidden: may not be used when `type` is "
                      f"'{spec.get('type')}'", "FieldValueForbidden")]
    if not isinstance(node_port, int) or not (
        net.node_port_first <= node_port <= net.node_port_last
    ):
        return [Cause(f"{path}.nodePort", f"Invalid value: {node_port}: provided port is not in "
                      f"the valid range. The range of valid ports is "
                      f"{net.node_port_first}-{net.node_port_last}")]
    if node_port in taken.node_ports or (node_port in own and own[node_port] != p.get("port")):
        return [Cause(f"{path}.nodePort",
                      f"Invalid value: {node_port}: provided port is already allocated")]
    own[node_port] = p.get("port")
    return []


def _validate_ips(spec: dict[str, Any], old: dict[str, Any] | None, net: ServiceNetwork,
                  taken: Allocations) -> list[Cause]:
    errs: list[Cause] = []
    cip = spec.get("clusterIP")
    old_spec = (old or {}).get("spec") or {}
    if spec.get("type") == "ExternalName":
        if cip not in (None, ""):
            errs.append(Cause("spec.clusterIP", "Forbidden: may not be set for ExternalName "
                              "services", "FieldValueForbidden"))
    elif cip not in (None, "", "None"):
        try:
            addr = ipaddress.IPv4Address(cip)
        except ValueError:
            errs.append(Cause("spec.clusterIP", f"Invalid value: {cip!r}: must be a valid IP "
                              "address, (e.g. 10.9.8.7 or 2001:db8::ffff)"))
        else:
            unchanged = old_spec.get("clusterIP") == cip
            if not unchanged and addr not in net.cidr:
                errs.append(Cause("spec.clusterIP", f"Invalid value: {cip!r}: provided IP is not "
                                  f"in the valid range. The range of valid IPs is {net.cidr}"))
            elif not unchanged and cip in taken.cluster_ips:
                errs.append(Cause("spec.clusterIP",
                                  f"Invalid value: {cip!r}: provided IP is already allocated"))
    if old is not None and old_spec.get("type") != "ExternalName" and spec.get("type") != \
            "ExternalName" and old_spec.get("clusterIP") not in (None, "", cip):
        errs.append(Cause("spec.clusterIP", "Invalid value: "
                          f"{cip!r}: field is immutable"))
    for i, ip in enumerate(spec.get("externalIPs") or []):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            errs.append(Cause(f"spec.externalIPs[{i}]",
                              f"Invalid value: {ip!r}: must be a valid IP address"))
    for i, cidr in enumerate(spec.get("loadBalancerSourceRanges") or []):
        try:
            ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError:
            errs.append(Cause(f"spec.loadBalancerSourceRanges[{i}]",
                              f"Invalid value: {cidr!r}: must be a valid CIDR"))
    return errs


def _validate_policies(spec: dict[str, Any]) -> list[Cause]:
    errs: list[Cause] = []
    etp = spec.get("externalTrafficPolicy")
    if etp not in (None, "", "Cluster", "Local"):
        errs.append(_unsupported("spec.externalTrafficPolicy", etp, ("Cluster", "Local")))
    elif etp and not _externally_accessible(spec):
        errs.append(Cause("spec.externalTrafficPolicy", f'Invalid value: "{etp}": may only be '
                          "set for externally-accessible services"))
    itp = spec.get("internalTrafficPolicy")
    if itp not in (None, "Cluster", "Local"):
        errs.append(_unsupported("spec.internalTrafficPolicy", itp, ("Cluster", "Local")))
    affinity = spec.get("sessionAffinity")
    if affinity not in ("None", "ClientIP"):
        errs.append(_unsupported("spec.sessionAffinity", affinity, ("ClientIP", "None")))
    timeout = (((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
               .get("timeoutSeconds"))
    if affinity == "ClientIP" and (not isinstance(timeout, int) or not 0 < timeout <= 86400):
        errs.append(Cause("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                          f"Invalid value: {timeout}: must be greater than 0 and less than "
                          "86400"))
    dist = spec.get("trafficDistribution")
    allowed = ("PreferClose", "PreferSameZone", "PreferSameNode")
    if dist is not None and dist not in allowed:
        errs.append(_unsupported("spec.trafficDistribution", dist, allowed))
    return errs
