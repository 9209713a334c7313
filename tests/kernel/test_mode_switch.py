"""A mode switch on the real kernel: the old mode leaves nothing, the new one serves.

Inside namespaces the test makes (deleted after, also on failure), one "node" syncs a
small cluster with mode A's real data plane, then starts mode B as the daemon does (the
start-up cleanup, modes/leftovers.py, then B's first full sync), and back. After each
start: nothing of the old mode is left (``iptables-save`` of both backends shows no
KUBE- line when B is nftables, ``nft list tables`` no kube-proxy table when B is
iptables, no bpf program on the cgroup when B is not ebpf, no virtual server, kube-ipvs0
or ipset when B is not ipvs), and a real connection to the ClusterIP reaches the
endpoint *B* was told about: each phase moves the Service to another Pod address, so a
stale rule of A's would answer from the wrong one.

    client kpc-* 192.168.0.100 --- 192.168.0.2 node kpt-* 10.180.0.254 --- pod kpn-*
                                                             10.180.0.1, 10.180.0.3

ebpf <-> nftables runs in the ebpf kernel tests' node (tests/kernel/test_ebpf_socklb.py:
its own cgroup and private bpffs, never the root cgroup). ipvs <-> iptables needs a
kernel with IPVS: it skips here and runs in the guest suite (tests/vm/). The last test
starts the real daemon (``kubeproxy run``) on a node holding another mode's rules; the
lab test switches a two-node lab served by deploy/ through its ConfigMap (real kubectl,
a rollout restart), iptables -> nftables -> iptables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.base import NetnsRunner, SubprocessRunner
from kubeproxy.dataplane.ipvs_netlink import NetlinkIpvs
from kubeproxy.dataplane.netlink import find_netns
from kubeproxy.k8s import decode_objects
from kubeproxy.lab import deploy as lab_deploy
from kubeproxy.lab.processes import python_env
from kubeproxy.model import parse_cidr
from kubeproxy.modes import ebpf as mode_ebpf
from kubeproxy.modes import leftovers
from kubeproxy.modes.base import (
    BPF_PROGRAMS,
    IPTABLES_CHAINS,
    IPVS_STATE,
    NFTABLES_TABLES,
    PlaneOptions,
    Removed,
)
from kubeproxy.proxier import Proxier
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.kernel.conftest import (
    DEPLOY,
    MakeLab,
    kubectl,
    kubectl_skip_reason,
    lab_yaml,
    pod_net,
)
from tests.kernel.test_ebpf_socklb import Node, answers, bpf_node, cluster

__all__ = ["bpf_node"]  # the ebpf kernel tests' node fixture, used here

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("nft") is None,
                       reason="needs root, iproute2 and nft (network namespaces)"),
]
CLUSTER_IP = "172.30.0.41"
PODS = ("10.180.0.1", "10.180.0.3")
# Answers with the address it was reached at: which endpoint the DNAT chose.
SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.getsockname()[0].encode()); c.close()
"""
ASK = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(s.recv(100).decode())
except OSError as err:
    print("error", err)
"""


@dataclass
class Net:
    node: str
    pod: str
    client: str
    runner: NetnsRunner

    def ask(self, host: str, port: int) -> str:
        """A new TCP connection from the client namespace: what the endpoint says."""
        out = subprocess.run(["ip", "netns", "exec", self.client, sys.executable, "-c", ASK,
                              host, str(port)], capture_output=True, text=True, timeout=30,
                             check=False)
        return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def net() -> Iterator[Net]:
    with pod_net(PODS, SERVER) as made:
        yield Net(made.node, made.pod, made.client, NetnsRunner(made.node))


def config(mode: str) -> ProxyConfig:
    return ProxyConfig(hostname=NODE, mode=mode, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))


def objects(pod: str) -> list[Obj]:
    """Service svc1 (ClusterIP, NodePort 30080) served by the one endpoint ``pod``."""
    return [node(), service("svc1", cluster_ip=CLUSTER_IP, type="NodePort",
                            ports=[("p80", 80, "TCP", 30080)]),
            endpoint_slice("svc1", [endpoint(pod)], ports=[("p80", 8080, "TCP")])]


def start(runner: NetnsRunner, mode: str, objs: Any, options: PlaneOptions
          ) -> dict[str, Removed]:
    """Mode ``mode``'s proxy starting on the node: the cleanup, then its first sync."""
    removed = leftovers.clean_at_start(config(mode), runner, options)
    proxy_mode = modes.for_config(config(mode))
    cluster_ = objs if not isinstance(objs, list) else decode_objects(objs)
    Proxier(proxy_mode, config(mode), proxy_mode.data_plane(runner, options)).sync(
        cluster_, None)
    return removed


def kube_lines(runner: NetnsRunner) -> list[str]:
    """Every KUBE- line of both iptables backends, both families (legacy: only the
    tables that exist; a save without -t creates none)."""
    out = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                 "ip6tables-nft-save"):
        res = runner.run([tool])
        assert res.returncode == 0, res.stderr
        out += [f"{tool}: {line}" for line in res.stdout.splitlines() if "KUBE-" in line]
    return out


def nft_tables(runner: NetnsRunner) -> str:
    res = runner.run(["nft", "list", "tables"])
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_iptables_to_nftables_and_back(net: Net, tmp_path: Path, backend: str) -> None:
    """iptables (on ``backend``) -> nftables -> iptables, the Service moving each time."""
    ipt = PlaneOptions(iptables_backend=backend, bpf_dir=str(tmp_path / "bpf"))
    auto = PlaneOptions(bpf_dir=str(tmp_path / "bpf"))  # the cleanup looks at both
    start(net.runner, "iptables", objects(PODS[0]), ipt)
    assert net.ask(CLUSTER_IP, 80) == PODS[0]
    before = kube_lines(net.runner)
    assert len([line for line in before if line.startswith(f"iptables-{backend}-save: :")]) \
        >= 10, before

    removed = start(net.runner, "nftables", objects(PODS[1]), auto)
    assert kube_lines(net.runner) == []
    assert removed[IPTABLES_CHAINS]["chains"] >= 10, removed
    assert set(removed) == {IPTABLES_CHAINS, IPVS_STATE, BPF_PROGRAMS}
    assert "table ip kube-proxy" in nft_tables(net.runner)
    assert net.ask(CLUSTER_IP, 80) == PODS[1]  # nftables' DNAT, none of iptables' left
    assert net.ask(NODE_IP, 30080) == PODS[1]

    removed = start(net.runner, "iptables", objects(PODS[0]), ipt)
    assert "kube-proxy" not in nft_tables(net.runner)
    assert removed[NFTABLES_TABLES] == {"tables": 1}, removed
    assert kube_lines(net.runner)
    assert net.ask(CLUSTER_IP, 80) == PODS[0]
    assert net.ask(NODE_IP, 30080) == PODS[0]


def test_a_restart_in_the_same_mode_keeps_serving(net: Net, tmp_path: Path) -> None:
    """The cleanup of a restarted proxy removes nothing: its rules stay in force until
    its first sync (here: without one)."""
    options = PlaneOptions(bpf_dir=str(tmp_path / "bpf"))
    for mode in ("iptables", "nftables"):
        start(net.runner, mode, objects(PODS[0]), options)
        rules = kube_lines(net.runner), nft_tables(net.runner)
        removed = leftovers.clean_at_start(config(mode), net.runner, options)
        assert all(not any(r.values()) for r in removed.values()), removed
        assert (kube_lines(net.runner), nft_tables(net.runner)) == rules
        assert net.ask(CLUSTER_IP, 80) == PODS[0]


# --- ebpf <-> nftables: the ebpf kernel tests' node and cgroup ----------------------------


def programs(node_: Node) -> str:
    """The programs attached to the test's cgroup, as bpftool lists them."""
    return subprocess.run(["bpftool", "cgroup", "show", str(node_.cgroup)],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("bpftool") is None or not mode_ebpf.OBJECT.is_file(),
                    reason="needs bpftool and bpf/sock_lb.o (make bpf)")
def test_ebpf_to_nftables_and_back(bpf_node: Node) -> None:
    runner = NetnsRunner(bpf_node.ns)
    options = PlaneOptions(cgroup_path=str(bpf_node.cgroup), bpf_dir=str(bpf_node.bpffs))
    start(runner, "ebpf", cluster(), options)
    assert programs(bpf_node).count("kp_") == 8
    # A service without endpoints: the socket program refuses the sendto() itself.
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") == [["error", 111]]

    removed = start(runner, "nftables", cluster(), options)
    assert removed[BPF_PROGRAMS]["links"] == 8 and removed[BPF_PROGRAMS]["maps"] > 0
    assert NFTABLES_TABLES not in removed  # nftables' own: taken over by its sync
    assert "kp_" not in programs(bpf_node)
    assert not bpf_sys.is_bpffs(bpf_node.bpffs) and not bpf_node.bpffs.exists()
    assert "table ip kube-proxy" in nft_tables(runner)
    # Now nftables does it: its reject (a local sender sees EPERM), its DNAT for TCP.
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") == [["error", 1]]
    assert set(answers(bpf_node.client("172.30.0.41", 80, 6))) <= {"10.180.0.1",
                                                                     "10.180.0.2"}

    removed = start(runner, "ebpf", cluster(), options)
    assert set(removed) == {IPTABLES_CHAINS, IPVS_STATE}  # the tables are its own
    assert all(not any(r.values()) for r in removed.values()), removed
    assert programs(bpf_node).count("kp_") == 8
    assert "table ip kube-proxy" in nft_tables(runner)
    assert bpf_node.client("172.30.0.60", 53, 1, "udp") == [["error", 111]]
    assert set(answers(bpf_node.client("172.30.0.41", 80, 6))) <= {"10.180.0.1",
                                                                     "10.180.0.2"}


# --- ipvs <-> iptables: in the guest suite (a kernel with IPVS) -----------------------------

IPVS_SKIP = modes.get("ipvs").kernel_support(SubprocessRunner()) if os.geteuid() == 0 \
    else "needs root"


def ipvs_state(runner: NetnsRunner) -> dict[str, Any]:
    """What the IPVS mode writes besides iptables: virtual servers, kube-ipvs0, ipsets."""
    sets = runner.run(["ipset", "list", "-n"])
    return {"virtual servers": NetlinkIpvs(find_netns(runner)).services(),
            "kube-ipvs0": runner.run(["ip", "link", "show", "kube-ipvs0"]).returncode == 0,
            "ipsets": [n for n in sets.stdout.split() if n.startswith("KUBE-")]}


@pytest.mark.skipif(IPVS_SKIP is not None, reason=f"ipvs mode: {IPVS_SKIP}")
def test_ipvs_to_iptables_and_back(net: Net, tmp_path: Path) -> None:
    options = PlaneOptions(bpf_dir=str(tmp_path / "bpf"))
    start(net.runner, "ipvs", objects(PODS[0]), options)
    assert net.ask(CLUSTER_IP, 80) == PODS[0]
    state = ipvs_state(net.runner)
    assert state["virtual servers"] and state["kube-ipvs0"] and state["ipsets"], state

    removed = start(net.runner, "iptables", objects(PODS[1]), options)
    assert ipvs_state(net.runner) == {"virtual servers": [], "kube-ipvs0": False,
                                      "ipsets": []}
    assert removed[IPVS_STATE]["ipsets"] == len(state["ipsets"]), removed
    assert removed[IPVS_STATE]["virtual servers"] == len(state["virtual servers"])
    assert removed[IPVS_STATE]["interfaces"] == 1
    left = [line for line in kube_lines(net.runner)
            if any(word in line for word in ("KUBE-IPVS", "KUBE-NODE-PORT ",
                                             "KUBE-LOAD-BALANCER", "KUBE-SOURCE-RANGES",
                                             "--match-set"))]
    assert left == []
    assert net.ask(CLUSTER_IP, 80) == PODS[1]
    assert net.ask(NODE_IP, 30080) == PODS[1]

    removed = start(net.runner, "ipvs", objects(PODS[0]), options)
    assert removed[IPTABLES_CHAINS]["chains"] >= 4, removed  # SVC, SEP, NODEPORTS, ...
    left = [line for line in kube_lines(net.runner)
            if any(word in line for word in ("KUBE-SVC-", "KUBE-SEP-", "KUBE-NODEPORTS",
                                             "KUBE-EXTERNAL-SERVICES", "KUBE-PROXY-CANARY",
                                             "kubernetes load balancer firewall"))]
    assert left == []
    assert net.ask(CLUSTER_IP, 80) == PODS[0]
    assert net.ask(NODE_IP, 30080) == PODS[0]


# --- the daemon does it once, at start ------------------------------------------------------


def test_the_daemon_removes_the_old_mode_before_its_first_sync(net: Net,
                                                               tmp_path: Path) -> None:
    """``kubeproxy run --proxy-mode nftables`` on a node holding the iptables mode's
    rules: they are gone before it ever reaches its (here unreachable) API server."""
    start(net.runner, "iptables", objects(PODS[0]), PlaneOptions(bpf_dir=str(tmp_path / "bpf")))
    assert kube_lines(net.runner)
    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://192.0.2.1:1'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", net.node, sys.executable, "-m", "kubeproxy", "run",
             "--kubeconfig", str(tmp_path / "kubeconfig"), "--master", "http://127.0.0.1:9",
             "--hostname-override", NODE, "--proxy-mode", "nftables",
             "--healthz-bind-address", "127.0.0.1:10256",
             "--metrics-bind-address", "127.0.0.1:10249",
             "--bpf-dir", str(tmp_path / "bpf")],
            stdout=log, stderr=log, env=python_env())
        try:
            deadline = time.monotonic() + 60
            while "kubeproxy run: node" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        finally:
            proc.terminate()  # this one process, by PID
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert "starting in nftables mode: removed the iptables chains the iptables mode " \
           "left:" in text, text
    assert kube_lines(net.runner) == []
    assert "full sync" not in text  # no API server: it never synced


# --- the lab: a mode switch through the ConfigMap, proxies from deploy/ ----------------------

LAB_NODES = ["node-1", "node-2"]
LAB = lab_yaml(LAB_NODES, [("web-1", "node-1", "web", 8080), ("web-2", "node-2", "web", 8080),
                           ("client", "node-1", None, None)]) + """
---
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"""
# What each mode's start must have removed from a node (seen from the node's namespace).
GONE: dict[str, Callable[[NetnsRunner], list[str]]] = {
    "nftables": kube_lines,  # every KUBE- line, both backends
    "iptables": lambda runner: [t for t in nft_tables(runner).splitlines()
                                if "kube-proxy" in t],
}


def served(lab: Any) -> None:
    lab.settle()
    spread = lab.probe("client", "web", 80, n=20)
    assert (spread.ok, sorted(spread.backends)) == (20, ["web-1", "web-2"]), spread
    outside = lab.probe("external", "node-2", 30080, n=10)
    assert outside.ok == 10, outside


def rolled(lab: Any, generation: str) -> None:
    """Until every node runs a Ready proxy Pod of the DaemonSet's ``generation``."""
    deadline = time.monotonic() + 120
    while True:
        pods = lab_deploy.proxy_pods(lab)
        seen = {p["metadata"]["labels"]["pod-template-generation"] for p in pods.values()}
        if set(pods) == set(LAB_NODES) and seen == {generation}:
            lab_deploy.wait_until_served(lab)
            return
        assert time.monotonic() < deadline, f"the DaemonSet did not roll: {seen}"
        time.sleep(0.3)


def test_lab_configmap_mode_switch_iptables_nftables_iptables(make_lab: MakeLab) -> None:
    """deploy/ on a lab in iptables mode; ``mode: nftables`` in the ConfigMap and a
    rollout restart; back to iptables. After each roll the Service answers and no node
    holds anything of the previous mode; each proxy logged what it removed."""
    if reason := kubectl_skip_reason():
        pytest.skip(reason)
    lab = make_lab("ktmsw", LAB, proxies=False, images=False)
    docs = lab_deploy.with_api_server(lab_deploy.manifests(DEPLOY))
    kubectl(lab, "apply", "-f", "-",
            stdin=lab_deploy.dump(lab_deploy.with_config(docs, mode="iptables")))
    lab_deploy.wait_until_served(lab)
    served(lab)
    nodes = {n.name: NetnsRunner(n.ns) for n in lab.state().nodes}
    assert all(kube_lines(runner) for runner in nodes.values())
    for generation, (mode, previous) in enumerate(
            (("nftables", "iptables"), ("iptables", "nftables")), start=2):
        kubectl(lab, "apply", "-f", "-",
                stdin=lab_deploy.dump(lab_deploy.with_config(docs, mode=mode)))
        kubectl(lab, "-n", "kube-system", "rollout", "restart", "daemonset/kube-proxy")
        rolled(lab, str(generation))
        for name, runner in nodes.items():
            assert GONE[mode](runner) == [], name
            log = lab_deploy.proxy_log(lab, name).read_text()
            said = [line for line in log.splitlines()
                    if f"starting in {mode} mode: removed the " in line]
            assert any(f" the {previous} " in line for line in said), log[-3000:]
        served(lab)
