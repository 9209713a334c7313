"""The kubelet's side for host-network Pods with a command (``hostpods.py`` plans them).

Theory of operation
-------------------
``HostPods.sync`` is called by the lab kubelet on every agent pass with the Pods that
``hostpods.is_host_pod`` picked out, and makes the node processes match:

- a Pod bound to a lab node that does not run yet is planned (``plan_launch``: the
  program, environment, volume files, mounts), its files written under
  ``<lab>/pods/<pod>/``, missing mount points created, and its process started in the
  node's network namespace (output appended to ``logs/<namespace>_<pod>.log``); then
  ``pods/status`` says Running, podIP = hostIP = the node's address; Ready while the
  process lives, or, with a ``readinessProbe.httpGet``, as kubelet's prober says (GET
  from inside the node namespace every ``periodSeconds``; Ready after
  ``successThreshold`` successes, not after ``failureThreshold`` failures);
- a process that exited is noted (Ready false, ``CrashLoopBackOff``, the exit code as
  ``lastState``) and started again after kubelet's back-off (10 s, doubling to 300 s,
  back to 10 s after 10 minutes of running) under ``restartPolicy: Always`` (the
  default; ``OnFailure`` only after a failure), else the Pod ends Succeeded or Failed;
- a Pod with a deletionTimestamp is stopped at once (SIGTERM, SIGKILL after 2 s) and
  DELETEd with gracePeriodSeconds=0; one gone from the API (or replaced: another UID)
  is stopped. Processes are always killed by their own PID.

An agent that stops leaves its Pods' processes running (they are started detached, as
a container outlives a kubelet restart). So that a restarted agent does not start each
Pod a second time, every process carries ``KUBEPROXY_LAB_POD=<its pod directory>`` in
its environment and its PID is kept in ``<lab>/pods/<pod>.pid``; the first ``sync`` of
a new ``HostPods`` stops every recorded process that still carries its mark (checked in
``/proc/<pid>/environ``, so a reused PID is never touched), and then starts afresh the
Pods the API still has, as the lab kubelet does with a left-over pod namespace.

Nothing wakes the agent when a process exits, so ``next_deadline`` asks to be woken
within ``POLL`` seconds while any runs, and at once when one has exited (the agent only
makes a pass when a deadline is due, so the polling itself costs no pass); a probe due
is a deadline too.

Where the Pod's container runs (:meth:`HostPods.image_of`): from its image, as a
container (containers.py), when the image is in local podman storage and the lab runs
images (``lab up`` without ``--no-images``); else as this checkout's program, when the
command is one of this project's and the image is this project's (``kubeproxy:TAG``,
not built here: ``make demo`` needs no image); else nowhere: the Pod waits with
kubelet's ``ErrImageNeverPull`` (upstream's ``registry.k8s.io/kube-proxy`` too: the lab
never stands in for another image), looked at again on every pass. A
container's ``podman run`` is the Pod's process (same PID file, mark, log, stop); once
it is stopped, the container is removed by name too, whatever state it was left in.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubeproxy.errors import LabError
from kubeproxy.lab import containers, hostpods, nsconnect, objects
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.hostpods import HttpProbe, PodFacts
from kubeproxy.lab.layout import NodePlan
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.processes import kill, python_env
from kubeproxy.lab.state import LabStore, write_atomic
from kubeproxy.util.jsontypes import JSON

log = logging.getLogger("kubeproxy.lab.kubelet")
POLL = 1.0  # seconds between checks that the processes still run
BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 10.0, 300.0, 600.0  # kubelet's
POD_MARK = "KUBEPROXY_LAB_POD"  # in a Pod process's environment: its pod directory


class Proc(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...


class Images(Protocol):
    """Local image storage and the containers run from it (containers.Podman; tests
    give a strict fake)."""

    def image_exists(self, image: str) -> bool: ...

    def remove(self, names: Sequence[str]) -> None: ...

    def remove_lab(self, lab: str) -> list[str]: ...


# Starts argv with env, output to the log; tests give their own.
Starter = Callable[[Sequence[str], Mapping[str, str], Path], Proc]
# Runs one HTTP probe from inside a namespace: success? Tests give their own.
Prober = Callable[[str, HttpProbe], bool]


def http_probe(ns: str, probe: HttpProbe) -> bool:
    """kubelet's HTTP prober: a status from 200 to 399 is a success."""
    try:
        status, _ = nsconnect.http_get(ns, probe.host, probe.port, probe.path, probe.timeout)
    except LabError:
        return False
    return 200 <= status < 400


def start_process(argv: Sequence[str], env: Mapping[str, str], log_file: Path) -> Proc:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        return subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class HostPod:
    uid: str
    node: str
    proc: Proc
    started: float  # wall clock
    restarts: int = 0
    backoff: float = BACKOFF_START
    exit_code: int | None = None  # noted exit, not yet restarted
    restart_at: float | None = None
    probe: HttpProbe | None = None
    ready: bool = True
    probe_at: float | None = None  # when the next readiness probe is due
    streak: int = 0  # consecutive probe results that disagree with ``ready``
    container: str | None = None  # the container's name when it runs from its image

    def reset_probe(self, now: float) -> None:
        """A started container: not Ready until its probe says so."""
        self.ready, self.streak = self.probe is None, 0
        self.probe_at = now + self.probe.initial_delay if self.probe else None


@dataclass
class Result:
    writes: int = 0
    local: int = 0
    errors: list[str] = field(default_factory=list)


class ApiSources:
    """ConfigMaps, tokens and the CA from the lab's API server and files."""

    def __init__(self, api: LabApi, store: LabStore) -> None:
        self.api = api
        self.store = store

    def config_map(self, namespace: str, name: str) -> JSON | None:
        try:
            return self.api.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        except LabApiError as exc:
            if exc.code == 404:
                return None
            raise

    def token(self, namespace: str, service_account: str, pod: PodFacts) -> str:
        try:
            answer = self.api.request_token(namespace, service_account, pod=(pod.name, pod.uid),
                                            expiration_seconds=hostpods.TOKEN_SECONDS)
        except LabApiError as exc:
            raise LabError(f"TokenRequest for ServiceAccount {namespace}/{service_account}: "
                           f"{exc}") from exc
        if not answer.token:
            raise LabError(f"TokenRequest for {namespace}/{service_account}: no token")
        return answer.token

    def ca(self) -> bytes:
        try:
            return self.store.ca_cert.read_bytes()
        except OSError as exc:
            raise LabError(f"the lab's CA {self.store.ca_cert}: {exc}") from exc


class HostPods:
    def __init__(self, store: LabStore, net: Netns, nodes: Mapping[str, NodePlan],
                 api: LabApi, clock: Callable[[], float], *,
                 sources: hostpods.Sources | None = None,
                 scripts: Mapping[str, str] | None = None,
                 starter: Starter = start_process,
                 prober: Prober = http_probe,
                 images: bool = True,
                 podman: Images | None = None) -> None:  # fmt: skip
        self.store = store
        self.net = net
        self.nodes = nodes
        self.api = api
        self.clock = clock
        self.sources = sources or ApiSources(api, store)
        self.scripts = scripts if scripts is not None else hostpods.console_scripts()
        self.starter = starter
        self.prober = prober
        self.images = images  # run a Pod's image when local storage has it
        self.podman: Images = podman or containers.Podman()
        self.running: dict[str, HostPod] = {}
        self.waiting: dict[str, str] = {}  # Pod -> its UID, while its image is missing
        self.cleaned = False  # an earlier agent's processes were looked for

    def next_deadline(self) -> float | None:
        now = self.clock()
        times = []
        for hp in self.running.values():
            if hp.restart_at is not None:
                times.append(hp.restart_at)
            elif hp.proc.poll() is not None:
                times.append(now)
            else:
                times.append(min(now + POLL, hp.probe_at or now + POLL))
        return min(times, default=None)

    def sync(self, pods: Sequence[JSON]) -> Result:
        out = Result()
        if not self.cleaned:
            out.local += self.stop_leftovers()
            self.cleaned = True
        by_key = {_key(p): p for p in pods}
        for key, hp in list(self.running.items()):
            obj = by_key.get(key)
            if obj is None or _uid(obj) != hp.uid:
                self._stop(key)
                out.local += 1
        self.waiting = {k: u for k, u in self.waiting.items()
                        if k in by_key and _uid(by_key[k]) == u}
        for key, obj in by_key.items():
            try:
                self._sync_one(key, obj, out)
            except LabError as exc:
                log.warning("pod %s: %s", key, exc)
                out.errors.append(f"pod {key}: {exc}")
        return out

    def _sync_one(self, key: str, obj: JSON, out: Result) -> None:
        spec = obj.get("spec") or {}
        if objects.is_terminating(obj):
            if key in self.running:
                self._stop(key)
                out.local += 1
            meta = obj.get("metadata") or {}
            if self.api.delete("Pod", objects.namespace_of(obj), meta["name"], 0):
                out.writes += 1
            return
        if key not in self.running:
            phase = (obj.get("status") or {}).get("phase")
            if spec.get("nodeName") in self.nodes and phase not in ("Succeeded", "Failed"):
                image = self.image_of(obj)
                if image is None:
                    out.writes += self._wait_for_image(key, obj)
                    return
                self._start(key, obj, image or None)
                out.local += 1
                out.writes += self._report(obj, self.running[key])
            return
        hp = self.running[key]
        now = self.clock()
        if hp.exit_code is None and hp.restart_at is None and hp.proc.poll() is not None:
            out.writes += self._exited(key, obj, hp, now)
        elif hp.restart_at is not None and hp.restart_at <= now:
            self._restart(key, obj, hp)
            out.local += 1
            out.writes += self._report(obj, hp)
        elif hp.restart_at is None and hp.probe_at is not None and hp.probe_at <= now:
            out.writes += self._report(obj, hp) if self._probe(key, hp, now) else 0

    # ---- life of one pod

    def _facts(self, obj: JSON) -> PodFacts:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        node = self.nodes[str(spec.get("nodeName"))]
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        return PodFacts(str(meta.get("name")), objects.namespace_of(obj), _uid(obj),
                        node.name, node.lab_ip, str(account))  # fmt: skip

    def pod_dir(self, key: str) -> Path:
        return self.store.dir / "pods" / key.replace("/", "_")

    def pid_file(self, key: str) -> Path:
        return self.pod_dir(key).with_name(self.pod_dir(key).name + ".pid")

    def stop_leftovers(self) -> int:
        """Stop the Pod processes an earlier agent of this lab started (recorded, and
        still marked with their pod directory); returns how many were stopped."""
        stopped = []
        for record in sorted((self.store.dir / "pods").glob("*.pid")):
            pod_dir = str(record.with_name(record.name.removesuffix(".pid")))
            try:
                pid = int(record.read_text())
            except (OSError, ValueError):
                pid = 0
            if pid and _environ(pid).get(POD_MARK) == pod_dir:
                log.info("pod process %d (%s): left by an earlier agent; stopping it", pid,
                         Path(pod_dir).name)  # fmt: skip
                stopped.append(pid)
            record.unlink(missing_ok=True)
        kill(stopped)
        if self.images:  # their containers too, whatever state they were left in
            self.podman.remove_lab(self.store.name)
        return len(stopped)

    def image_of(self, obj: JSON) -> str | None:
        """The image to run the Pod's container from; "" for this checkout's program
        (this project's program, and its image unbuilt or images off); None when
        neither can run: another image that local storage lacks."""
        container = hostpods.first_container(obj)
        image = str(container.get("image") or "")
        program = Path(str((container.get("command") or [""])[0])).name
        ours = program in self.scripts
        if not self.images:
            return "" if ours else None
        if self.podman.image_exists(image):
            return image
        return "" if ours and hostpods.is_project_image(image) else None

    def _wait_for_image(self, key: str, obj: JSON) -> int:
        """kubelet's answer to an image it may not pull: the Pod waits, not Ready."""
        if self.waiting.get(key) == _uid(obj):
            return 0
        image = str(hostpods.first_container(obj).get("image") or "")
        log.warning("pod %s: image %r is not in local storage (make image builds "
                    "kubeproxy's); it waits", key, image)  # fmt: skip
        self.waiting[key] = _uid(obj)
        return self._write(obj, image_missing_status(obj, self.nodes, self.clock()))

    def _spawn(self, key: str, obj: JSON, image: str | None) -> tuple[Proc, str | None]:
        """Start the Pod's container: from ``image`` (None: this checkout's program).
        Returns the process and the container's name (None for a host process)."""
        facts = self._facts(obj)
        pod_dir = self.pod_dir(key)
        launch = hostpods.plan_launch(obj, facts, self.sources, self.scripts, pod_dir,
                                      in_image=image is not None)  # fmt: skip
        hostpods.write_files(pod_dir, launch)
        hostpods.prepare_host(self.store, launch, mount_points=image is None)
        node = self.nodes[facts.node]
        base = python_env()
        env: dict[str, str] = {k: base[k] for k in ("PATH", "PYTHONPATH", "LANG") if k in base}
        name = None
        if image is None:
            argv = hostpods.wrapper(lambda a: self.net.exec_argv(node.ns, a), launch)
            env |= {"HOSTNAME": facts.node, **launch.env}
        else:
            name = containers.container_name(self.store.name, facts.namespace, facts.name)
            privileged = bool((hostpods.first_container(obj).get("securityContext") or {})
                              .get("privileged"))  # fmt: skip
            argv = containers.run_argv(launch, image, name, node.ns, facts.node,
                                       privileged=privileged)  # fmt: skip
            env = containers.podman_env(env)
        env[POD_MARK] = str(pod_dir)
        log.info("pod %s: running %s on %s (host network%s)", key, " ".join(launch.argv),
                 facts.node, f", image {image}" if image else "")  # fmt: skip
        proc = self.starter(argv, env, self.store.log_file(key))
        write_atomic(self.pid_file(key), str(proc.pid))
        return proc, name

    def _start(self, key: str, obj: JSON, image: str | None) -> None:
        probe = hostpods.readiness_probe(hostpods.first_container(obj), self._facts(obj))
        proc, name = self._spawn(key, obj, image)
        node = str((obj.get("spec") or {}).get("nodeName"))
        hp = HostPod(_uid(obj), node, proc, self.clock(), probe=probe, container=name)
        hp.reset_probe(hp.started)
        self.running[key] = hp
        self.waiting.pop(key, None)

    def _probe(self, key: str, hp: HostPod, now: float) -> bool:
        """Run the due readiness probe; True when Ready changed."""
        assert hp.probe is not None
        ok = self.prober(self.nodes[hp.node].ns, hp.probe)
        hp.probe_at = now + hp.probe.period
        hp.streak = 0 if ok == hp.ready else hp.streak + 1
        need = hp.probe.success_threshold if ok else hp.probe.failure_threshold
        if ok == hp.ready or hp.streak < need:
            return False
        hp.ready, hp.streak = ok, 0
        log.info("pod %s: readiness probe %s: %s", key, "succeeded" if ok else "failed",
                 "Ready" if ok else "not Ready")  # fmt: skip
        return True

    def _restart(self, key: str, obj: JSON, hp: HostPod) -> None:
        log.info("pod %s: restarting its container (restart %d)", key, hp.restarts + 1)
        image = self.image_of(obj)
        hp.proc, hp.container = self._spawn(key, obj, image or None)
        hp.restarts += 1
        hp.exit_code, hp.restart_at, hp.started = None, None, self.clock()
        hp.reset_probe(hp.started)

    def _exited(self, key: str, obj: JSON, hp: HostPod, now: float) -> int:
        code = hp.proc.returncode if hp.proc.returncode is not None else -1
        hp.exit_code = code
        policy = (obj.get("spec") or {}).get("restartPolicy") or "Always"
        if now - hp.started > BACKOFF_RESET:
            hp.backoff = BACKOFF_START
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            hp.restart_at = now + hp.backoff
            log.warning("pod %s: its process exited (%s); restarting in %.0f s",
                        key, code, hp.backoff)  # fmt: skip
            hp.backoff = min(BACKOFF_MAX, hp.backoff * 2)
            return self._write(obj, exited_status(obj, hp, self.nodes[hp.node].lab_ip, now))
        log.info("pod %s: its process exited (%s); restartPolicy %s", key, code, policy)
        status = exited_status(obj, hp, self.nodes[hp.node].lab_ip, now)
        status["phase"] = "Succeeded" if code == 0 else "Failed"
        written = self._write(obj, status)
        del self.running[key]
        self.pid_file(key).unlink(missing_ok=True)
        return written

    def _report(self, obj: JSON, hp: HostPod) -> int:
        ip = self.nodes[hp.node].lab_ip
        status = objects.running_status(obj, ip, ip, self.clock(), hp.proc.pid)
        for cs in status.get("containerStatuses") or []:
            cs["restartCount"] = hp.restarts
        if not hp.ready:
            _not_ready(status)
        return self._write(obj, status)

    def _write(self, obj: JSON, status: JSON) -> int:
        meta = obj.get("metadata") or {}
        uid = _uid(obj)

        def change(cur: JSON) -> JSON | None:
            if _uid(cur) != uid:
                return None  # replaced meanwhile: the next pass decides
            return {**cur, "status": status}

        try:
            self.api.mutate("Pod", objects.namespace_of(obj), meta["name"], change, "status")
        except LabApiError as exc:
            if exc.code == 404:
                return 0
            raise
        return 1

    def _stop(self, key: str) -> None:
        hp = self.running.pop(key)
        log.info("pod %s: stopping its process %d", key, hp.proc.pid)
        if hp.proc.poll() is None:
            kill([hp.proc.pid])
        hp.proc.poll()
        if hp.container is not None:  # SIGKILLed podman leaves its container
            self.podman.remove([hp.container])
        shutil.rmtree(self.pod_dir(key), ignore_errors=True)
        self.pid_file(key).unlink(missing_ok=True)

    def stop_all(self) -> None:
        for key in list(self.running):
            self._stop(key)


def exited_status(obj: JSON, hp: HostPod, ip: str, now: float) -> JSON:
    """Running, not Ready: the container waits in CrashLoopBackOff, its last exit kept."""
    status = _not_ready(objects.running_status(obj, ip, ip, now, None))
    stamp = objects.timestamp(now)
    for cs in status.get("containerStatuses") or []:
        cs.update(started=False, restartCount=hp.restarts,
                  state={"waiting": {"reason": "CrashLoopBackOff"}},
                  lastState={"terminated": {"exitCode": hp.exit_code, "finishedAt": stamp}})
    return copy.deepcopy(status)


def image_missing_status(obj: JSON, nodes: Mapping[str, NodePlan], now: float) -> JSON:
    """Pending, the container waiting: kubelet's status for an image it may not pull."""
    image = str(hostpods.first_container(obj).get("image") or "")
    node = nodes.get(str((obj.get("spec") or {}).get("nodeName")))
    ip = node.lab_ip if node else ""
    status = _not_ready(objects.running_status(obj, ip, ip, now, None))
    status["phase"] = "Pending"
    for cs in status.get("containerStatuses") or []:
        cs.update(started=False, state={"waiting": {
            "reason": "ErrImageNeverPull",
            "message": f'Container image "{image}" is not present with pull policy of '
                       "Never"}})  # fmt: skip
    return copy.deepcopy(status)


def _not_ready(status: JSON) -> JSON:
    for cond in status["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond["status"] = "False"
    for cs in status.get("containerStatuses") or []:
        cs["ready"] = False
    return status


def _environ(pid: int) -> dict[str, str]:
    """A process's environment ({} when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (e.decode(errors="replace").partition("=") for e in raw.split(b"\0") if e)
    return {k: v for k, _, v in pairs}


def _uid(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def _key(obj: JSON) -> str:
    return f"{objects.namespace_of(obj)}/{(obj.get('metadata') or {}).get('name')}"

