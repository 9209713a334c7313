"""The running lab as its API server describes it: Pods, Services, slices, a live plan.

What ``lab status``, ``probe``, ``exec`` and ``diagram`` need to know (which namespace is
pod ``web-1``, what is the ClusterIP of ``my-service``) is read from the API, so that a
Pod created with kubectl is as much a part of the lab as one from ``lab up``. Pure: it
works on objects already read (``LabApi.list``) and the lab's fixed network (``LabState``).
"""

from __future__ import annotations

import calendar
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kubeproxy.errors import LabError
from kubeproxy.lab import controller, layout, objects
from kubeproxy.lab.manifest import LabObjects, parse_node, parse_pod, parse_service
from kubeproxy.lab.state import LabState
from kubeproxy.util.jsontypes import JSON

T = TypeVar("T")
log = logging.getLogger("kubeproxy.lab.view")


@dataclass(frozen=True)
class LivePod:
    key: str  # namespace/name
    name: str
    namespace: str
    node: str | None
    ip: str | None
    phase: str
    ready: bool
    terminating: bool
    deletion_at: float | None  # when its grace period ends (wall clock), if terminating

    @classmethod
    def from_api(cls, obj: JSON) -> LivePod:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        namespace = str(meta.get("namespace") or "default")
        stamp = meta.get("deletionTimestamp")
        return cls(
            key=f"{namespace}/{meta.get('name')}",
            name=str(meta.get("name")),
            namespace=namespace,
            node=(obj.get("spec") or {}).get("nodeName"),
            ip=status.get("podIP"),
            phase=str(status.get("phase") or "Pending"),
            ready=objects.is_ready(obj),
            terminating=bool(stamp),
            deletion_at=_parse_time(stamp) if stamp else None,
        )


def _parse_time(stamp: str) -> float:
    return float(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))


def find_pod(pods: Sequence[LivePod], ref: str) -> LivePod:
    """A Pod by NAMESPACE/NAME, or by NAME when that is unique."""
    matches = [p for p in pods if (p.key if "/" in ref else p.name) == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LabError(f"no Pod, Node or Service {ref!r} in the lab")
    raise LabError(f"Pod name {ref!r} is ambiguous; use NAMESPACE/NAME")


def find_service(services: Sequence[JSON], ref: str) -> JSON | None:
    """A Service by NAME[.NAMESPACE] (like a DNS name)."""
    name, _, namespace = ref.partition(".")
    for svc in services:
        meta = svc.get("metadata") or {}
        if meta.get("name") == name and objects.namespace_of(svc) == (namespace or "default"):
            return svc
    return None


def live_plan(
    state: LabState,
    nodes: Sequence[JSON],
    pods: Sequence[JSON],
    services: Sequence[JSON],
    slices: Sequence[JSON],
) -> layout.Plan:
    """The lab's plan as it is now: its fixed network plus what the API holds."""
    parsed_services = _parse_all(parse_service, services)
    parsed_pods = _parse_all(parse_pod, pods)
    by_node = {n.name: n for n in state.nodes}
    pod_plans = tuple(
        layout.pod_plan(state.name, p, by_node[p.node_name], parsed_services)
        for p in parsed_pods
        if p.node_name in by_node and p.pod_ip
    )
    user_slices = tuple(s for s in slices if not controller.is_managed(s))
    lab_objects = LabObjects(
        tuple(_parse_all(parse_node, nodes)),
        tuple(parsed_pods),
        tuple(parsed_services),
        user_slices,
    )
    return layout.Plan(
        lab=state.name,
        switch_ns=state.switch_ns,
        nodes=state.nodes,
        pods=pod_plans,
        external=state.external,
        objects=lab_objects,
        cluster_cidr=state.cluster_cidr,
        service_cidr=state.service_cidr,
    )


def _parse_all(parse: Callable[[JSON], T], raws: Sequence[JSON]) -> list[T]:
    """Each object parsed; an invalid one is logged and left out (the rest still work)."""
    out: list[T] = []
    for raw in raws:
        try:
            out.append(parse(raw))
        except LabError as exc:
            log.warning("%s", exc)
    return out


def namespace_of(state: LabState, pods: Sequence[LivePod], target: str) -> str:
    """The namespace of ``external``, ``net`` (the switch), a node, or a running pod."""
    if target == "external":
        return state.external.ns
    if target == "net":
        return state.switch_ns
    for node in state.nodes:
        if node.name == target:
            return node.ns
    pod = find_pod(pods, target)
    if pod.node not in {n.name for n in state.nodes} or not pod.ip:
        raise LabError(f"Pod {pod.key} is not running ({pod.phase})")
    return layout.pod_ns(state.name, pod.namespace, pod.name)


def address_of(
    state: LabState, pods: Sequence[LivePod], services: Sequence[JSON], target: str
) -> str:
    """An IP, a node's lab address, a Service's ClusterIP, or a pod's IP."""
    try:
        return str(ipaddress.IPv4Address(target))
    except ValueError:
        pass
    for node in state.nodes:
        if node.name == target:
            return node.lab_ip
    svc = find_service(services, target)
    if svc is not None:
        ip = (svc.get("spec") or {}).get("clusterIP")
        if not ip or ip == "None":
            raise LabError(f"Service {objects.namespace_of(svc)}/{target} has no ClusterIP")
        return str(ip)
    pod = find_pod(pods, target)
    if not pod.ip:
        raise LabError(f"Pod {pod.key} has no IP yet ({pod.phase})")
    return pod.ip
