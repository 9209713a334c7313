"""The HTTP edge: sockets in, `handlers.Api` in the middle, bytes out.

One `ThreadingHTTPServer` per listening socket (the root-namespace 127.0.0.1 listener and
one per lab node namespace), all sharing one `Api`. HTTP/1.1 with keep-alive, as kubectl
and client-go expect; every answer has a Content-Length except watches, which are
chunked, one JSON event per chunk, flushed as it happens. Anything unexpected becomes a
500 `Status`, and the standard library's own error pages (bad request line, unsupported
method) are replaced by `Status` bodies too, so a client always gets JSON back.

With a TLS context every connection is wrapped in the thread that serves it (a slow
handshake never holds up the accept loop). A client certificate is asked for but not
required; one that does not chain to the client CA fails the handshake, and the subject
of one that does travels with each request (`Request.client_cert`) for auth.py.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kubeproxy.apiserver import codec
from kubeproxy.apiserver.auth import CertIdentity
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.handlers import Api
from kubeproxy.apiserver.messages import Request, Response, Stream, status_response

log = logging.getLogger("kubeproxy.apiserver")

MAX_BODY = 3 * 1024 * 1024  # kube-apiserver's request size limit
HANDSHAKE_TIMEOUT = 10.0


def server_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+, HTTP/1.1 only; client certificates verified against the client CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.num_tickets = 0  # no TLS 1.3 session tickets: clients here never resume a session
    if client_ca_file is not None:
        ctx.load_verify_locations(client_ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def cert_identity(conn: Any) -> CertIdentity | None:
    """The subject of the verified client certificate of a TLS connection, if it sent one."""
    if not isinstance(conn, ssl.SSLSocket):
        return None
    cert = conn.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    names = [(str(k), str(v)) for rdn in subject for k, v in rdn]
    common = next((v for k, v in names if k == "commonName"), "")
    return CertIdentity(common, tuple(v for k, v in names if k == "organizationName"))


class ApiHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, api: Api,
                 tls: ssl.SSLContext | None = None) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__((host, port), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = host, port
        self.api = api
        self.tls = tls
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # As Go's net/http: no Nagle. With TLS the server's session tickets and the answer
        # are separate writes, and Nagle plus the client's delayed ACK cost 40 ms each.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        with self._conns_lock:
            self._conns.discard(request)  # detached by wrap_socket; the TLS socket is it now
            self._conns.add(conn)
        try:
            super().finish_request(conn, client_address)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut idle keep-alive connections so their threads end with the server."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiHTTPServer
    timeout = 600  # idle keep-alive connections are dropped after this long

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's HTML error pages, as Status JSON."""
        del explain
        reason = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed",
                  414: "RequestURITooLong", 431: "RequestHeaderFieldsTooLarge",
                  501: "MethodNotAllowed"}.get(code, "BadRequest")
        status = 405 if code == 501 else code
        self.close_connection = True
        body = codec.encode(ApiError(status, reason, message or "bad request").to_status())
        try:
            self.send_response(status)
            self.send_header("Content-Type", codec.JSON)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_OPTIONS(self) -> None:
        self._serve("OPTIONS")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"invalid Content-Length {raw!r}") from exc
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "RequestEntityTooLarge", "the request body is too large")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            line = self.rfile.readline(1024).strip()
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError as exc:
                self.close_connection = True
                raise ApiError(400, "BadRequest", "malformed chunked body") from exc
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline(1024)
            if len(body) > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, "RequestEntityTooLarge", "the request body is too large")

    def _serve(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            req = Request(
                method=method,
                path=url.path,
                query=parse_qs(url.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self._read_body(),
                server_address=f"{self.server.server_name}:{self.server.server_port}",
                client_cert=cert_identity(self.connection),
            )
            result = self.server.api.handle(req)
        except ApiError as exc:
            result = status_response(exc)
        except Exception:
            log.exception("internal error serving %s %s", method, self.path)
            result = status_response(ApiError(500, "InternalError",
                                              "an error on the server has prevented the "
                                              "request from succeeding"))
        try:
            if isinstance(result, Stream):
                self._stream(result)
            else:
                self._respond(result, head=method == "HEAD")
        except OSError:
            self.close_connection = True

    def _respond(self, resp: Response, *, head: bool) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Cache-Control", "no-cache, private")
        for name, value in resp.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(resp.body)

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            if isinstance(self.connection, ssl.SSLSocket):
                return self._tls_closed(self.connection)
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _tls_closed(self, conn: ssl.SSLSocket) -> bool:
        """TLS cannot peek: read what arrived (a watch client sends nothing but its close)."""
        conn.setblocking(False)
        try:
            return bool(conn.recv(1) == b"")
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # a TLS record that carried no data (a session ticket, say)
        except ssl.SSLZeroReturnError:
            return True
        finally:
            conn.settimeout(self.timeout)

    def _stream(self, stream: Stream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        try:
            for chunk in stream.chunks:
                if chunk is None:
                    if self._client_gone():
                        self.close_connection = True
                        return
                    continue
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        except Exception:
            log.exception("internal error in a watch of %s", self.path)
            self.close_connection = True
            error = ApiError(500, "InternalError", "the watch failed on the server").to_status()
            line = codec.encode({"type": "ERROR", "object": error}) + b"\n"
            with contextlib.suppress(OSError):
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        finally:
            close = getattr(stream.chunks, "close", None)
            if close is not None:
                close()
