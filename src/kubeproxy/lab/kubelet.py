"""The agent's kubelet (with its CNI plugin and its scheduler): Pods become namespaces.

``Kubelet.sync`` takes the Pods and Services the agent sees in the API and makes the
machine match, one pass at a time:

1. A running Pod that is gone from the API (or was replaced: another UID) is torn down:
   its processes are killed, its namespace deleted (its veth goes with it).
2. A Pod with a deletionTimestamp is terminating: it keeps serving (the endpoint
   controller marks it terminating) until ``deletionGracePeriodSeconds`` after the agent
   first saw it, then it is torn down and DELETEd with gracePeriodSeconds=0, as kubelet
   does. (The lab's API server also removes Pods whose grace period ended by itself; the
   agent then sees DELETED first and tears down at once: either way the Pod is gone.)
3. A new Pod bound to a lab node gets an IP from the node's podCIDR (the one annotated
   ``lab.kubeproxy.io/pod-ip`` if it is free), a namespace wired to the node's cbr0, and
   the built-in server listening on its ports; all new Pods of a pass start in parallel.
   Once every server is listening, ``pods/status`` says Running, Ready, with the IP.
4. A Service that selects a running Pod on a numeric targetPort the server does not
   listen on restarts that server with the port added.

Scheduling: the lab's API server has no ``pods/binding``, and ``spec.nodeName`` cannot
change after creation, so a Pod created without a node is re-created with one (the
node with the fewest Pods): a watcher sees it DELETED and ADDED again under the same
name. A Pod bound to a node the lab does not have stays Pending, saying why.

Host-network Pods with a command (a DaemonSet's kube-proxy) are not pod servers: they
run their program in the node's namespace (``hostpods.py`` plans them,
``hostkubelet.py`` runs them). Like a kubelet registering its Node, the first pass
gives every lab Node kubelet's well-known labels (``kubernetes.io/os``, ``/arch``,
``/hostname``) when missing, so that DaemonSet node selectors match.
"""

from __future__ import annotations

import copy
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from kubeproxy.errors import LabError
from kubeproxy.lab import cgroups, hostpods, network, objects
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.hostkubelet import HostPods
from kubeproxy.lab.layout import NodePlan, PodPlan, free_pod_ip, listen_ports, pod_plan
from kubeproxy.lab.manifest import Pod, Service, parse_pod
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.processes import SERVER_MODULE, kill, spawn, time_scale
from kubeproxy.lab.state import LabStore
from kubeproxy.util.jsontypes import JSON

log = logging.getLogger("kubeproxy.lab.kubelet")
READY_TIMEOUT = 20.0
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
          "s390x": "s390x"}  # uname -m -> GOARCH, for kubernetes.io/arch


@dataclass
class RunningPod:
    uid: str
    plan: PodPlan
    proc: subprocess.Popen[bytes] | None = None
    deadline: float | None = None  # terminating: when its grace period ends (wall clock)


@dataclass
class Work:
    """What one pass did: API writes, local changes, failures (retried next pass)."""

    writes: int = 0
    local: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Work) -> None:
        self.writes += other.writes
        self.local += other.local
        self.errors += other.errors


def uid_of(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def key_of(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def display(plan: PodPlan) -> str:
    return plan.name if plan.namespace == "default" else plan.key


# Starts a Pod's server; None when the Pod serves nothing. Tests give their own.
ServerStarter = Callable[[PodPlan], "subprocess.Popen[bytes] | None"]


class Kubelet:
    def __init__(
        self,
        lab: str,
        store: LabStore,
        net: Netns,
        nodes: Sequence[NodePlan],
        api: LabApi,
        clock: Callable[[], float] = time.time,
        servers: ServerStarter | None = None,
        host: HostPods | None = None,
        images: bool = True,
    ) -> None:
        self.lab = lab
        self.store = store
        self.net = net
        self.nodes = {n.name: n for n in nodes}
        self.api = api
        self.clock = clock
        self._start_server = servers or self._server
        self.running: dict[str, RunningPod] = {}
        self.last_ip: dict[str, str] = {}  # node -> the last address handed out there
        self.host = host or HostPods(store, net, self.nodes, api, clock, images=images)
        self.labelled = False  # the Nodes carry kubelet's well-known labels

    def next_deadline(self) -> float | None:
        times = [r.deadline for r in self.running.values() if r.deadline]
        host = self.host.next_deadline()
        return min([*times, *([host] if host is not None else [])], default=None)

    def sync(self, pods: Sequence[JSON], services: Sequence[Service]) -> Work:
        work = self._label_nodes()
        hosted = [p for p in pods if hostpods.is_host_pod(p)]
        done = self.host.sync(hosted)
        work.add(Work(done.writes, done.local, done.errors))
        pods = [p for p in pods if not hostpods.is_host_pod(p)]
        by_key = {key_of(p): p for p in pods}
        for key, rp in list(self.running.items()):
            obj = by_key.get(key)
            if obj is None or uid_of(obj) != rp.uid:
                work.add(self._guard(key, partial(self._teardown, key)))
        for key, obj in by_key.items():
            if objects.is_terminating(obj) and key in self.running:
                work.add(self._guard(key, partial(self._terminate, obj)))
        work.add(self._schedule(pods))
        for key, rp in list(self.running.items()):
            if key in by_key and not objects.is_terminating(by_key[key]):
                work.add(self._guard(key, partial(self._refresh, by_key[key], rp, services)))
        new = [p for k, p in by_key.items() if k not in self.running and self._startable(p)]
        if new:
            work.add(self._start(new, pods, services))
        return work

    def _label_nodes(self) -> Work:
        if self.labelled:
            return Work()
        work = Work()
        arch = ARCHES.get(platform.machine(), platform.machine())
        for name in self.nodes:
            want = {"kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
                    "kubernetes.io/hostname": name}  # fmt: skip
            try:
                if _with_labels(want, self.api.get("Node", None, name)) is not None:
                    self.api.mutate("Node", None, name, partial(_with_labels, want))
                    work.writes += 1
            except LabApiError as exc:
                work.errors.append(f"node {name}: labels: {exc}")
        self.labelled = not work.errors
        return work

    def _guard(self, key: str, action: Callable[[], Work]) -> Work:
        try:
            return action()
        except LabError as exc:
            log.warning("pod %s: %s", key, exc)
            return Work(errors=[f"pod {key}: {exc}"])

    # ---- scheduling

    def _startable(self, obj: JSON) -> bool:
        node = (obj.get("spec") or {}).get("nodeName")
        phase = (obj.get("status") or {}).get("phase")
        return (
            node in self.nodes
            and not objects.is_terminating(obj)
            and phase not in ("Succeeded", "Failed")
        )

    def _schedule(self, pods: Sequence[JSON]) -> Work:
        work = Work()
        counts = {name: 0 for name in self.nodes}
        for p in pods:
            node = (p.get("spec") or {}).get("nodeName")
            if node in counts:
                counts[node] += 1
        for obj in pods:
            node = (obj.get("spec") or {}).get("nodeName")
            if objects.is_terminating(obj) or node in self.nodes:
                continue
            key = key_of(obj)
            try:
                if node:
                    message = (
                        f"spec.nodeName {node!r} is not a node of lab {self.lab!r} "
                        f"(nodes: {', '.join(self.nodes)})"
                    )
                    status = objects.unschedulable_status(obj, message, self.clock())
                    if status is not None:
                        self.api.update({**obj, "status": status}, "status")
                        work.writes += 1
                    continue
                chosen = min(counts, key=lambda n: (counts[n], list(self.nodes).index(n)))
                counts[chosen] += 1
                self._bind(obj, chosen)
                work.writes += 2
            except LabApiError as exc:
                work.errors.append(f"pod {key}: {exc}")
        return work

    def _bind(self, obj: JSON, node: str) -> None:
        meta = obj.get("metadata") or {}
        log.info("pod %s: scheduling on %s (re-created with spec.nodeName)", key_of(obj), node)
        body = copy.deepcopy(obj)
        body.pop("status", None)
        body["spec"]["nodeName"] = node
        body["metadata"] = {
            k: v
            for k, v in meta.items()
            if k
            not in ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
        }
        self.api.delete("Pod", meta.get("namespace") or "default", meta["name"], grace=0)
        self.api.create(body)

    # ---- starting

    def _start(
        self, new: Sequence[JSON], pods: Sequence[JSON], services: Sequence[Service]
    ) -> Work:
        work = Work()
        started: list[tuple[JSON, RunningPod]] = []
        used = self._used_ips(pods)
        for obj in sorted(new, key=_start_order):
            key = key_of(obj)
            try:
                rp = self._launch(obj, used, services)
            except LabError as exc:
                log.warning("pod %s: %s", key, exc)
                work.errors.append(f"pod {key}: {exc}")
                continue
            used[rp.plan.ip] = key
            self.running[key] = rp
            started.append((obj, rp))
            work.local += 1
        work.add(self._await_servers(started))
        return work

    def _used_ips(self, pods: Sequence[JSON]) -> dict[str, str]:
        """IP -> the Pod that has it, or has it reserved (annotation of a Pod not started)."""
        used = {rp.plan.ip: key for key, rp in self.running.items()}
        for obj in pods:
            for ip in (_annotated_ip(obj), (obj.get("status") or {}).get("podIP")):
                if ip:
                    used.setdefault(str(ip), key_of(obj))
        return used

    def _launch(self, obj: JSON, used: dict[str, str], services: Sequence[Service]) -> RunningPod:
        key = key_of(obj)
        pod = parse_pod(obj)
        node = self.nodes[str(pod.node_name)]
        wanted = (obj.get("status") or {}).get("podIP") or _annotated_ip(obj)
        others = {ip for ip, owner in used.items() if owner != key}
        ip = free_pod_ip(node, others, wanted, self.last_ip.get(node.name))
        if ip is None:
            raise LabError(f"node {node.name}'s podCIDR {node.pod_cidr} is full")
        if ip != wanted:
            self.last_ip[node.name] = ip
        plan = pod_plan(self.lab, replace(pod, pod_ip=ip), node, services)
        if self.net.exists(plan.ns):  # left over (an agent that restarted): start afresh
            self._kill_in(plan.ns)
            self.net.delete(plan.ns)
        network.add_pod(self.net, node, plan)
        log.info(
            "pod %s: %s on %s, listening on %s",
            key,
            ip,
            node.name,
            ", ".join(plan.listen) or "nothing",
        )
        return RunningPod(uid_of(obj), plan, self._start_server(plan))

    def _server(self, plan: PodPlan) -> subprocess.Popen[bytes] | None:
        if not plan.listen:
            return None
        ready = self.store.ready_file(plan.key)
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            SERVER_MODULE,
            "--lab",
            self.lab,
            "--pod",
            display(plan),
            "--node",
            plan.node,
            *(f"--listen={x}" for x in plan.listen),
            "--ready-file",
            str(ready),
        ]
        cgroup = cgroups.node_cgroup(self.lab, plan.node)  # a socket-LB mode's: see cgroups
        return spawn(cgroups.in_cgroup(self.net.exec_argv(plan.ns, argv), cgroup),
                     self.store.log_file(plan.key))

    def _await_servers(
        self, started: Sequence[tuple[JSON, RunningPod]], report: bool = True
    ) -> Work:
        """Wait until every new server listens, then (report) say the Pods are Running."""
        work = Work()
        waiting = {key_of(o): (o, rp) for o, rp in started}
        deadline = time.monotonic() + READY_TIMEOUT * time_scale()
        while waiting:
            for key, (obj, rp) in list(waiting.items()):
                failed = rp.proc is not None and (
                    rp.proc.poll() is not None or time.monotonic() > deadline
                )
                if rp.proc is None or self.store.ready_file(key).exists():
                    del waiting[key]
                    if report:
                        work.add(self._guard(key, partial(self._report, obj, rp)))
                elif failed:
                    del waiting[key]
                    text = self.store.log_file(key).read_text(errors="replace")[-500:]
                    work.errors.append(f"pod {key}: its server did not start: {text}")
                    work.add(self._guard(key, partial(self._teardown, key)))
            time.sleep(0.01)
        return work

    def _report(self, obj: JSON, rp: RunningPod) -> Work:
        node = self.nodes[rp.plan.node]
        pid = rp.proc.pid if rp.proc else None
        status = objects.running_status(obj, rp.plan.ip, node.lab_ip, self.clock(), pid)
        try:
            self.api.update({**obj, "status": status}, "status")
        except LabApiError as exc:
            if exc.code in (404, 409):  # deleted or changed meanwhile: the next pass decides
                return Work(errors=[] if exc.code == 404 else [f"pod {key_of(obj)}: {exc}"])
            raise
        return Work(writes=1)

    # ---- running and stopping

    def _refresh(self, obj: JSON, rp: RunningPod, services: Sequence[Service]) -> Work:
        """Keep a running Pod's status and its server's ports current."""
        work = Work()
        status = obj.get("status") or {}
        if status.get("podIP") != rp.plan.ip or status.get("phase") != "Running":
            work.add(self._report(obj, rp))  # a status write that failed before
        want = set(listen_ports(parse_pod(obj), services))
        added = want - set(rp.plan.listen)
        if rp.proc is not None and rp.proc.poll() is not None:
            log.warning(
                "pod %s: its server exited (%s); restarting it", rp.plan.key, rp.proc.returncode
            )
        elif not added:
            return work
        rp.plan = replace(
            rp.plan, listen=tuple(sorted(want | set(rp.plan.listen), key=_port_order))
        )
        if added:
            log.info(
                "pod %s: restarting its server to listen on %s too",
                rp.plan.key,
                ", ".join(sorted(added, key=_port_order)),
            )
        self._kill_in(rp.plan.ns, rp.proc)
        rp.proc = self._start_server(rp.plan)
        work.local += 1
        work.add(self._await_servers([(obj, rp)], report=False))
        return work

    def _terminate(self, obj: JSON) -> Work:
        key = key_of(obj)
        rp = self.running[key]
        now = self.clock()
        grace = (obj.get("metadata") or {}).get("deletionGracePeriodSeconds") or 0
        end = now + float(grace)
        if rp.deadline is None or end < rp.deadline:  # a new delete may only hurry it
            if rp.deadline is None:
                log.info("pod %s: terminating, %ss grace", key, grace)
            rp.deadline = end
        if now < rp.deadline:
            return Work()
        work = self._teardown(key)
        meta = obj.get("metadata") or {}
        if self.api.delete("Pod", meta.get("namespace") or "default", meta["name"], 0):
            work.writes += 1
        return work

    def _teardown(self, key: str) -> Work:
        """Stop a Pod and remove its namespace; it stays ours (retried) if that fails."""
        rp = self.running[key]
        log.info("pod %s: stopping, removing %s", key, rp.plan.ns)
        self._kill_in(rp.plan.ns, rp.proc)
        if self.net.exists(rp.plan.ns):
            self.net.delete(rp.plan.ns)
        network.forget_pod(self.net, self.nodes[rp.plan.node], rp.plan)
        self.store.ready_file(key).unlink(missing_ok=True)
        del self.running[key]
        return Work(local=1)

    def _kill_in(self, ns: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        """Stop everything in a Pod's namespace, and its server (by PID only while it has
        not been reaped: a reaped PID may already be someone else's)."""
        pids = self.net.pids(ns) if self.net.exists(ns) else []
        if proc is not None and proc.poll() is None:
            pids.append(proc.pid)
        kill(pids)
        if proc is not None:
            proc.poll()


def _with_labels(want: dict[str, str], node: JSON) -> JSON | None:
    """The Node with kubelet's labels added where missing; None if it has them all."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    missing = {k: v for k, v in want.items() if k not in labels}
    if not missing:
        return None
    body = copy.deepcopy(node)
    body["metadata"]["labels"] = {**labels, **missing}
    return body


def _annotated_ip(obj: JSON) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(objects.POD_IP_ANNOTATION)
    return str(value) if value else None


def _start_order(obj: JSON) -> tuple[int, str, str]:
    """Pods with a planned IP first (so nobody takes it), then oldest first."""
    meta = obj.get("metadata") or {}
    return (0 if _annotated_ip(obj) else 1, str(meta.get("creationTimestamp") or ""), key_of(obj))


def _port_order(spec: str) -> tuple[int, str]:
    port, _, proto = spec.partition("/")
    return int(port), proto


def parse_pods(pods: Sequence[JSON]) -> list[Pod]:
    """The Pods the endpoint controller can use (invalid ones are logged and skipped)."""
    out = []
    for obj in pods:
        try:
            out.append(parse_pod(obj))
        except LabError as exc:
            log.warning("%s", exc)
    return out
