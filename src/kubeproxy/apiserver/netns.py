"""Listening sockets inside other network namespaces, from this one process.

The lab's API server listens on 127.0.0.1 in the root namespace (for kubectl) and, from
the same process, inside each node namespace (for the proxies): the socket is created
by kubeproxy.util.netns_thread on a thread that has entered the namespace; the serving
threads never leave the root namespace.
"""

from __future__ import annotations

import socket

from kubeproxy.errors import NetnsError
from kubeproxy.util.netns_thread import call_in_netns

__all__ = ["NetnsError", "netns_socket"]


def netns_socket(name: str, host: str, port: int, *, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on host:port inside the network namespace `name`."""

    def listen() -> socket.socket:
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

    return call_in_netns(name, listen)
