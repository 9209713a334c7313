"""The lab's processes: starting them detached, recognising them, stopping them by PID.

Everything the lab runs is a ``python -m`` module started with ``start_new_session`` (so
it outlives the command that started it and no terminal signal reaches it), with its
output in a log file under the lab's directory:

==========================  ==========================  ===================================
process                     runs in                     recognised by (argv)
==========================  ==========================  ===================================
``kubeproxy.apiserver``     root namespace              ``--kubeconfig-out <lab dir>/...``
``kubeproxy.lab.agent``     root namespace              ``--name <lab>``
``kubeproxy run``           a node namespace            ``--kubeconfig <lab dir>/...``
``kubeproxy.lab.podserver`` a pod namespace             ``--lab <lab>``
==========================  ==========================  ===================================

A recorded PID is killed only after its command line was checked to be one of these,
for this lab (a PID may have been reused). PIDs found inside a lab namespace
(``ip netns pids``) are the lab's by construction.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import kubeproxy

APISERVER_MODULE = "kubeproxy.apiserver"
AGENT_MODULE = "kubeproxy.lab.agent"
SERVER_MODULE = "kubeproxy.lab.podserver"
PROXY_MODULE = "kubeproxy"
MODULES = (APISERVER_MODULE, AGENT_MODULE, SERVER_MODULE, PROXY_MODULE)
# How many times slower than this machine the lab's processes may run: every wait of the
# lab for them is multiplied by it. tools/vmrun sets it in its emulated guest (docs/vm.md).
TIME_SCALE_VARIABLE = "KUBEPROXY_TIME_SCALE"


def time_scale() -> float:
    """``KUBEPROXY_TIME_SCALE`` (a number >= 1), else 1."""
    text = os.environ.get(TIME_SCALE_VARIABLE, "")
    try:
        return max(1.0, float(text)) if text else 1.0
    except ValueError:
        return 1.0


def python_env() -> dict[str, str]:
    """The environment for lab subprocesses: this kubeproxy importable even uninstalled."""
    env = dict(os.environ)
    root = str(Path(next(iter(kubeproxy.__path__))).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start argv detached, output appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv),
            env=python_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_lab_process(pid: int, lab: str, lab_dir: Path | None = None) -> bool:
    """Whether pid runs one of this lab's programs (checked before killing it)."""
    argv = cmdline(pid)
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        return False
    if argv[argv.index("-m") + 1] not in MODULES:
        return False
    pairs = set(itertools.pairwise(argv))
    if ("--lab", lab) in pairs or ("--name", lab) in pairs:
        return True
    prefix = f"{lab_dir}/" if lab_dir is not None else None
    return prefix is not None and any(a.startswith(prefix) for a in argv)


def kill(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds, by PID; reaps them if they are ours."""
    targets = sorted({p for p in pids if p != os.getpid() and alive(p)})
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap(targets)
        if not any(alive(p) for p in targets):
            return
        time.sleep(0.02)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    reap(targets)


def reap(pids: Sequence[int]) -> None:
    """Collect exit statuses of those pids that are our children (no zombies left)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
