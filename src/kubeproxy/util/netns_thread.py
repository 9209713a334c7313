"""Run one short function inside another network namespace, from this process.

A socket belongs to the network namespace of the thread that created it, for its whole
life. So to listen or connect inside `/run/netns/NAME`, a short-lived thread moves
itself (only itself) into the namespace with setns(2), runs the function (which creates
the socket), moves back, and hands the result to the caller. Doing the switch on a
throwaway thread means even a failed switch back cannot leave a long-lived thread in
the wrong namespace. Used by the lab API server (listeners inside node namespaces), the
lab (connections to the node proxies' loopback-only health and metrics ports) and the
nftables data plane (its netlink socket, dataplane/netlink.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from kubeproxy.errors import NetnsError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
T = TypeVar("T")


def setns(fd: int, what: str = "network namespace") -> None:
    """Move the calling thread (only it) into the network namespace open as ``fd``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({what}): {os.strerror(err)}")


def _call_inside(path: str, fn: Callable[[], T]) -> T:
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise NetnsError(exc.errno, f"network namespace {path!r}: {exc.strerror}") from exc
        try:
            setns(target, path)
            try:
                return fn()
            finally:
                setns(own, "back to the original namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


def call_at(path: str, fn: Callable[[], T]) -> T:
    """fn() run on a throwaway thread inside the namespace bound at ``path`` (a
    /run/netns entry or a /proc/PID/ns/net link); its exception re-raised."""
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(_call_inside(path, fn))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{os.path.basename(path)}",
                              daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() run on a throwaway thread inside namespace `name`; its exception re-raised."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(0, f"invalid network namespace name {name!r}")
    return call_at(os.path.join(NETNS_DIR, name), fn)
