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

Every failure leaves this module as one of the exceptions below (translated at the
boundary with ``raise ... from``), so callers decide by meaning, not by socket detail:

* :class:`ClientError` -- base: talking to the API server failed.
* :class:`TransportError` -- no connection, a timeout, or a stream that broke mid-way.
* :class:`WatchStalled` -- a watch showed no event and no bookmark within its bound.
* :class:`StatusError` -- the server answered with an error status (``code``, ``reason``).
* :class:`GoneError` -- 410: the resourceVersion is too old; the caller must relist.
* :class:`ProtocolError` -- the answer is not what the API promises (bad JSON, shape).

One HTTP connection per request keeps the code small; a proxy makes few requests.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from kubeproxy.sources.kubeconfig import ClusterAccess

Obj = dict[str, Any]
USER_AGENT = "kubeproxy/0.1"


class ClientError(Exception):
    """Talking to the API server failed."""


class TransportError(ClientError):
    """No connection, a timeout, or a stream that broke before its end."""


class WatchStalled(TransportError):
    """A watch went quiet for longer than its bound: the server may be stopped."""


class ProtocolError(ClientError):
    """The server's answer is not valid API JSON."""


class StatusError(ClientError):
    """The server answered with an error status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")


class GoneError(StatusError):
    """410 Gone/Expired: the resourceVersion is no longer served; relist."""


def status_error(code: int, status: object) -> StatusError:
    """The exception for an error status (a Status object if the server sent one)."""
    reason, message = "", ""
    if isinstance(status, dict):
        reason = str(status.get("reason") or "")
        message = str(status.get("message") or "")
        raw_code = status.get("code")
        code = raw_code if isinstance(raw_code, int) and raw_code else code
    reason = reason or http.client.responses.get(code, "Error")
    return (GoneError if code == 410 else StatusError)(code, reason, message)


def _ssl_context(access: ClusterAccess) -> ssl.SSLContext:
    if access.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=access.ca_file, cadata=access.ca_data)
    if access.client_cert_file or access.client_cert_data:
        with tempfile.TemporaryDirectory(prefix="kubeproxy-tls-") as tmp:
            cert = access.client_cert_file or _write(Path(tmp) / "cert.pem",
                                                     access.client_cert_data or "")
            key = access.client_key_file or _write(Path(tmp) / "key.pem",
                                                   access.client_key_data or "")
            ctx.load_cert_chain(cert, key)
    return ctx


def _write(path: Path, text: str) -> str:
    path.touch(mode=0o600)
    path.write_text(text)
    return str(path)


class Client:
    def __init__(self, access: ClusterAccess, *, timeout: float = 30.0) -> None:
        self.access = access
        self.timeout = timeout
        url = urlsplit(access.server)
        self._host = url.hostname or ""
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        try:
            self._ssl = _ssl_context(access) if access.tls else None
        except (OSError, ssl.SSLError) as err:
            raise ClientError(f"TLS setup for {access.server}: {err}") from err

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        token = self.access.token
        if self.access.token_file:
            try:
                token = Path(self.access.token_file).read_text().strip()
            except OSError as err:
                raise ClientError(f"token file: {err}") from err
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _get(self, path: str, query: dict[str, str], timeout: float
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a GET; return the open response if it is a 200, else raise."""
        target = self._prefix + path + ("?" + urlencode(query) if query else "")
        conn = self._connection(timeout)
        try:
            conn.request("GET", target, headers=self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                conn.close()
                raise status_error(resp.status, _json_or_none(body))
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            raise TransportError(f"GET {target}: {err}") from err
        return conn, resp

    def list_page(self, path: str, *, label_selector: str = "", field_selector: str = "",
             limit: int | None = None, continue_token: str | None = None) -> Obj:
        query = _selectors(label_selector, field_selector)
        if limit:
            query["limit"] = str(limit)
        if continue_token:
            query["continue"] = continue_token
        conn, resp = self._get(path, query, self.timeout)
        try:
            body = resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise TransportError(f"GET {path}: {err}") from err
        finally:
            conn.close()
        doc = _json_or_none(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list | None):
            raise ProtocolError(f"GET {path}: the answer is not a list")
        return doc

    def list_all(self, path: str, *, label_selector: str = "", field_selector: str = "",
                 page_size: int = 500) -> tuple[list[Obj], str]:
        """Every item (following ``continue``) and the list's resourceVersion."""
        items: list[Obj] = []
        token: str | None = None
        while True:
            try:
                doc = self.list_page(path, label_selector=label_selector,
                                field_selector=field_selector, limit=page_size,
                                continue_token=token)
            except GoneError:
                if token is None:
                    raise
                items, token = [], None  # the continue token expired: start over
                continue
            items.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
            meta = doc.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            token = meta.get("continue") or None
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
            conn, resp = self._get(path, query, bound)
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


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
