"""The probe's failure kinds: which socket error is which kind, and the JSON they travel in.

Pure (no sockets are opened): the errors are built as the kernel reports them. The kinds
are what lets a kernel test tell a REJECT (refused) from a DROP (timeout), so each errno
that could blur the two is pinned here.
"""

from __future__ import annotations

import errno
import json

import pytest

from kubeproxy.lab.probe import FAILURE_KINDS, ProbeResult, classify, format_table

# (id, the error a socket call raised, kind)
ERRORS = [
    ("rst-or-port-unreachable", ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "refused"),
    ("udp-port-unreachable", OSError(errno.ECONNREFUSED, "refused"), "refused"),
    ("no-answer", TimeoutError("timed out"), "timeout"),
    ("no-neighbour-or-host-unreachable", OSError(errno.EHOSTUNREACH, "no route"), "unreachable"),
    ("no-route", OSError(errno.ENETUNREACH, "unreachable"), "unreachable"),
    ("dropped-on-own-output", PermissionError(errno.EPERM, "not permitted"), "denied"),
    ("eacces", OSError(errno.EACCES, "denied"), "denied"),
    ("reset", ConnectionResetError(errno.ECONNRESET, "reset"), "reset"),
    ("other-errno", OSError(errno.EINVAL, "invalid"), "reset"),
    ("no-errno", OSError("odd"), "reset"),
]


@pytest.mark.parametrize(("exc", "kind"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_every_kind_round_trips() -> None:
    result = ProbeResult(sent=20, ok=5, refused=1, timeout=2, reset=3, unreachable=4, denied=5,
                         backends={"a": 5})
    assert list(result.failures().items()) == [
        ("refused", 1), ("timeout", 2), ("unreachable", 4), ("denied", 5), ("reset", 3)]
    assert tuple(result.failures()) == FAILURE_KINDS
    assert ProbeResult.from_json(json.loads(json.dumps(result.to_json()))) == result


# (id, a result, the "failed" object of its JSON)
SHAPES = [
    ("first-kinds-always", ProbeResult(2, 2), {"refused": 0, "timeout": 0, "reset": 0}),
    ("later-kinds-when-seen", ProbeResult(2, 0, denied=2),
     {"refused": 0, "timeout": 0, "denied": 2, "reset": 0}),
]


@pytest.mark.parametrize(("result", "failed"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_failed_shape(result: ProbeResult, failed: dict[str, int]) -> None:
    assert result.to_json()["failed"] == failed


def test_reads_an_older_probe_without_the_later_kinds() -> None:
    old = {"sent": 3, "ok": 0, "failed": {"refused": 1, "timeout": 2, "reset": 0},
           "backends": {}, "client_addresses": []}
    assert ProbeResult.from_json(old) == ProbeResult(sent=3, ok=0, refused=1, timeout=2)


def test_table_names_the_later_kinds_only_when_seen() -> None:
    assert "denied" not in format_table(ProbeResult(sent=1, ok=1), "x")
    line = format_table(ProbeResult(sent=2, ok=0, timeout=1, unreachable=1), "x").splitlines()[0]
    assert line == "x: sent 2, ok 0, failed: refused 0, timeout 1, unreachable 1, reset 0"
