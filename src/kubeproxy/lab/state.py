"""What a running lab remembers between commands, kept under ``/run/kubeproxy-lab/<name>/``.

The lab's Kubernetes objects live in its API server, not here. ``state.json`` holds
what the API does not: the settings ``lab up`` was given, the network plan of the nodes
and of the external client (fixed for the lab's life), the API server's root-namespace
port (chosen free at ``lab up``, then kept for the lab's life: a restarted API server
listens on it again, so the agent and kubectl keep their address), and the PIDs of the
processes the lab runs (API server, agent, one proxy per node). Writers hold
``<name>.lock`` (flock); ``state.json`` is replaced atomically.

Other files in the directory: ``kubeconfig`` (for kubectl, server on 127.0.0.1 in the
root namespace, with the lab CA and the admin's client certificate), ``node.kubeconfig``
(for the proxies, server on 127.0.0.1 inside their node namespace, user
``system:kube-proxy``), ``pki/`` (the lab's CA, certificates and service-account signing
key, made at ``lab up``: pki.py; ``ca_cert`` is the CA every client trusts),
``agent.json`` (the agent's progress, read by the convergence wait),
``apiserver.json`` (the API server's objects, rewritten by it after every change: what a
restarted API server starts from), ``logs/`` and ``ready/`` (pod servers' ready files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kubeproxy.lab.errors import LabStateError
from kubeproxy.lab.layout import ExternalPlan, NodePlan
from kubeproxy.util.jsontypes import JSON

DEFAULT_BASE = Path("/run/kubeproxy-lab")


@dataclass(frozen=True)
class Processes:
    """PIDs of the lab's long-running processes (pod servers are the agent's)."""

    apiserver: int | None = None
    agent: int | None = None
    proxies: dict[str, int] = field(default_factory=dict)  # node name -> PID

    def all(self) -> list[int]:
        return [p for p in (self.agent, *self.proxies.values(), self.apiserver) if p]


@dataclass(frozen=True)
class LabState:
    name: str
    mode: str
    lb_algorithm: str
    cluster_cidr: str
    service_cidr: str
    external_node: str | None
    switch_ns: str
    nodes: tuple[NodePlan, ...]
    external: ExternalPlan
    api_port: int | None = None
    processes: Processes = field(default_factory=Processes)
    # DaemonSet Pods run from their image when local podman storage has it (containers.py);
    # False (lab up --no-images): always from this checkout, as host processes.
    pod_images: bool = True

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_json(self) -> JSON:
        return asdict(self)

    @classmethod
    def from_json(cls, data: JSON) -> LabState:
        ext = dict(data["external"])
        ext["clients"] = tuple(ext["clients"])
        ext["routes"] = tuple(ext["routes"])
        return cls(
            name=data["name"],
            mode=data["mode"],
            lb_algorithm=data["lb_algorithm"],
            cluster_cidr=data["cluster_cidr"],
            service_cidr=data["service_cidr"],
            external_node=data.get("external_node"),
            switch_ns=data["switch_ns"],
            nodes=tuple(NodePlan(**n) for n in data["nodes"]),
            external=ExternalPlan(**ext),
            api_port=data.get("api_port"),
            processes=Processes(**data.get("processes", {})),
            pod_images=bool(data.get("pod_images", True)),
        )


@dataclass(frozen=True)
class LabStore:
    """The files of one lab."""

    name: str
    base: Path = DEFAULT_BASE

    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def node_kubeconfig(self) -> Path:
        return self.dir / "node.kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def ca_cert(self) -> Path:
        """The lab CA's certificate (PEM): what a client of the lab's API server trusts."""
        return self.pki_dir / "ca.crt"

    @property
    def apiserver_state(self) -> Path:
        return self.dir / "apiserver.json"

    @property
    def agent_status(self) -> Path:
        return self.dir / "agent.json"

    @property
    def settled_file(self) -> Path:
        return self.dir / "settled"

    @property
    def logs_dir(self) -> Path:
        """Every lab process's output, and each Pod's (what ``kubectl logs`` reads)."""
        return self.dir / "logs"

    def log_file(self, key: str) -> Path:
        return self.logs_dir / f"{key.replace('/', '_')}.log"

    def ready_file(self, key: str) -> Path:
        return self.dir / "ready" / key.replace("/", "_")

    def exists(self) -> bool:
        return self.state_file.exists()

    def load(self) -> LabState:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise LabStateError(
                f"lab {self.name!r} is not up (no {self.state_file}); run `kubeproxy lab up`"
            ) from None
        except (OSError, ValueError) as exc:
            raise LabStateError(f"lab {self.name!r}: unreadable state: {exc}") from exc
        try:
            return LabState.from_json(data)
        except (KeyError, TypeError) as exc:
            raise LabStateError(f"lab {self.name!r}: state file is damaged: {exc}") from exc

    def save(self, state: LabState) -> None:
        write_atomic(self.state_file, json.dumps(state.to_json(), indent=1, sort_keys=True))

    def prepare(self) -> None:
        for sub in ("logs", "ready"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        if not self.dir.exists():
            return
        for path in sorted(self.dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        self.dir.rmdir()

    def remove_lock(self) -> None:
        """Called by ``down`` while holding the lock: leave nothing behind."""
        (self.base / f"{self.name}.lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.base.rmdir()  # only when no other lab is left

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / f"{self.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write a file so that a reader sees the old or the new text, never half of it;
    ``mode`` (e.g. 0o600 for a file holding a key) is set before it appears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
