"""Kernel tests: listening inside a network namespace from the server's own process.

Each test creates its own namespace `kpa-<random>` (with loopback up) and always deletes
it; nothing in the root namespace changes except the server's own 127.0.0.1 listener.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeproxy.apiserver import ApiServer, NetnsListener, ServerConfig, kubeconfig_text
from kubeproxy.apiserver.netns import NetnsError, netns_socket
from kubeproxy.apiserver.resources import SERVICES
from tests.api.conftest import have_root_and_ip, kubectl_path

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not have_root_and_ip(), reason="needs root and iproute2 (ip netns)"),
]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpa-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def inside(ns: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30, check=False)


def free_in_root(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_netns_socket_listens_inside_and_only_inside(netns: str) -> None:
    sock = netns_socket(netns, "127.0.0.1", 0)
    port = sock.getsockname()[1]
    received: list[bytes] = []

    def accept_one() -> None:
        conn, _ = sock.accept()
        with conn:
            received.append(conn.recv(16))

    acceptor = threading.Thread(target=accept_one, daemon=True)
    acceptor.start()
    try:
        result = inside(netns, f"import socket; socket.create_connection(('127.0.0.1', {port}),"
                               " timeout=5).sendall(b'hello')")
        assert result.returncode == 0, result.stderr
        acceptor.join(timeout=5)
        assert received == [b"hello"]
        if free_in_root(port):  # nothing else listens there in the root namespace
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        sock.close()


def test_netns_socket_reports_a_missing_namespace() -> None:
    with pytest.raises(NetnsError):
        netns_socket(f"kpa-missing-{secrets.token_hex(4)}", "127.0.0.1", 0)
    with pytest.raises(NetnsError):
        netns_socket("../etc", "127.0.0.1", 0)


def test_api_server_is_reachable_from_the_namespace(netns: str, tmp_path: Path) -> None:
    config = ServerConfig(netns=(NetnsListener(netns, "127.0.0.1", 6443),))
    with ApiServer(config) as server:
        code = ("import json, urllib.request\n"
                "req = urllib.request.Request('http://127.0.0.1:6443/api/v1/namespaces/default/"
                "services', method='POST', headers={'Content-Type': 'application/json'},\n"
                "    data=json.dumps({'metadata': {'name': 'from-node'},"
                " 'spec': {'ports': [{'port': 80}]}}).encode())\n"
                "print(json.load(urllib.request.urlopen(req, timeout=5))['spec']['clusterIP'])\n")
        result = inside(netns, code)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().startswith("10.96.")
        seen = server.hub.call(lambda s: s.get(SERVICES, "default", "from-node"))
        assert seen["spec"]["clusterIP"] == result.stdout.strip()
        binary = kubectl_path("1.33") or kubectl_path("1.27")
        if binary is not None:
            kubeconfig = tmp_path / "in-node.kubeconfig"
            kubeconfig.write_text(kubeconfig_text("http://127.0.0.1:6443"))
            got = subprocess.run(["ip", "netns", "exec", netns, str(binary),
                                  f"--kubeconfig={kubeconfig}", f"--cache-dir={tmp_path}/c",
                                  "get", "services", "-o", "name"],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert got.returncode == 0 and "service/from-node" in got.stdout, got.stderr


def test_a_listener_can_be_added_to_a_running_server(netns: str) -> None:
    with ApiServer() as server:
        server.listen_in(NetnsListener(netns, "127.0.0.1", 6444))
        result = inside(netns, "import urllib.request; print(urllib.request.urlopen("
                               "'http://127.0.0.1:6444/healthz', timeout=5).read().decode())")
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_non_loopback_root_listener_is_refused() -> None:
    with pytest.raises(ValueError):
        ServerConfig(host="0.0.0.0")
