"""The lab's cgroups and bpf filesystems: where a socket-LB mode attaches, one per node.

Theory of operation
-------------------
A mode with ``Mode.needs_cgroup`` (ebpf) load balances only the processes of the cgroup
its programs are attached to. On a real node that is every process; in the lab it must
be exactly one node's pods (and that node's own processes), never the machine's. So
``lab up`` in such a mode gives the lab a cgroup ``kpl-<lab>`` under the cgroup2 mount
(found in /proc/mounts: this machine mounts it at a hybrid ``/sys/fs/cgroup/unified``)
with one child per node, and every process the lab starts on a node's behalf (pod
servers, probes, ``lab exec``) is started inside its node's cgroup: :func:`in_cgroup`
wraps the argv in a shell that writes its own PID to ``cgroup.procs`` and then execs it,
so the process is in the cgroup before its first instruction (no race with its first
``connect``).

The node's proxy runs under ``ip netns exec``, which gives the command a mount namespace
of its own and remounts /sys there: the system's cgroup2 mount is gone from its view, and
a mount the proxy made would vanish when it exits. So the lab makes both mounts the
proxy needs in the root mount namespace, before the proxy starts (``ip netns exec``
copies them): a bind mount of the node's cgroup at ``<lab dir>/nodes/<node>/cgroup`` and
a private bpffs at ``<lab dir>/nodes/<node>/bpf``, passed as ``--cgroup-path`` and
``--bpf-dir`` (:func:`proxy_flags`). The proxy sees its own node's cgroup and nothing
above it.

:func:`remove` undoes all of it, whatever is left (also after a failed ``up``): it
detaches the programs' pinned links, unmounts the bpffs and the bind mounts, and removes
the node cgroups and the lab's (called once the lab's processes are stopped).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path

from kubeproxy.dataplane import bpf_sys
from kubeproxy.errors import DataPlaneError, LabError
from kubeproxy.lab.layout import NS_PREFIX
from kubeproxy.modes.base import PlaneOptions

MS_BIND = 4096
MNT_DETACH = 2
NODES_DIR = "nodes"
_libc = ctypes.CDLL(None, use_errno=True)


def lab_cgroup(lab: str) -> Path | None:
    """The lab's cgroup (``kpl-<lab>`` under the cgroup2 mount); None without cgroup2."""
    try:
        return bpf_sys.cgroup2_root() / f"{NS_PREFIX}{lab}"
    except DataPlaneError:
        return None


def node_cgroup(lab: str, node: str) -> Path | None:
    """Node ``node``'s cgroup, if the lab made one (its mode needs cgroups)."""
    root = lab_cgroup(lab)
    path = root / node if root else None
    return path if path and (path / "cgroup.procs").is_file() else None


def node_dir(lab_dir: Path, node: str) -> Path:
    return lab_dir / NODES_DIR / node


def in_cgroup(argv: Sequence[str], cgroup: Path | None) -> list[str]:
    """argv, started inside ``cgroup`` (as is when None)."""
    if cgroup is None:
        return list(argv)
    script = 'echo $$ > "$0" && exec "$@"'
    return ["sh", "-c", script, str(cgroup / "cgroup.procs"), *argv]


def proxy_flags(lab_dir: Path, node: str) -> list[str]:
    """The flags that point node ``node``'s proxy at its cgroup and bpffs ([] if none)."""
    opts = plane_options(lab_dir, node)
    if not opts.cgroup_path:
        return []
    return ["--cgroup-path", opts.cgroup_path, "--bpf-dir", opts.bpf_dir]


def plane_options(lab_dir: Path, node: str) -> PlaneOptions:
    """The node's data-plane options as its proxy has them (the defaults if none)."""
    base = node_dir(lab_dir, node)
    if not (base / "cgroup" / "cgroup.procs").is_file():
        return PlaneOptions()
    return PlaneOptions(cgroup_path=str(base / "cgroup"), bpf_dir=str(base / "bpf"))


def create(lab: str, lab_dir: Path, nodes: Sequence[str]) -> None:
    """The lab's cgroup, one child per node, their bind mounts and bpf filesystems."""
    root = lab_cgroup(lab)
    if root is None:
        raise LabError("this mode needs cgroup2, and there is no cgroup2 mount")
    try:
        root.mkdir(exist_ok=True)
        for node in nodes:
            cgroup, base = root / node, node_dir(lab_dir, node)
            cgroup.mkdir(exist_ok=True)
            (base / "cgroup").mkdir(parents=True, exist_ok=True)
            bind_mount(cgroup, base / "cgroup")
            bpf_sys.ensure_bpffs(base / "bpf")
    except (OSError, DataPlaneError) as err:
        with contextlib.suppress(LabError):
            remove(lab, lab_dir)
        raise LabError(f"cannot set up the lab's cgroups: {err}") from err


def remove(lab: str, lab_dir: Path) -> list[str]:
    """Detach, unmount and remove what :func:`create` made; returns what was removed.
    The processes in the cgroups must be stopped first."""
    gone: list[str] = []
    nodes = lab_dir / NODES_DIR
    for base in sorted(nodes.iterdir()) if nodes.is_dir() else []:
        try:
            bpf_sys.remove_bpffs(base / "bpf")
        except DataPlaneError as err:
            raise LabError(f"removing {base / 'bpf'}: {err}") from err
        mount = base / "cgroup"
        if bpf_sys.fs_type(mount) == "cgroup2":  # our bind mount is still there
            unmount(mount)
        for path in (mount, base):
            with contextlib.suppress(FileNotFoundError):
                path.rmdir()
        gone.append(base.name)
    with contextlib.suppress(FileNotFoundError):
        nodes.rmdir()
    root = lab_cgroup(lab)
    if root is not None and root.is_dir():
        for cgroup in [p for p in root.iterdir() if p.is_dir()] + [root]:
            _rmdir_cgroup(cgroup)
    return gone


def _rmdir_cgroup(path: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup; its last processes may take a moment to leave it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                procs = (path / "cgroup.procs").read_text().split()
                raise LabError(f"cannot remove cgroup {path} (processes {procs}): "
                               f"{err.strerror}") from err
            time.sleep(0.05)


def bind_mount(source: Path, target: Path) -> None:
    """``mount --bind source target`` (target must exist)."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --bind {source} {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise LabError(f"umount {target}: {os.strerror(err)}")
