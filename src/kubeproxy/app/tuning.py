"""Node tuning at start, as upstream's kube-proxy does it (server_linux.go, conntrack.go).

Theory of operation
-------------------
:func:`plan` is pure: from the configuration's ``conntrack`` section, ``oomScoreAdj``,
the CPU count and what the node has now, it returns the writes to make, each a
:class:`Write` with a reason. :func:`apply` makes them through a :class:`Sysctl`
(the real one is files under /proc/sys and /sys; tests use a strict fake that refuses
unknown keys). Upstream's rules:

* ``nf_conntrack_max`` = max(maxPerCore x CPUs, min) when maxPerCore > 0, and only
  raised, never lowered; the hash table (``/sys/module/nf_conntrack/parameters/
  hashsize``) to max/4 when smaller. Both are *global* (the host's, whatever network
  namespace we are in): a proxy that is not in the host's network namespace (a lab
  node, a test) leaves them alone and says so.
* the per-namespace timeouts ``nf_conntrack_tcp_timeout_established`` /
  ``_close_wait`` / ``nf_conntrack_udp_timeout`` / ``_stream`` when non-zero and
  different, ``nf_conntrack_tcp_be_liberal=1`` when asked;
* the process's ``oom_score_adj``.

``route_localnet`` is not here: the iptables data plane sets it when (and only when) it
writes the localhost NodePort rules.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubeproxy.errors import ConfigError

log = logging.getLogger("kubeproxy.tuning")

CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"  # an absolute path: not a sysctl
OOM_SCORE_ADJ = "/proc/self/oom_score_adj"
# (setting in the conntrack section, sysctl it sets): the per-namespace timeouts.
TIMEOUTS: tuple[tuple[str, str], ...] = (
    ("tcpEstablishedTimeout", "net/netfilter/nf_conntrack_tcp_timeout_established"),
    ("tcpCloseWaitTimeout", "net/netfilter/nf_conntrack_tcp_timeout_close_wait"),
    ("udpTimeout", "net/netfilter/nf_conntrack_udp_timeout"),
    ("udpStreamTimeout", "net/netfilter/nf_conntrack_udp_timeout_stream"),
)
BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"


class Sysctl(Protocol):
    """Read and write kernel settings: sysctl names as /proc/sys paths
    (``net/netfilter/nf_conntrack_max``), or absolute file paths."""

    def read(self, key: str) -> str | None:
        """The current value, or None when the setting does not exist."""

    def write(self, key: str, value: str) -> None:
        """Raises OSError when the kernel refuses."""


class ProcSysctl:
    """The real one: files under /proc/sys (of the caller's network namespace)."""

    def __init__(self, root: Path = Path("/proc/sys")) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return Path(key) if key.startswith("/") else self.root / key

    def read(self, key: str) -> str | None:
        try:
            return self._path(key).read_text().strip()
        except FileNotFoundError:
            return None

    def write(self, key: str, value: str) -> None:
        self._path(key).write_text(value + "\n")


@dataclass(frozen=True)
class Settings:
    """The configuration's tuning part (config/v1alpha1.py: conntrack.*, oomScoreAdj), seconds."""

    max_per_core: int = 32 * 1024
    min: int = 128 * 1024
    tcp_established_timeout: float = 86400.0
    tcp_close_wait_timeout: float = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float = 0.0
    udp_stream_timeout: float = 0.0
    oom_score_adj: int | None = -999

    def __post_init__(self) -> None:
        if self.max_per_core < 0 or self.min < 0:
            raise ConfigError("conntrack.maxPerCore and conntrack.min must be >= 0")
        if self.oom_score_adj is not None and not -1000 <= self.oom_score_adj <= 1000:
            raise ConfigError(f"oomScoreAdj: {self.oom_score_adj} is not in [-1000, 1000]")

    def timeout(self, name: str) -> float:
        return {"tcpEstablishedTimeout": self.tcp_established_timeout,
                "tcpCloseWaitTimeout": self.tcp_close_wait_timeout,
                "udpTimeout": self.udp_timeout,
                "udpStreamTimeout": self.udp_stream_timeout}[name]


@dataclass(frozen=True)
class Write:
    key: str
    value: str
    why: str


def conntrack_max(settings: Settings, cpus: int) -> int:
    """upstream's getConntrackMax: 0 = leave the limit as it is."""
    if settings.max_per_core <= 0:
        return 0
    return max(settings.max_per_core * cpus, settings.min)


def plan(settings: Settings, sysctl: Sysctl, *, cpus: int, host_netns: bool,
         oom: bool = True) -> tuple[list[Write], list[str]]:
    """The writes to make, and notes on what is left alone (and why)."""
    writes: list[Write] = []
    notes: list[str] = []
    want = conntrack_max(settings, cpus)
    if want:
        if not host_netns:
            notes.append(f"nf_conntrack_max: not in the host's network namespace, leaving "
                         f"the global limit alone (would raise it to {want})")
        else:
            writes += _max_writes(want, sysctl, notes)
    for name, key in TIMEOUTS:
        seconds = int(settings.timeout(name))
        current = sysctl.read(key)
        if seconds > 0 and current is not None and current != str(seconds):
            writes.append(Write(key, str(seconds), f"conntrack.{name}"))
        elif seconds > 0 and current is None:
            notes.append(f"{key}: not present (nf_conntrack not loaded?)")
    if settings.tcp_be_liberal and sysctl.read(BE_LIBERAL) not in (None, "1"):
        writes.append(Write(BE_LIBERAL, "1", "conntrack.tcpBeLiberal"))
    if oom and settings.oom_score_adj is not None \
            and sysctl.read(OOM_SCORE_ADJ) != str(settings.oom_score_adj):
        writes.append(Write(OOM_SCORE_ADJ, str(settings.oom_score_adj), "oomScoreAdj"))
    return writes, notes


def _max_writes(want: int, sysctl: Sysctl, notes: list[str]) -> list[Write]:
    out: list[Write] = []
    current = sysctl.read(CONNTRACK_MAX)
    if current is None:
        notes.append("nf_conntrack_max: not present (nf_conntrack not loaded?)")
        return out
    if int(current) < want:
        out.append(Write(CONNTRACK_MAX, str(want), "conntrack max per core x CPUs"))
    hashsize = sysctl.read(HASHSIZE)
    if hashsize is not None and int(hashsize) < want // 4:
        out.append(Write(HASHSIZE, str(want // 4), "conntrack hash table for max/4"))
    return out


def apply(writes: list[Write], sysctl: Sysctl) -> list[str]:
    """Make the writes; returns one error line per write the kernel refused (upstream
    logs them and goes on, except a read-only /sys which it reports the same way)."""
    errors: list[str] = []
    for w in writes:
        try:
            sysctl.write(w.key, w.value)
            log.info("set %s to %s (%s)", w.key, w.value, w.why)
        except OSError as err:
            errors.append(f"cannot set {w.key} to {w.value} ({w.why}): {err.strerror or err}")
    return errors


def in_host_netns() -> bool:
    """Whether this process shares pid 1's network namespace (the host's, on a node)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def cpu_count() -> int:
    """CPUs this process may run on (Go's runtime.NumCPU honours the affinity mask)."""
    return len(os.sched_getaffinity(0))


CAP_NET_ADMIN = 12


def privilege_problem(status: str | None = None) -> str | None:
    """Why this process cannot program the kernel (None: it can): it needs
    CAP_NET_ADMIN in its effective set (root normally has it)."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError as err:
            return f"cannot read /proc/self/status: {err}"
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            if not caps >> CAP_NET_ADMIN & 1:
                who = "not root" if os.geteuid() != 0 else "root without CAP_NET_ADMIN"
                return (f"{who}: kube-proxy needs CAP_NET_ADMIN (run as root, or "
                        f"privileged in a pod)")
            return None
    return "no CapEff line in /proc/self/status"


def tune(settings: Settings, sysctl: Sysctl | None = None, *, oom: bool = True) -> list[str]:
    """Plan and apply on this node; returns the errors (logged by the caller)."""
    real = sysctl or ProcSysctl()
    writes, notes = plan(settings, real, cpus=cpu_count(), host_netns=in_host_netns(), oom=oom)
    for note in notes:
        log.info("%s", note)
    return apply(writes, real)
