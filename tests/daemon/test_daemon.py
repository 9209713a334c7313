"""`kubeproxy run` end to end: the real API server, the real daemon, the real kernel.

Everything that writes rules runs inside a network namespace this test creates
(``kpd-<random>``) and deletes, also on failure. The API server runs in the root
namespace on 127.0.0.1 and, through its ``--netns`` listener, on 127.0.0.1 inside ours;
the daemon runs in ours with ``ip netns exec`` and reaches it with ``--master``. Objects
are created through the API; what the daemon did is read back with iptables-save / nft
and over its healthz and metrics endpoints. Waits poll with a deadline, never sleep a
fixed time. Every process started here is stopped by its PID.

A second, unprivileged test runs the daemon's main loop in this process against an
in-process API server and a fake data plane: the wiring without the kernel.
"""

from __future__ import annotations

import ctypes
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from kubeproxy import modes
from kubeproxy.apiserver import ApiServer, ServerConfig
from kubeproxy.app.daemon import Daemon
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.base import NetnsRunner, SubprocessRunner
from kubeproxy.health.server import Health, Metrics
from kubeproxy.lab import cgroups
from kubeproxy.model import NamespacedName
from kubeproxy.modes.base import DataPlane, PlaneCounts, PlaneOptions
from kubeproxy.proxier import Proxier
from kubeproxy.sources.client import Client
from kubeproxy.sources.informer import Backoff, Informer, resources
from kubeproxy.sources.kubeconfig import ClusterAccess
from kubeproxy.trace.result import Packet
from tests.builders import Obj, endpoint, endpoint_slice, node

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
NS_API_PORT, HEALTHZ_PORT, METRICS_PORT = 6443, 10256, 10249
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SERVICES = "/api/v1/namespaces/default/services"
CLONE_NEWNET = 0x40000000
NODE_IP = "192.168.0.2"
POD_IP = "10.180.7.7"  # a pod of this node (in --cluster-cidr) that is no endpoint
needs_root = pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux",
                                reason="needs root to create network namespaces")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def eventually(what: Callable[[], T | None], timeout: float = 15.0, every: float = 0.1,
               message: str | Callable[[], str] = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not within {timeout}s: {text}")
        time.sleep(every)  # polling interval, bounded by the deadline above


# --- the API, from the root namespace ----------------------------------------------


def call(url: str, method: str, path: str, body: Obj | None = None) -> Obj:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: Obj = json.loads(resp.read())
        return doc


def web_service(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": 80}]}}


def web_slice(service: str, ip: str, *, name: str | None = None,
              labels: dict[str, str] | None = None) -> Obj:
    obj = endpoint_slice(service, [endpoint(ip, "node1")], "default", name=name,
                         ports=[("http", 8080, "TCP")], labels=labels)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": now}
    return obj


# --- inside the namespace ----------------------------------------------------------


def ns_connect(ns: str, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside namespace ns (from a throwaway thread)."""
    out: list[socket.socket | OSError] = []

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                out.append(OSError(ctypes.get_errno(), "setns"))
                return
            try:
                out.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError as err:
                out.append(err)
            finally:
                libc.setns(own, CLONE_NEWNET)
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if isinstance(out[0], OSError):
        raise out[0]
    return out[0]


def ns_get(ns: str, port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of a GET inside the namespace; None when nothing answers."""
    try:
        sock = ns_connect(ns, port)
    except OSError:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def in_ns(ns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout if done.returncode == 0 else ""


def leftovers(ns: str) -> str:
    """Every rule of the namespace, whichever mode or backend wrote it."""
    return "".join(in_ns(ns, *argv) for argv in (
        ("nft", "list", "ruleset"), ("iptables-legacy-save",), ("iptables-nft-save",)))


def metric(text: str, name: str) -> float:
    """A metric's value over its series (per IP family): summed, or the newest for a
    timestamp."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((name + " ", name + "{"))]
    if not values:
        raise AssertionError(f"no {name} in /metrics")
    return max(values) if name.endswith("_timestamp_seconds") else sum(values)


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def plane_options(mode: str, tmp_path: Path) -> Iterator[PlaneOptions]:
    """The data-plane options of the daemon under test. A mode that attaches to a cgroup
    gets a child cgroup of its own (kpt-...), bind-mounted where the daemon sees it
    (``ip netns exec`` remounts /sys), and a private bpffs, both made here in the root
    mount namespace (so this test reads the same pins) and removed even on failure."""
    if reason := modes.get(mode).kernel_support(SubprocessRunner()):
        pytest.skip(f"{mode} mode: {reason}")
    if not modes.get(mode).needs_cgroup:
        yield PlaneOptions()
        return
    cgroup = bpf_sys.cgroup2_root() / f"kpt-{uuid.uuid4().hex[:8]}"
    seen, bpf = tmp_path / "cgroup", tmp_path / "bpf"
    cgroup.mkdir()
    try:
        seen.mkdir()
        cgroups.bind_mount(cgroup, seen)
        bpf_sys.ensure_bpffs(bpf)
        yield PlaneOptions(cgroup_path=str(seen), bpf_dir=str(bpf))
    finally:
        bpf_sys.remove_bpffs(bpf)
        if bpf_sys.fs_type(seen) == "cgroup2":
            cgroups.unmount(seen)
        cgroup.rmdir()


def plane_flags(options: PlaneOptions) -> list[str]:
    return ["--cgroup-path", options.cgroup_path, "--bpf-dir", options.bpf_dir] \
        if options.cgroup_path else []


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGTERM this one process (by PID), then SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


@pytest.fixture
def apiserver(netns: str, tmp_path: Path) -> Iterator[str]:
    """The API server (history of 12 changes, so a burst forces 410); yields its URL."""
    kubeconfig = tmp_path / "api.kubeconfig"
    log = (tmp_path / "apiserver.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeproxy.apiserver", "--listen", "127.0.0.1:0",
         "--netns", f"{netns}:127.0.0.1:{NS_API_PORT}", "--history", "12",
         "--bookmark-interval", "1", "--kubeconfig-out", str(kubeconfig)],
        stdout=log, stderr=log, env=env())
    try:
        eventually(lambda: kubeconfig.exists() or proc.poll() is not None, 30,
                   message="the API server writes its kubeconfig")
        assert proc.poll() is None, (tmp_path / "apiserver.log").read_text()
        match = re.search(r"server: (\S+)", kubeconfig.read_text())
        assert match
        yield match.group(1)
    finally:
        stop(proc)
        log.close()


# --- the root test -----------------------------------------------------------------


def start_proxy(ns: str, tmp_path: Path, mode: str, log: IO[bytes],
                options: PlaneOptions) -> subprocess.Popen[bytes]:
    """`kubeproxy run` inside the namespace; its kubeconfig's server is overridden."""
    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://192.0.2.1:1'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "kubeproxy", "run",
         "--kubeconfig", str(tmp_path / "kubeconfig"),
         "--master", f"http://127.0.0.1:{NS_API_PORT}", "--hostname-override", "node1",
         "--proxy-mode", mode, "--cluster-cidr", "10.180.0.0/16",
         "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}",
         "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
         "--iptables-min-sync-period", "100ms", "--iptables-sync-period", "10s",
         *plane_flags(options)],
        stdout=log, stderr=log, env=env())


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize("mode", modes.NAMES)
def test_run_converges_relists_and_cleans_up(netns: str, apiserver: str, tmp_path: Path,
                                             mode: str, plane_options: PlaneOptions) -> None:
    url = apiserver
    call(url, "POST", "/api/v1/nodes", node("node1", ips=[NODE_IP]))
    log_path = tmp_path / "proxy.log"
    log = log_path.open("wb")
    proc = start_proxy(netns, tmp_path, mode, log, plane_options)

    def proxy_log() -> str:
        return log_path.read_text()

    try:
        check = Checks(netns, mode, proxy_log, plane_options)
        eventually(lambda: "full sync" in proxy_log(), 30, message="the first sync")
        svc = call(url, "POST", SERVICES, web_service("web"))
        ip = svc["spec"]["clusterIP"]
        call(url, "POST", SLICES, web_slice("web", "10.180.0.5", name="web-1"))
        check.forwards("web", ip, "10.180.0.5")

        call(url, "DELETE", f"{SLICES}/web-1")
        check.rejects("web", ip)

        # Twenty slices for "web", then all deleted in one request: more changes at once
        # than the server's history of 12, so every watch gets 410 Gone and never sees
        # those DELETEs. Only the relist can tell the proxy that web is empty again.
        for i in range(20):
            call(url, "POST", SLICES, web_slice("web", f"10.180.1.{i}", name=f"junk-{i}",
                                                labels={"junk": "y"}))
        check.forwards("web", ip, "10.180.1.19")
        call(url, "DELETE", f"{SLICES}?labelSelector=junk%3Dy")
        eventually(lambda: re.search(r"watch: 410 .*relisting", proxy_log()),
                   message="a 410 and a relist")
        late = call(url, "POST", SERVICES, web_service("late"))["spec"]["clusterIP"]
        call(url, "POST", SLICES, web_slice("late", "10.180.0.9", name="late-1"))
        check.forwards("late", late, "10.180.0.9")
        check.rejects("web", ip)

        check.health_and_metrics(mode)
        assert stop(proc) == 0, proxy_log()
        assert "stopping" in proxy_log()
        assert check.outcome(late) == ("DNAT", ("10.180.0.9:8080",)), \
            "rules stay when the proxy stops"

        cleanup = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m",
                                  "kubeproxy", "run", "--cleanup",
                                  *plane_flags(plane_options)[2:]], env=env(),
                                 capture_output=True, text=True, timeout=60, check=False)
        assert cleanup.returncode == 0, cleanup.stderr
        leftover = leftovers(netns)
        assert "KUBE-" not in leftover and "kube-proxy" not in leftover, leftover
        if plane_options.bpf_dir:  # no program on the cgroup, no pin
            assert "attached: (none)" in check.plane.rules()
            assert not any(Path(plane_options.bpf_dir).rglob("*"))
    finally:
        stop(proc)
        log.close()


class Checks:
    """What the kernel does with a pod's packet to a ClusterIP, read from the live rules
    with the mode's own tracer (so the checks hold for every mode)."""

    def __init__(self, ns: str, mode: str, proxy_log: Callable[[], str],
                 options: PlaneOptions) -> None:
        self.ns, self.proxy_log = ns, proxy_log
        self.mode = modes.get(mode)
        self.plane = self.mode.data_plane(NetnsRunner(ns), options)

    def outcome(self, ip: str) -> tuple[str, tuple[str, ...]]:
        packet = Packet(src=ipaddress.ip_address(POD_IP), dst=ipaddress.ip_address(ip),
                        port=80, proto="tcp", in_interface="eth0")
        result = self.mode.trace_rules(self.plane.rules(), packet,
                                       frozenset({ipaddress.ip_address(NODE_IP)}))
        return result.verdict, tuple(result.endpoints)

    def forwards(self, name: str, ip: str, endpoint_ip: str) -> None:
        def ok() -> bool:
            verdict, endpoints = self.outcome(ip)
            return verdict == "DNAT" and f"{endpoint_ip}:8080" in endpoints

        eventually(ok, message=lambda: f"{name} ({ip}) forwarding to {endpoint_ip}: "
                   f"{self.outcome(ip)}\n{self.plane.rules()}\n{self.proxy_log()}")

    def rejects(self, name: str, ip: str) -> None:
        eventually(lambda: self.outcome(ip) == ("REJECT", ()),
                   message=lambda: f"a REJECT for {name} ({ip}): {self.outcome(ip)}\n"
                   f"{self.plane.rules()}\n{self.proxy_log()}")

    def health_and_metrics(self, mode: str) -> None:
        status, body = eventually(lambda: ns_get(self.ns, HEALTHZ_PORT, "/healthz"),
                                  message="healthz answers")
        doc = json.loads(body)
        assert status == 200 and doc["nodeEligible"] is True
        assert set(doc) == {"lastUpdated", "currentTime", "nodeEligible"}
        livez = ns_get(self.ns, HEALTHZ_PORT, "/livez")
        assert livez is not None and livez[0] == 200
        assert ns_get(self.ns, METRICS_PORT, "/proxyMode") == (200, mode)
        answer = ns_get(self.ns, METRICS_PORT, "/metrics")
        assert answer is not None and answer[0] == 200
        text = answer[1]
        p = "kubeproxy_"
        assert metric(text, p + "sync_proxy_rules_service_changes_total") >= 2
        assert metric(text, p + "sync_proxy_rules_endpoint_changes_total") >= 3
        assert metric(text, p + "sync_full_proxy_rules_duration_seconds_count") >= 1
        assert metric(text, p + "sync_partial_proxy_rules_duration_seconds_count") >= 1
        assert metric(text, p + "network_programming_duration_seconds_count") >= 1
        assert metric(text, p + "sync_proxy_rules_last_timestamp_seconds") > 1.6e9


# --- the wiring, without root --------------------------------------------------------


class RecordingPlane:
    """A mode's data plane over the package's strict fake kernel, recording syncs."""

    def __init__(self, inner: DataPlane[Any]) -> None:
        self.inner = inner
        self.calls: list[frozenset[NamespacedName] | None] = []

    def sync(self, ruleset: Any, changed: frozenset[NamespacedName] | None = None) -> None:
        self.inner.sync(ruleset, changed)
        self.calls.append(changed)

    def cleanup(self) -> None:
        self.inner.cleanup()

    def rules(self) -> str:
        return self.inner.rules()

    def intact(self) -> bool:
        return self.inner.intact()

    def counts(self) -> PlaneCounts:
        return self.inner.counts()


@pytest.mark.parametrize("mode_name", modes.NAMES)
def test_daemon_loop_in_process(mode_name: str) -> None:
    """Informers -> queue -> tracker -> sync loop -> Proxier(mode) -> fake kernel, stop()."""
    server = ApiServer(ServerConfig(bookmark_interval=0.2)).start()
    config = ProxyConfig(hostname="node1", mode=mode_name, min_sync_period=0.05,
                         sync_period=5.0)
    mode = modes.get(mode_name)
    plane = RecordingPlane(mode.fake())
    health, metrics = Health(10.0), Metrics(mode_name)
    daemon = Daemon(config, Proxier(mode, config, plane), health=health, metrics=metrics)
    client = Client(ClusterAccess(server.url))
    informers = [Informer(client, r, daemon.emit, watch_timeout=(30, 60),
                          backoff=Backoff(0.01, 0.05)).start()
                 for r in resources("node1")]
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        call(server.url, "POST", "/api/v1/nodes", node("node1"))
        call(server.url, "POST", SERVICES, web_service("web"))
        call(server.url, "POST", SLICES, web_slice("web", "10.180.0.5", name="web-1"))
        eventually(lambda: "10.180.0.5" in plane.rules(), 10, 0.02,
                   "the fake kernel holding the endpoint")
        assert plane.calls[0] is None, "the first sync is full"
        assert health.answer(node=True)[0] == 200
    finally:
        daemon.stop()
        thread.join(5)
        for informer in informers:
            informer.stop()
        server.stop()
    assert not thread.is_alive()
    assert metric(metrics.render(), "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.6e9
