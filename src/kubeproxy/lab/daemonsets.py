"""The lab's DaemonSet controller: one Pod per matching node, as kube-controller-manager's.

Theory of operation
-------------------
``plan`` (pure) takes one DaemonSet, the Nodes and every Pod, and says what to write so
that each node the DaemonSet wants runs exactly one of its Pods:

- a node is *wanted* when its labels match ``spec.template.spec.nodeSelector`` and every
  NoSchedule / NoExecute taint it has is tolerated by the template (upstream's
  ``NodeShouldRunDaemonPod``; the usual kube-proxy toleration ``operator: Exists``
  tolerates them all, so tolerations never block). Node affinity is not evaluated;
- a Pod belongs to the DaemonSet when its controller ownerReference carries the
  DaemonSet's uid. Each wanted node without a live Pod (not terminating, not Succeeded
  or Failed) gets a new one: the template's labels and spec, ``spec.nodeName`` set
  (the lab has no scheduler binding; upstream pins the node by affinity instead),
  ``generateName: <name>-``, the ownerReference, ``pod-template-generation``. Extra
  Pods on a node (the newest), Pods on nodes no longer wanted and finished Pods are
  deleted; a changed template rolls out one node at a time (RollingUpdate,
  maxUnavailable 1: a Pod of an older generation is deleted only while every wanted
  node has a Ready Pod; ``OnDelete`` waits for the user);
- the status counts (desired, current, misscheduled, ready, available, updated,
  observedGeneration), written only when it changed.

``orphans`` finds Pods whose owning DaemonSet is gone: the lab has no garbage collector,
so this controller deletes them (what a cascading delete does in a cluster).

``Controller`` is the I/O side, run as ``python -m kubeproxy.lab.daemonsets --name LAB``
(one process per lab, started by ``lab up``, its PID in ``daemonsets.pid``): three watch
caches (DaemonSets, Pods, Nodes) wake it; each pass reconciles every DaemonSet. After
writing Pods it waits until its Pod cache has seen its own writes before the next pass,
so a Pod is never created twice (upstream's "expectations").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import queue
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from kubeproxy.errors import LabError
from kubeproxy.lab import objects
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.processes import cmdline, kill
from kubeproxy.lab.state import DEFAULT_BASE, LabStore, write_atomic
from kubeproxy.lab.watchcache import WatchCache
from kubeproxy.util.jsontypes import JSON
from kubeproxy.util.queues import drain

log = logging.getLogger("kubeproxy.lab.daemonsets")
MODULE = "kubeproxy.lab.daemonsets"
TEMPLATE_GENERATION = "pod-template-generation"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
RESYNC = 10.0  # seconds: a pass at least this often, whatever the watches say


@dataclass(frozen=True)
class DaemonSetPlan:
    create: list[JSON] = field(default_factory=list)  # Pod bodies
    delete: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    status: JSON | None = None  # the new status, None when unchanged


def _meta(obj: JSON) -> JSON:
    return obj.get("metadata") or {}


def tolerates(tolerations: Sequence[JSON], taint: JSON) -> bool:
    """Upstream's Toleration.ToleratesTaint for one taint."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        key, op = t.get("key") or "", t.get("operator") or "Equal"
        if op == "Exists" and (not key or key == taint.get("key")):
            return True
        if op == "Equal" and key == taint.get("key") and (t.get("value") or "") == (
            taint.get("value") or ""
        ):
            return True
    return False


def wants(ds: JSON, node: JSON) -> bool:
    spec = ((ds.get("spec") or {}).get("template") or {}).get("spec") or {}
    labels = _meta(node).get("labels") or {}
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    taints = (node.get("spec") or {}).get("taints") or []
    tolerations = spec.get("tolerations") or []
    return all(
        tolerates(tolerations, t) for t in taints if t.get("effect") in BLOCKING_EFFECTS
    )


def owner_uid(pod: JSON) -> str | None:
    for ref in _meta(pod).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "DaemonSet":
            return str(ref.get("uid") or "")
    return None


def _live(pod: JSON) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return not objects.is_terminating(pod) and phase not in ("Succeeded", "Failed")


def pod_body(ds: JSON, node: str) -> JSON:
    meta = _meta(ds)
    template = copy.deepcopy((ds.get("spec") or {}).get("template") or {})
    tmeta = template.get("metadata") or {}
    labels = dict(tmeta.get("labels") or {})
    labels[TEMPLATE_GENERATION] = str(meta.get("generation") or 1)
    spec = template.get("spec") or {}
    spec["nodeName"] = node
    pod_meta: JSON = {
        "generateName": f"{meta['name']}-",
        "namespace": objects.namespace_of(ds),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": meta["name"],
            "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True,
        }],
    }  # fmt: skip
    if tmeta.get("annotations"):
        pod_meta["annotations"] = dict(tmeta["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}


def plan(ds: JSON, nodes: Sequence[JSON], pods: Sequence[JSON]) -> DaemonSetPlan:
    uid = _meta(ds).get("uid")
    ns = objects.namespace_of(ds)
    mine = [p for p in pods if owner_uid(p) == uid and objects.namespace_of(p) == ns]
    wanted = {str(_meta(n).get("name")) for n in nodes if wants(ds, n)}
    by_node: dict[str, list[JSON]] = {}
    for p in mine:
        by_node.setdefault(str((p.get("spec") or {}).get("nodeName") or ""), []).append(p)
    out = DaemonSetPlan()
    for node, node_pods in sorted(by_node.items()):
        live = sorted((p for p in node_pods if _live(p)), key=_age)
        finished = [p for p in node_pods if not _live(p) and not objects.is_terminating(p)]
        extra = live if node not in wanted else live[1:]
        out.delete.extend(_ref(p) for p in [*finished, *extra])
    out.delete.extend(_rolling_update(ds, wanted, by_node))
    for node in sorted(wanted):
        if not any(_live(p) for p in by_node.get(node, [])):
            out.create.append(pod_body(ds, node))
    status = _status(ds, wanted, by_node)
    if status != {k: (ds.get("status") or {}).get(k) for k in status}:
        return DaemonSetPlan(out.create, out.delete, status)
    return out


def _generation(obj: JSON) -> str:
    return str((_meta(obj).get("labels") or {}).get(TEMPLATE_GENERATION) or "")


def _rolling_update(
    ds: JSON, wanted: set[str], by_node: Mapping[str, list[JSON]]
) -> list[tuple[str, str]]:
    """RollingUpdate with maxUnavailable 1: when every wanted node has a Ready Pod, delete
    one Pod of an older template (the next pass creates its replacement)."""
    strategy = ((ds.get("spec") or {}).get("updateStrategy") or {}).get("type")
    if strategy == "OnDelete":
        return []
    generation = str(_meta(ds).get("generation") or 1)
    current = {n: sorted((p for p in by_node.get(n, []) if _live(p)), key=_age)
               for n in sorted(wanted)}  # fmt: skip
    if not all(ps and objects.is_ready(ps[0]) for ps in current.values()):
        return []  # one node is already without a Ready Pod: wait for it
    old = [ps[0] for ps in current.values() if _generation(ps[0]) != generation]
    return [_ref(old[0])] if old else []


def _status(ds: JSON, wanted: set[str], by_node: Mapping[str, list[JSON]]) -> JSON:
    generation = str(_meta(ds).get("generation") or 1)
    scheduled = {n for n, ps in by_node.items() if any(_live(p) for p in ps)}
    live = [p for ps in by_node.values() for p in ps if _live(p)]
    ready = [p for p in live if objects.is_ready(p) and p["spec"].get("nodeName") in wanted]
    updated = [p for p in live
               if _generation(p) == generation and p["spec"].get("nodeName") in wanted]
    return {
        "desiredNumberScheduled": len(wanted),
        "currentNumberScheduled": len(scheduled & wanted),
        "numberMisscheduled": len(scheduled - wanted),
        "numberReady": len(ready),
        "numberAvailable": len(ready),
        "numberUnavailable": len(wanted) - len(ready),
        "updatedNumberScheduled": len(updated),
        "observedGeneration": int(generation),
    }


def orphans(daemonsets: Sequence[JSON], pods: Sequence[JSON]) -> list[tuple[str, str]]:
    """DaemonSet Pods whose DaemonSet is gone (and not already terminating)."""
    uids = {_meta(d).get("uid") for d in daemonsets}
    return [
        _ref(p)
        for p in pods
        if owner_uid(p) is not None and owner_uid(p) not in uids and not objects.is_terminating(p)
    ]


def _ref(pod: JSON) -> tuple[str, str]:
    return objects.namespace_of(pod), str(_meta(pod).get("name"))


def _age(pod: JSON) -> tuple[str, str]:
    return str(_meta(pod).get("creationTimestamp") or ""), str(_meta(pod).get("name"))


# ---------------------------------------------------------------- the controller process


class Controller:
    KINDS = ("DaemonSet", "Pod", "Node")

    def __init__(self, api: LabApi) -> None:
        self.api = api
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.caches = {k: WatchCache(api, k, self._notify) for k in self.KINDS}
        self.expect_rv = 0  # the Pod cache must reach this before the next pass

    def _notify(self, kind: str, changed: bool) -> None:
        if changed:
            self.queue.put(kind)

    def stop(self) -> None:
        self.queue.put(None)

    def run(self) -> None:
        for cache in self.caches.values():
            cache.start()
        try:
            while None not in drain(self.queue, RESYNC):
                if all(c.synced for c in self.caches.values()) and (
                    self.caches["Pod"].resource_version >= self.expect_rv
                ):
                    self.reconcile()
        finally:
            for cache in self.caches.values():
                cache.stop()

    def reconcile(self) -> None:
        snap = {k: c.snapshot().items for k, c in self.caches.items()}
        for ds in snap["DaemonSet"]:
            self._apply(ds, plan(ds, snap["Node"], snap["Pod"]))
        self._delete(orphans(snap["DaemonSet"], snap["Pod"]), "its DaemonSet is gone")

    def _apply(self, ds: JSON, p: DaemonSetPlan) -> None:
        key = f"{objects.namespace_of(ds)}/{_meta(ds).get('name')}"
        for body in p.create:
            try:
                made = self.api.create(body)
            except LabApiError as exc:
                log.warning("DaemonSet %s: creating a Pod on %s: %s", key,
                            body["spec"]["nodeName"], exc)  # fmt: skip
                continue
            self._expect(made)
            log.info("DaemonSet %s: Pod %s on %s", key, _meta(made).get("name"),
                     body["spec"]["nodeName"])  # fmt: skip
        self._delete(p.delete, f"DaemonSet {key} does not want it")
        if p.status is not None:
            body = {**ds, "status": {**(ds.get("status") or {}), **p.status}}
            with contextlib.suppress(LabApiError):  # 409/404: the next pass writes it again
                self.api.update(body, "status")

    def _delete(self, refs: Sequence[tuple[str, str]], why: str) -> None:
        for ns, name in refs:
            try:
                gone = self.api.delete("Pod", ns, name)
            except LabApiError as exc:
                log.warning("Pod %s/%s: %s", ns, name, exc)
                continue
            log.info("Pod %s/%s: deleted (%s)", ns, name, why)
            if gone is not None:
                self._expect(gone)

    def _expect(self, obj: JSON) -> None:
        with contextlib.suppress(TypeError, ValueError):
            self.expect_rv = max(self.expect_rv, int(_meta(obj).get("resourceVersion") or 0))


# ---------------------------------------------------------------- process bookkeeping


def pid_file(store: LabStore) -> Path:
    return store.dir / "daemonsets.pid"


def argv(store: LabStore) -> list[str]:
    return [sys.executable, "-m", MODULE, "--name", store.name, "--base", str(store.base)]


def is_controller(pid: int, lab: str) -> bool:
    args = cmdline(pid)
    return MODULE in args and "--name" in args and lab in args


def stop(store: LabStore) -> None:
    """Stop the lab's DaemonSet controller (by its recorded PID, checked first)."""
    try:
        pid = int(pid_file(store).read_text())
    except (OSError, ValueError):
        return
    if is_controller(pid, store.name):
        kill([pid])
    pid_file(store).unlink(missing_ok=True)


def record(store: LabStore, pid: int) -> None:
    write_atomic(pid_file(store), str(pid))


def main(args_: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--name", required=True, help="the lab")
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    args = parser.parse_args(args_)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")  # fmt: skip
    store = LabStore(args.name, Path(args.base))
    try:
        api = LabApi.from_kubeconfig(store.kubeconfig)
    except LabError as exc:
        print(f"lab daemonsets: {exc}", file=sys.stderr)
        return 1
    controller = Controller(api)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        controller.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("lab %s: DaemonSet controller (pid %d)", args.name, os.getpid())
    controller.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
