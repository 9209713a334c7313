"""Faults of the lab's API server: restarted, and stopped (hung) for a while.

While the fault lasts, a prober in the client pod keeps calling a Service the fault does
not touch: no probe may fail (the rules stay in the kernel whatever the API does). After
it, a Service created through the API must reach the node's rules (a probe to it
succeeds), which shows the proxies and the agent follow the API again.

- Restart (``Lab.restart_apiserver``): the API server comes back on the same port with the
  same objects, UIDs and resourceVersions; the agent reaches the new server for every kind.
- Hung (SIGSTOP, then SIGCONT): an informer with a short stall bound, built as the daemon
  builds its own, notices the silent watch, gives it up and re-watches from its last
  resourceVersion (no relist); the agent (bound ``watchcache.STALL_TIMEOUT``) relists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kubeproxy.lab import watchcache
from kubeproxy.lab.agent import KINDS, AgentStatus
from kubeproxy.lab.processes import python_env
from kubeproxy.lab.runtime import Lab
from kubeproxy.sources.client import Client
from kubeproxy.sources.informer import Backoff, Informer, Replace, Resource
from kubeproxy.sources.kubeconfig import load_kubeconfig
from kubeproxy.tracker import Update
from tests.kernel.conftest import PROXIES_ENV, MakeLab, mode_tag, proxy_source

pytestmark = pytest.mark.kernel

LAB = """
kind: Node
metadata: {name: node-1}
---
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
kind: Pod
metadata: {name: client}
spec: {containers: [{name: c}]}
---
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""
STALL = 1.0  # the test informer's stall bound, seconds
STOPPED_FOR = watchcache.STALL_TIMEOUT + 2.0  # longer than every bound but the proxies'


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktflt{mode_tag(mode)}", LAB, mode=mode)


class Prober:
    """Probes ``web`` from the client pod in a loop, without asking the API anything."""

    def __init__(self, lab: Lab) -> None:
        ns, ip = lab.namespace_of("client"), lab.address_of("web")
        self.argv = lab.net.exec_argv(ns, [sys.executable, "-m", "kubeproxy.lab.probe",
                                           "--to", ip, "--port", "80", "-n", "10",
                                           "--timeout", "0.5"])
        self.sent = 0
        self.failed: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = subprocess.run(self.argv, env=python_env(), capture_output=True, text=True,
                                  check=False, timeout=60)
            if proc.returncode != 0:
                self.errors.append(proc.stderr[-500:])
                continue
            result = json.loads(proc.stdout)
            self.sent += result["sent"]
            for kind, n in result["failed"].items():
                self.failed[kind] = self.failed.get(kind, 0) + n

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(90)
        assert not self.errors, self.errors
        assert self.sent >= 10, "the prober ran through the fault"
        assert sum(self.failed.values()) == 0, f"{self.failed} of {self.sent} probes failed"


def service(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}


def assert_reachable(lab: Lab, name: str) -> None:
    result = lab.probe("client", name, 80, n=20, timeout=0.5)
    assert result.ok == 20 and set(result.backends) == {"web-1", "web-2"}, result


def agent_connections(lab: Lab) -> dict[str, int]:
    status = AgentStatus.read(lab.store.agent_status)
    assert status is not None
    return status.connections


def test_api_server_restart_keeps_state_and_the_lab_follows(lab: Lab) -> None:
    before = lab.state()
    api = lab.api(before)
    uids = {s["metadata"]["name"]: s["metadata"]["uid"] for s in api.list("Service")[0]}
    rv = api.resource_version()
    connections = agent_connections(lab)
    with Prober(lab).running():
        after = lab.restart_apiserver()
    assert after.api_port == before.api_port, "the root-namespace port is the lab's for life"
    assert after.processes.apiserver != before.processes.apiserver
    api = lab.api(after)
    assert {s["metadata"]["name"]: s["metadata"]["uid"] for s in api.list("Service")[0]} == uids
    assert api.resource_version() >= rv, "resourceVersions go on from where they were"
    now = agent_connections(lab)
    assert all(now[k] > connections[k] for k in KINDS), (connections, now)
    assert_reachable(lab, "web")
    api.create(service("after-restart"))
    assert_reachable(lab, "after-restart")


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: set[str] = set()

    def emit(self, item: Update | Replace) -> None:
        with self.lock:
            for update in item.updates if isinstance(item, Replace) else (item,):
                if update.obj is not None or update.error is not None:
                    self.names.add(update.key.name)
                else:
                    self.names.discard(update.key.name)

    def wait_for(self, name: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if name in self.names:
                    return
            assert time.monotonic() < deadline, f"{name} not seen; have {self.names}"
            time.sleep(0.05)  # polling, bounded by the deadline


def test_hung_api_server_is_noticed_and_the_lab_follows(lab: Lab) -> None:
    state = lab.state()
    pid = state.processes.apiserver
    assert pid is not None
    sink = Sink()
    informer = Informer(Client(load_kubeconfig(lab.store.kubeconfig)),
                        Resource("Service", "/api/v1/services"), sink.emit,
                        watch_timeout=(300, 600), stall_timeout=STALL,
                        backoff=Backoff(initial=0.1, cap=0.5)).start()
    try:
        sink.wait_for("web")
        before = agent_connections(lab)
        with Prober(lab).running():
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(STOPPED_FOR)  # the fault: a stopped API server, sockets open
            finally:
                os.kill(pid, signal.SIGCONT)
            lab.api(state).create(service("after-stop"))
            sink.wait_for("after-stop")
        assert informer.stalls >= 1, "the silent watch was noticed"
        assert informer.lists == 1, "re-watched from its resourceVersion, no relist"
    finally:
        informer.stop()
    assert_reachable(lab, "after-stop")
    assert_reachable(lab, "web")
    now = agent_connections(lab)
    assert all(now[k] > before[k] for k in KINDS), ("the agent gave up its hung watches",
                                                    before, now)


def mentions(rules: str, ip: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?!\d)", rules) is not None


def test_proxy_restart_converges_with_no_stale_rules(lab: Lab) -> None:
    """The proxy stopped (its rules stay in the kernel), a Service deleted and another
    created meanwhile, the proxy started again: its first sync removes every rule of
    the deleted Service and writes the new one, while ``web`` never stops answering."""
    if proxy_source() != "lab":
        pytest.skip(f"{PROXIES_ENV}={proxy_source()}: stops and starts the lab's own "
                    "proxies (Lab.restart_proxies) around changes; a DaemonSet's are not")
    api = lab.api()
    api.create(service("doomed"))
    lab.settle()
    assert_reachable(lab, "doomed")
    doomed = lab.address_of("doomed")
    assert mentions(lab.node_rules(), doomed), "the check below can see a stale rule"

    def while_stopped() -> None:
        assert mentions(lab.node_rules(), doomed), "a stopped proxy leaves its rules"
        api.create(service("born"))  # first, so that it cannot take doomed's ClusterIP
        api.delete("Service", "default", "doomed")

    with Prober(lab).running():
        lab.restart_proxies(between=while_stopped)
    rules = lab.node_rules()
    assert not mentions(rules, doomed), f"stale rules for {doomed}:\n{rules}"
    assert_reachable(lab, "born")
    assert_reachable(lab, "web")
