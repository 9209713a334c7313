"""Listening sockets inside other network namespaces, from this one process.

A socket belongs to the network namespace of the thread that created it, for its whole
life. So to listen inside `/run/netns/NAME` we start a short-lived thread, move that
thread (only) into the namespace with setns(2), create, bind and listen, move it back,
and hand the socket to the caller; the serving threads never leave the root namespace.
Doing the namespace switch on a throwaway thread means that even a failed switch back
cannot leave a long-lived thread in the wrong namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class NetnsError(OSError):
    """The namespace is missing, or setns/bind/listen inside it failed."""


def _setns(libc: ctypes.CDLL, fd: int, what: str) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns({what}): {os.strerror(err)}")


def _listen_inside(name: str, host: str, port: int, backlog: int) -> socket.socket:
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
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port))
                    sock.listen(backlog)
                except OSError as exc:
                    sock.close()
                    raise NetnsError(exc.errno, f"listen on {host}:{port} in {name!r}: "
                                     f"{exc.strerror}") from exc
                return sock
            finally:
                _setns(libc, own, "back to the original namespace")
        finally:
            os.close(target)
    finally:
        os.close(own)


def netns_socket(name: str, host: str, port: int, *, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on host:port inside the network namespace `name`."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(0, f"invalid network namespace name {name!r}")
    result: list[socket.socket | BaseException] = []

    def worker() -> None:
        try:
            result.append(_listen_inside(name, host, port, backlog))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-listen-{name}", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
