"""What a running lab remembers between commands, kept under ``/run/kubeproxy-lab/<name>/``.

``state.json`` holds the resolved objects (Pods with their node and IP, Services with
their allocated IPs and ports: re-planning them gives the same topology), each Pod's life
(ready, being deleted until when, its server's PID) and of the process finishing its deletion.
``state.yaml`` is what the core's ``apply`` reads. Writers hold ``<name>.lock`` (flock);
``state.json`` is replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kubeproxy.lab.errors import LabStateError

JSON = dict[str, Any]
DEFAULT_BASE = Path("/run/kubeproxy-lab")


@dataclass(frozen=True)
class PodRecord:
    ready: bool = True
    # Wall-clock time (time.time()) the deletion's grace period ends; None: not deleting.
    delete_at: float | None = None
    pid: int | None = None  # its pod server
    reaper: int | None = None  # the process that finishes its deletion


@dataclass(frozen=True)
class LabState:
    name: str
    mode: str
    lb_algorithm: str
    cluster_cidr: str
    service_cidr: str
    external_node: str | None
    documents: tuple[JSON, ...]
    pods: dict[str, PodRecord] = field(default_factory=dict)

    def with_pod(self, key: str, record: PodRecord) -> LabState:
        return replace(self, pods={**self.pods, key: record})

    def to_json(self) -> JSON:
        data = asdict(self)
        data["documents"] = list(self.documents)
        return data

    @classmethod
    def from_json(cls, data: JSON) -> LabState:
        return cls(
            name=data["name"],
            mode=data["mode"],
            lb_algorithm=data["lb_algorithm"],
            cluster_cidr=data["cluster_cidr"],
            service_cidr=data["service_cidr"],
            external_node=data.get("external_node"),
            documents=tuple(data["documents"]),
            pods={k: PodRecord(**v) for k, v in data["pods"].items()},
        )


@dataclass(frozen=True)
class Store:
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
    def apply_file(self) -> Path:
        return self.dir / "state.yaml"

    def log_file(self, key: str) -> Path:
        return self.dir / "logs" / f"{key.replace('/', '_')}.log"

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
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

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
