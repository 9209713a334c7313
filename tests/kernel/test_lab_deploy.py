"""deploy/ on a lab: `lab up --no-proxy`, `kubectl apply -f deploy/`, real packets.

Each case brings up its own two-node lab without the lab's proxies, gives it manifests
with real kubectl, waits for the DaemonSet's Pod to run on every node (the installed
``kube-proxy`` console script, in the node's network namespace, its ConfigMap and
service-account files bind-mounted in a private mount namespace) and then probes:

- ``deploy/`` with its one value filled as docs/deploy.md fills it (the API server's
  address in the ConfigMap's kubeconfig.conf, a ``sed`` of the shipped file): ClusterIP
  spread, NodePort from outside, no endpoints refused; the process sees its files at the
  manifest's paths and the host does not; ``kubectl set env`` rolls the Pods; deleting
  the DaemonSet stops the processes;
- kubeadm's own ConfigMap (``tests/unit/data/kubeadm-kube-proxy-configmap.yaml``: its
  ``config.conf`` with ``syncPeriod: 0s`` and a ``kubeconfig.conf`` with ``tokenFile``
  and the CA under the service-account directory, its server the node's 127.0.0.1:6443;
  Ready by a readiness probe on ``/healthz``): the same probes; then the lab agent
  restarts and each node still runs one kube-proxy (the earlier agent's are stopped,
  the Pods started again);
- the binding points at a ClusterRole without ``list endpointslices``: the proxy logs
  the 403 and the Service is not programmed;
- the image ``make image`` built (``kubeproxy:0.1.0``, what deploy/ names): one podman
  container per node, in the node's network namespace; ``kubectl logs`` is its output;
  a deleted Pod's container goes and the DaemonSet's new Pod brings another; an image
  not in local storage leaves the Pods waiting with ``ErrImageNeverPull``; deleting
  the DaemonSet removes every container.

The cases of this project's own program run with ``lab up --no-images`` (so they run
from this checkout even where the image was built).

A first case needs no lab: the mount wrapper in a network namespace of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kubeproxy.lab import containers, converge, hostpods
from kubeproxy.lab import deploy as lab_deploy
from kubeproxy.lab.deploy import proxy_pods
from kubeproxy.lab.hostpods import SA_DIR, Launch, Mount
from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.processes import AGENT_MODULE, alive, cmdline, kill, python_env, spawn
from kubeproxy.lab.runtime import Lab
from kubeproxy.util.jsontypes import JSON
from tests.kernel.conftest import (
    DEPLOY,
    IMAGE,
    KUBEADM_CM,
    MakeLab,
    image_skip_reason,
    kubectl,
    kubectl_skip_reason,
    lab_yaml,
)

pytestmark = pytest.mark.kernel

WEB = ["web-1", "web-2"]
NODES = {"node-1": "192.168.0.2", "node-2": "192.168.0.3"}
POD_TIMEOUT = 60.0

LAB = lab_yaml(list(NODES), [("web-1", "node-1", "web", 8080), ("web-2", "node-2", "web", 8080),
                            ("client", "node-1", None, None)]) + """
---
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports: [{port: 80, targetPort: 8080}]
"""


@pytest.fixture(autouse=True)
def needs() -> None:
    reason = kubectl_skip_reason()
    if reason:
        pytest.skip(reason)


def deploy_docs() -> list[JSON]:
    return lab_deploy.with_api_server(lab_deploy.manifests(DEPLOY))


def filled_deploy() -> str:
    """deploy/kube-proxy.yaml with its one value set, as docs/deploy.md's sed does it."""
    text = (DEPLOY / "kube-proxy.yaml").read_text()
    assert lab_deploy.PLACEHOLDER_SERVER in text
    return text.replace(lab_deploy.PLACEHOLDER_SERVER, lab_deploy.LAB_SERVER)


def wait_for_proxies(lab: Lab) -> dict[str, JSON]:
    """Until a Ready kube-proxy Pod runs on every node and its metrics answer."""
    pods = lab_deploy.wait_for_pods(lab, POD_TIMEOUT)
    assert set(pods) == set(NODES)
    return pods


def pid_of(pod: JSON) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("lab://"))


def probes_pass(lab: Lab) -> None:
    lab.settle()
    spread = lab.probe("client", "web", 80, n=40)
    assert (spread.ok, sorted(spread.backends)) == (40, WEB), spread
    outside = lab.probe("external", "node-2", 30080, n=40)
    assert (outside.ok, sorted(outside.backends)) == (40, WEB), outside
    empty = lab.probe("client", "empty", 80, n=3, timeout=0.5)
    assert (empty.ok, empty.refused) == (0, 3), empty


@pytest.fixture(scope="module", autouse=True)
def host_unchanged() -> Iterator[None]:
    """The mount points the Pods create on the host are gone once every lab is down
    (autouse: set up before make_lab, so checked after it took the labs down)."""
    before = {p: Path(p).exists() for p in ("/var/lib/kube-proxy", "/run/secrets", SA_DIR)}
    yield
    after = {p: Path(p).exists() for p in before}
    assert after == before


def test_deploy_with_its_one_value_serves_the_lab(make_lab: MakeLab) -> None:
    lab = make_lab("ktdep", LAB, proxies=False, images=False)
    assert "--no-proxy" in subprocess.run(
        [sys.executable, "-m", "kubeproxy", "lab", "status", "--name", lab.name],
        env=python_env(), capture_output=True, text=True, timeout=60).stdout
    assert {n.ns: converge.proxy_sample(n.ns) for n in lab.state().nodes} == {
        n.ns: None for n in lab.state().nodes}  # no proxy before the DaemonSet
    print(kubectl(lab, "apply", "-f", "-", stdin=filled_deploy()))
    pods = wait_for_proxies(lab)
    for node, pod in pods.items():
        assert pod["status"]["hostIP"] == pod["status"]["podIP"] == NODES[node]
        pid = pid_of(pod)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert Path(argv[1].decode()).name == "kube-proxy"  # the venv's console script
        assert b"--hostname-override=" + node.encode() in argv
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes()
                   .split(b"\0") if b"=" in e)  # fmt: skip
        assert (env[b"NODE_NAME"], env[b"KUBERNETES_SERVICE_HOST"]) == (node.encode(),
                                                                        b"127.0.0.1")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        root = Path(f"/proc/{pid}/root")
        config = yaml.safe_load(next(d for d in deploy_docs() if d["kind"] == "ConfigMap")
                                ["data"]["config.conf"])  # fmt: skip
        assert yaml.safe_load((root / "var/lib/kube-proxy/config.conf").read_text()) == config
        account = root / str(Path(SA_DIR).resolve()).lstrip("/")  # /var/run -> /run
        assert (account / "namespace").read_text() == "kube-system"
        assert (account / "token").read_text()
        assert not Path("/var/lib/kube-proxy/config.conf").exists()  # only the Pod sees it
        assert not Path(SA_DIR, "token").exists()
    probes_pass(lab)
    status = json.loads(kubectl(lab, "get", "ds", "-n", "kube-system", "kube-proxy", "-o",
                                "json"))["status"]  # fmt: skip
    assert (status["desiredNumberScheduled"], status["numberReady"]) == (2, 2)

    # A changed template rolls the Pods, one node at a time.
    kubectl(lab, "-n", "kube-system", "set", "env", "daemonset/kube-proxy",
            "KUBEPROXY_ROLLED=2")  # fmt: skip
    deadline = time.monotonic() + POD_TIMEOUT
    while True:
        pods = wait_for_proxies(lab)
        generations = {p["metadata"]["labels"]["pod-template-generation"] for p in pods.values()}
        if generations == {"2"}:
            break
        assert time.monotonic() < deadline, f"the DaemonSet did not roll: {generations}"
        time.sleep(0.3)
    after = lab.probe("external", "node-1", 30080, n=20)
    assert (after.ok, sorted(after.backends)) == (20, WEB), after

    kubectl(lab, "delete", "-f", str(DEPLOY / "kube-proxy.yaml"), "--wait=false")
    deadline = time.monotonic() + POD_TIMEOUT
    pids = [pid_of(p) for p in pods.values()]
    while any(alive(p) for p in pids) or proxy_pods(lab):
        assert time.monotonic() < deadline, "the DaemonSet's Pods outlived it"
        time.sleep(0.2)
    lab.down()


def test_kubeadms_configmap_serves_the_lab(make_lab: MakeLab) -> None:
    lab = make_lab("ktdepk", LAB, proxies=False, images=False)
    cm = lab_deploy.kubeadm_configmap(KUBEADM_CM)
    docs = lab_deploy.with_configmap(deploy_docs(), cm)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")  # Ready when healthz says so
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"port": 10256, "path": "/healthz"}, "periodSeconds": 1}
    kubectl(lab, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    pods = wait_for_proxies(lab)
    for pod in pods.values():
        root = Path(f"/proc/{pid_of(pod)}/root")
        seen = yaml.safe_load((root / "var/lib/kube-proxy/kubeconfig.conf").read_text())
        assert seen["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
        log = lab.store.log_file(f"kube-system/{pod['metadata']['name']}").read_text()
        assert "unknown field" not in log, log
    probes_pass(lab)

    # The lab agent (kubelet) restarts: each node still runs one kube-proxy, not two.
    before = {node: pid_of(pod) for node, pod in pods.items()}
    restart_agent(lab)
    deadline = time.monotonic() + POD_TIMEOUT
    while True:
        pods = wait_for_proxies(lab)
        if not {pid_of(p) for p in pods.values()} & set(before.values()):
            break
        assert time.monotonic() < deadline, f"the Pods were not started again: {pods}"
        time.sleep(0.3)
    assert not any(alive(pid) for pid in before.values())
    for node in lab.state().nodes:
        proxies = [p for p in lab.net.pids(node.ns) if "--hostname-override=" in
                   " ".join(cmdline(p))]  # fmt: skip
        assert proxies == [pid_of(pods[node.name])], (node.name, proxies)
    probes_pass(lab)


def restart_agent(lab: Lab) -> None:
    """Stop the lab's agent (its Pods' processes live on) and start another."""
    state = lab.state()
    assert state.processes.agent is not None
    kill([state.processes.agent])
    argv = [sys.executable, "-m", AGENT_MODULE, "--name", lab.name, "--base", str(lab.store.base)]
    agent = spawn(argv, lab.store.log_file("agent")).pid
    lab.store.save(replace(state, processes=replace(state.processes, agent=agent)))


NO_SLICES = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: proxier-without-slices}
rules:
- apiGroups: [""]
  resources: [services, nodes, endpoints]
  verbs: [list, watch, get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch, update]
"""


def test_a_role_without_endpointslices_programs_nothing(make_lab: MakeLab) -> None:
    lab = make_lab("ktdepr", LAB, proxies=False, images=False)
    docs = deploy_docs()
    for d in docs:
        if d["kind"] == "ClusterRoleBinding":
            d["roleRef"]["name"] = "proxier-without-slices"
    kubectl(lab, "apply", "-f", "-", stdin=NO_SLICES + "---\n" + yaml.safe_dump_all(docs))
    pods = wait_for_proxies(lab)
    log_file = lab.store.log_file("kube-system/" + pods["node-1"]["metadata"]["name"])
    deadline = time.monotonic() + 30
    while "403" not in log_file.read_text():
        assert time.monotonic() < deadline, log_file.read_text()[-2000:]
        time.sleep(0.2)
    assert "endpointslices" in log_file.read_text()
    assert "default/web" not in lab.node_rules("node-1")
    result = raw_probe(lab, "client", lab.address_of("web"), 80)
    assert result.ok == 0, result


def podman_ps(lab: Lab) -> dict[str, str]:
    """The lab's containers: name -> image."""
    done = subprocess.run(["podman", "--runtime", "runc", "ps", "--format",
                           "{{.Names}} {{.Image}}"], env=containers.podman_env(),
                          capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    rows = (line.split() for line in done.stdout.splitlines() if line.strip())
    return {name: image for name, image in rows
            if name.startswith(containers.lab_prefix(lab.name))}


def test_the_image_serves_the_lab(make_lab: MakeLab) -> None:
    if reason := image_skip_reason():
        pytest.skip(reason)
    lab = make_lab("ktdepi", LAB, proxies=False)  # images: as `lab up` runs them
    kubectl(lab, "apply", "-f", "-", stdin=filled_deploy())
    pods = wait_for_proxies(lab)
    running = podman_ps(lab)
    assert sorted(running) == sorted(containers.container_name(
        lab.name, "kube-system", p["metadata"]["name"]) for p in pods.values())
    assert set(running.values()) == {f"localhost/{IMAGE}"}
    for node, pod in pods.items():  # the container's processes are in the node's netns
        pid = pid_of(pod)  # podman run's
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"podman"
        inside = [p for p in lab.net.pids(lab.state().node(node).ns)
                  if "--hostname-override=" + node in " ".join(cmdline(p))]
        assert len(inside) == 1, (node, inside)
    print(kubectl(lab, "get", "pods", "-n", "kube-system", "-o", "wide"))
    logs = kubectl(lab, "logs", "-n", "kube-system", pods["node-1"]["metadata"]["name"])
    assert "Starting" in logs or "sync" in logs.lower(), logs[-2000:]
    probes_pass(lab)

    # A deleted Pod's container goes; the DaemonSet's new Pod brings another.
    old = pods["node-1"]["metadata"]["name"]
    kubectl(lab, "delete", "pod", "-n", "kube-system", old)
    deadline = time.monotonic() + POD_TIMEOUT
    while old in {p["metadata"]["name"] for p in wait_for_proxies(lab).values()}:
        assert time.monotonic() < deadline, "no new Pod on node-1"
        time.sleep(0.3)
    assert containers.container_name(lab.name, "kube-system", old) not in podman_ps(lab)
    assert len(podman_ps(lab)) == 2
    probes_pass(lab)

    # Upstream's image, which local storage lacks: the Pods wait, as a kubelet's would.
    kubectl(lab, "-n", "kube-system", "set", "image", "daemonset/kube-proxy",
            "kube-proxy=registry.k8s.io/kube-proxy:v1.33.0")  # fmt: skip
    deadline = time.monotonic() + POD_TIMEOUT
    while True:
        listed = json.loads(kubectl(lab, "get", "pods", "-n", "kube-system", "-o", "json"))
        reasons = [((p["status"].get("containerStatuses") or [{}])[0].get("state") or {})
                   .get("waiting", {}).get("reason") for p in listed["items"]]  # fmt: skip
        if "ErrImageNeverPull" in reasons:
            break
        assert time.monotonic() < deadline, reasons
        time.sleep(0.3)
    print(kubectl(lab, "get", "pods", "-n", "kube-system"))

    kubectl(lab, "delete", "-f", str(DEPLOY / "kube-proxy.yaml"), "--wait=false")
    deadline = time.monotonic() + POD_TIMEOUT
    while podman_ps(lab) or proxy_pods(lab):
        assert time.monotonic() < deadline, f"containers outlived the DaemonSet: {podman_ps(lab)}"
        time.sleep(0.3)


def raw_probe(lab: Lab, source: str, ip: str, port: int) -> ProbeResult:
    """A probe that does not wait for the proxies first (they never catch up here)."""
    ns = lab.namespace_of(source)
    argv = [sys.executable, "-m", "kubeproxy.lab.probe", "--to", ip, "--port", str(port),
            "-n", "3", "--timeout", "0.5"]  # fmt: skip
    done = subprocess.run(lab.net.exec_argv(ns, argv), env=python_env(), capture_output=True,
                          text=True, check=True, timeout=60)  # fmt: skip
    return ProbeResult.from_json(json.loads(done.stdout))


def test_mounts_are_private_to_the_process(tmp_path: Path) -> None:
    """The wrapper alone, in a network namespace of the test's own: the program sees the
    volume at its mount path read-only, the host sees nothing there."""
    ns = f"kpt-{secrets.token_hex(3)}"
    source, target = tmp_path / "vol", tmp_path / "mnt"
    source.mkdir()
    target.mkdir()
    (source / "config.conf").write_text("from the ConfigMap\n")
    script = ("cat $0/config.conf; touch $0/x 2>/dev/null && echo writable || echo read-only;"
              " exec sleep 30")
    launch = Launch(("sh", "-c", script, str(target)), {}, {},
                    (Mount(str(source), str(target), True),))  # fmt: skip
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        argv = hostpods.wrapper(lambda a: ["ip", "netns", "exec", ns, *a], launch)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        seen = [proc.stdout.readline(), proc.stdout.readline()]
        assert seen == ["from the ConfigMap\n", "read-only\n"]
        assert list(target.iterdir()) == []  # while it runs, the host sees nothing there
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "delete", ns], check=True)
