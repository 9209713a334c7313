"""Logging as kube-proxy logs: klog's text lines or its JSON, with -v and --vmodule.

Theory of operation
-------------------
Python's ``logging`` stays the API (``log.info(...)``); :func:`setup` installs one
handler on the root logger whose formatter writes klog's shapes and whose filter maps
Python levels to klog verbosity:

* text: ``I1201 00:11:32.190123   12345 daemon.py:123] msg key="value"`` - severity
  letter (I, W, E; F for critical), month and day, time with microseconds, the pid
  right-aligned in 7 columns (klog prints the pid there), ``module.py:line``;
* json: ``{"ts": 1701389492.190123, "caller": "daemon.py:123", "msg": "...", "v": 0}``
  (errors carry ``"err"`` instead of ``"v"``, as klog's JSON does).

Verbosity: WARNING and above always pass; ``INFO`` is ``V(0)``; the levels between
INFO and DEBUG are ``V(1)`` .. ``V(9)`` (:func:`vlevel`: ``V2 = 18``); ``DEBUG`` is
``V(4)``, klog's usual debug level. A record passes when its V is at most ``-v``, or
the ``--vmodule`` pattern matching its file (``daemon=4``, globs allowed) allows it.
Structured key/values go in ``extra={"kv": {...}}``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

V1, V2, V3, V4, V5 = 19, 18, 17, 16, 15  # logging levels for klog V(1) .. V(5)
_LETTERS = ((logging.CRITICAL, "F"), (logging.ERROR, "E"), (logging.WARNING, "W"))


def vlevel(levelno: int) -> int:
    """A Python level's klog verbosity (0 for INFO and above)."""
    if levelno >= logging.INFO:
        return 0
    if levelno == logging.DEBUG:
        return 4
    return max(0, logging.INFO - levelno)


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text or json
    verbosity: int = 0
    vmodule: tuple[tuple[str, int], ...] = ()  # (file glob without .py, level)
    split_stream: bool = False  # info to stdout, warnings and errors to stderr

    def __post_init__(self) -> None:
        if self.format not in ("text", "json"):
            raise ValueError(f"--logging-format: {self.format!r} is not text or json")
        if self.verbosity < 0:
            raise ValueError(f"-v: {self.verbosity} must be >= 0")


def parse_vmodule(text: str) -> tuple[tuple[str, int], ...]:
    """``pattern=N,pattern=N`` as klog reads it."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pattern, _, level = part.partition("=")
        if not pattern or not level.isdigit():
            raise ValueError(f"--vmodule: {part!r} is not pattern=N")
        out.append((pattern, int(level)))
    return tuple(out)


class VFilter(logging.Filter):
    def __init__(self, config: LogConfig) -> None:
        super().__init__()
        self.config = config

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        limit = self.config.verbosity
        for pattern, level in self.config.vmodule:
            if fnmatch.fnmatchcase(record.module, pattern):
                limit = level
                break
        return vlevel(record.levelno) <= limit


def _letter(levelno: int) -> str:
    return next((ch for level, ch in _LETTERS if levelno >= level), "I")


def _kv_text(value: object) -> str:
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(str(value))


class KlogTextFormatter(logging.Formatter):
    def __init__(self, pid: int | None = None) -> None:
        super().__init__()
        self.pid = os.getpid() if pid is None else pid

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        head = (f"{_letter(record.levelno)}{stamp.tm_mon:02d}{stamp.tm_mday:02d} "
                f"{stamp.tm_hour:02d}:{stamp.tm_min:02d}:{stamp.tm_sec:02d}.{micros:06d} "
                f"{self.pid:7d} {record.filename}:{record.lineno}] ")
        text = head + record.getMessage()
        kv: Mapping[str, object] = getattr(record, "kv", {}) or {}
        if kv:
            text += "".join(f" {k}={_kv_text(v)}" for k, v in kv.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class KlogJSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {"ts": round(record.created, 6),
                                  "caller": f"{record.filename}:{record.lineno}",
                                  "msg": record.getMessage()}
        if record.levelno >= logging.ERROR:
            doc["err"] = self.formatException(record.exc_info) if record.exc_info \
                else record.getMessage()
        else:
            doc["v"] = vlevel(record.levelno)
        for key, value in (getattr(record, "kv", {}) or {}).items():
            doc.setdefault(str(key), value if isinstance(value, bool | int | float | str)
                           else str(value))
        return json.dumps(doc)


class _SplitHandler(logging.Handler):
    """Info to one stream, warnings and errors to another (``--log-*-split-stream``)."""

    def __init__(self, info: TextIO, errors: TextIO) -> None:
        super().__init__()
        self.streams = (info, errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.streams[record.levelno >= logging.WARNING]
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the proxy down
            self.handleError(record)


def setup(config: LogConfig, stream: TextIO | None = None) -> logging.Handler:
    """Install the handler on the root logger (replacing earlier ones); returns it."""
    err = stream or sys.stderr
    handler: logging.Handler = (_SplitHandler(sys.stdout, err) if config.split_stream
                                else logging.StreamHandler(err))
    handler.setFormatter(KlogJSONFormatter() if config.format == "json"
                         else KlogTextFormatter())
    handler.addFilter(VFilter(config))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(1)  # the filter decides
    return handler
