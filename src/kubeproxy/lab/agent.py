"""The lab agent: kubelet and kube-controller-manager of one lab, in one process.

Theory of operation
-------------------
``lab up`` starts it detached in the root namespace (``python -m kubeproxy.lab.agent
--name LAB``); it talks to the lab's API server on 127.0.0.1 with the lab's kubeconfig.
Four watch caches (``watchcache.py``) keep caches of Pods, Services, Nodes and EndpointSlices
and wake the main thread, which is the only one that acts. Each *pass* reads the caches
and makes the world match them:

1. kubelet (``kubelet.py``): Pods bound to lab nodes become namespaces with a server;
   deleted ones go away after their grace period; the Pod's status is written back;
2. the LoadBalancer controller (MetalLB's job in a real lab): a LoadBalancer Service
   without an ingress IP gets one from 192.168.100.0/24, through ``services/status``;
3. the external client's routes: every Service external IP and LB IP is routed to the
   external node (local, in the ``kpl-<lab>-external`` namespace);
4. the EndpointSlice controller (``controller.py``, pure): Pods + Services + Nodes ->
   the slices that should exist, written through the API (create, update, delete).

A pass that wrote to the API will see its own writes come back as events and runs again;
the endpoint step waits for that pass when Pods or Services were just written, so slices
are computed from what the API really holds. A pass that failed is retried after a
second. Passes run only on changes (and on terminating Pods' deadlines), never on a timer.

Progress is published in ``agent.json`` after every turn: per kind, the resourceVersion up
to which every change was acted on (what the last pass saw; later bookmarks move it on
only while no change arrived since), whether the last pass found nothing to do
(``idle``), and when it last saw a change to what the proxies read (Services,
EndpointSlices, Nodes). That is
what ``lab`` commands wait on (``converge.py``). It also counts, per kind, the lists
and watches the API server answered (``connections``): after ``lab restart-apiserver``
every count must move, which says the agent reconnected to the new API server. SIGTERM
stops the agent; what it started keeps running until ``lab down``.

The agent needs nothing special to survive an API server restart: the server comes back
on the same port with the same objects and resourceVersions, the caches list again once
it answers (``watchcache.py``), and a pass whose writes failed meanwhile is retried.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from kubeproxy.errors import LabError
from kubeproxy.lab import controller, network, objects
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.kubelet import Kubelet, ServerStarter, Work, parse_pods
from kubeproxy.lab.layout import LB_POOL
from kubeproxy.lab.manifest import Service, parse_node, parse_service
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.state import DEFAULT_BASE, LabState, LabStore, write_atomic
from kubeproxy.lab.watchcache import WatchCache
from kubeproxy.util.jsontypes import JSON
from kubeproxy.util.queues import drain

log = logging.getLogger("kubeproxy.lab.agent")
KINDS = ("Pod", "Service", "Node", "EndpointSlice")
PROXY_KINDS = frozenset({"Service", "EndpointSlice", "Node"})  # what kube-proxy watches
RETRY_DELAY = 1.0
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True)
class AgentStatus:
    pid: int
    rvs: dict[str, int]  # kind -> resourceVersion up to which every change was acted on
    idle: bool  # the last pass found nothing to write and nothing failed
    proxy_event: float  # wall time of the last change seen to Services, slices or Nodes
    errors: list[str] = field(default_factory=list)
    connections: dict[str, int] = field(default_factory=dict)  # kind -> lists + watches

    @property
    def seen(self) -> int:
        """Every change up to this resourceVersion was acted on."""
        return min(self.rvs.values()) if set(self.rvs) == set(KINDS) else 0

    @classmethod
    def read(cls, path: Path) -> AgentStatus | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                int(data["pid"]),
                {str(k): int(v) for k, v in data["rvs"].items()},
                bool(data["idle"]),
                float(data["proxy_event"]),
                list(data["errors"]),
                {str(k): int(v) for k, v in data.get("connections", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


class Agent:
    def __init__(
        self,
        store: LabStore,
        state: LabState,
        api: LabApi,
        net: Netns,
        servers: ServerStarter | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.api = api
        self.net = net
        self.kubelet = Kubelet(state.name, store, net, state.nodes, api, servers=servers,
                               images=state.pod_images)
        self.queue: queue.SimpleQueue[tuple[str, bool] | None] = queue.SimpleQueue()
        self.caches = {k: WatchCache(api, k, self._notify) for k in KINDS}
        self.proxy_event = 0.0
        self.idle = False
        self.errors: list[str] = []
        self.retry_at: float | None = None
        self.acted: dict[str, tuple[int, int]] = {}  # kind -> (rv, changes) of the last pass
        self._written: AgentStatus | None = None

    def _notify(self, kind: str, changed: bool) -> None:
        """Called by the watch caches' threads."""
        if changed and kind in PROXY_KINDS:
            self.proxy_event = time.time()
        self.queue.put((kind, changed))

    def stop(self) -> None:
        """Safe from a signal handler."""
        self.queue.put(None)

    def run(self) -> None:
        """Until stop(): wait for changes (or a deadline), act on them, publish progress."""
        self.start()
        try:
            while self.step():
                pass
        finally:
            self.close()

    def start(self) -> None:
        for cache in self.caches.values():
            cache.start()

    def close(self) -> None:
        for cache in self.caches.values():
            cache.stop()

    def step(self, timeout: float | None = None) -> bool:
        """One turn: False once stop() was called."""
        items = self._wait(timeout)
        if None in items:
            return False
        if (self._due() or self._changed()) and self._synced():
            self._pass()
        self._publish()
        return True

    def _changed(self) -> bool:
        """Whether a cache changed since the last pass took its snapshot."""
        return any(
            i.progress()[1] != self.acted.get(k, (0, -1))[1] for k, i in self.caches.items()
        )

    def _synced(self) -> bool:
        return all(i.synced for i in self.caches.values())

    def _due(self) -> bool:
        now = time.time()
        deadline = self.kubelet.next_deadline()
        return (deadline is not None and deadline <= now) or (
            self.retry_at is not None and self.retry_at <= now
        )

    def _wait(self, limit: float | None = None) -> list[tuple[str, bool] | None]:
        wake = [t for t in (self.kubelet.next_deadline(), self.retry_at) if t is not None]
        if limit is not None:
            wake.append(time.time() + limit)
        return drain(self.queue, max(0.0, min(wake) - time.time()) if wake else None)

    # ---- one pass

    def _pass(self) -> None:
        snapshots = {k: i.snapshot() for k, i in self.caches.items()}
        self.acted = {k: (s.resource_version, s.changes) for k, s in snapshots.items()}
        snap = {k: s.items for k, s in snapshots.items()}
        services = _parse_services(snap["Service"])
        work = self.kubelet.sync(snap["Pod"], services)
        work.add(self._load_balancers(snap["Service"]))
        work.add(self._routes(services))
        if work.writes == 0:  # else the next pass sees those writes and computes slices
            work.add(self._endpoints(snap, services))
        self.idle = work.writes == 0 and not work.errors
        self.errors = work.errors
        self.retry_at = time.time() + RETRY_DELAY if work.errors else None
        for error in work.errors:
            log.warning("%s (retrying)", error)

    def _load_balancers(self, services: Sequence[JSON]) -> Work:
        work = Work()
        used = {ip for s in services for ip in _ingress_ips(s)}
        free = (str(h) for i, h in enumerate(LB_POOL.hosts()) if i >= 9 and str(h) not in used)
        for svc in services:
            spec = svc.get("spec") or {}
            is_lb = spec.get("type") == "LoadBalancer"
            ingress = _ingress_ips(svc)
            if is_lb == bool(ingress):
                continue
            status = dict(svc.get("status") or {})
            ip = next(free, None) if is_lb else None
            if is_lb and ip is None:
                work.errors.append(f"Service {_key(svc)}: the LB pool {LB_POOL} is exhausted")
                continue
            status["loadBalancer"] = {"ingress": [{"ip": ip, "ipMode": "VIP"}]} if ip else {}
            try:
                self.api.update({**svc, "status": status}, "status")
                work.writes += 1
                log.info("Service %s: LoadBalancer IP %s", _key(svc), ip or "released")
            except LabApiError as exc:
                work.errors.append(f"Service {_key(svc)}: {exc}")
        return work

    def _routes(self, services: Sequence[Service]) -> Work:
        want = {f"{ip}/32" for s in services for ip in (*s.external_ips, *s.lb_ips)}
        try:
            changed = network.set_external_routes(self.net, self.state.external, want)
        except LabError as exc:
            return Work(errors=[f"external routes: {exc}"])
        return Work(local=int(changed))

    def _endpoints(self, snap: dict[str, list[JSON]], services: Sequence[Service]) -> Work:
        work = Work()
        pods = parse_pods(snap["Pod"])
        nodes = []
        for raw in snap["Node"]:
            try:
                nodes.append(parse_node(raw))
            except LabError as exc:
                log.warning("%s", exc)
        statuses = {
            f"{objects.namespace_of(o)}/{o['metadata']['name']}": controller.PodStatus(
                ready=objects.is_ready(o), terminating=objects.is_terminating(o)
            )
            for o in snap["Pod"]
        }
        desired = controller.endpoint_slices(services, pods, nodes, statuses)
        creates, updates, deletes = controller.slice_changes(desired, snap["EndpointSlice"])
        stamp = objects.timestamp(time.time())
        for body in [*creates, *updates]:
            body["metadata"].setdefault("annotations", {})[TRIGGER_TIME] = stamp
        actions = [(self.api.create, s) for s in creates] + [(self.api.update, s) for s in updates]
        for write, body in actions:
            try:
                write(body)
                work.writes += 1
            except LabApiError as exc:
                work.errors.append(f"EndpointSlice {_key(body)}: {exc}")
        for gone in deletes:
            try:
                self.api.delete(
                    "EndpointSlice", objects.namespace_of(gone), gone["metadata"]["name"]
                )
                work.writes += 1
            except LabApiError as exc:
                work.errors.append(f"EndpointSlice {_key(gone)}: {exc}")
        if creates or updates or deletes:
            log.info(
                "EndpointSlices: %d created, %d updated, %d deleted",
                len(creates),
                len(updates),
                len(deletes),
            )
        return work

    # ---- progress

    def acted_on(self) -> dict[str, int]:
        """Per kind, the resourceVersion up to which every change was acted on: what the
        last pass saw, or (a bookmark later, if no change came since) the cache's now."""
        out = {}
        for kind, informer in self.caches.items():
            if kind not in self.acted:
                continue
            rv, changes = informer.progress()
            acted_rv, acted_changes = self.acted[kind]
            out[kind] = rv if changes == acted_changes else acted_rv
        return out

    def _publish(self) -> None:
        status = AgentStatus(
            pid=os.getpid(),
            rvs=self.acted_on(),
            idle=self.idle,
            proxy_event=self.proxy_event,
            errors=self.errors,
            connections={k: c.connections for k, c in self.caches.items()},
        )
        if status != self._written:
            write_atomic(self.store.agent_status, json.dumps(asdict(status)))
            self._written = status


def _parse_services(raws: Sequence[JSON]) -> list[Service]:
    out = []
    for raw in raws:
        try:
            out.append(parse_service(raw))
        except LabError as exc:
            log.warning("%s", exc)
    return out


def _ingress_ips(svc: JSON) -> list[str]:
    ingress = (((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress")) or []
    out = []
    for entry in ingress:
        try:
            out.append(str(ipaddress.IPv4Address(str(entry.get("ip")))))
        except ValueError:
            continue
    return out


def _key(obj: JSON) -> str:
    return f"{objects.namespace_of(obj)}/{(obj.get('metadata') or {}).get('name')}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeproxy.lab.agent")
    parser.add_argument("--name", required=True, help="the lab")
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname).1s %(name)s] %(message)s",
    )
    store = LabStore(args.name, Path(args.base))
    try:
        state = store.load()
        agent = Agent(store, state, LabApi.from_kubeconfig(store.kubeconfig), Netns())
    except LabError as exc:
        print(f"lab agent: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("lab %s: agent for nodes %s", args.name, ", ".join(n.name for n in state.nodes))
    agent.run()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
