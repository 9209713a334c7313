"""Kernel tests of the lab: real packets through real rules, inside network namespaces.

They need root, iproute2, iptables/nft and the core's ``kubeproxy run``; otherwise they
skip with the reason. Every lab a test brings up is taken down by its fixture, also on
failure; test labs are named ``kt...<session>`` so that a user's own lab (default ``lab``)
and another test session's labs are never touched. The session ends by failing if a
``kpl-`` namespace, a lab process (pod server, agent, a lab's API server or proxy), a
lab cgroup (``kpl-<lab>``, socket-LB modes) or a lab file of this session's labs is still
there after it (they are removed, then reported).

``KUBEPROXY_TEST_PROXIES`` (issue 11's "done when") changes where a test lab's proxies
come from, for every lab ``make_lab`` brings up with proxies (the default):

- unset or ``lab``: the lab's own ``kubeproxy run`` per node;
- ``deploy``: ``lab up --no-proxy``, then the unmodified deploy/ manifests applied with
  real kubectl, the ConfigMap's ``mode`` set to the test's mode;
- ``kubeadm``: the same with kubeadm's own ConfigMap
  (tests/unit/data/kubeadm-kube-proxy-configmap.yaml, its kubeconfig.conf naming the
  API server as a lab node reaches it) in place of deploy/'s.
- ``image``: deploy/ as for ``deploy``, its Pods run by the lab's kubelet from the
  image ``make image`` built (podman, lab/containers.py), one container per node;
  ``deploy`` and ``kubeadm`` run them from this checkout (``lab up --no-images``).

``make_lab`` returns once every node's DaemonSet Pod runs and its proxy has synced
(kubeproxy.lab.deploy.wait_until_served). A lab option no configuration field carries
(``lb_algorithm``) becomes this project's flag on the DaemonSet's command. A test that
drives the lab's own proxy processes (Lab.restart_proxies) skips under the switch,
saying why; socket-LB modes skip too (their proxies need per-node cgroup flags).
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import shutil
import string
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.dataplane.base import SubprocessRunner
from kubeproxy.lab import cgroups, containers
from kubeproxy.lab import deploy as lab_deploy
from kubeproxy.lab.manifest import load_documents
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.processes import python_env
from kubeproxy.lab.runtime import Lab, UpOptions
from kubeproxy.lab.state import LabStore
from tests.builders import NODE_IP


@functools.cache
def skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "kernel tests need root on Linux (they create network namespaces)"
    for tool in ("ip", "iptables", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not _core_runs("run", "--help"):
        return "the core's `python -m kubeproxy run` (the proxy daemon) is not available"
    return None


def kubectl_skip_reason() -> str | None:
    """Why a test that drives a lab with real kubectl cannot run here, or None."""
    reason = skip_reason()
    if reason is None and not KUBECTL.exists():
        reason = f"{KUBECTL} is not installed"
    return reason


@contextmanager
def scratch_namespace() -> Iterator[str]:
    """A network namespace of the test's own (``kpt-...``), deleted after, also on
    failure: for data-plane tests that need a kernel but no lab."""
    name = f"kpt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


# A node namespace between a pod namespace and a client's (routed, not bridged).
CLIENT_IP, NODE_POD_SIDE = "192.168.0.100", "10.180.0.254"


@dataclass
class PodNet:
    node: str  # where the rules go; NODE_IP towards the client, NODE_POD_SIDE to the pod
    pod: str  # holds every pod address, its server listening on all of them
    client: str  # CLIENT_IP, its default route via the node
    server: subprocess.Popen[str]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextmanager
def pod_net(pods: Sequence[str], server: str) -> Iterator[PodNet]:
    """Three namespaces of the test's own (``kpt-``, ``kpn-``, ``kpc-``): a node routing
    between one pod namespace holding ``pods`` (Python ``server`` running there, which
    prints "ready" once it listens) and a client at CLIENT_IP. Deleted after, also on
    failure; the server is killed by its PID."""
    tag = secrets.token_hex(3)
    node_ns, pod_ns, client_ns = f"kpt-{tag}", f"kpn-{tag}", f"kpc-{tag}"
    made: list[str] = []
    proc: subprocess.Popen[str] | None = None
    try:
        for ns in (node_ns, pod_ns, client_ns):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for peer, here, there, addr_here, addrs_there in (
                (pod_ns, "veth-pod", "eth0", f"{NODE_POD_SIDE}/24", [f"{p}/24" for p in pods]),
                (client_ns, "eth0", "eth0", f"{NODE_IP}/24", [f"{CLIENT_IP}/24"])):
            sh("ip", "-n", node_ns, "link", "add", here, "type", "veth", "peer", "name",
                there, "netns", peer)
            sh("ip", "-n", node_ns, "addr", "add", addr_here, "dev", here)
            for addr in addrs_there:
                sh("ip", "-n", peer, "addr", "add", addr, "dev", there)
            sh("ip", "-n", node_ns, "link", "set", here, "up")
            sh("ip", "-n", peer, "link", "set", there, "up")
        sh("ip", "-n", pod_ns, "route", "add", "default", "via", NODE_POD_SIDE)
        sh("ip", "-n", client_ns, "route", "add", "default", "via", NODE_IP)
        sh("ip", "netns", "exec", node_ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        proc = subprocess.Popen(["ip", "netns", "exec", pod_ns, sys.executable, "-c", server],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield PodNet(node_ns, pod_ns, client_ns, proc)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _core_runs(*argv: str) -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "kubeproxy", *argv],
        env=python_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return proc.returncode == 0


@pytest.fixture(scope="module", params=modes.NAMES)
def mode(request: pytest.FixtureRequest) -> str:
    """Every registered mode: the lab's real-packet tests run once per mode."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    value: str = request.param
    reason = modes.get(value).kernel_support(SubprocessRunner())
    if reason:
        pytest.skip(f"{value} mode: {reason}")
    return value


def mode_tag(mode: str) -> str:
    """One character per registered mode, for test lab names (kt<what><tag>)."""
    return "0123456789abcdefghijklmnopqrstuvwxyz"[modes.NAMES.index(mode)]


MakeLab = Callable[..., Lab]


def lab_yaml(nodes: Sequence[str], pods: Sequence[tuple[str, str, str | None, int | None]]
             ) -> str:  # fmt: skip
    """A test lab's Nodes and Pods: each pod (name, node, app label or None, the port it
    serves or None), in YAML. Services and the rest are appended by the test."""
    docs = [f"kind: Node\nmetadata: {{name: {node}}}\n" for node in nodes]
    for name, node, app, port in pods:
        labels = f", labels: {{app: {app}}}" if app else ""
        ports = f", ports: [{{containerPort: {port}}}]" if port else ""
        docs.append(f"kind: Pod\nmetadata: {{name: {name}{labels}}}\n"
                    f"spec: {{nodeName: {node}, containers: [{{name: c{ports}}}]}}\n")
    return "---\n".join(docs)


# Test labs are named kt<what><mode><session>: the session suffix keeps two test sessions
# on one machine (several people work here) from taking down each other's labs, and lets
# the leftover check below look at this session's labs only.
SESSION = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(2))


def session_lab(name: str) -> str:
    """This session's name for test lab ``name`` (kt..., at most 6 characters)."""
    assert name.startswith("kt") and len(name) <= 6, "test labs are named kt... (<= 6)"
    return name + SESSION


ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBEADM_CM = ROOT / "tests" / "unit" / "data" / "kubeadm-kube-proxy-configmap.yaml"
KUBECTL = Path("/usr/lib/google-cloud-sdk/bin/kubectl.1.33")
PROXIES_ENV = "KUBEPROXY_TEST_PROXIES"
PROXY_SOURCES = ("lab", "deploy", "kubeadm", "image")  # where a lab's proxies come from
IMAGE = "kubeproxy:0.1.0"  # deploy/'s DaemonSet image, as make image tags it

# Modules that drive the lab's own proxy processes, which a lab served by deploy/ has
# not: they skip under KUBEPROXY_TEST_PROXIES=deploy|kubeadm, with this reason.


def proxy_source() -> str:
    """KUBEPROXY_TEST_PROXIES: where this session's test labs get their proxies."""
    value = os.environ.get(PROXIES_ENV) or "lab"
    if value not in PROXY_SOURCES:
        raise pytest.UsageError(f"{PROXIES_ENV}={value!r}: one of {', '.join(PROXY_SOURCES)}")
    return value


def kubectl(lab: Lab, *args: str, stdin: str | None = None) -> str:
    """Real kubectl (1.33) against the lab's kubeconfig; asserts it succeeded."""
    done = subprocess.run([str(KUBECTL), "--kubeconfig", str(lab.kubeconfig), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def deploy_documents(source: str, mode: str, lb_algorithm: str) -> list[Any]:
    """deploy/ as the switch gives it to a lab: its kubeconfig.conf naming the lab's API
    server (the one value an operator sets), ``mode`` in the ConfigMap (kubeadm's for
    ``kubeadm``), a non-default load-balancing algorithm as our flag."""
    docs = lab_deploy.with_api_server(lab_deploy.manifests(DEPLOY))
    if source == "kubeadm":
        docs = lab_deploy.with_configmap(docs, lab_deploy.kubeadm_configmap(KUBEADM_CM))
    docs = lab_deploy.with_config(docs, mode=mode)
    if lb_algorithm != UpOptions.lb_algorithm:
        docs = lab_deploy.with_args(docs, [f"--lb-algorithm={lb_algorithm}"])
    return docs


def _serve_from_deploy(lab: Lab, source: str, options: UpOptions) -> None:
    kubectl(lab, "apply", "-f", "-",
            stdin=lab_deploy.dump(deploy_documents(source, options.mode, options.lb_algorithm)))
    lab_deploy.wait_until_served(lab)
    if source == "image":  # the proxies are the image's, one container per node
        names = containers.Podman().names(containers.lab_prefix(lab.name))
        assert len(names) == len(lab.state().nodes), names


def image_skip_reason() -> str | None:
    """Why deploy/'s image cannot run in a lab here, or None."""
    if not containers.Podman().available():
        return "podman is not installed (make image installs it)"
    if not containers.Podman().image_exists(IMAGE):
        return f"no image {IMAGE} in local podman storage (make image builds it)"
    return None


def _skip_under_switch(options: UpOptions) -> None:
    """Skip (with the reason) what a lab served by deploy/ cannot run."""
    if modes.get(options.mode).needs_cgroup:
        pytest.skip(f"{PROXIES_ENV}={proxy_source()}: {options.mode} mode's proxy needs the "
                    "lab's per-node cgroup flags, which a DaemonSet's one template lacks")
    if not KUBECTL.exists():
        pytest.skip(f"{PROXIES_ENV}={proxy_source()}: {KUBECTL} is not installed")
    if proxy_source() == "image" and (reason := image_skip_reason()):
        pytest.skip(f"{PROXIES_ENV}=image: {reason}")


@pytest.fixture(scope="module")
def make_lab() -> Iterator[MakeLab]:
    """make_lab(name, yaml_text, **UpOptions) -> a running Lab, downed after the module.

    With proxies (the default) and KUBEPROXY_TEST_PROXIES=deploy|kubeadm, the lab comes
    up with --no-proxy and deploy/ brings its proxies (see the module docstring)."""
    labs: list[Lab] = []
    source = proxy_source()

    def make(name: str, text: str, **kwargs: Any) -> Lab:
        options = UpOptions(**kwargs)
        from_deploy = options.proxies and source != "lab"
        if from_deploy:
            _skip_under_switch(options)
            options = replace(options, proxies=False, images=source == "image")
        lab = Lab(session_lab(name))
        labs.append(lab)
        lab.up(load_documents([(name, text)]), options)
        if from_deploy:
            _serve_from_deploy(lab, source, options)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down()


def _mine(lab: str) -> bool:
    return lab.startswith("kt") and lab.endswith(SESSION)


def _lab_cgroups() -> set[str]:
    """This session's labs that have a cgroup (named kpl-<lab>)."""
    root = cgroups.lab_cgroup("x")
    if root is None:
        return set()
    found = (p.name.removeprefix("kpl-") for p in root.parent.glob("kpl-*") if p.is_dir())
    return {lab for lab in found if _mine(lab)}


def _lab_namespaces() -> set[str]:
    return {ns for ns in Netns().list_namespaces("kpl-") if _mine(ns.split("-")[1])}


LAB_DIR = str(LabStore("x").base) + "/"  # in the argv of a lab's API server and proxies


def _lab_of(argv: list[str]) -> str | None:
    """The lab a lab process belongs to (pod server, agent, API server, proxy), if any."""
    for flag, value in itertools.pairwise(argv):
        if flag in ("--lab", "--name") and any(a.startswith("kubeproxy.lab.") for a in argv):
            return value
    for arg in argv:
        if LAB_DIR in arg:
            return arg.split(LAB_DIR, 1)[1].split("/")[0]
    return None


def _lab_processes() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        lab = _lab_of([a.decode(errors="replace") for a in raw.split(b"\0")])
        if lab is not None and _mine(lab):
            pids.add(int(proc.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    if skip_reason() is not None:
        yield
        return
    namespaces, processes, files = _lab_namespaces(), _lab_processes(), _test_lab_files()
    labs_with_cgroups, pods = _lab_cgroups(), _lab_containers()
    yield
    left_ns = sorted(_lab_namespaces() - namespaces)
    left_procs = sorted(_lab_processes() - processes)
    left_files = sorted(str(p) for p in set(_test_lab_files()) - set(files))
    left_cgroups = sorted(_lab_cgroups() - labs_with_cgroups)
    left_pods = sorted(_lab_containers() - pods)
    for name in sorted({ns.split("-")[1] for ns in left_ns} | set(left_cgroups)
                       | {c.split("-")[1] for c in left_pods}):
        Lab(name).down()
    if left_ns or left_procs or left_files or left_cgroups or left_pods:
        pytest.fail(
            f"lab tests left behind namespaces {left_ns}, processes {left_procs}, "
            f"files {left_files}, cgroups of labs {left_cgroups}, containers {left_pods}"
        )


def _lab_containers() -> set[str]:
    """This session's labs' containers (DaemonSet Pods run from their image)."""
    names = containers.Podman().names(containers.lab_prefix("kt")[:-1])
    return {n for n in names if _mine(n.split("-")[1])}


def _test_lab_files() -> list[Path]:
    base = LabStore("x").base
    return (
        sorted(p for p in base.glob("kt*") if _mine(p.name.split(".")[0])) if base.exists() else []
    )
