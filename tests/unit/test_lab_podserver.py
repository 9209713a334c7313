"""The pod server and the probe, talking over loopback (no namespaces, no root)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from kubeproxy.lab import podserver
from kubeproxy.lab.probe import ProbeResult, format_table, run_probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    async def main() -> None:
        task = asyncio.create_task(
            podserver.serve("web-1", "node-1", [(port, "tcp"), (port, "udp")], None,
                            host="127.0.0.1", stop=stop)
        )  # fmt: skip
        await asyncio.sleep(0.05)
        started.set()
        await task

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_probe_counts_answers(server: int, proto: str) -> None:
    result = run_probe("127.0.0.1", server, proto, n=5, timeout=1.0)
    assert result == ProbeResult(sent=5, ok=5, backends={"web-1": 5},
                                 client_addresses=("127.0.0.1",))  # fmt: skip


def test_refused_and_timeout_are_told_apart(server: int) -> None:
    closed = free_port()
    assert run_probe("127.0.0.1", closed, "tcp", n=2, timeout=0.5).refused == 2
    assert run_probe("127.0.0.1", closed, "udp", n=2, timeout=0.5).refused == 2


def test_http_clients_get_http(server: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/", timeout=2) as resp:
        body = json.loads(resp.read())
    assert body["pod"] == "web-1" and body["node"] == "node-1"
    assert body["client"].startswith("127.0.0.1:")


def test_json_shape_is_exact() -> None:
    result = ProbeResult(sent=3, ok=2, timeout=1, backends={"b": 1, "a": 1},
                         client_addresses=("10.0.0.1",))  # fmt: skip
    assert json.dumps(result.to_json()) == (
        '{"sent": 3, "ok": 2, "failed": {"refused": 0, "timeout": 1, "reset": 0}, '
        '"backends": {"a": 1, "b": 1}, "client_addresses": ["10.0.0.1"]}'
    )
    assert ProbeResult.from_json(result.to_json()) == result
    assert "a" in format_table(result, "x") and "timeout 1" in format_table(result, "x")


def test_listen_spec_is_validated() -> None:
    assert podserver.parse_listen("53/udp") == (53, "udp")
    with pytest.raises(Exception, match="PORT/tcp"):
        podserver.parse_listen("53/icmp")
