"""Run one short function inside another network namespace, from this process.

A socket belongs to the network namespace of the thread that created it, for its whole
life. So to listen or connect inside `/run/netns/NAME`, a short-lived thread moves
itself (only itself) into the namespace with setns(2), runs the function (which creates
the socket), moves back, and hands the result to the caller. Doing the switch on a
throwaway thread means even a failed switch back cannot leave a long-lived thread in
the wrong namespace. Used by the lab API server (listeners inside node namespaces) and
the lab (connections to the node proxies' loopback-only health and metrics ports).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
T = TypeVar("T")


class NetnsError(OSError):
    """The namespace is missing, or entering or leaving it failed."""


def _setns(libc: ctypes.CDLL, fd: int, what: str) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({what}): {os.strerror(err)}")


def _call_inside(name: str, fn: Callable[[], T]) -> T:
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
        except OSError as exc:
            raise NetnsError(exc.errno, f"network namespace {name!r}: {exc.strerror}") from exc
        try:
            _setns(libc, target, name)
            try:
                return fn()
            finally:
                _setns(libc, own, "back to the original namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


def call_in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() run on a throwaway thread inside namespace `name`; its exception re-raised."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(0, f"invalid network namespace name {name!r}")
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(_call_inside(name, fn))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
