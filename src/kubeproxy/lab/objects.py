"""The lab's objects as the API server wants them, and the status the agent writes. Pure.

``lab up`` plans the lab from the user's YAML (``layout.plan``: node CIDRs, pod nodes
and IPs, Service IPs and ports), then creates the objects through the API in dependency
order: Namespaces, Nodes, Services, the user's EndpointSlices, Pods. What the plan
decided travels with them so the lab is the same as it always was:

- a Pod gets ``spec.nodeName`` and the annotation ``lab.kubeproxy.io/pod-ip`` (the IP the
  agent gives it; it plays the CNI plugin, and honours the annotation when the IP is free);
- a Service gets its planned ``clusterIP`` and ``nodePort``\\s; a LoadBalancer's ingress IP
  is written to ``services/status`` right after (the API drops status on create);
- a Node carries its podCIDR, InternalIP and a Ready condition (Node status is kept).

Lab YAML may be terse (a container with neither name nor image); the API requires both,
so missing ones are filled in (``c0``.., ``kubeproxy.lab/podserver``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

from kubeproxy.lab.layout import Plan
from kubeproxy.util.jsontypes import JSON

POD_IP_ANNOTATION = "lab.kubeproxy.io/pod-ip"
LAB_IMAGE = "kubeproxy.lab/podserver"
BUILTIN_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
KUBELET_VERSION = "v1.33.0-kubeproxy-lab"


def timestamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def namespace_of(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "default")


def api_objects(
    plan: Plan, documents: Sequence[JSON], now: float = 0.0
) -> tuple[list[JSON], list[JSON]]:
    """(objects to create in order, Services whose status to write after)."""
    objects = plan.objects
    namespaces = {
        namespace_of(o)
        for o in (
            *(p.raw for p in objects.pods),
            *(s.raw for s in objects.services),
            *objects.slices,
        )
    }
    namespaces |= {
        str((d.get("metadata") or {}).get("name"))
        for d in documents
        if d.get("kind") == "Namespace"
    }
    out: list[JSON] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        for ns in sorted(namespaces - BUILTIN_NAMESPACES)
    ]
    out += [node_body(n.raw, now) for n in objects.nodes]
    services = [_strip(s.raw, "Service", "v1") for s in objects.services]
    out += services
    out += [
        _strip(s, "EndpointSlice", "discovery.k8s.io/v1", keep_status=True) for s in objects.slices
    ]
    out += [pod_body(p.raw) for p in objects.pods]
    statuses = [
        _status_only(s.raw)
        for s in objects.services
        if ((s.raw.get("status") or {}).get("loadBalancer") or {}).get("ingress")
    ]
    return out, statuses


def _strip(raw: JSON, kind: str, api_version: str, keep_status: bool = False) -> JSON:
    body = copy.deepcopy(raw)
    body["kind"], body["apiVersion"] = kind, api_version
    if not keep_status:
        body.pop("status", None)
    meta = body.setdefault("metadata", {})
    for key in ("resourceVersion", "uid", "creationTimestamp"):
        meta.pop(key, None)
    return body


def _status_only(raw: JSON) -> JSON:
    meta = raw.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": meta["name"], "namespace": namespace_of(raw)},
        "status": copy.deepcopy(raw.get("status") or {}),
    }


def node_body(raw: JSON, now: float) -> JSON:
    body = _strip(raw, "Node", "v1", keep_status=True)
    status = body.setdefault("status", {})
    status["conditions"] = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "lab node: a network namespace",
            "lastHeartbeatTime": timestamp(now),
            "lastTransitionTime": timestamp(now),
        }
    ]
    status.setdefault(
        "nodeInfo",
        {
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "osImage": "kubeproxy lab",
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "lab://0",
            "kernelVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    )
    return body


def pod_body(raw: JSON) -> JSON:
    body = _strip(raw, "Pod", "v1")
    ip = (raw.get("status") or {}).get("podIP")
    if ip:
        body["metadata"].setdefault("annotations", {})[POD_IP_ANNOTATION] = ip
    spec = body.setdefault("spec", {})
    for i, container in enumerate(spec.get("containers") or []):
        if isinstance(container, dict):
            container.setdefault("name", f"c{i}")
            container.setdefault("image", LAB_IMAGE)
    return body


# ---------------------------------------------------------------- pod status


def condition(obj: JSON, kind: str) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return str(c.get("status"))
    return None


def is_ready(pod: JSON) -> bool:
    return condition(pod, "Ready") == "True"


def is_terminating(pod: JSON) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def running_status(pod: JSON, ip: str, host_ip: str, now: float, pid: int | None) -> JSON:
    """What kubelet reports for a started Pod: Running, its IP, every condition True."""
    status = copy.deepcopy(pod.get("status") or {})
    stamp = timestamp(now)
    status.update(
        phase="Running",
        podIP=ip,
        podIPs=[{"ip": ip}],
        hostIP=host_ip,
        hostIPs=[{"ip": host_ip}],
        startTime=stamp,
    )
    status["conditions"] = [
        {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": stamp}
        for t in (
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        )
    ]
    status["containerStatuses"] = [
        {
            "name": c.get("name", f"c{i}"),
            "ready": True,
            "started": True,
            "restartCount": 0,
            "image": c.get("image", LAB_IMAGE),
            "imageID": "",
            "containerID": f"lab://{pid or 0}",
            "state": {"running": {"startedAt": stamp}},
        }
        for i, c in enumerate((pod.get("spec") or {}).get("containers") or [])
    ]
    return status


def with_ready(pod: JSON, ready: bool, now: float) -> JSON | None:
    """The Pod with its Ready (and ContainersReady) condition set; None if already so."""
    if is_ready(pod) == ready:
        return None
    out = copy.deepcopy(pod)
    status = out.setdefault("status", {})
    word = "True" if ready else "False"
    conditions = [
        c
        for c in status.get("conditions") or []
        if c.get("type") not in ("Ready", "ContainersReady")
    ]
    for kind in ("Ready", "ContainersReady"):
        conditions.append(
            {
                "type": kind,
                "status": word,
                "lastProbeTime": None,
                "lastTransitionTime": timestamp(now),
                **(
                    {}
                    if ready
                    else {"reason": "LabPodReady", "message": "set by kubeproxy lab pod-ready"}
                ),
            }
        )
    status["conditions"] = conditions
    for cs in status.get("containerStatuses") or []:
        cs["ready"] = ready
    return out


def unschedulable_status(pod: JSON, message: str, now: float) -> JSON | None:
    """Pending with PodScheduled False and why; None if the Pod already says so."""
    status = copy.deepcopy(pod.get("status") or {})
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("message") == message:
            return None
    status["phase"] = "Pending"
    status["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": timestamp(now),
        }
    ]
    return status
