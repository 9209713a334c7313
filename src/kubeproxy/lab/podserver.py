"""The lab's built-in pod server: what every lab Pod runs instead of an image.

It listens on each given port (TCP and/or UDP, all addresses) and answers every request
with one JSON line saying who answered and whom it saw::

    {"pod": "web-1", "node": "node-1", "client": "10.244.1.3:40112"}

TCP: one answer per connection, then close. The client may send a line first (the lab's
probe does, so no time is lost); an HTTP request gets a minimal HTTP/1.0 response with
the JSON as body, so ``curl`` works too; a silent client gets its answer after 0.5 s.
UDP: one answer datagram per datagram received.

Run inside a pod namespace: ``python -m kubeproxy.lab.podserver --pod NAME --node NODE
--listen 8080/tcp --listen 8080/udp [--ready-file PATH]``; the ready file is written once
every socket is bound, which is how ``lab up`` knows the Pod serves. Stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import cast

HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
FIRST_LINE_WAIT = 0.5


def answer(pod: str, node: str, peer: tuple[str, int]) -> bytes:
    body = {"pod": pod, "node": node, "client": f"{peer[0]}:{peer[1]}"}
    return json.dumps(body).encode() + b"\n"


def parse_listen(spec: str) -> tuple[int, str]:
    port_text, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp") or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"--listen wants PORT/tcp or PORT/udp, got {spec!r}")
    return int(port_text), proto


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, pod: str, node: str) -> None:
        self.pod = pod
        self.node = node
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(answer(self.pod, self.node, addr), addr)


async def _serve_tcp_client(
    pod: str, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    peer = writer.get_extra_info("peername")
    try:
        try:
            first = await asyncio.wait_for(reader.readline(), FIRST_LINE_WAIT)
        except TimeoutError:
            first = b""
        body = answer(pod, node, (peer[0], peer[1]))
        if first.startswith(HTTP_METHODS):
            with contextlib.suppress(TimeoutError):
                while (await asyncio.wait_for(reader.readline(), FIRST_LINE_WAIT)).strip():
                    pass
            head = (
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if first.startswith(b"HEAD ") else body))
        else:
            writer.write(body)
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def serve(
    pod: str,
    node: str,
    listen: Sequence[tuple[int, str]],
    ready: str | None,
    host: str = "0.0.0.0",
    stop: asyncio.Event | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    servers: list[asyncio.AbstractServer] = []
    transports: list[asyncio.BaseTransport] = []
    for port, proto in listen:
        if proto == "tcp":
            servers.append(
                await asyncio.start_server(
                    lambda r, w: _serve_tcp_client(pod, node, r, w),
                    host=host,
                    port=port,
                    reuse_address=True,
                )
            )
        else:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(pod, node), local_addr=(host, port), family=socket.AF_INET
            )
            transports.append(udp)
    if ready:
        tmp = f"{ready}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, ready)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeproxy.lab.podserver")
    parser.add_argument("--pod", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--listen", type=parse_listen, action="append", default=[])
    parser.add_argument("--ready-file")
    parser.add_argument("--lab", help="the lab this server belongs to (for bookkeeping)")
    args = parser.parse_args(argv)
    if not args.listen:
        parser.error("give at least one --listen PORT/PROTO")
    try:
        asyncio.run(serve(args.pod, args.node, args.listen, args.ready_file))
    except OSError as exc:
        print(f"podserver {args.pod}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
