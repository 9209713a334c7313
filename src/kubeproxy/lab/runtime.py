"""A running lab: bring it up, change it, program its nodes, probe it, take it down.

``Lab`` is the Python API the CLI and the kernel tests share. Its state lives in a
``Store`` (``/run/kubeproxy-lab/<name>/``); every mutating call holds the store's lock,
first finishes deletions whose grace period has ended (``reconcile``), then changes the
state and re-syncs. A sync recomputes the EndpointSlices (``controller``), writes
``state.yaml`` (Nodes, Services, EndpointSlices) and runs the core's one-shot
``python -m kubeproxy apply`` inside every node namespace, in parallel: each node's
kernel gets its own rules from the real data plane of the chosen mode.

Processes the lab starts (pod servers, the deletion reaper) are detached, recorded by
PID, and killed by PID at ``down`` after checking their command line, together with any
process still inside a lab namespace (``ip netns pids``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

import kubeproxy
from kubeproxy.lab import controller, network, topology
from kubeproxy.lab.errors import CommandError, LabError, LabStateError
from kubeproxy.lab.manifest import LabObjects, Pod, Service, parse_objects
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.state import DEFAULT_BASE, LabState, PodRecord, Store

JSON = dict[str, Any]
MODES = ("iptables", "nftables")
LB_ALGORITHMS = ("random", "round-robin")
READY_TIMEOUT = 20.0
SERVER_MODULE = "kubeproxy.lab.podserver"
REAPER_MODULE = "kubeproxy.lab.runtime"


@dataclass(frozen=True)
class UpOptions:
    mode: str = "iptables"
    lb_algorithm: str = "random"
    cluster_cidr: str = topology.DEFAULT_CLUSTER_CIDR
    service_cidr: str = topology.DEFAULT_SERVICE_CIDR
    external_node: str | None = None


def python_env() -> dict[str, str]:
    """The environment for lab subprocesses: this kubeproxy importable even uninstalled."""
    env = dict(os.environ)
    root = str(Path(next(iter(kubeproxy.__path__))).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def read_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise LabError(f"cannot read {path}: {exc}") from exc
        out.append((path, text))
    return out


class Lab:
    def __init__(
        self, name: str = "lab", *, base: Path = DEFAULT_BASE, net: Netns | None = None
    ) -> None:
        self.name = topology.check_lab_name(name)
        self.store = Store(name, base)
        self.net = net or Netns()
        self.prefix = topology.ns_prefix(name)

    # ------------------------------------------------------------ up / down

    def up(self, documents: Sequence[JSON], options: UpOptions = UpOptions()) -> LabState:
        if options.mode not in MODES:
            raise LabError(f"--mode must be one of {', '.join(MODES)}")
        if options.lb_algorithm not in LB_ALGORITHMS:
            raise LabError(f"--lb-algorithm must be one of {', '.join(LB_ALGORITHMS)}")
        objects = parse_objects(documents)
        with self.store.lock():
            if self.store.exists() or self.net.list_namespaces(self.prefix):
                raise LabStateError(
                    f"lab {self.name!r} is already up (or left over); "
                    f"run `kubeproxy lab down --name {self.name}` first"
                )
            plan = topology.plan(
                self.name,
                objects,
                topology.Options(options.cluster_cidr, options.service_cidr, options.external_node),
            )
            state = LabState(
                name=self.name,
                mode=options.mode,
                lb_algorithm=options.lb_algorithm,
                cluster_cidr=plan.cluster_cidr,
                service_cidr=plan.service_cidr,
                external_node=options.external_node,
                documents=_documents(plan.objects),
                pods={p.key: PodRecord() for p in plan.pods},
            )
            self.store.prepare()
            self.store.save(state)
            try:
                network.build(self.net, plan)
                state = self._start_servers(state, plan)
                self.store.save(state)
                self._sync(state)
            except BaseException:
                self._down_locked()
                self.store.remove_lock()
                raise
            return state

    def down(self) -> list[str]:
        """Remove the lab, whatever is left of it; returns the namespaces deleted."""
        with self.store.lock():
            gone = self._down_locked()
            self.store.remove_lock()
        return gone

    def _down_locked(self) -> list[str]:
        pids: list[int] = []
        if self.store.exists():
            with contextlib.suppress(LabStateError):
                state = self.store.load()
                recorded = [p for r in state.pods.values() for p in (r.pid, r.reaper) if p]
                pids += [p for p in recorded if is_lab_process(p, self.name)]
        for ns in self.net.list_namespaces(self.prefix):
            with contextlib.suppress(CommandError):
                pids += self.net.pids(ns)
        _kill(pids, self.name)
        gone = network.teardown(self.net, self.prefix)
        self.store.remove()
        return gone

    # ------------------------------------------------------------ state

    def state(self) -> LabState:
        return self.store.load()

    def plan(self, state: LabState | None = None) -> topology.Plan:
        state = state or self.state()
        return topology.plan(
            self.name,
            parse_objects(state.documents),
            topology.Options(state.cluster_cidr, state.service_cidr, state.external_node),
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[LabState]:
        self.store.load()  # a lab that is not up: say so, and leave no lock file behind
        with self.store.lock():
            yield self._reconcile(self.store.load(), time.time())

    def reconcile(self) -> LabState:
        """Finish deletions whose grace period is over (every command does this first)."""
        with self._locked() as state:
            return state

    def slices(self, state: LabState | None = None) -> list[JSON]:
        state = state or self.state()
        objects = parse_objects(state.documents)
        statuses = {
            key: controller.PodStatus(ready=rec.ready, terminating=rec.delete_at is not None)
            for key, rec in state.pods.items()
        }
        computed = controller.endpoint_slices(
            objects.services, objects.pods, objects.nodes, statuses
        )
        return computed + list(objects.slices)

    # ------------------------------------------------------------ pods

    def find_pod(self, ref: str, state: LabState | None = None) -> Pod:
        objects = parse_objects((state or self.state()).documents)
        return _find_pod(objects, ref)

    def set_pod_ready(self, ref: str, ready: bool) -> None:
        with self._locked() as state:
            pod = _find_pod(parse_objects(state.documents), ref)
            state = state.with_pod(pod.key, replace(state.pods[pod.key], ready=ready))
            self.store.save(state)
            self._sync(state)

    def delete_pod(self, ref: str, grace: float = 30.0, wait: bool = False) -> float:
        """Start deleting a Pod: terminating for grace seconds, then gone.

        Returns the wall-clock deadline. Without wait a detached reaper finishes it.
        Deleting a terminating Pod again with a shorter grace brings its end forward
        (``--grace 0`` ends it now, like ``kubectl delete --force``).
        """
        with self._locked() as state:
            pod = _find_pod(parse_objects(state.documents), ref)
            record = state.pods[pod.key]
            deadline = time.time() + max(grace, 0.0)
            if record.delete_at is not None and record.delete_at <= deadline:
                return record.delete_at  # already going; a new delete may only hurry it
            if record.reaper and is_lab_process(record.reaper, self.name):
                _kill([record.reaper], self.name)  # its deadline is no longer the one
            reaper = None if wait or grace <= 0 else self._spawn_reaper(deadline)
            state = state.with_pod(pod.key, replace(record, delete_at=deadline, reaper=reaper))
            if grace <= 0:
                self._reconcile(state, deadline)
                return deadline
            self.store.save(state)
            self._sync(state)
        if wait:
            time.sleep(max(0.0, deadline - time.time()))
            self.reconcile()
        return deadline

    def _reconcile(self, state: LabState, now: float) -> LabState:
        due = [k for k, r in state.pods.items() if r.delete_at is not None and r.delete_at <= now]
        if not due:
            return state
        plan = self.plan(state)
        pods = dict(state.pods)
        for key in due:
            record = pods.pop(key)
            own = [p for p in (record.pid, record.reaper) if p and p != os.getpid()]
            _kill([p for p in own if is_lab_process(p, self.name)], self.name)
            ns = next(p.ns for p in plan.pods if p.key == key)
            with contextlib.suppress(CommandError):
                _kill(self.net.pids(ns), self.name)
                self.net.delete(ns)
        documents = tuple(
            d for d in state.documents if not (d.get("kind") == "Pod" and _doc_key(d) in due)
        )
        state = replace(state, documents=documents, pods=pods)
        self.store.save(state)
        self._sync(state)
        return state

    def _spawn_reaper(self, deadline: float) -> int:
        argv = [sys.executable, "-m", REAPER_MODULE, "reap", "--name", self.name]
        argv += ["--base", str(self.store.base), "--at", repr(deadline)]
        proc = subprocess.Popen(
            argv,
            env=python_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.store.dir / "logs" / "reaper.log", "a"),  # noqa: SIM115
            start_new_session=True,
        )
        return proc.pid

    # ------------------------------------------------------------ processes

    def _start_servers(self, state: LabState, plan: topology.Plan) -> LabState:
        env = python_env()
        started: dict[str, int] = {}
        waiting: dict[str, subprocess.Popen[bytes]] = {}
        for pod in plan.pods:
            if not pod.listen:
                continue
            ready = self.store.ready_file(pod.key)
            ready.unlink(missing_ok=True)
            argv = [sys.executable, "-m", SERVER_MODULE, "--lab", self.name]
            argv += ["--pod", _display(pod.namespace, pod.name), "--node", pod.node]
            argv += [f"--listen={x}" for x in pod.listen]
            argv += ["--ready-file", str(ready)]
            with open(self.store.log_file(pod.key), "ab") as log:
                proc = subprocess.Popen(
                    self.net.exec_argv(pod.ns, argv),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started[pod.key] = proc.pid
            waiting[pod.key] = proc
        state = replace(
            state,
            pods={k: replace(r, pid=started.get(k)) for k, r in state.pods.items()},
        )
        self.store.save(state)  # PIDs first, so a failure below still cleans them up
        deadline = time.monotonic() + READY_TIMEOUT
        while waiting:
            for key, proc in list(waiting.items()):
                if self.store.ready_file(key).exists():
                    del waiting[key]
                elif proc.poll() is not None or time.monotonic() > deadline:
                    text = self.store.log_file(key).read_text(errors="replace")[-2000:]
                    raise LabError(f"pod server of {key} did not start:\n{text}")
            time.sleep(0.02)
        return state

    # ------------------------------------------------------------ programming nodes

    def sync(self) -> None:
        with self._locked() as state:
            self._sync(state)

    def _sync(self, state: LabState) -> None:
        plan = self.plan(state)
        objects = plan.objects
        docs = [n.raw for n in objects.nodes] + [s.raw for s in objects.services]
        docs += self.slices(state)
        tmp = self.store.apply_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        os.replace(tmp, self.store.apply_file)
        procs = []
        for node in plan.nodes:
            argv = [sys.executable, "-m", "kubeproxy", "apply", "-f", str(self.store.apply_file)]
            argv += ["--hostname-override", node.name, "--mode", state.mode]
            argv += ["--cluster-cidr", state.cluster_cidr]
            if state.lb_algorithm != "random":
                argv += ["--lb-algorithm", state.lb_algorithm]
            full = self.net.exec_argv(node.ns, argv)
            procs.append(
                (
                    full,
                    subprocess.Popen(
                        full,
                        env=python_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        errors = []
        for full, proc in procs:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                errors.append(CommandError(full, proc.returncode, err))
        if errors:
            raise errors[0]

    # ------------------------------------------------------------ using the lab

    def namespace_of(self, target: str, state: LabState | None = None) -> str:
        """The namespace of ``external``, a node, a pod, or ``net`` (the switch)."""
        plan = self.plan(state)
        if target == "external":
            return plan.external.ns
        if target == "net":
            return plan.switch_ns
        for node in plan.nodes:
            if node.name == target:
                return node.ns
        pod = _find_pod(plan.objects, target)
        return next(p.ns for p in plan.pods if p.key == pod.key)

    def address_of(self, target: str, state: LabState | None = None) -> str:
        """An IP, a node's lab address, a Service's ClusterIP, or a pod's IP."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.IPv4Address(target))
        plan = self.plan(state)
        for node in plan.nodes:
            if node.name == target:
                return node.lab_ip
        svc = _find_service(plan.objects, target)
        if svc is not None:
            if not svc.cluster_ip or svc.headless:
                raise LabError(f"Service {svc.key} has no ClusterIP")
            return svc.cluster_ip
        pod = _find_pod(plan.objects, target)
        assert pod.pod_ip is not None
        return pod.pod_ip

    def probe(
        self,
        source: str,
        target: str,
        port: int,
        *,
        proto: str = "tcp",
        n: int = 100,
        timeout: float = 1.0,
        source_ip: str | None = None,
    ) -> ProbeResult:
        state = self.reconcile()
        ns = self.namespace_of(source, state)
        ip = self.address_of(target, state)
        argv = [sys.executable, "-m", "kubeproxy.lab.probe", "--to", ip, "--port", str(port)]
        argv += ["--proto", proto, "-n", str(n), "--timeout", str(timeout)]
        if source_ip:
            argv += ["--source", source_ip]
        full = self.net.exec_argv(ns, argv)
        proc = subprocess.run(
            full,
            env=python_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=30 + n * timeout * 2,
        )
        if proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return ProbeResult.from_json(json.loads(proc.stdout))

    def exec(self, target: str, argv: Sequence[str], **kwargs: Any) -> int:
        ns = self.namespace_of(target, self.reconcile())
        return subprocess.run(self.net.exec_argv(ns, list(argv)), check=False, **kwargs).returncode

    def node_rules(self, node: str | None = None) -> str:
        """The live rules of a node: ``iptables-save`` or the nftables kube-proxy table."""
        state = self.reconcile()
        plan = self.plan(state)
        ns = plan.node(node).ns if node else plan.nodes[0].ns
        if state.mode == "nftables":
            argv = ["nft", "list", "table", "ip", "kube-proxy"]
            return subprocess.run(
                self.net.exec_argv(ns, argv), capture_output=True, text=True, check=False
            ).stdout
        return self._iptables(ns, "save")

    def iptables_binary(self, ns: str) -> str:
        """The iptables variant (nft or legacy backend) that holds kube-proxy's rules."""
        for binary in ("iptables", "iptables-nft", "iptables-legacy"):
            argv = self.net.exec_argv(ns, [f"{binary}-save", "-t", "nat"])
            with contextlib.suppress(OSError):
                out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
                if "KUBE-SERVICES" in out:
                    return binary
        return "iptables"

    def _iptables(self, ns: str, what: str) -> str:
        binary = self.iptables_binary(ns)
        argv = self.net.exec_argv(ns, [f"{binary}-save"] if what == "save" else [binary])
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


# ---------------------------------------------------------------- helpers


def _documents(objects: LabObjects) -> tuple[JSON, ...]:
    return (
        *(n.raw for n in objects.nodes),
        *(p.raw for p in objects.pods),
        *(s.raw for s in objects.services),
        *objects.slices,
    )


def _doc_key(doc: JSON) -> str:
    meta = doc.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name')}"


def _display(namespace: str, name: str) -> str:
    return name if namespace == "default" else f"{namespace}/{name}"


def _find_pod(objects: LabObjects, ref: str) -> Pod:
    if "/" in ref:
        matches = [p for p in objects.pods if p.key == ref]
    else:
        matches = [p for p in objects.pods if p.name == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LabError(f"no Pod, Node or Service {ref!r} in the lab")
    raise LabError(f"Pod name {ref!r} is ambiguous; use NAMESPACE/NAME")


def _find_service(objects: LabObjects, ref: str) -> Service | None:
    name, _, namespace = ref.partition(".")
    for svc in objects.services:
        if svc.name == name and svc.namespace == (namespace or "default"):
            return svc
    return None


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def is_lab_process(pid: int, lab: str) -> bool:
    """Whether pid runs one of this lab's own programs (checked before killing it)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    mine = any(m.encode() in argv for m in (SERVER_MODULE, REAPER_MODULE))
    named = any(a == b"--lab" or a == b"--name" for a in argv) and lab.encode() in argv
    return mine and named


def _kill(pids: Sequence[int], lab: str, grace: float = 2.0) -> None:
    """SIGTERM then SIGKILL, by PID. Recorded PIDs are checked to still be this lab's
    programs; PIDs found inside lab namespaces are the lab's by construction."""
    targets = sorted({p for p in pids if p != os.getpid() and alive(p)})
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_children(targets)
        if not any(alive(p) for p in targets):
            return
        time.sleep(0.02)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    _reap_children(targets)


def _reap_children(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _reaper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {REAPER_MODULE}")
    parser.add_argument("command", choices=["reap"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--base", default=str(DEFAULT_BASE))
    parser.add_argument("--at", type=float, required=True)
    args = parser.parse_args(argv)
    time.sleep(max(0.0, args.at - time.time()))
    lab = Lab(args.name, base=Path(args.base))
    if not lab.store.exists():
        return 0
    try:
        lab.reconcile()
    except LabError as exc:
        print(f"reaper: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_reaper_main(sys.argv[1:]))
