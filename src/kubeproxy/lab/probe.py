"""The probe: n requests, each on a new connection (TCP) or socket (UDP), counted.

Run inside the source namespace (``lab probe`` does it with ``ip netns exec``)::

    python -m kubeproxy.lab.probe --to 10.96.0.10 --port 80 [--proto udp] [-n 100]
        [--timeout 1] [--source 203.0.113.130]

It prints one JSON object (``ProbeResult.to_json``). Each answer is the pod server's JSON
line; failures are sorted by kind, so that a test can tell a REJECT from a DROP:

``refused``      ECONNREFUSED: a TCP RST or an ICMP port-unreachable came back. This is
                 what kube-proxy's REJECT sends (upstream iptables ``-j REJECT``, nftables
                 ``reject``: both ICMP port-unreachable), so the REJECT cases.
``timeout``      no answer at all within the timeout: the DROP cases (a packet dropped on
                 the way, or a forwarded one dropped at the node).
``unreachable``  EHOSTUNREACH / ENETUNREACH: no route, no neighbour, or an ICMP
                 host/net-unreachable. Routing trouble, not a kube-proxy verdict.
``denied``       EPERM / EACCES: the local stack refused to send (a DROP in the sender's
                 own OUTPUT path fails at once with EPERM rather than timing out).
``reset``        connection reset, closed without an answer, or anything else.

Stdlib only, so it starts fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# errno -> failure kind; anything else (and a reset or a garbled answer) is "reset".
FAILURE_ERRNOS: dict[int, str] = {
    errno.ECONNREFUSED: "refused",  # RST, or ICMP port-unreachable: a REJECT
    errno.EHOSTUNREACH: "unreachable",  # no neighbour, or ICMP host-unreachable
    errno.ENETUNREACH: "unreachable",  # no route, or ICMP net-unreachable
    errno.EPERM: "denied",  # a netfilter DROP on the sender's own OUTPUT path
    errno.EACCES: "denied",  # the same, as some paths report it
}
FAILURE_KINDS = ("refused", "timeout", "unreachable", "denied", "reset")
FIRST_KINDS = ("refused", "timeout", "reset")  # the probe's original three, always shown


@dataclass(frozen=True)
class ProbeResult:
    sent: int
    ok: int
    refused: int = 0
    timeout: int = 0
    reset: int = 0
    unreachable: int = 0
    denied: int = 0
    backends: dict[str, int] = field(default_factory=dict)
    client_addresses: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The probe's output. ``failed`` always has the first kinds (refused, timeout,
        reset); the later ones (unreachable, denied) only when they happened, so that a
        result without them reads exactly as it did before they existed."""
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": {k: n for k, n in self.failures().items() if n or k in FIRST_KINDS},
            "backends": dict(sorted(self.backends.items())),
            "client_addresses": list(self.client_addresses),
        }

    def failures(self) -> dict[str, int]:
        """Failure counts by kind, every kind present (in ``FAILURE_KINDS`` order)."""
        return {kind: int(getattr(self, kind)) for kind in FAILURE_KINDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResult:
        """Parse ``to_json``'s output; a kind missing from ``failed`` (an older probe,
        which had only refused/timeout/reset) counts 0."""
        failed = data["failed"]
        return cls(
            sent=int(data["sent"]),
            ok=int(data["ok"]),
            **{kind: int(failed.get(kind, 0)) for kind in FAILURE_KINDS},
            backends={str(k): int(v) for k, v in data["backends"].items()},
            client_addresses=tuple(str(a) for a in data["client_addresses"]),
        )


def format_table(result: ProbeResult, target: str) -> str:
    # The first kinds always (as before), the later ones only when they happened.
    failed = [f"{k} {n}" for k, n in result.failures().items() if n or k in FIRST_KINDS]
    lines = [f"{target}: sent {result.sent}, ok {result.ok}, failed: {', '.join(failed)}"]
    if result.backends:
        width = max(len("BACKEND"), *(len(b) for b in result.backends))
        lines.append(f"  {'BACKEND':<{width}}  ANSWERS")
        for backend, count in sorted(result.backends.items()):
            bar = "#" * round(40 * count / max(result.sent, 1))
            lines.append(f"  {backend:<{width}}  {count:>7}  {bar}")
    clients = ", ".join(result.client_addresses) or "-"
    lines.append(f"  client addresses seen by the backends: {clients}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the client


def classify(exc: BaseException) -> str:
    """The failure kind of a socket error (see the module docstring)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return FAILURE_ERRNOS.get(exc.errno, "reset")
    return "reset"


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def request(
    ip: str, port: int, proto: str, timeout: float, source: str | None
) -> dict[str, Any] | str:
    """One request on a fresh socket: the answer, or the failure kind."""
    try:
        if proto == "tcp":
            with socket.create_connection(
                (ip, port), timeout=timeout, source_address=(source, 0) if source else None
            ) as sock:
                sock.sendall(b"probe\n")
                line = _read_line(sock)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(timeout)
                if source:
                    sock.bind((source, 0))
                sock.connect((ip, port))
                sock.send(b"probe\n")
                line = sock.recv(4096)
    except OSError as exc:
        return classify(exc)
    try:
        answer = json.loads(line)
    except ValueError:
        return "reset"
    return answer if isinstance(answer, dict) and "pod" in answer else "reset"


def run_probe(
    ip: str, port: int, proto: str = "tcp", n: int = 100, timeout: float = 1.0,
    source: str | None = None,
) -> ProbeResult:  # fmt: skip
    failures: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    clients: set[str] = set()
    for _ in range(n):
        outcome = request(ip, port, proto, timeout, source)
        if isinstance(outcome, str):
            failures[outcome] += 1
            continue
        backends[str(outcome["pod"])] += 1
        client = str(outcome.get("client", ""))
        clients.add(client.rsplit(":", 1)[0])
    return ProbeResult(
        sent=n,
        ok=sum(backends.values()),
        **{kind: failures[kind] for kind in FAILURE_KINDS},
        backends=dict(backends),
        client_addresses=tuple(sorted(clients, key=_ip_sort_key)),
    )


def _ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in ip.split("."))
    except ValueError:
        return (999,)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeproxy.lab.probe")
    parser.add_argument("--to", required=True, help="destination IPv4 address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--source", help="source address to bind")
    args = parser.parse_args(argv)
    result = run_probe(args.to, args.port, args.proto, args.n, args.timeout, args.source)
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
