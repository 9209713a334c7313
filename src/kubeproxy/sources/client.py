"""A tiny Kubernetes API client on the standard library: list and watch, JSON only.

Theory of operation
-------------------
Two verbs are all a proxy needs. ``list_page`` is a GET of a collection (with
``labelSelector``, ``fieldSelector``, ``limit`` and ``continue``); :meth:`Client.list_all`
follows ``continue`` tokens and returns the items with the list's resourceVersion.
``watch`` is a GET with ``watch=true&allowWatchBookmarks=true&resourceVersion=RV&
timeoutSeconds=N`` whose chunked answer is one JSON event per line; :class:`WatchStream`
yields them as dicts and can be closed from another thread (which is how a stopping
daemon wakes an informer blocked on a quiet stream).

A watch can also *hang*: an API server that is stopped (not closed) keeps the connection
open and sends nothing, and nothing in TCP notices (the kernel still ACKs). With
``stall_timeout`` a watch must show life within that bound: the answer's headers, then
an event or a BOOKMARK (the server sends those on a quiet watch), else the stream ends
with :class:`WatchStalled`. It is a socket read timeout (no bytes within the bound)
plus a check that what did arrive held an event (blank lines do not count).

Every failure leaves this module as one of the exceptions of ``sources.errors``
(re-exported here): :class:`ClientError` and below.

Connections, TLS, proxies, the QPS limit and 401 retries are ``sources.transport``'s;
credentials are ``sources.auth``'s. :class:`ClientOptions` holds what the command line
sets (``--kube-api-qps``, ``--kube-api-burst``, ``--kube-api-content-type``) and the user
agent, ``kube-proxy/<version> (<os>/<arch>) kubeproxy`` as upstream's is built.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

from kubeproxy import __version__
from kubeproxy.errors import ClientError
from kubeproxy.sources.auth import Authenticator, AuthError
from kubeproxy.sources.errors import (
    GoneError,
    ProtocolError,
    StatusError,
    TransportError,
    WatchStalled,
    status_error,
)
from kubeproxy.sources.kubeconfig import ClusterAccess
from kubeproxy.sources.transport import RateLimiter, Transport

__all__ = ["AuthError", "Client", "ClientError", "ClientOptions", "GoneError", "Obj",
           "ProtocolError", "StatusError", "TransportError", "WatchStalled", "WatchStream",
           "status_error"]

log = logging.getLogger("kubeproxy.client")
Obj = dict[str, Any]
T = TypeVar("T")
JSON = "application/json"
PROTOBUF = "application/vnd.kubernetes.protobuf"
DEFAULT_QPS, DEFAULT_BURST = 5.0, 10  # client-go's rest.Config defaults (kube-proxy's too)
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x"}


def user_agent() -> str:
    """``kube-proxy/<version> (<os>/<arch>) kubeproxy``, the shape of upstream's
    ``kube-proxy/v1.30.0 (linux/amd64) kubernetes/<commit>``."""
    machine = os.uname().machine.lower()
    return f"kube-proxy/v{__version__} ({sys.platform}/{_ARCH.get(machine, machine)}) kubeproxy"


@dataclass(frozen=True)
class ClientOptions:
    """What the command line tunes. As in client-go's rest.Config: ``qps == 0`` is the
    default 5 and ``burst == 0`` the default 10; a negative qps turns the limit off.
    ``content_type``: JSON, or protobuf, which is accepted and answered with JSON (this
    client decodes JSON only; the wire format changes nothing a proxy sees)."""

    qps: float = DEFAULT_QPS
    burst: int = DEFAULT_BURST
    content_type: str = JSON
    user_agent: str = field(default_factory=user_agent)

    def __post_init__(self) -> None:
        if self.burst < 0:
            raise ValueError(f"burst: {self.burst}: must be >= 0")
        if self.content_type not in (JSON, PROTOBUF):
            raise ValueError(f"content type: {self.content_type!r}: must be {JSON} or "
                             f"{PROTOBUF}")

    def limiter(self, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> RateLimiter | None:
        if self.qps < 0:
            return None
        return RateLimiter(self.qps or DEFAULT_QPS, self.burst or DEFAULT_BURST,
                           clock=clock, sleep=sleep)


class Client:
    def __init__(self, access: ClusterAccess, *, timeout: float = 30.0,
                 options: ClientOptions | None = None, clock: Callable[[], float] = time.time,
                 env: Mapping[str, str] = os.environ) -> None:
        """Raises ClientError when the TLS material or the proxy cannot be used."""
        self.access = access
        self.timeout = timeout
        self.options = options or ClientOptions()
        if self.options.content_type != JSON:
            log.info("API content type %s: this client asks for and decodes JSON",
                     self.options.content_type)
        self.auth = Authenticator(access, clock=clock, environ=env)
        self.transport = Transport(access, self.auth, limiter=self.options.limiter(),
                                   user_agent=self.options.user_agent, accept=JSON, env=env)

    def close(self) -> None:
        """Close the kept-alive connections (watches close their own)."""
        self.transport.close()

    def _get(self, path: str, query: dict[str, str], timeout: float, *, watch: bool = False
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a GET; return the open response if it is a 200, else raise."""
        target = path + ("?" + urlencode(query) if query else "")
        conn, resp = self.transport.request(target, timeout=timeout, watch=watch)
        if resp.status != 200:
            try:
                body = resp.read()
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise TransportError(f"GET {target}: {err}") from err
            self.transport.release(conn, resp)
            raise status_error(resp.status, _json_or_none(body))
        return conn, resp

    def list_page(self, path: str, *, label_selector: str = "", field_selector: str = "",
                  limit: int | None = None, continue_token: str | None = None,
                  resource_version: str = "") -> Obj:
        """One page. ``resource_version``: "" a consistent read, "0" anything the
        server's watch cache holds (it may ignore ``limit`` then), else not older than
        it; never sent with ``continue`` (the token carries it)."""
        query = _selectors(label_selector, field_selector)
        if limit:
            query["limit"] = str(limit)
        if continue_token:
            query["continue"] = continue_token
        elif resource_version:
            query["resourceVersion"] = resource_version
        conn, resp = self._get(path, query, self.timeout)
        try:
            body = resp.read()
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise TransportError(f"GET {path}: {err}") from err
        self.transport.release(conn, resp)
        doc = _json_or_none(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list | None):
            raise ProtocolError(f"GET {path}: the answer is not a list")
        return doc

    def list_all(self, path: str, *, label_selector: str = "", field_selector: str = "",
                 page_size: int = 500, resource_version: str = "") -> tuple[list[Obj], str]:
        """Every item (following ``continue``) and the list's resourceVersion.
        ``resource_version`` applies to the first page (see :meth:`list_page`)."""
        return self.list_converted(path, _same, label_selector=label_selector,
                                   field_selector=field_selector, page_size=page_size,
                                   resource_version=resource_version)

    def list_converted(self, path: str, convert: Callable[[Obj], T], *,
                       label_selector: str = "", field_selector: str = "",
                       page_size: int = 500, resource_version: str = "") -> tuple[list[T], str]:
        """:meth:`list_all` with ``convert`` applied to each item as its page arrives, so
        that only one page of raw JSON is alive at a time (10,000 EndpointSlices are
        ~70 MB as dicts, a few MB as the proxy's model)."""
        items: list[T] = []
        token: str | None = None
        while True:
            try:
                doc = self.list_page(path, label_selector=label_selector,
                                     field_selector=field_selector, limit=page_size,
                                     continue_token=token, resource_version=resource_version)
            except GoneError:
                if token is None:
                    raise
                items, token = [], None  # the continue token expired: start over
                continue
            items.extend(convert(i) for i in doc.get("items") or [] if isinstance(i, dict))
            meta = doc.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            token = meta.get("continue") or None
            del doc
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(self, path: str, *, resource_version: str, timeout_seconds: int,
              label_selector: str = "", field_selector: str = "",
              stall_timeout: float | None = None) -> WatchStream:
        """Start a watch. ``stall_timeout``: the longest the stream may stay without an
        event or a bookmark (and the answer's headers may take) before it ends with
        WatchStalled; None: only the read timeout below."""
        query = _selectors(label_selector, field_selector)
        query.update(watch="true", allowWatchBookmarks="true",
                     resourceVersion=resource_version, timeoutSeconds=str(timeout_seconds))
        # The server ends the stream after timeoutSeconds; a read timeout a little
        # later catches a server that silently went away.
        bound = timeout_seconds + 30.0
        if stall_timeout is not None:
            if stall_timeout <= 0:
                raise ValueError("stall_timeout must be > 0")
            bound = min(bound, stall_timeout)
        try:
            conn, resp = self._get(path, query, bound, watch=True)
        except TransportError as err:
            if isinstance(err.__cause__, TimeoutError):
                raise WatchStalled(f"watch {path}: no answer within {bound:g}s") from err
            raise
        return WatchStream(path, conn, resp, bound)


class WatchStream:
    """The events of one watch, as dicts; close() is safe from any thread."""

    def __init__(self, path: str, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, stall_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.stall_timeout = stall_timeout
        self._conn = conn
        self._resp = resp
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False

    def _stalled(self) -> WatchStalled:
        return WatchStalled(f"watch {self.path}: no event or bookmark for "
                            f"{self.stall_timeout:g}s; the server may be stopped")

    def __iter__(self) -> Iterator[Obj]:
        last_event = self._clock()
        while True:
            try:
                line = self._resp.readline()
            except TimeoutError as err:  # the socket's read timeout: nothing arrived
                if self._closed:
                    return
                raise self._stalled() from err
            except (OSError, http.client.HTTPException, ValueError) as err:
                if self._closed:
                    return
                raise TransportError(f"watch {self.path}: the stream broke: {err}") from err
            if not line:
                return  # the server ended the watch (timeoutSeconds), or we closed it
            if not line.strip():
                if (self.stall_timeout is not None
                        and self._clock() - last_event > self.stall_timeout):
                    raise self._stalled()  # bytes, but no event: not a sign of life
                continue
            last_event = self._clock()
            event = _json_or_none(line)
            if (not isinstance(event, dict) or not isinstance(event.get("type"), str)
                    or not isinstance(event.get("object"), dict)):
                raise ProtocolError(f"watch {self.path}: not a watch event: {line[:200]!r}")
            yield event

    def close(self) -> None:
        """End the stream; a reader blocked on it sees the end. Safe from any thread.

        Only the socket is shut down here: the connection object is not thread-safe, so
        it is closed by the reading thread, on leaving the ``with`` block.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._conn.close()


def _selectors(label_selector: str, field_selector: str) -> dict[str, str]:
    query: dict[str, str] = {}
    if label_selector:
        query["labelSelector"] = label_selector
    if field_selector:
        query["fieldSelector"] = field_selector
    return query


def _same(obj: Obj) -> Obj:
    return obj


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
