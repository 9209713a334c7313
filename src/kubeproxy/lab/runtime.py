"""A running lab: bring it up, change it through its API server, probe it, take it down.

Theory of operation
-------------------
``Lab`` is the Python API the CLI and the kernel tests share. A lab is four kinds of
processes around one API server, all started detached by ``up`` and recorded by PID in
the lab's ``LabStore`` (``/run/kubeproxy-lab/<name>/``):

``kubeproxy.apiserver``  in the root namespace, on 127.0.0.1:<free port> (kubectl, the
                         agent, ``lab`` commands) and on 127.0.0.1:6443 *inside* each
                         node namespace (that node's proxy): a loopback address is
                         reachable only from its own namespace, so nothing else (pods,
                         the external client, other machines) can reach the API;
``kubeproxy.lab.agent``  in the root namespace: kubelet, CNI, scheduler, endpoint and
                         LoadBalancer controllers (agent.py);
``kubeproxy run``        one per node, inside the node namespace: the real proxy
                         daemon, watching the API and writing that node's rules;
pod servers              one per Pod, inside the Pod's namespace, started by the agent
                         (a host-network Pod with a command runs it in its node's);
``kubeproxy.lab.daemonsets``  in the root namespace: the DaemonSet controller (its PID
                         in ``daemonsets.pid``). ``up --no-proxy`` starts no proxies:
                         a DaemonSet (``deploy/``) brings them.

``up`` plans the network (layout), builds the namespaces that do not come and go
(switch, nodes, external client), starts the API server, creates the objects through it
(objects.py), starts the agent and the proxies, and waits until every node's rules hold
everything (converge.py). Changes (``set_pod_ready``, ``delete_pod``, and anything done
with kubectl) are API writes; the commands that make them, and ``probe``, return only
once the change reached every node's rules (``settle``). ``down`` stops the agent, then
every process in a lab namespace, the proxies and the API server, and deletes the
namespaces and the lab's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubeproxy import modes
from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.errors import DataPlaneError, LabError
from kubeproxy.lab import (
    cgroups,
    containers,
    converge,
    daemonsets,
    hostpods,
    layout,
    network,
    objects,
    view,
)
from kubeproxy.lab import pki as lab_pki
from kubeproxy.lab.agent import KINDS as AGENT_KINDS
from kubeproxy.lab.agent import AgentStatus
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.errors import CommandError, LabStateError
from kubeproxy.lab.manifest import parse_objects
from kubeproxy.lab.netns import Netns, lab_namespace
from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.processes import (
    AGENT_MODULE,
    APISERVER_MODULE,
    PROXY_MODULE,
    is_lab_process,
    kill,
    log_tail,
    python_env,
    spawn,
    time_scale,
)
from kubeproxy.lab.state import DEFAULT_BASE, LabState, LabStore, Processes, write_atomic
from kubeproxy.lab.view import LivePod
from kubeproxy.sources.kubeconfig import load_kubeconfig
from kubeproxy.util.jsontypes import JSON

log = logging.getLogger("kubeproxy.lab")
MODES = modes.NAMES
LB_ALGORITHMS = ("random", "round-robin")
PROXY_WATCH_STALL = 5.0  # seconds: the proxies give up a silent watch this fast
NODE_API_PORT = 6443  # the API server inside each node namespace, on 127.0.0.1
BOOKMARK_INTERVAL = 0.2  # seconds; how closely the agent's caches follow the API
START_TIMEOUT = 20.0


def proxy_flags(state: LabState, node: str) -> list[str]:
    """The flags of node ``node``'s ``kubeproxy run`` (besides its kubeconfig)."""
    return ["--hostname-override", node, "--proxy-mode", state.mode,
            "--cluster-cidr", state.cluster_cidr, "--lb-algorithm", state.lb_algorithm,
            # The lab's API server sends bookmarks every fraction of a second.
            "--watch-stall-timeout", f"{PROXY_WATCH_STALL * time_scale():g}s",
            "--healthz-bind-address", f"127.0.0.1:{converge.HEALTHZ_PORT}",
            "--metrics-bind-address", f"127.0.0.1:{converge.METRICS_PORT}"]  # fmt: skip


@dataclass(frozen=True)
class UpOptions:
    mode: str = "iptables"
    lb_algorithm: str = "random"
    cluster_cidr: str = layout.DEFAULT_CLUSTER_CIDR
    service_cidr: str = layout.DEFAULT_SERVICE_CIDR
    external_node: str | None = None
    proxies: bool = True  # False (--no-proxy): no `kubeproxy run` per node; deploy/ brings one
    images: bool = True  # False (--no-images): DaemonSet Pods never run from their image


def read_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise LabError(f"cannot read {path}: {exc}") from exc
        out.append((path, text))
    return out


def _with_status(status: JSON, current: JSON) -> JSON:
    return {**current, "status": status}


class Lab:
    def __init__(
        self, name: str = "lab", *, base: Path = DEFAULT_BASE, net: Netns | None = None
    ) -> None:
        self.name = layout.check_lab_name(name)
        self.store = LabStore(name, base)
        self.net = net or Netns()
        self.prefix = layout.ns_prefix(name)

    # ------------------------------------------------------------ up / down

    def up(self, documents: Sequence[JSON], options: UpOptions = UpOptions()) -> LabState:
        if options.mode not in MODES:
            raise LabError(f"--mode must be one of {', '.join(MODES)}")
        if options.lb_algorithm not in LB_ALGORITHMS:
            raise LabError(f"--lb-algorithm must be one of {', '.join(LB_ALGORITHMS)}")
        objects_ = parse_objects(documents)
        with self.store.lock():
            if self.store.exists() or self.net.list_namespaces(self.prefix):
                raise LabStateError(
                    f"lab {self.name!r} is already up (or left over); "
                    f"run `kubeproxy lab down --name {self.name}` first"
                )
            plan = layout.plan(
                self.name,
                objects_,
                layout.Options(options.cluster_cidr, options.service_cidr, options.external_node),
            )
            bodies, statuses = objects.api_objects(plan, documents, time.time())
            state = LabState(
                name=self.name, mode=options.mode, lb_algorithm=options.lb_algorithm,
                cluster_cidr=plan.cluster_cidr, service_cidr=plan.service_cidr,
                external_node=options.external_node, switch_ns=plan.switch_ns,
                nodes=plan.nodes, external=replace(plan.external, routes=()),
                pod_images=options.images,
            )  # fmt: skip
            self.store.prepare()
            self.store.save(state)
            if not options.proxies:  # remembered for `lab status` and the waits
                write_atomic(self.no_proxy_file, "started with --no-proxy\n")
            try:
                network.build_base(self.net, replace(plan, external=state.external))
                if modes.get(options.mode).needs_cgroup:  # before any pod or proxy starts
                    cgroups.create(self.name, self.store.dir, [n.name for n in plan.nodes])
                state = self._start_apiserver(state)
                self._create(self.api(state), bodies, statuses)
                state = self._start_agent(state)
                self._start_daemonsets()
                # The proxies start once the Pods run and the slices are written, so their
                # first sync has it all (a second one would wait out the min sync period).
                self._wait_for_agent(state)
                if options.proxies:
                    state = self._start_proxies(state)
                    self._settle(state)
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
        recorded = Processes()
        if self.store.exists():
            with contextlib.suppress(LabStateError):
                recorded = self.store.load().processes
        mine = [p for p in recorded.all() if is_lab_process(p, self.name, self.store.dir)]
        # The agent first, so that no Pod starts while the rest is being stopped.
        daemonsets.stop(self.store)
        kill([p for p in mine if p == recorded.agent])
        pids = [p for p in mine if p != recorded.agent]
        for ns in self.net.list_namespaces(self.prefix):
            with contextlib.suppress(CommandError):
                pids += self.net.pids(ns)
        kill(pids)  # pod servers, proxies, and the API server (its sockets in the nodes)
        containers.Podman().remove_lab(self.name)  # DaemonSet Pods run from their image
        cgroups.remove(self.name, self.store.dir)  # programs detached, mounts, cgroups
        gone = network.teardown(self.net, self.prefix)
        hostpods.remove_mountpoints(self.store)  # host-network Pods' empty mount points
        self.store.remove()
        return gone

    def restart_apiserver(self, timeout: float = 30.0) -> LabState:
        """Stop the lab's API server and start it again: same port, same objects and
        resourceVersions (its state file). Returns once the agent has listed or watched
        every kind from the new server and every node's rules hold what the API holds."""
        with self.store.lock():
            state = self.state()
            before = AgentStatus.read(self.store.agent_status)
            pid = state.processes.apiserver
            if pid and is_lab_process(pid, self.name, self.store.dir):
                kill([pid])  # SIGTERM: the state file is current after every change
            state = self._start_apiserver(state)
            self.store.settled_file.unlink(missing_ok=True)
        self._wait_for_reconnect(before.connections if before else {}, timeout)
        self._settle(state)
        return state

    def restart_proxies(self, between: Callable[[], object] = lambda: None) -> LabState:
        """Stop every node's proxy (SIGTERM: its rules stay in the kernel, as upstream's
        do), call ``between`` (a test changes the API while no proxy runs), start them
        again and return once every node's rules hold what the API holds."""
        with self.store.lock():
            state = self.state()
            mine = [p for p in state.processes.proxies.values()
                    if is_lab_process(p, self.name, self.store.dir)]
            kill(mine)
            between()
            state = self._start_proxies(state)
            self.store.settled_file.unlink(missing_ok=True)
        self._settle(state)
        return state

    def _wait_for_reconnect(self, before: dict[str, int], timeout: float) -> None:
        timeout *= time_scale()
        deadline = time.monotonic() + timeout
        while True:
            now = AgentStatus.read(self.store.agent_status)
            count = now.connections if now else {}
            behind = sorted(k for k in AGENT_KINDS if count.get(k, 0) <= before.get(k, 0))
            if not behind:
                return
            if time.monotonic() > deadline:
                raise LabError(f"the agent did not reach the restarted API server for "
                               f"{', '.join(behind)} within {timeout:g} s:\n"
                               f"{log_tail(self.store.log_file('agent'))}")
            time.sleep(0.05)

    # ------------------------------------------------------------ starting processes

    def _record(self, state: LabState, **pids: Any) -> LabState:
        state = replace(state, processes=replace(state.processes, **pids))
        self.store.save(state)  # PIDs first, so that a failure below still stops them
        return state

    def _start_apiserver(self, state: LabState) -> LabState:
        # A free port at `lab up`, the same one ever after (restart_apiserver): the agent
        # and kubeconfig users keep calling it. The state file carries the objects over.
        pki = lab_pki.ensure(self.store.pki_dir)  # made at `lab up`, kept by restarts
        argv = [sys.executable, "-m", APISERVER_MODULE, *lab_pki.apiserver_flags(pki),
                "--listen", f"127.0.0.1:{state.api_port or 0}",
                *(f"--netns={n.ns}:127.0.0.1:{NODE_API_PORT}" for n in state.nodes),
                "--service-cidr", state.service_cidr,
                "--bookmark-interval", str(BOOKMARK_INTERVAL),
                "--state", str(self.store.apiserver_state),
                "--pod-log-dir", str(self.store.logs_dir),
                "--kubeconfig-out", str(self.store.kubeconfig)]  # fmt: skip
        log = self.store.log_file("apiserver")
        self.store.kubeconfig.unlink(missing_ok=True)  # its appearance means "listening"
        proc = spawn(argv, log)
        state = self._record(state, apiserver=proc.pid)
        deadline = time.monotonic() + START_TIMEOUT * time_scale()
        while not self.store.kubeconfig.exists():  # written once every listener is up
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the lab's API server did not start:\n{log_tail(log)}")
            time.sleep(0.02)
        node_server = f"https://127.0.0.1:{NODE_API_PORT}"  # user system:kube-proxy
        write_atomic(self.store.node_kubeconfig, lab_pki.proxy_kubeconfig(pki, node_server), 0o600)
        port = urlsplit(load_kubeconfig(self.store.kubeconfig).server).port
        state = replace(state, api_port=port)
        self.store.save(state)
        return state

    def _create(self, api: LabApi, bodies: Sequence[JSON], statuses: Sequence[JSON]) -> None:
        """The lab's objects, in order; then the LoadBalancer statuses the plan chose."""
        writes = [(b, False) for b in bodies] + [(s, True) for s in statuses]
        for body, is_status in writes:
            meta = body.get("metadata") or {}
            what = f"{body['kind']} {objects.namespace_of(body)}/{meta.get('name')}"
            try:
                if is_status:
                    api.mutate(
                        "Service",
                        objects.namespace_of(body),
                        meta["name"],
                        partial(_with_status, body["status"]),
                        "status",
                    )
                else:
                    api.create(body)
            except LabApiError as exc:
                raise LabError(f"{what}: the API server refused it: {exc}") from exc

    def _start_agent(self, state: LabState) -> LabState:
        argv = [sys.executable, "-m", AGENT_MODULE, "--name", self.name,
                "--base", str(self.store.base)]  # fmt: skip
        return self._record(state, agent=spawn(argv, self.store.log_file("agent")).pid)

    def _start_daemonsets(self) -> None:
        """kube-controller-manager's DaemonSet controller (daemonsets.py); its PID is
        kept in its own file (state.json records the API server, agent and proxies)."""
        proc = spawn(daemonsets.argv(self.store), self.store.log_file("daemonsets"))
        daemonsets.record(self.store, proc.pid)

    @property
    def no_proxy_file(self) -> Path:
        return self.store.dir / "no-proxy"

    def proxies(self) -> bool:
        """Whether the lab runs its own proxy per node (not `lab up --no-proxy`)."""
        return not self.no_proxy_file.exists()

    def _start_proxies(self, state: LabState) -> LabState:
        proxies = {}
        for node in state.nodes:
            argv = [sys.executable, "-m", PROXY_MODULE, "run",
                    "--kubeconfig", str(self.store.node_kubeconfig),
                    *proxy_flags(state, node.name),
                    *cgroups.proxy_flags(self.store.dir, node.name)]  # fmt: skip
            log = self.store.log_file(f"proxy-{node.name}")
            proxies[node.name] = spawn(self.net.exec_argv(node.ns, argv), log).pid
        return self._record(state, proxies=proxies)

    # ------------------------------------------------------------ waiting

    def settle(self) -> None:
        """Return once everything written to the API so far is in every node's rules."""
        self._settle(self.state())

    def _settle(self, state: LabState) -> None:
        api = self.api(state)
        current = api.resource_version()
        with contextlib.suppress(OSError, ValueError):
            if int(self.store.settled_file.read_text()) == current:
                return  # nothing was written since the last wait
        status = self._wait_for_agent(state)
        nodes = {n.name: n.ns for n in state.nodes}
        if not self.proxies():  # --no-proxy: wait for the proxies that run (a DaemonSet's)
            nodes = {k: ns for k, ns in nodes.items() if converge.proxy_sample(ns) is not None}
        converge.wait_for_proxies(
            nodes,
            status.proxy_event,
            {n.name: self.store.log_file(f"proxy-{n.name}") for n in state.nodes},
            converge.PROXY_TIMEOUT * time_scale(),
        )
        if api.resource_version() <= status.seen:  # no one wrote meanwhile
            write_atomic(self.store.settled_file, str(status.seen))

    def _wait_for_agent(self, state: LabState) -> AgentStatus:
        return converge.wait_for_agent(
            self.api(state),
            self.store.agent_status,
            state.processes.agent,
            self.store.log_file("agent"),
            converge.AGENT_TIMEOUT * time_scale(),
        )

    # ------------------------------------------------------------ reading

    def state(self) -> LabState:
        return self.store.load()

    def api(self, state: LabState | None = None) -> LabApi:
        state = state or self.state()
        del state  # the kubeconfig names the port (state.api_port) and the admin credential
        return LabApi.from_kubeconfig(self.store.kubeconfig)

    @property
    def kubeconfig(self) -> Path:
        self.store.load()  # say so when the lab is not up
        return self.store.kubeconfig

    def pods(self) -> list[LivePod]:
        return [LivePod.from_api(o) for o in self.api().list("Pod")[0]]

    def find_pod(self, ref: str) -> LivePod:
        return view.find_pod(self.pods(), ref)

    def service(self, ref: str) -> JSON:
        svc = view.find_service(self.api().list("Service")[0], ref)
        if svc is None:
            raise LabError(f"no Service {ref!r} in the lab")
        return svc

    def slices(self) -> list[JSON]:
        return self.api().list("EndpointSlice")[0]

    def plan(self, state: LabState | None = None) -> layout.Plan:
        """The lab as it is now (its network plus what the API holds)."""
        state = state or self.state()
        api = self.api(state)
        lists = [api.list(k)[0] for k in ("Node", "Pod", "Service", "EndpointSlice")]
        return view.live_plan(state, *lists)

    # ------------------------------------------------------------ changing

    def set_pod_ready(self, ref: str, ready: bool) -> None:
        pod = self.find_pod(ref)
        self.api().mutate(
            "Pod",
            pod.namespace,
            pod.name,
            lambda cur: objects.with_ready(cur, ready, time.time()),
            "status",
        )
        self.settle()

    def delete_pod(self, ref: str, grace: float = 30.0, wait: bool = False) -> float:
        """Delete a Pod: terminating for grace seconds (rounded up), then gone.

        Returns the wall-clock time its grace period ends. Deleting a terminating Pod
        again with a shorter grace brings its end forward (``--grace 0``: now).
        """
        pod = self.find_pod(ref)
        seconds = max(0, math.ceil(grace))
        deadline = time.time() + seconds
        if pod.deletion_at is not None:
            deadline = min(deadline, pod.deletion_at + 1)  # the API keeps whole seconds
        self.api().delete("Pod", pod.namespace, pod.name, grace=seconds)
        self.settle()
        if wait:
            limit = time.monotonic() + max(0.0, deadline - time.time()) + 30
            while any(p.key == pod.key for p in self.pods()):
                if time.monotonic() > limit:
                    raise LabError(f"Pod {pod.key} is still there after its grace period")
                time.sleep(0.1)
            self.settle()
        return deadline

    # ------------------------------------------------------------ using the lab

    def namespace_of(self, target: str) -> str:
        """The namespace of ``external``, a node, a pod, or ``net`` (the switch)."""
        return view.namespace_of(self.state(), self.pods(), target)

    def address_of(self, target: str) -> str:
        """An IP, a node's lab address, a Service's ClusterIP, or a pod's IP."""
        state = self.state()
        return view.address_of(state, self.pods(), self.api(state).list("Service")[0], target)

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
        """n requests from source to target:port; first waits for the rules to catch up
        with the API (if they cannot, it says why on the log and probes anyway)."""
        try:
            self.settle()
        except LabError as exc:
            log.warning("probing a lab that has not caught up with its API: %s", exc)
        ns = self.namespace_of(source)
        ip = self.address_of(target)
        argv = [sys.executable, "-m", "kubeproxy.lab.probe", "--to", ip, "--port", str(port)]
        timeout *= time_scale()  # a slow CPU answers slowly (docs/vm.md)
        argv += ["--proto", proto, "-n", str(n), "--timeout", str(timeout)]
        if source_ip:
            argv += ["--source", source_ip]
        full = cgroups.in_cgroup(self.net.exec_argv(ns, argv), self._cgroup_of(source))
        proc = subprocess.run(
            full,
            env=python_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=30 * time_scale() + n * timeout * 2,
        )
        if proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return ProbeResult.from_json(json.loads(proc.stdout))

    def exec(self, target: str, argv: Sequence[str], **kwargs: Any) -> int:
        ns = self.namespace_of(target)
        full = cgroups.in_cgroup(self.net.exec_argv(ns, list(argv)), self._cgroup_of(target))
        return subprocess.run(full, check=False, **kwargs).returncode

    def _cgroup_of(self, target: str) -> Path | None:
        """The cgroup a process on ``target``'s behalf runs in: its node's, if the lab
        made cgroups (a socket-LB mode); None for ``external`` and ``net``."""
        if target in ("external", "net"):
            return None
        nodes = {n.name for n in self.state().nodes}
        node = target if target in nodes else self.find_pod(target).node
        return cgroups.node_cgroup(self.name, node) if node else None

    def node_rules(self, node: str | None = None) -> str:
        """The live rules of a node, as its mode's own tools print them."""
        state = self.state()
        try:
            ns = state.node(node).ns if node else state.nodes[0].ns
        except KeyError:
            raise LabError(f"no node {node!r} in lab {self.name!r}") from None
        runner = NetnsRunner(lab_namespace(ns), timeout=60)
        try:
            options = cgroups.plane_options(self.store.dir, node or state.nodes[0].name)
            return modes.get(state.mode).data_plane(runner, options).rules()
        except DataPlaneError as err:
            raise LabError(f"reading the rules of node {node or state.nodes[0].name}: {err}"
                           ) from err
