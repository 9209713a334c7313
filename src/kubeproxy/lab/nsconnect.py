"""Talking to a server that listens on 127.0.0.1 *inside* a lab namespace, from here.

Each node's proxy serves /metrics and /healthz on the node namespace's own loopback,
which nothing outside the namespace can reach, by design. A socket belongs to the
namespace of the thread that creates it, for its whole life; so a short-lived thread
enters the namespace (kubeproxy.util.netns_thread), creates and connects the socket, and
hands it back. Only lab namespaces are accepted (the ``netns`` guard).
"""

from __future__ import annotations

import http.client
import socket

from kubeproxy.errors import LabError
from kubeproxy.lab.netns import lab_namespace
from kubeproxy.util.netns_thread import call_in_netns


def connect(ns: str, host: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A TCP connection to host:port made inside lab namespace ns. Raises OSError."""
    lab_namespace(ns)
    return call_in_netns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


class _Connection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = connect(self._ns, self.host, self.port, self.timeout or 2.0)


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET http://host:port/path from inside ns: (status, body). Raises LabError."""
    conn = _Connection(ns, host, port, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        raise LabError(f"GET http://{host}:{port}{path} in {ns}: {exc}") from exc
    finally:
        conn.close()
