"""A running lab driven with real kubectl (1.27 and 1.33), as a lab user would.

The lab starts with two nodes and Pods (app=my-app on both nodes, a client) but no
Service. Each test uses ``kubectl --kubeconfig $(kubeproxy lab kubeconfig)`` to change
the lab and the lab's own command line (``lab probe``, ``lab wait``) to see the effect:
the seed's Services applied with kubectl are reachable from outside and from a pod, a
Pod applied with kubectl becomes a backend, a Pod deleted with kubectl stops being one,
``kubectl get -w`` sees changes. The proxies' healthz answers inside their node
namespace, and the API server is reachable from the root namespace and the node
namespaces only. Object names carry the kubectl
version, so both versions share one lab.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubeproxy.lab.probe import ProbeResult
from kubeproxy.lab.processes import python_env
from kubeproxy.lab.runtime import Lab
from tests.kernel.conftest import MakeLab, lab_yaml, mode_tag

pytestmark = pytest.mark.kernel

KUBECTL_DIR = Path("/usr/lib/google-cloud-sdk/bin")
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed.yaml"
VERSIONS = ("1.27", "1.33")

LAB = lab_yaml(["node-1", "node-2"], [("my-app-1", "node-1", "my-app", 8080),
                                      ("my-app-2", "node-2", "my-app", 8080),
                                      ("client", "node-1", None, None)])


def service_yaml(name: str, app: str) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {app}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


def pod_yaml(name: str, app: str, node: str | None) -> str:
    node_line = f"  nodeName: {node}\n" if node else ""  # without: the agent schedules it
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
{node_line}  containers:
  - name: web
    image: nginx
    ports: [{{containerPort: 8080}}]
"""


def lab_cli(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubeproxy", "lab", argv[0], "--name", lab.name, *argv[1:]],
        env=python_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@dataclass(frozen=True)
class Kubectl:
    binary: Path
    kubeconfig: str
    version: str

    @property
    def tag(self) -> str:  # for object names: "127"
        return self.version.replace(".", "")

    def argv(self, *args: str) -> list[str]:
        return [str(self.binary), "--kubeconfig", self.kubeconfig, *args]

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            self.argv(*args), input=stdin, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout


@pytest.fixture(scope="module")
def lab(mode: str, make_lab: MakeLab) -> Lab:
    return make_lab(f"ktapi{mode_tag(mode)}", LAB, mode=mode)


@pytest.fixture(params=VERSIONS, ids=[f"kubectl{v}" for v in VERSIONS])
def kubectl(request: pytest.FixtureRequest, lab: Lab) -> Kubectl:
    binary = KUBECTL_DIR / f"kubectl.{request.param}"
    if not binary.exists():
        pytest.skip(f"{binary} is not installed")
    printed = lab_cli(lab, "kubeconfig")
    assert printed.returncode == 0, printed.stderr
    return Kubectl(binary, printed.stdout.strip(), request.param)


def probe(lab: Lab, source: str, target: str, port: int, n: int = 20) -> ProbeResult:
    """``lab probe --json`` as a user runs it (it waits for the rules to catch up)."""
    done = lab_cli(lab, "probe", "--from", source, "--to", target, "--port", str(port),
                   "-n", str(n), "--timeout", "0.5", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return ProbeResult.from_json(json.loads(done.stdout))


def test_kubectl_sees_the_lab(kubectl: Kubectl) -> None:
    nodes = kubectl("get", "nodes")
    assert "node-1" in nodes and "node-2" in nodes and "Ready" in nodes
    pods = json.loads(kubectl("get", "pods", "-o", "json"))["items"]
    running = {p["metadata"]["name"]: p["status"] for p in pods}
    assert {"my-app-1", "my-app-2", "client"} <= set(running)
    assert running["my-app-1"]["phase"] == "Running"
    assert running["my-app-1"]["podIP"].startswith("10.244.")


def seed_services() -> str:
    """The seed's two Services (my-service, my-service-nodeport), verbatim."""
    docs = [d for d in yaml.safe_load_all(SEED.read_text()) if d and d["kind"] == "Service"]
    assert [d["metadata"]["name"] for d in docs] == ["my-service", "my-service-nodeport"]
    return yaml.safe_dump_all(docs)


def test_seed_services_applied_reach_the_pods_already_there(lab: Lab, kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", stdin=seed_services())
    try:
        for source, target, port in (("external", "node-2", 30080),
                                     ("client", "my-service", 80)):  # fmt: skip
            result = probe(lab, source, target, port)
            assert (result.ok, set(result.backends)) == (20, {"my-app-1", "my-app-2"}), result
    finally:
        kubectl("delete", "-f", "-", stdin=seed_services())


def test_applied_pod_becomes_a_backend_and_deleted_stops(lab: Lab, kubectl: Kubectl) -> None:
    app, name = f"extra-{kubectl.tag}", f"extra-{kubectl.tag}"
    node = "node-2" if kubectl.version == "1.27" else None  # 1.33: the agent schedules it
    kubectl("apply", "-f", "-", stdin=service_yaml(app, app))
    try:
        kubectl("apply", "-f", "-", stdin=pod_yaml(name, app, node))
        assert lab_cli(lab, "wait").returncode == 0
        pod = json.loads(kubectl("get", "pod", name, "-o", "json"))
        ip = pod["status"]["podIP"]
        assert pod["status"]["phase"] == "Running" and ip.startswith("10.244.")
        assert any(
            ns.endswith(f"-pod-default.{name}") for ns in lab.net.list_namespaces(lab.prefix)
        )
        slices = json.loads(
            kubectl(
                "get", "endpointslices", "-l", f"kubernetes.io/service-name={app}", "-o", "json"
            )
        )["items"]
        endpoints = [e for s in slices for e in s.get("endpoints") or []]
        assert [(e["addresses"], e["conditions"]["ready"]) for e in endpoints] == [([ip], True)]
        assert probe(lab, "client", app, 80).backends == {name: 20}

        kubectl("delete", "pod", name, "--grace-period=1")  # returns once it is gone
        result = probe(lab, "client", app, 80, n=3)
        assert (result.ok, result.refused) == (0, 3), result
        assert not any(ns.endswith(f".{name}") for ns in lab.net.list_namespaces(lab.prefix))
    finally:
        kubectl("delete", "pod", name, "--ignore-not-found", "--grace-period=0", "--force")
        kubectl("delete", "service", app)


@pytest.fixture
def watching(kubectl: Kubectl) -> Iterator[queue.Queue[str]]:
    """``kubectl get pods -w --output-watch-events``, its lines on a queue."""
    proc = subprocess.Popen(
        kubectl.argv("get", "pods", "-w", "--output-watch-events"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        proc.kill()
        proc.wait()
        reader.join(5)


def wait_for_line(lines: queue.Queue[str], *words: str, timeout: float = 20.0) -> str:
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line with {words} in {seen}") from None
        seen.append(line)
        if all(w in line.split() for w in words):
            return line


def test_get_watch_sees_readiness_change(lab: Lab, watching: queue.Queue[str]) -> None:
    wait_for_line(watching, "ADDED", "my-app-2")  # the initial state
    lab.set_pod_ready("my-app-2", False)
    try:
        wait_for_line(watching, "MODIFIED", "my-app-2", "0/1")
    finally:
        lab.set_pod_ready("my-app-2", True)
    wait_for_line(watching, "MODIFIED", "my-app-2", "1/1")


def http_code(lab: Lab, where: str, url: str) -> str:
    """curl's HTTP status for url, run inside a lab namespace ("000": no connection).
    https URLs (the API server's) are checked against the lab's CA."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    tls = ["--cacert", str(lab.store.ca_cert)] if url.startswith("https://") else []
    done = subprocess.run(
        lab.net.exec_argv(lab.namespace_of(where), [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", *tls,
            url,
        ]),
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.parametrize("node", ["node-1", "node-2"])
def test_proxy_healthz_answers_inside_its_node(lab: Lab, node: str) -> None:
    assert http_code(lab, node, "http://127.0.0.1:10256/healthz") == "200"
    assert http_code(lab, node, "http://127.0.0.1:10249/metrics") == "200"
    assert http_code(lab, node, "https://127.0.0.1:6443/version") == "200"  # its API server


# (from, url): the API server is not reachable from pods, the outside, or across nodes.
UNREACHABLE = [
    ("client", "https://127.0.0.1:6443/version"),
    ("client", "https://192.168.0.2:6443/version"),
    ("external", "https://192.168.0.2:6443/version"),
    ("node-2", "https://192.168.0.2:6443/version"),
]


@pytest.mark.parametrize(
    ("source", "url"), UNREACHABLE, ids=[f"{s}->{u[8:-8]}" for s, u in UNREACHABLE]
)
def test_api_server_is_reachable_from_nowhere_else(lab: Lab, source: str, url: str) -> None:
    assert http_code(lab, source, url) == "000"
