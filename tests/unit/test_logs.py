"""klog's text and JSON lines, -v and --vmodule."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from kubeproxy.app import logs

KLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ test_logs\.py:\d+\] ")


def capture(config: logs.LogConfig) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logs.setup(config, stream)
    return logging.getLogger("kubeproxy.test"), stream


@pytest.mark.parametrize(("verbosity", "vmodule", "level", "shown"), [
    (0, (), logging.INFO, True),  # V(0)
    (0, (), logs.V2, False),
    (2, (), logs.V2, True),
    (3, (), logging.DEBUG, False),  # DEBUG is V(4)
    (4, (), logging.DEBUG, True),
    (0, (("test_l*", 4),), logging.DEBUG, True),  # --vmodule by file glob
    (9, (("test_logs", 0),), logs.V2, False),  # vmodule lowers it too
    (0, (), logging.WARNING, True),
])
def test_verbosity(verbosity: int, vmodule: tuple[tuple[str, int], ...], level: int,
                   shown: bool) -> None:
    log, stream = capture(logs.LogConfig(verbosity=verbosity, vmodule=vmodule))
    log.log(level, "hello")
    assert bool(stream.getvalue()) is shown


def test_text_line() -> None:
    log, stream = capture(logs.LogConfig())
    log.warning("sync failed", extra={"kv": {"service": "ns/a", "count": 3}})
    line = stream.getvalue().rstrip("\n")
    assert KLOG.match(line), line
    assert line.startswith("W")
    assert line.endswith('] sync failed service="ns/a" count=3')


def test_json_line() -> None:
    log, stream = capture(logs.LogConfig(format="json", verbosity=2))
    log.log(logs.V2, "synced %d", 5, extra={"kv": {"node": "n1"}})
    log.error("broken")
    info, err = (json.loads(line) for line in stream.getvalue().splitlines())
    assert info["msg"] == "synced 5" and info["v"] == 2 and info["node"] == "n1"
    assert re.match(r"^test_logs\.py:\d+$", info["caller"])
    assert isinstance(info["ts"], float)
    assert err["msg"] == "broken" and "v" not in err and err["err"] == "broken"


@pytest.mark.parametrize(("text", "want"), [
    ("proxier=4,sync*=2", (("proxier", 4), ("sync*", 2))),
    ("", ()),
])
def test_parse_vmodule(text: str, want: tuple[tuple[str, int], ...]) -> None:
    assert logs.parse_vmodule(text) == want


@pytest.mark.parametrize("text", ["proxier", "=3", "a=x"])
def test_bad_vmodule(text: str) -> None:
    with pytest.raises(ValueError, match="--vmodule"):
        logs.parse_vmodule(text)


def test_bad_format() -> None:
    with pytest.raises(ValueError, match="logging-format"):
        logs.LogConfig(format="xml")
