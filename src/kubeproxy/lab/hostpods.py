"""Host-network Pods with a command: what the lab's kubelet runs for a DaemonSet.

Theory of operation
-------------------
A lab Pod normally runs the built-in pod server in a namespace of its own
(``kubelet.py``). A Pod with ``hostNetwork: true`` whose container has a ``command``
is different: it is a node agent (kube-proxy from ``deploy/``), so it runs in its node's
network namespace, with the container's program. When the Pod's image is in local
podman storage (``make image``), the lab's kubelet runs that image (containers.py),
with the same environment and volumes as below; otherwise it runs the program from
this checkout as a host process:

1. **program**: the command's program is looked up by its base name among this
   project's console scripts (``kube-proxy``, ``kubeproxy`` in pyproject.toml) and run
   from this Python's environment (``/usr/local/bin/kube-proxy`` -> ``.venv/bin/kube-proxy``).
   Any other program without its image waits as a kubelet's would (ErrImageNeverPull):
   the lab runs only what it ships or what was built here.
2. **environment**, as kubelet builds it: the service variables first
   (``KUBERNETES_SERVICE_HOST``/``PORT``: in the lab the API server as the node
   namespace reaches it, 127.0.0.1:6443, where a cluster gives the ``kubernetes``
   Service's ClusterIP), then the container's ``env`` in order: ``value`` with
   ``$(VAR)`` expanded against what came before, ``valueFrom.fieldRef``
   (``FIELD_REFS``), ``configMapKeyRef``. ``$(VAR)`` in command and args is expanded
   against the result (``$$`` is a literal ``$``; an unknown name is left as written).
3. **volumes**: ConfigMaps (``data`` and ``binaryData``, or just ``items``), projected
   volumes (serviceAccountToken, configMap, downwardAPI), and the service-account volume
   the admission plugin would add (``token`` from a TokenRequest, ``ca.crt``, the
   ``namespace``) unless ``automountServiceAccountToken: false`` or a container mount
   already covers ``SA_DIR``: their files are written to ``<lab>/pods/<pod>/<volume>/``.
   hostPath volumes are the host's own path (``FileOrCreate`` / ``DirectoryOrCreate``
   create it, as kubelet does).
4. **mounts**: the process starts as ``ip netns exec NODE unshare --mount --propagation
   private sh -c '<mount --bind ...>; exec "$@"' PROGRAM ARGS``: each volume is
   bind-mounted at its mountPath (read-only ones remounted ``ro``) in a mount namespace
   of its own, so the process sees its files at the manifest's paths and nothing changes
   for anyone else. A mountPath missing on the host is created empty first (as a
   runtime creates it in an image) and listed in ``<lab>/mountpoints.json``;
   ``lab down`` removes it again unless another lab still uses it. A hostPath mounted
   at its own path that the host lacks (``/lib/modules`` where the kernel has no
   modules) is skipped: the process sees the host as it is, and the host's ``/`` gets
   nothing new (an empty ``/lib/modules`` file would break tools/vmrun's guests).

A ``readinessProbe.httpGet`` (``readiness_probe``) is run from inside the node's
namespace; without one a Pod is Ready while its process lives.

``plan_launch`` (pure) turns a Pod into a ``Launch``; ``HostPods`` (in
``hostkubelet.py``) starts, watches, probes, restarts and stops them.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Protocol

from kubeproxy.errors import LabError
from kubeproxy.lab.state import LabStore, write_atomic
from kubeproxy.util.jsontypes import JSON

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_HOST, API_PORT = "127.0.0.1", 6443  # the node namespace's API listener (runtime.py)
PROJECT = "kubeproxy"
SA_VOLUME = "kube-api-access-lab"
TOKEN_SECONDS = 3607  # what kubelet asks for a projected token (1 h + 7 s)


@dataclass(frozen=True)
class PodFacts:
    """What downward-API field references read."""

    name: str
    namespace: str
    uid: str
    node: str
    node_ip: str
    service_account: str


# fieldRef.fieldPath -> its value (upstream's supported downward-API env fields).
FIELD_REFS: dict[str, Callable[[PodFacts], str]] = {
    "metadata.name": lambda f: f.name,
    "metadata.namespace": lambda f: f.namespace,
    "metadata.uid": lambda f: f.uid,
    "spec.nodeName": lambda f: f.node,
    "spec.serviceAccountName": lambda f: f.service_account,
    "status.hostIP": lambda f: f.node_ip,
    "status.hostIPs": lambda f: f.node_ip,
    "status.podIP": lambda f: f.node_ip,  # host network: the node's address
    "status.podIPs": lambda f: f.node_ip,
}


class Sources(Protocol):
    """Where volume and env contents come from (the API server, or a test's fake)."""

    def config_map(self, namespace: str, name: str) -> JSON | None:
        """The ConfigMap, or None when it does not exist."""

    def token(self, namespace: str, service_account: str, pod: PodFacts) -> str:
        """A token from the service account's TokenRequest; raises LabError."""

    def ca(self) -> bytes:
        """The cluster CA (PEM) a Pod trusts: ca.crt."""


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class Launch:
    argv: tuple[str, ...]  # the program resolved, command and args expanded
    env: Mapping[str, str]
    files: Mapping[str, bytes]  # path relative to the pod directory -> content
    mounts: tuple[Mount, ...]
    host_paths: Mapping[str, str] = field(default_factory=dict)  # path -> File|Directory


@dataclass(frozen=True)
class HttpProbe:
    """A container's readinessProbe.httpGet, kubelet's defaults filled in."""

    host: str
    port: int
    path: str
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def readiness_probe(container: JSON, facts: PodFacts) -> HttpProbe | None:
    """The container's readiness probe (httpGet over HTTP only); None without one."""
    probe = container.get("readinessProbe")
    if not probe:
        return None
    get = probe.get("httpGet")
    if get is None or (get.get("scheme") or "HTTP") != "HTTP":
        raise LabError("readinessProbe: only httpGet over HTTP is supported in the lab")
    port = get.get("port")
    if isinstance(port, str):  # a named container port
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        if port not in named:
            raise LabError(f"readinessProbe: no container port named {port!r}")
        port = named[port]
    return HttpProbe(
        host=str(get.get("host") or facts.node_ip), port=int(port),
        path=str(get.get("path") or "/"),
        initial_delay=float(probe.get("initialDelaySeconds") or 0),
        period=float(probe.get("periodSeconds") or 10),
        timeout=float(probe.get("timeoutSeconds") or 1),
        success_threshold=int(probe.get("successThreshold") or 1),
        failure_threshold=int(probe.get("failureThreshold") or 3),
    )  # fmt: skip


def first_container(pod: JSON) -> JSON:
    """The Pod's first container (the one the lab runs), {} when it has none."""
    container: JSON = ((pod.get("spec") or {}).get("containers") or [{}])[0]
    return container


def is_project_image(image: str) -> bool:
    """Whether ``image`` names this project's image (``[registry/]kubeproxy[:tag]``)."""
    name = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    return name == PROJECT


def is_host_pod(pod: JSON) -> bool:
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or [{}]
    return bool(spec.get("hostNetwork")) and bool(containers[0].get("command"))


_REF = re.compile(r"\$(\$|\(([A-Za-z_][-._A-Za-z0-9]*)\))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """kubelet's $(VAR) expansion: known names replaced, $$ -> $, the rest kept."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        return env.get(m.group(2), m.group(0))

    return _REF.sub(one, text)


def console_scripts() -> dict[str, str]:
    """This project's console scripts -> where this Python installed them."""
    out = {}
    for ep in metadata.entry_points(group="console_scripts"):
        if ep.dist is not None and ep.dist.name == PROJECT:
            local = Path(sys.executable).parent / ep.name
            found = str(local) if local.exists() else shutil.which(ep.name)
            if found:
                out[ep.name] = found
    return out


def resolve_program(command0: str, scripts: Mapping[str, str]) -> str:
    name = Path(command0).name
    if name not in scripts:
        raise LabError(f"the lab runs only this project's programs ({', '.join(sorted(scripts))})"
                       f"; {command0!r} is not one")  # fmt: skip
    return scripts[name]


def service_env() -> dict[str, str]:
    """The service variables kubelet gives every container, for the API server."""
    tcp = f"tcp://{API_HOST}:{API_PORT}"
    return {"KUBERNETES_SERVICE_HOST": API_HOST, "KUBERNETES_SERVICE_PORT": str(API_PORT),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(API_PORT), "KUBERNETES_PORT": tcp,
            f"KUBERNETES_PORT_{API_PORT}_TCP": tcp}  # fmt: skip


def container_env(container: JSON, facts: PodFacts, sources: Sources) -> dict[str, str]:
    env = service_env()
    for i, var in enumerate(container.get("env") or []):
        name = str(var.get("name"))
        where = f"env[{i}] ({name})"
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand(str(var.get("value") or ""), env)
        elif "fieldRef" in source:
            path = str(source["fieldRef"].get("fieldPath"))
            if path not in FIELD_REFS:
                raise LabError(f"{where}: fieldRef {path!r} is not supported in the lab")
            env[name] = FIELD_REFS[path](facts)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = sources.config_map(facts.namespace, str(ref.get("name")))
            value = ((cm or {}).get("data") or {}).get(ref.get("key"))
            if value is None and not ref.get("optional"):
                raise LabError(f"{where}: ConfigMap {ref.get('name')} key {ref.get('key')} "
                               "is missing")  # fmt: skip
            if value is not None:
                env[name] = str(value)
        else:
            raise LabError(f"{where}: only value, fieldRef and configMapKeyRef are supported")
    return env


def _config_map_files(
    facts: PodFacts, spec: JSON, sources: Sources, what: str
) -> dict[str, bytes]:
    cm = sources.config_map(facts.namespace, str(spec.get("name")))
    if cm is None:
        if spec.get("optional"):
            return {}
        raise LabError(f"{what}: ConfigMap {facts.namespace}/{spec.get('name')} not found")
    data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
    data |= {k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()}
    items = spec.get("items")
    if not items:
        return data
    out = {}
    for item in items:
        if item.get("key") not in data:
            raise LabError(f"{what}: ConfigMap key {item.get('key')!r} not found")
        out[str(item.get("path"))] = data[item["key"]]
    return out


def _sa_files(facts: PodFacts, sources: Sources) -> dict[str, bytes]:
    token = sources.token(facts.namespace, facts.service_account, facts)
    return {"token": token.encode(), "ca.crt": sources.ca(), "namespace": facts.namespace.encode()}


def _projected(facts: PodFacts, spec: JSON, sources: Sources, what: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for src in spec.get("sources") or []:
        if "serviceAccountToken" in src:
            token = sources.token(facts.namespace, facts.service_account, facts)
            out[str(src["serviceAccountToken"].get("path") or "token")] = token.encode()
        elif "configMap" in src:
            if src["configMap"].get("name") == "kube-root-ca.crt":  # the lab's CA
                out.update({str(i.get("path")): sources.ca()
                            for i in src["configMap"].get("items") or [{"path": "ca.crt"}]})
            else:
                out.update(_config_map_files(facts, src["configMap"], sources, what))
        elif "downwardAPI" in src:
            for item in src["downwardAPI"].get("items") or []:
                path = str((item.get("fieldRef") or {}).get("fieldPath"))
                if path not in FIELD_REFS:
                    raise LabError(f"{what}: downwardAPI {path!r} is not supported")
                out[str(item.get("path"))] = FIELD_REFS[path](facts).encode()
        else:
            raise LabError(f"{what}: projected source {sorted(src)} is not supported")
    return out


def plan_launch(
    pod: JSON, facts: PodFacts, sources: Sources, scripts: Mapping[str, str], pod_dir: Path,
    *, in_image: bool = False,
) -> Launch:
    """Everything needed to start the Pod's (first) container. Raises LabError.
    ``in_image``: the container runs from its image (containers.py), so its command is
    the image's program as written, not one of this checkout's ``scripts``."""
    spec = pod.get("spec") or {}
    container = first_container(pod)
    env = container_env(container, facts, sources)
    command = [expand(str(a), env) for a in container.get("command") or []]
    command += [expand(str(a), env) for a in container.get("args") or []]
    argv = tuple(command) if in_image else (resolve_program(command[0], scripts), *command[1:])
    files: dict[str, bytes] = {}
    sources_of: dict[str, str] = {}  # volume -> what to bind (a pod dir or a host path)
    host_paths: dict[str, str] = {}
    for vol in spec.get("volumes") or []:
        name, what = str(vol.get("name")), f"volume {vol.get('name')}"
        if "configMap" in vol:
            found = _config_map_files(facts, vol["configMap"], sources, what)
        elif "projected" in vol:
            found = _projected(facts, vol["projected"], sources, what)
        elif "hostPath" in vol:
            path = str(vol["hostPath"].get("path"))
            kind = str(vol["hostPath"].get("type") or "")
            if kind in ("FileOrCreate", "DirectoryOrCreate"):
                host_paths[path] = kind.removesuffix("OrCreate")
            sources_of[name] = path
            continue
        else:
            raise LabError(f"{what}: only configMap, projected and hostPath are supported")
        files |= {f"{name}/{k}": v for k, v in found.items()}
        sources_of[name] = str(pod_dir / name)
    mounts = []
    for m in container.get("volumeMounts") or []:
        if m.get("name") not in sources_of:
            raise LabError(f"volumeMount {m.get('mountPath')}: no volume {m.get('name')!r}")
        src = sources_of[str(m["name"])]
        read_only = bool(m.get("readOnly")) or src.startswith(str(pod_dir))
        mounts.append(Mount(src, str(m.get("mountPath")), read_only))
    if spec.get("automountServiceAccountToken") is not False and all(
        m.target != SA_DIR for m in mounts
    ):
        files |= {f"{SA_VOLUME}/{k}": v for k, v in _sa_files(facts, sources).items()}
        mounts.append(Mount(str(pod_dir / SA_VOLUME), SA_DIR, True))
    return Launch(argv, env, files, tuple(mounts), host_paths)


def wrapper(ns_argv: Callable[[Sequence[str]], list[str]], launch: Launch) -> list[str]:
    """The argv that runs the Pod's program in the node namespace, with its mounts in a
    private mount namespace. Mounts that are their own source and read-write need none."""
    lines = ["set -e"]
    for m in launch.mounts:
        if m.source == m.target and not m.read_only:
            continue
        src, dst = shlex.quote(m.source), shlex.quote(m.target)
        mount = [f"mount --bind {src} {dst}"]
        if m.read_only:
            mount.append(f"mount -o remount,bind,ro {dst}")
        if m.source == m.target:  # a host path over itself: only if the host has it
            lines.append(f"if [ -e {src} ]; then {'; '.join(mount)}; fi")
        else:
            lines += mount
    lines.append('exec "$@"')
    inner = ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", "\n".join(lines), "lab-pod", *launch.argv]  # fmt: skip
    return ns_argv(inner)


# ---------------------------------------------------------------- files on the host


def write_files(pod_dir: Path, launch: Launch) -> None:
    if pod_dir.exists():
        shutil.rmtree(pod_dir)
    for rel, data in launch.files.items():
        path = pod_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for m in launch.mounts:  # an empty volume is still a directory
        if m.source.startswith(str(pod_dir)):
            Path(m.source).mkdir(parents=True, exist_ok=True)


def prepare_host(store: LabStore, launch: Launch, *, mount_points: bool = True) -> None:
    """Create hostPath *OrCreate paths and (``mount_points``: for a process on the host,
    not a container, whose mount points are in its image) missing mount points; record
    what was made."""
    for path, kind in launch.host_paths.items():
        p = Path(path)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "File":
                p.touch()
            else:
                p.mkdir()
    if not mount_points:
        return
    created: list[str] = []
    for m in launch.mounts:
        target = Path(m.target)
        if target.exists() or m.source == m.target:
            # A hostPath at its own path that the host lacks (/lib/modules on a kernel
            # without modules): nothing to mount, and nothing to create in the host's /.
            continue
        missing = [a for a in (target, *target.parents) if not a.exists()]
        created += [str(a) for a in reversed(missing)]
        if Path(m.source).is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    record = _read_record(store)
    record["created"] = sorted(set(record["created"]) | set(created))
    record["used"] = sorted(set(record["used"]) | {m.target for m in launch.mounts})
    write_atomic(mountpoints_file(store), json.dumps(record))


def mountpoints_file(store: LabStore) -> Path:
    return store.dir / "mountpoints.json"


def _read_record(store: LabStore) -> dict[str, list[str]]:
    try:
        data = json.loads(mountpoints_file(store).read_text())
        return {"created": list(data["created"]), "used": list(data["used"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"created": [], "used": []}


def remove_mountpoints(store: LabStore) -> list[str]:
    """At ``lab down``: remove the empty mount points this lab created. One that another
    lab's Pods use (it or something below it) is handed over to that lab, which removes
    it at its own ``down``. Returns what was removed."""
    mine = _read_record(store)["created"]
    others = [
        LabStore(d.name, store.base) for d in store.base.iterdir()
        if d.is_dir() and d.name != store.name
    ] if store.base.exists() else []  # fmt: skip
    removed = []
    for path in sorted(mine, key=lambda p: p.count("/"), reverse=True):
        user = next((o for o in others if any(u == path or u.startswith(path + "/")
                                              for u in _read_record(o)["used"])), None)
        if user is not None:
            record = _read_record(user)
            record["created"] = sorted({*record["created"], path})
            write_atomic(mountpoints_file(user), json.dumps(record))
            continue
        p = Path(path)
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()  # only when empty
            elif p.is_file() and p.stat().st_size == 0:
                p.unlink()
            else:
                continue
        except OSError:
            continue
        removed.append(path)
    return removed
