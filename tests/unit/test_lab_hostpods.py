"""Host-network Pods in the lab: planning (pure) and the kubelet's side (strict fakes).

The planning cases run deploy/'s own DaemonSet template, so "the lab can run the
manifest" is checked here without root. The kubelet's side runs ``sleep`` as the Pod's
process (no network, no namespace: the starter is the test's) against a strict fake API.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeproxy.errors import LabError
from kubeproxy.lab import containers, hostpods
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.lab.hostkubelet import BACKOFF_START, HostPods
from kubeproxy.lab.hostpods import (
    SA_DIR,
    HttpProbe,
    Mount,
    PodFacts,
    expand,
    plan_launch,
    readiness_probe,
    wrapper,
)
from kubeproxy.lab.layout import NodePlan
from kubeproxy.lab.netns import Netns
from kubeproxy.lab.state import LabStore
from kubeproxy.util.jsontypes import JSON

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kube-proxy.yaml"
SCRIPTS = {"kube-proxy": "/venv/bin/kube-proxy", "kubeproxy": "/venv/bin/kubeproxy"}
FACTS = PodFacts("kube-proxy-abcde", "kube-system", "uid-1", "node-1", "192.168.0.2", "kube-proxy")
CONFIG = {"config.conf": "kind: KubeProxyConfiguration\n"}


class FakeSources:
    def __init__(self, config_maps: Mapping[tuple[str, str], JSON] | None = None) -> None:
        self.config_maps = dict(config_maps or {})
        self.tokens: list[tuple[str, str, str]] = []

    def config_map(self, namespace: str, name: str) -> JSON | None:
        return self.config_maps.get((namespace, name))

    def token(self, namespace: str, service_account: str, pod: PodFacts) -> str:
        self.tokens.append((namespace, service_account, pod.name))
        return f"token-for-{service_account}"

    def ca(self) -> bytes:
        return b"-----BEGIN CERTIFICATE-----\nlab\n"


def deploy_pod() -> JSON:
    ds = next(d for d in yaml.safe_load_all(DEPLOY.read_text()) if d["kind"] == "DaemonSet")
    spec = dict(ds["spec"]["template"]["spec"], nodeName="node-1")
    return {"metadata": {"name": FACTS.name, "namespace": "kube-system", "uid": "uid-1"},
            "spec": spec}  # fmt: skip


# (id, text, env, expanded) - kubelet's expansion rules
EXPAND = [
    ("known", "--hostname-override=$(NODE_NAME)", {"NODE_NAME": "node-1"},
     "--hostname-override=node-1"),
    ("unknown-kept", "$(NOPE)", {}, "$(NOPE)"),
    ("escaped", "$$(NODE_NAME)", {"NODE_NAME": "x"}, "$(NODE_NAME)"),
    ("lone-dollar", "a$b $", {"b": "x"}, "a$b $"),
    ("twice", "$(A)-$(A)", {"A": "1"}, "1-1"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "env", "want"), [e[1:] for e in EXPAND],
                         ids=[e[0] for e in EXPAND])  # fmt: skip
def test_expand(text: str, env: dict[str, str], want: str) -> None:
    assert expand(text, env) == want


def test_the_deploy_daemonset_as_the_lab_runs_it(tmp_path: Path) -> None:
    sources = FakeSources({("kube-system", "kube-proxy"): {"data": CONFIG}})
    launch = plan_launch(deploy_pod(), FACTS, sources, SCRIPTS, tmp_path)
    assert launch.argv == ("/venv/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf",
                           "--hostname-override=node-1")  # fmt: skip
    assert launch.env["NODE_NAME"] == "node-1"
    assert (launch.env["KUBERNETES_SERVICE_HOST"], launch.env["KUBERNETES_SERVICE_PORT"]) == (
        "127.0.0.1", "6443")
    assert launch.files == {
        "kube-proxy/config.conf": CONFIG["config.conf"].encode(),
        "kube-api-access-lab/token": b"token-for-kube-proxy",
        "kube-api-access-lab/ca.crt": FakeSources().ca(),
        "kube-api-access-lab/namespace": b"kube-system",
    }
    assert launch.mounts == (
        Mount(str(tmp_path / "kube-proxy"), "/var/lib/kube-proxy", True),
        Mount("/run/xtables.lock", "/run/xtables.lock", False),
        Mount("/lib/modules", "/lib/modules", True),
        Mount(str(tmp_path / "kube-api-access-lab"), SA_DIR, True),
    )
    assert launch.host_paths == {"/run/xtables.lock": "File"}
    assert sources.tokens == [("kube-system", "kube-proxy", FACTS.name)]


def test_env_in_order_with_field_refs_and_config_map_keys() -> None:
    container: JSON = {"env": [
        {"name": "A", "value": "a"},
        {"name": "B", "value": "$(A)-$(KUBERNETES_SERVICE_PORT)-$(C)"},
        {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "D", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
        {"name": "KUBERNETES_SERVICE_HOST", "value": "10.0.0.1"},  # a pod's env wins
    ]}  # fmt: skip
    env = hostpods.container_env(container, FACTS, FakeSources({("kube-system", "cm"):
                                                                {"data": {"k": "v"}}}))
    assert {k: env[k] for k in "ABCD"} == {"A": "a", "B": "a-6443-$(C)", "C": "192.168.0.2",
                                           "D": "v"}  # fmt: skip
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"


def with_spec(**changes: Any) -> JSON:
    pod = deploy_pod()
    pod["spec"] = {**pod["spec"], **changes}
    return pod


def container(**changes: Any) -> list[JSON]:
    return [{**deploy_pod()["spec"]["containers"][0], **changes}]


# (id, pod, ConfigMaps, error text) - what the lab refuses to run, saying why
REFUSED: list[tuple[str, JSON, dict[tuple[str, str], JSON], str]] = [
    ("foreign-program", with_spec(containers=container(command=["/bin/sh", "-c", "x"])),
     {}, "'/bin/sh' is not one"),
    ("unsupported-field-ref", with_spec(containers=container(env=[
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}])),
     {}, "env[0] (X): fieldRef 'metadata.labels'"),
    ("missing-config-map", deploy_pod(), {}, "ConfigMap kube-system/kube-proxy not found"),
    ("missing-key", with_spec(volumes=[{"name": "kube-proxy", "configMap": {
        "name": "kube-proxy", "items": [{"key": "nope", "path": "x"}]}}]),
     {("kube-system", "kube-proxy"): {"data": CONFIG}}, "key 'nope' not found"),
    ("emptydir", with_spec(volumes=[{"name": "kube-proxy", "emptyDir": {}}]), {},
     "only configMap, projected and hostPath"),
]  # fmt: skip


@pytest.mark.parametrize(("pod", "cms", "error"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])  # fmt: skip
def test_refused(pod: JSON, cms: dict[tuple[str, str], JSON], error: str, tmp_path: Path) -> None:
    with pytest.raises(LabError, match=re.escape(error)):
        plan_launch(pod, FACTS, FakeSources(cms), SCRIPTS, tmp_path)


def test_no_token_when_automount_is_off_and_admissions_volume_is_used(tmp_path: Path) -> None:
    cms = {("kube-system", "kube-proxy"): {"data": CONFIG}}
    off = plan_launch(with_spec(automountServiceAccountToken=False), FACTS, FakeSources(cms),
                      SCRIPTS, tmp_path)  # fmt: skip
    assert [m.target for m in off.mounts if m.target == SA_DIR] == []
    # What the ServiceAccount admission plugin injects: a projected volume at SA_DIR.
    ca_item = {"key": "ca.crt", "path": "ca.crt"}
    ns_item = {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
    projected = {"name": "kube-api-access-x", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [ca_item]}},
        {"downwardAPI": {"items": [ns_item]}}]}}  # fmt: skip
    pod = deploy_pod()
    pod["spec"]["volumes"] = [*pod["spec"]["volumes"], projected]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        *pod["spec"]["containers"][0]["volumeMounts"],
        {"name": "kube-api-access-x", "mountPath": SA_DIR, "readOnly": True}]
    launch = plan_launch(pod, FACTS, FakeSources(cms), SCRIPTS, tmp_path)
    assert [m for m in launch.mounts if m.target == SA_DIR] == [
        Mount(str(tmp_path / "kube-api-access-x"), SA_DIR, True)]
    assert {k: v for k, v in launch.files.items() if k.startswith("kube-api")} == {
        "kube-api-access-x/token": b"token-for-kube-proxy",
        "kube-api-access-x/ca.crt": FakeSources().ca(),
        "kube-api-access-x/namespace": b"kube-system"}


def test_wrapper_binds_in_a_private_mount_namespace(tmp_path: Path) -> None:
    launch = hostpods.Launch(("/venv/bin/kube-proxy", "--v=2"), {}, {}, (
        Mount("/lab/pods/p/cfg", "/var/lib/kube-proxy", True),
        Mount("/run/xtables.lock", "/run/xtables.lock", False),
        Mount("/lib/modules", "/lib/modules", True)))  # fmt: skip
    argv = wrapper(lambda a: Netns().exec_argv("kpl-x-node-1", a), launch)
    assert argv[:11] == ["ip", "netns", "exec", "kpl-x-node-1", "unshare", "--mount",
                         "--propagation", "private", "--", "sh", "-c"]  # fmt: skip
    assert argv[11].splitlines() == [
        "set -e",
        "mount --bind /lab/pods/p/cfg /var/lib/kube-proxy",
        "mount -o remount,bind,ro /var/lib/kube-proxy",
        "if [ -e /lib/modules ]; then mount --bind /lib/modules /lib/modules; "
        "mount -o remount,bind,ro /lib/modules; fi",
        'exec "$@"',
    ]
    assert argv[12:] == ["lab-pod", "/venv/bin/kube-proxy", "--v=2"]


def test_a_host_path_the_host_lacks_is_not_created(tmp_path: Path) -> None:
    """hostPath /lib/modules on a kernel without modules: nothing appears in the host's /
    (an empty /lib/modules file there would break tools/vmrun's guests)."""
    store = LabStore("a", tmp_path / "labs")
    store.dir.mkdir(parents=True)
    missing = str(tmp_path / "lib" / "modules")
    hostpods.prepare_host(store, hostpods.Launch(("x",), {}, {}, (
        Mount(missing, missing, True),)))
    assert not (tmp_path / "lib").exists()


def test_mount_points_are_removed_unless_another_lab_uses_them(tmp_path: Path) -> None:
    base, root = tmp_path / "labs", tmp_path / "host"
    a, b = LabStore("a", base), LabStore("b", base)
    a.dir.mkdir(parents=True)
    b.dir.mkdir(parents=True)
    source = tmp_path / "src"
    source.mkdir()
    mine = hostpods.Launch(("x",), {}, {}, (Mount(str(source), str(root / "mine/deep"), True),
                                            Mount(str(source), str(root / "shared"), True)))
    hostpods.prepare_host(a, mine)
    assert (root / "mine/deep").is_dir() and (root / "shared").is_dir()
    hostpods.prepare_host(b, hostpods.Launch(("x",), {}, {}, (
        Mount(str(source), str(root / "shared"), True),)))  # fmt: skip
    removed = hostpods.remove_mountpoints(a)
    assert sorted(removed) == [str(root / "mine"), str(root / "mine/deep")]
    assert (root / "shared").is_dir() and not (root / "mine").exists()
    a.remove()  # what `lab down` does next
    # a created root and root/shared, b still used them: they were handed over to b.
    assert hostpods.remove_mountpoints(b) == [str(root / "shared"), str(root)]
    assert not root.exists()


# ---------------------------------------------------------------- the kubelet's side


class FakeApi(LabApi):
    """Pods only; mutate and delete as the API server does them; anything else fails."""

    def __init__(self, pods: Sequence[JSON]) -> None:
        super().__init__("http://127.0.0.1:9")
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.deleted: list[tuple[str, int | None]] = []

    def mutate(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        change: Callable[[JSON], JSON | None],
        sub: str | None = None,
    ) -> JSON | None:
        assert (kind, namespace, sub) == ("Pod", "kube-system", "status")
        if name not in self.pods:
            raise LabApiError(404, "NotFound", name)
        new = change(self.pods[name])
        if new is not None:
            self.pods[name] = new
        return new

    def delete(self, kind: str, namespace: str | None, name: str,
               grace: int | None = None) -> JSON | None:  # fmt: skip
        self.deleted.append((name, grace))
        return self.pods.pop(name, None)

    def request(self, *args: Any, **kwargs: Any) -> JSON:
        raise AssertionError("the fake sources answer; no request expected")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def host_pod(tmp_path: Path, restart: str = "Always") -> JSON:
    """A Pod whose mounts stay under tmp_path (prepare_host would create them)."""
    pod = deploy_pod()
    spec = pod["spec"]
    spec["restartPolicy"] = restart
    spec["automountServiceAccountToken"] = False
    spec["volumes"] = [spec["volumes"][0]]
    spec["containers"][0]["volumeMounts"] = [{"name": "kube-proxy",
                                              "mountPath": str(tmp_path / "mnt")}]  # fmt: skip
    return pod


class FakePodman:
    """Local podman storage and containers, strictly: only the names this lab's
    containers may have are removed, and nothing else is ever asked."""

    def __init__(self, images: set[str] | None = None) -> None:
        self.images = set(images or ())
        self.containers: set[str] = set()
        self.removed: list[str] = []

    def image_exists(self, image: str) -> bool:
        return image in self.images

    def remove(self, names: Sequence[str]) -> None:
        assert all(n.startswith("kpl-x-") for n in names), names
        self.removed += names
        self.containers -= set(names)

    def remove_lab(self, lab: str) -> list[str]:
        names = sorted(n for n in self.containers if n.startswith(f"kpl-{lab}-"))
        self.remove(names)
        return names


def kubelet(tmp_path: Path, api: FakeApi, clock: Clock, procs: list[subprocess.Popen[bytes]],
            probes: list[bool] | None = None, podman: FakePodman | None = None,
            images: bool = True) -> tuple[HostPods, list[Any]]:  # fmt: skip
    calls: list[Any] = []

    def prober(ns: str, probe: HttpProbe) -> bool:
        calls.append(("probe", ns, probe))
        assert probes, "no probe expected"
        return probes.pop(0)

    def starter(argv: Sequence[str], env: Mapping[str, str], log: Path) -> Any:
        calls.append((list(argv), dict(env), log))
        procs.append(subprocess.Popen(["sleep", "60"]))
        return procs[-1]

    node = NodePlan(name="node-1", ns="kpl-x-node-1", lab_ip="192.168.0.2",
                    pod_cidr="10.244.1.0/24", gateway="10.244.1.1", switch_port="p1",
                    zone=None)  # fmt: skip
    sources = FakeSources({("kube-system", "kube-proxy"): {"data": CONFIG}})
    hp = HostPods(LabStore("x", tmp_path / "labs"), Netns(), {"node-1": node}, api, clock,
                  sources=sources, scripts=SCRIPTS, starter=starter, prober=prober,
                  images=images, podman=podman or FakePodman())
    return hp, calls


def status_of(api: FakeApi) -> JSON:
    status: JSON = api.pods[FACTS.name]["status"]
    return status


def ready(api: FakeApi) -> str:
    return str(next(c["status"] for c in status_of(api)["conditions"] if c["type"] == "Ready"))


def test_runs_restarts_and_stops_a_pod(tmp_path: Path, procs: list[Any]) -> None:
    api, clock = FakeApi([host_pod(tmp_path)]), Clock()
    hp, calls = kubelet(tmp_path, api, clock, procs)
    done = hp.sync(list(api.pods.values()))
    assert (done.local, done.writes, done.errors) == (1, 1, [])
    argv, env, log = calls[0]
    assert argv[:4] == ["ip", "netns", "exec", "kpl-x-node-1"] and argv[-1] == (
        "--hostname-override=node-1")
    assert (env["NODE_NAME"], env["HOSTNAME"], log.name) == ("node-1", "node-1",
                                                              "kube-system_kube-proxy-abcde.log")
    assert (hp.pod_dir("kube-system/" + FACTS.name) / "kube-proxy/config.conf").read_text() == (
        CONFIG["config.conf"])
    status = status_of(api)
    assert (status["phase"], status["podIP"], status["hostIP"], ready(api)) == (
        "Running", "192.168.0.2", "192.168.0.2", "True")
    assert hp.next_deadline() == clock.now + 1.0  # polling, not due

    procs[0].kill()  # the container exits
    procs[0].wait()
    assert hp.next_deadline() == clock.now  # due: note the exit
    hp.sync(list(api.pods.values()))
    assert ready(api) == "False"
    cs = status_of(api)["containerStatuses"][0]
    assert cs["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert cs["lastState"]["terminated"]["exitCode"] == -9
    assert hp.next_deadline() == clock.now + BACKOFF_START
    hp.sync(list(api.pods.values()))
    assert len(calls) == 1  # backing off
    clock.now += BACKOFF_START
    hp.sync(list(api.pods.values()))
    assert len(calls) == 2 and ready(api) == "True"
    assert status_of(api)["containerStatuses"][0]["restartCount"] == 1

    pod = dict(api.pods[FACTS.name])
    pod["metadata"] = {**pod["metadata"], "deletionTimestamp": "2025-01-01T00:00:00Z"}
    hp.sync([pod])
    assert procs[1].poll() is not None and api.deleted == [(FACTS.name, 0)]
    assert hp.running == {} and not hp.pod_dir("kube-system/" + FACTS.name).exists()


def test_restart_policy_never_ends_the_pod(tmp_path: Path, procs: list[Any]) -> None:
    api, clock = FakeApi([host_pod(tmp_path, restart="Never")]), Clock()
    hp, calls = kubelet(tmp_path, api, clock, procs)
    hp.sync(list(api.pods.values()))
    procs[0].terminate()
    procs[0].wait()
    hp.sync(list(api.pods.values()))
    assert status_of(api)["phase"] == "Failed" and hp.running == {}
    hp.sync(list(api.pods.values()))
    assert len(calls) == 1  # never started again


def test_a_pod_gone_or_replaced_is_stopped(tmp_path: Path, procs: list[Any]) -> None:
    api, clock = FakeApi([host_pod(tmp_path)]), Clock()
    hp, _ = kubelet(tmp_path, api, clock, procs)
    hp.sync(list(api.pods.values()))
    replaced = host_pod(tmp_path)
    replaced["metadata"]["uid"] = "uid-2"
    hp.sync([replaced])  # stopped, then the new one started
    assert procs[0].poll() is not None and procs[1].poll() is None
    hp.sync([])
    assert procs[1].poll() is not None and hp.running == {}


def test_a_pod_whose_image_is_missing_waits_as_a_kubelets_would(
        tmp_path: Path, procs: list[Any]) -> None:
    """Neither its image nor this checkout's program: ErrImageNeverPull, Pending, not
    Ready, written once; started as soon as the image is in local storage."""
    pod = host_pod(tmp_path)
    pod["spec"]["containers"][0]["command"] = ["/usr/bin/nginx"]
    pod["spec"]["containers"][0]["image"] = "nginx:1.25"
    api, clock, podman = FakeApi([pod]), Clock(), FakePodman()
    hp, calls = kubelet(tmp_path, api, clock, procs, podman=podman)
    done = hp.sync([pod])
    assert calls == [] and done.errors == [] and done.writes == 1
    status = status_of(api)
    (waiting,) = [c["state"]["waiting"] for c in status["containerStatuses"]]
    assert status["phase"] == "Pending" and ready(api) == "False"
    assert waiting == {"reason": "ErrImageNeverPull", "message": 'Container image '
                       '"nginx:1.25" is not present with pull policy of Never'}
    assert hp.sync([api.pods[FACTS.name]]).writes == 0  # still waiting: nothing new
    podman.images.add("nginx:1.25")
    hp.sync([api.pods[FACTS.name]])
    assert len(calls) == 1 and calls[0][0][:2] == ["podman", "--runtime"]
    assert status_of(api)["phase"] == "Running"


def test_a_pod_whose_image_is_present_runs_as_a_container(
        tmp_path: Path, procs: list[Any]) -> None:
    pod = host_pod(tmp_path)
    api, clock, podman = FakeApi([pod]), Clock(), FakePodman({"kubeproxy:0.1.0"})
    hp, calls = kubelet(tmp_path, api, clock, procs, podman=podman)
    hp.sync([pod])
    ((argv, env, _),) = calls
    name = "kpl-x-kube-system-kube-proxy-abcde"
    assert argv[:4] == ["podman", "--runtime", "runc", "run"]
    assert argv[argv.index("--name") + 1] == name
    assert "--network=ns:/run/netns/kpl-x-node-1" in argv and "--privileged" in argv
    assert "--pull=never" in argv and "--ulimit=nofile=20000:20000" in argv
    assert argv[argv.index("--entrypoint") + 1:] == [
        "/usr/local/bin/kube-proxy", "kubeproxy:0.1.0",
        "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=node-1"]
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "--volume"]
    pod_dir = hp.pod_dir(f"kube-system/{FACTS.name}")
    assert volumes == [f"{pod_dir}/kube-proxy:{tmp_path / 'mnt'}:ro"]
    envs = {a.split("=", 1)[0]: a.split("=", 1)[1]
            for a, prev in zip(argv[1:], argv, strict=False) if prev == "--env"}
    assert envs["NODE_NAME"] == "node-1" and envs["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["CONTAINERS_CONF"].endswith("lab/containers.conf")
    assert env["KUBEPROXY_LAB_POD"] == str(pod_dir)
    assert not (tmp_path / "mnt").exists()  # a container's mount points are its image's
    podman.containers.add(name)
    hp.sync([])  # the Pod is gone: the process stopped, the container removed by name
    assert procs[0].poll() is not None and podman.removed == [name]


def test_without_images_a_pod_runs_from_this_checkout(
        tmp_path: Path, procs: list[Any]) -> None:
    pod = host_pod(tmp_path)
    api, clock = FakeApi([pod]), Clock()
    hp, calls = kubelet(tmp_path, api, clock, procs, podman=FakePodman({"kubeproxy:0.1.0"}),
                        images=False)  # fmt: skip
    hp.sync([pod])
    ((argv, _, _),) = calls
    assert "podman" not in argv and "/venv/bin/kube-proxy" in argv


# (id, readinessProbe, the probe as run, or the error)
PROBES: list[tuple[str, JSON, HttpProbe | str]] = [
    ("defaults", {"httpGet": {"port": 10256}}, HttpProbe("192.168.0.2", 10256, "/")),
    ("named-port", {"httpGet": {"port": "healthz", "path": "/healthz"}, "periodSeconds": 2,
                    "initialDelaySeconds": 1, "failureThreshold": 1},
     HttpProbe("192.168.0.2", 10256, "/healthz", 1.0, 2.0, 1.0, 1, 1)),
    ("unknown-port-name", {"httpGet": {"port": "nope"}}, "no container port named 'nope'"),
    ("https", {"httpGet": {"port": 1, "scheme": "HTTPS"}}, "only httpGet over HTTP"),
    ("exec", {"exec": {"command": ["true"]}}, "only httpGet over HTTP"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "want"), [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_readiness_probe(spec: JSON, want: HttpProbe | str) -> None:
    container = {"readinessProbe": spec, "ports": [{"name": "healthz", "containerPort": 10256}]}
    if isinstance(want, str):
        with pytest.raises(LabError, match=re.escape(want)):
            readiness_probe(container, FACTS)
    else:
        assert readiness_probe(container, FACTS) == want


def test_ready_as_the_probe_says(tmp_path: Path, procs: list[Any]) -> None:
    pod = host_pod(tmp_path)
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"port": 10256, "path": "/healthz"}, "initialDelaySeconds": 1,
        "periodSeconds": 5, "failureThreshold": 2}  # fmt: skip
    api, clock = FakeApi([pod]), Clock()
    results = [False, True, False, False]
    hp, calls = kubelet(tmp_path, api, clock, procs, probes=results)
    hp.sync([pod])
    assert ready(api) == "False"  # until the probe says so
    assert hp.next_deadline() == clock.now + 1.0  # the initial delay
    seen = []
    for _ in range(4):
        clock.now += 5
        hp.sync(list(api.pods.values()))
        seen.append(ready(api))
    # fail (stays not Ready), succeed (Ready), one failure (threshold 2), second failure
    assert seen == ["False", "True", "True", "False"]
    probe = calls[-1]
    assert probe[:2] == ("probe", "kpl-x-node-1") and probe[2].path == "/healthz"
    assert results == []


def test_run_argv_mounts_what_the_host_has(tmp_path: Path) -> None:
    """A hostPath at its own path that the host lacks is not mounted (podman would
    refuse to start); read-only mounts say so; command and args around the image."""
    (tmp_path / "lock").touch()
    launch = hostpods.Launch(
        argv=("/bin/prog", "--flag"), env={"A": "1"}, files={},
        mounts=(Mount(str(tmp_path / "lock"), str(tmp_path / "lock"), False),
                Mount(str(tmp_path / "absent"), str(tmp_path / "absent"), True),
                Mount(str(tmp_path / "cfg"), "/etc/prog", True)))  # fmt: skip
    argv = containers.run_argv(launch, "img:1", "kpl-x-ns-p", "kpl-x-n1", "n1",
                               privileged=False)  # fmt: skip
    volumes = [argv[i + 1] for i, a in enumerate(argv) if a == "--volume"]
    assert volumes == [f"{tmp_path / 'lock'}:{tmp_path / 'lock'}",
                       f"{tmp_path / 'cfg'}:/etc/prog:ro"]
    assert "--privileged" not in argv
    assert argv[-4:] == ["--entrypoint", "/bin/prog", "img:1", "--flag"]
    assert argv[argv.index("--env") + 1] == "A=1" and "--hostname" in argv


# (image, this project's?)
PROJECT_IMAGES = [("kubeproxy:0.1.0", True), ("registry.example.com/kubeproxy:0.1.0", True),
                  ("kubeproxy", True), ("localhost:5000/kubeproxy@sha256:ab", True),
                  ("registry.k8s.io/kube-proxy:v1.33.0", False), ("nginx:1.25", False),
                  ("kubeproxy-fork:1", False), ("", False)]


@pytest.mark.parametrize(("image", "ours"), PROJECT_IMAGES)
def test_is_project_image(image: str, ours: bool) -> None:
    assert hostpods.is_project_image(image) is ours


def test_upstreams_image_is_not_stood_in_for(tmp_path: Path, procs: list[Any]) -> None:
    """The lab runs this checkout only for this project's own image, never for another
    image with a program of the same name."""
    pod = host_pod(tmp_path)
    pod["spec"]["containers"][0]["image"] = "registry.k8s.io/kube-proxy:v1.33.0"
    api, clock = FakeApi([pod]), Clock()
    hp, calls = kubelet(tmp_path, api, clock, procs)
    hp.sync([pod])
    assert calls == [] and status_of(api)["phase"] == "Pending"
