"""Daemon benchmark: one Service change, from the API server accepting it to the kernel.

An in-process API server holds N Services x 10 endpoints; a real ``kubeproxy run``
daemon watches it from inside a network namespace this benchmark creates (and deletes).
Then K single-object changes are made, one at a time, each timed from the moment the
API server committed it until packets follow it: a connect from inside the namespace to
the changed Service's ClusterIP reaches a real listener (``ok``), is refused (REJECT:
no endpoints) or goes nowhere (the Service is gone). The cycle per Service:

    service added   (its slice exists)   -> ok
    endpoint removed                     -> refused
    endpoint added                       -> ok
    service deleted                      -> timeout (no rule: the connect goes nowhere)

Last, the mode's service dispatch is flushed from outside (FLUSHES) and the time until
packets flow again is measured (flush detection plus repair).

Changes are spaced by the daemon's minSyncPeriod (1 s, upstream's default), so each is
one sync and not a batch. The daemon's full sync time comes from its log; its peak RSS
from /proc. The iptables mode uses the legacy backend (iptables-nft-restore 1.8.9 does
not load 10,000 services in reasonable time here).

    make bench-daemon                                   # 1,000 and 10,000, both modes
    python bench/daemon.py --services 1000 --changes 20 --mode nftables [--json]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import re
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeproxy import modes
from kubeproxy.apiserver.resources import ENDPOINTSLICES, NODES, SERVICES
from kubeproxy.apiserver.server import ApiServer, NetnsListener, ServerConfig
from kubeproxy.apiserver.store import Store
from kubeproxy.dataplane.base import SubprocessRunner
from kubeproxy.util.netns_thread import call_in_netns

NODE_IP = "192.168.0.2"
LISTENER = "10.200.0.1"  # a real endpoint: a TCP listener on an address in the netns
API_PORT = 6443
ENDPOINTS = 10
BACKLOG = 65535  # the listener's accept queue (the namespace's somaxconn is raised to it)
PROBE_TIMEOUT = 0.025  # seconds a connect may take to count as "ok"/"refused"
START_TIMEOUT = 900.0  # seconds for the daemon's first full sync
Obj = dict[str, Any]


def service(i: int) -> Obj:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"s{i}", "namespace": "default"},
            "spec": {"clusterIP": str(ipaddress.IPv4Address("10.96.0.0") + 10 + i),
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def endpoint_slice(i: int, addresses: list[str]) -> Obj:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"s{i}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True},
                           "nodeName": "node1"} for a in addresses]}


def cluster_ip(i: int) -> str:
    return str(service(i)["spec"]["clusterIP"])


def fake_endpoints(i: int) -> list[str]:
    return [str(ipaddress.IPv4Address("10.180.0.0") + i * ENDPOINTS + j)
            for j in range(ENDPOINTS)]


# --- the namespace, the listener, the probe ---------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


@contextmanager
def namespace() -> Iterator[str]:
    name = "kpb-" + secrets.token_hex(4)
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends here (this kernel may have no dummy module).
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        sh("ip", "-n", name, "link", "set", "eth1", "up")
        sh("ip", "-n", name, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        sh("ip", "-n", name, "addr", "add", f"{LISTENER}/32", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        # A node has a default route: the route lookup before DNAT needs one for a
        # ClusterIP. It leads nowhere (the peer is in this namespace and answers no ARP).
        sh("ip", "-n", name, "route", "add", "default", "dev", "eth0")
        # Room for every probe's connection until the listener accepts it: a full
        # accept queue drops SYNs, which a probe would take for "no rule".
        sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", f"net.core.somaxconn={BACKLOG}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def serve(ns: str) -> socket.socket:
    """A listener on LISTENER:8080 inside the namespace that accepts and closes."""
    sock = call_in_netns(ns, lambda: socket.create_server((LISTENER, 8080), backlog=BACKLOG))

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return sock


@dataclass
class Probe:
    """One connect to ip:80: when its SYN left, and what it met (None: not yet)."""

    sent: float
    sock: socket.socket
    outcome: str | None = None


def _meets(err: int) -> str | None:
    """What a connect's error means: ok, refused, unreachable; None: still going."""
    if err == 0:
        return "ok"
    if err == errno.ECONNREFUSED:
        return "refused"
    if err in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM):
        return "unreachable"
    if err in (errno.EINPROGRESS, errno.EALREADY):
        return None
    raise OSError(err, os.strerror(err))


def wait_for(ns: str, ip: str, want: str, deadline: float,
             alive: Callable[[], bool] = lambda: True) -> float:
    """When the kernel first sent a connect to ip:80 where ``want`` says: ``ok`` (a
    rule led it to the listener), ``refused`` (REJECT: no endpoints) or ``timeout``
    (no rule: it goes out to nowhere). Non-blocking connects go out one after another,
    not waiting for each other, at an interval that grows with the wait (0.5 ms, up to
    2% of the time waited so far, at most 5 ms: fine resolution for fast changes, and a
    prober that does not steal the CPU from a slow sync); each is judged when it
    completes or after PROBE_TIMEOUT, and the answer is the send time of the first one
    that met ``want`` (the SYN goes through the rules in the connect call). So the
    resolution is the interval, not the probe's timeout."""
    return call_in_netns(ns, lambda: _first(ip, want, deadline, alive))


def _first(ip: str, want: str, deadline: float, alive: Callable[[], bool]) -> float:
    start = next_send = time.monotonic()
    probes: list[Probe] = []  # in send order; resolved ones leave from the front
    last: str | None = None
    poller = selectors.DefaultSelector()
    try:
        while True:
            now = time.monotonic()
            if now >= next_send:
                sock = socket.socket()
                sock.setblocking(False)
                probe = Probe(time.monotonic(), sock)
                probe.outcome = _meets(sock.connect_ex((ip, 80)))
                if probe.outcome is None:
                    poller.register(sock, selectors.EVENT_WRITE, probe)
                probes.append(probe)
                next_send = now + min(0.005, max(0.0005, 0.02 * (now - start)))
            for key, _ in poller.select(max(0.0, next_send - time.monotonic())):
                probe = key.data
                probe.outcome = _meets(probe.sock.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_ERROR)) or "timeout"
            now = time.monotonic()
            for probe in probes:
                if probe.outcome is None and now - probe.sent > PROBE_TIMEOUT:
                    probe.outcome = "timeout"
            while probes and probes[0].outcome is not None:
                probe = probes.pop(0)
                if probe.sock in poller.get_map():
                    poller.unregister(probe.sock)
                probe.sock.close()
                if probe.outcome == want:
                    return probe.sent
                last = probe.outcome
            if now > deadline or not alive():
                raise TimeoutError(f"{ip}: not {want} in time (last: {last})")
    finally:
        for probe in probes:
            probe.sock.close()
        poller.close()


# The cycle of single-object changes: (kind, the change to Service i, what a connect
# to its ClusterIP then meets).
STEPS: list[tuple[str, Callable[[Store, int], object], str]] = [
    ("service added", lambda st, i: st.create(SERVICES, "default", service(i)), "ok"),
    ("endpoint removed", lambda st, i: st.update(
        ENDPOINTSLICES, "default", f"s{i}-1", endpoint_slice(i, [])), "refused"),
    ("endpoint added", lambda st, i: st.update(
        ENDPOINTSLICES, "default", f"s{i}-1", endpoint_slice(i, [LISTENER])), "ok"),
    ("service deleted", lambda st, i: st.delete(SERVICES, "default", f"s{i}"), "timeout"),
]


# --- one run -----------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    services: int
    latencies: dict[str, list[float]]  # change kind -> seconds
    full_sync_s: float
    rss_mib: float
    # The mode's own floor for one change, measured on the loaded node after the daemon
    # stopped (iptables: one tiny `iptables-legacy-restore --noflush`, which makes the
    # legacy kernel rewrite the whole table); None where the mode has none.
    floor_s: float | None = None
    flush_s: float | None = None  # a flush from outside until packets flow again

    def summary(self) -> dict[str, Any]:
        every = sorted(t for ts in self.latencies.values() for t in ts)
        out = {"mode": self.mode, "services": self.services,
               "p50_ms": round(1000 * statistics.median(every), 1),
               "p99_ms": round(1000 * every[min(len(every) - 1, int(0.99 * len(every)))], 1),
               "full_sync_s": round(self.full_sync_s, 2), "rss_mib": round(self.rss_mib, 1)}
        if self.floor_s is not None:
            out["floor_ms"] = round(1000 * self.floor_s, 1)
            out["p50_over_floor"] = round(statistics.median(every) / self.floor_s, 2)
        if self.flush_s is not None:
            out["flush_restored_s"] = round(self.flush_s, 2)
        return out


def restore_alone(ns: str, repeat: int = 5) -> float:
    """Median seconds of one tiny ``iptables-legacy-restore --noflush`` (a chain and a
    rule added; each undone untimed) on the namespace's loaded nat table, and on a copy
    of its rules in a fresh namespace (no conntrack entries, no sockets left by the
    probes): the smaller of the two, so the ratio errs against the daemon."""
    add = "*nat\n:KUBE-BENCH-ONE - [0:0]\n-A KUBE-BENCH-ONE -j RETURN\nCOMMIT\n"
    undo = "*nat\n:KUBE-BENCH-ONE - [0:0]\n-X KUBE-BENCH-ONE\nCOMMIT\n"  # flush, delete

    def median_in(where: str) -> float:
        argv = ["ip", "netns", "exec", where, "iptables-legacy-restore", "--noflush", "-w"]
        times = []
        for _ in range(repeat):
            start = time.monotonic()
            subprocess.run(argv, input=add.encode(), check=True)
            times.append(time.monotonic() - start)
            subprocess.run(argv, input=undo.encode(), check=True)
        return statistics.median(times)

    rules = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save"],
                           check=True, capture_output=True).stdout
    fresh = "kpb-" + secrets.token_hex(4)
    sh("ip", "netns", "add", fresh)
    try:
        subprocess.run(["ip", "netns", "exec", fresh, "iptables-legacy-restore"],
                       input=rules, check=True)
        return min(median_in(ns), median_in(fresh))
    finally:
        subprocess.run(["ip", "netns", "del", fresh], check=False)


# The floor each mode's p50 is compared with (the iptables target: p50 <= 1.1x).
FLOORS: dict[str, Callable[[str], float]] = {"iptables": restore_alone}
# A flush from outside, per mode (the target: restored within 3 s): timed from
# the command's return until a connect to the Service with the real endpoint is ok again.
FLUSHES: dict[str, list[str]] = {
    "iptables": ["iptables-legacy", "-w", "-t", "nat", "-F", "KUBE-SERVICES"],
    "nftables": ["nft", "flush", "chain", "ip", "kube-proxy", "services"],
}


def preload(server: ApiServer, n: int, changes: int) -> None:
    """n Services with their slices, and the slices of the Services the changes will
    add (a slice without its Service writes no rule), so every change is one object."""
    def load(store: Store) -> None:
        store.create(NODES, None, {"apiVersion": "v1", "kind": "Node",
                                   "metadata": {"name": "node1"},
                                   "status": {"addresses": [{"type": "InternalIP",
                                                             "address": NODE_IP}]}})
        for i in range(n):  # the last one has the real endpoint: a full sync is visible
            store.create(SERVICES, "default", service(i))
            store.create(ENDPOINTSLICES, "default", endpoint_slice(
                i, [LISTENER] if i == n - 1 else fake_endpoints(i)))
        for i in range(n, n + (changes + len(STEPS) - 1) // len(STEPS)):
            store.create(ENDPOINTSLICES, "default", endpoint_slice(i, [LISTENER]))
    server.hub.call(load)


def start_daemon(ns: str, mode: str, workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'http://127.0.0.1:{API_PORT}'}}}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    log = workdir / "proxy.log"
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "kubeproxy", "run",
            "--kubeconfig", str(kubeconfig), "--hostname-override", "node1",
            "--proxy-mode", mode, "--cluster-cidr", "10.180.0.0/16",
            "--iptables-backend", "legacy", "--healthz-bind-address", "",
            "--metrics-bind-address", ""]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    return proc, log


def full_sync_seconds(log: Path) -> float:
    found = re.search(r"full sync: \d+ services, .*?([\d.]+)s$", log.read_text(), re.M)
    return float(found.group(1)) if found else float("nan")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(mode: str, n: int, changes: int, settle: float = 1.1) -> Result:
    latencies: dict[str, list[float]] = {}
    with namespace() as ns, tempfile.TemporaryDirectory() as tmp:
        server = ApiServer(ServerConfig(netns=(NetnsListener(ns, "127.0.0.1", API_PORT),),
                                        service_cidr="10.96.0.0/16", history=100_000))
        server.start()
        listener = serve(ns)
        proc: subprocess.Popen[bytes] | None = None
        try:
            preload(server, n, changes)
            print(f"{mode}, {n:,} services: loaded; starting the daemon", file=sys.stderr)
            proc, log = start_daemon(ns, mode, Path(tmp))
            try:
                wait_for(ns, cluster_ip(n - 1), "ok", time.monotonic() + START_TIMEOUT,
                         alive=lambda: proc is not None and proc.poll() is None)
            except TimeoutError as err:
                raise TimeoutError(f"{err}; the daemon's log:\n{log.read_text()[-3000:]}"
                                   ) from None
            wait_for_log(log, "full sync", time.monotonic() + 60)
            time.sleep(settle)
            for k in range(changes):
                i = n + k // len(STEPS)
                kind, change, want = STEPS[k % len(STEPS)]
                server.hub.call(lambda st, c=change, i=i: c(st, i))  # type: ignore[misc]
                accepted = time.monotonic()
                done = wait_for(ns, cluster_ip(i), want, accepted + 120)
                latencies.setdefault(kind, []).append(done - accepted)
                time.sleep(settle)
            rss = peak_rss_mib(proc.pid)  # before the flush: a repair's peak is its own
            flush = flush_restored(ns, mode, cluster_ip(n - 1)) if mode in FLUSHES else None
            stop(proc)  # its rules stay: the floor is measured on the same loaded node
            floor = FLOORS[mode](ns) if mode in FLOORS else None
            return Result(mode, n, latencies, full_sync_seconds(log), rss, floor, flush)
        finally:
            if proc is not None:
                stop(proc)
                if os.environ.get("BENCH_LOG_DIR"):  # keep the daemon's log for a look
                    (Path(os.environ["BENCH_LOG_DIR"]) / f"proxy-{mode}-{n}.log").write_bytes(
                        log.read_bytes())
            listener.close()
            server.stop()


def flush_restored(ns: str, mode: str, ip: str) -> float:
    """Seconds from a flush of the mode's service dispatch (FLUSHES) until a connect to
    ``ip`` (a Service with a real endpoint) is ok again: detection plus repair."""
    subprocess.run(["ip", "netns", "exec", ns, *FLUSHES[mode]], check=True)
    flushed = time.monotonic()
    return wait_for(ns, ip, "ok", flushed + 120) - flushed


def wait_for_log(log: Path, text: str, deadline: float) -> None:
    while text not in log.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in the daemon's log:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)  # polling interval, bounded by the deadline


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon we started (by PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def table(results: list[Result]) -> str:
    kinds = sorted({k for r in results for k in r.latencies})
    head = ["mode", "services", "p50 ms", "p99 ms", *[f"{k} p50" for k in kinds],
            "full sync s", "RSS MiB", "floor ms", "p50/floor", "flush restored s"]
    rows = [head]
    for r in results:
        s = r.summary()
        rows.append([r.mode, f"{r.services:,}", f"{s['p50_ms']}", f"{s['p99_ms']}",
                     *[f"{1000 * statistics.median(r.latencies[k]):.1f}" for k in kinds],
                     f"{s['full_sync_s']}", f"{s['rss_mib']}", str(s.get("floor_ms", "-")),
                     str(s.get("p50_over_floor", "-")), str(s.get("flush_restored_s", "-"))])
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def default_modes() -> list[str]:
    """The registered modes this benchmark can run here: the daemon runs without a
    cgroup (Mode.needs_cgroup) on this machine's kernel (Mode.kernel_support)."""
    return [name for name in modes.NAMES if not modes.get(name).needs_cgroup
            and modes.get(name).kernel_support(SubprocessRunner()) is None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, action="append",
                   help="services already in the cluster (repeatable; default 1000, 10000)")
    p.add_argument("--changes", type=int, default=20, help="single-object changes per run")
    p.add_argument("--mode", action="append", choices=modes.NAMES,
                   help="repeatable; default every mode that can run here (default_modes)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/daemon.py needs root: it creates a network namespace", file=sys.stderr)
        return 1
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the namespace and the daemon
    # are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for n in args.services or [1000, 10_000]:
        for mode in args.mode or default_modes():
            result = run(mode, n, args.changes)
            results.append(result)
            if args.json:
                print(json.dumps(result.summary()), flush=True)
    if not args.json:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
