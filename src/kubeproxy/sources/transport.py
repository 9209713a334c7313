"""HTTP(S) to one API server: kept-alive connections, proxies, TLS, QPS, 401 retries.

Theory of operation
-------------------
:class:`Transport` sends one request and returns the open response. Around that:

* **Connections.** Requests whose answer is read to its end (lists, gets) give their
  connection back to a small idle pool (HTTP/1.1 keep-alive), so a proxy's requests
  share one TCP + TLS connection instead of one each. A watch holds its own connection
  for its whole life and closes it at the end. A kept connection the server closed
  meanwhile fails on reuse; the request is then sent once more on a new one (GETs are
  idempotent), as urllib3 and Go's transport do.
* **TLS.** The context is built from the credentials' :class:`~.auth.TlsMaterial`
  (CA file or data, insecure-skip-tls-verify, client certificate files or PEM data,
  tls-server-name as SNI and as the name to verify). Material that differs from the
  last request's (rotated certificate files, a new certificate from an exec plugin)
  gets a new context and the idle connections are dropped; running watches keep theirs
  until they end.
* **Proxies.** ``proxy-url`` from the kubeconfig, else ``HTTPS_PROXY`` / ``HTTP_PROXY``
  unless ``NO_PROXY`` matches (Go's rules: loopback is never proxied; entries are
  hosts, ``.domain`` suffixes, IPs, CIDRs, ``*``). HTTPS goes through a ``CONNECT``
  tunnel, plain HTTP as absolute-form requests to the proxy; ``user:pass@`` in the
  proxy URL becomes ``Proxy-Authorization: Basic``.
* **QPS.** :class:`RateLimiter` is client-go's token bucket (``--kube-api-qps`` /
  ``--kube-api-burst``): every request but a watch takes a token, waiting when none is
  left; clock and sleep are injected.
* **401.** The authenticator is told which credentials were refused; when it may have
  better ones (a token file re-read, an exec plugin re-run) the request goes once more.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kubeproxy.errors import ClientError
from kubeproxy.sources.auth import Authenticator, Credentials, TlsMaterial
from kubeproxy.sources.errors import TransportError
from kubeproxy.sources.kubeconfig import ClusterAccess

MAX_IDLE = 4  # idle kept-alive connections per server (lists of 3 informers at start)
# What a reused connection raises when the server closed it while it was idle.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
          ConnectionAbortedError)


class RateLimiter:
    """client-go's token bucket: ``burst`` tokens, refilled at ``qps`` per second.

    ``wait()`` takes a token, sleeping until one is due; a waiter reserves its token
    first (the bucket may go negative), so concurrent callers queue up fairly.
    """

    def __init__(self, qps: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError("a rate limit needs qps > 0 and burst >= 1")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self) -> float:
        delay = self.reserve()
        if delay > 0:
            self._sleep(delay)
        return delay


# --- proxies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = None  # Proxy-Authorization value


def proxy_for(access: ClusterAccess, env: Mapping[str, str]) -> Proxy | None:
    """The proxy the server is reached through, if any (kubeconfig, then environment)."""
    url = access.proxy_url
    if url is None:
        url = _env_proxy(access.server, env)
    if url is None:
        return None
    if "://" not in url:
        url = "http://" + url  # Go accepts a bare host:port
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ClientError(f"proxy {url!r}: only http:// proxies are supported")
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, auth)


def _env_proxy(server: str, env: Mapping[str, str]) -> str | None:
    parts = urlsplit(server)
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host == "localhost" or _is_loopback(host):
        return None
    names = ("HTTPS_PROXY", "https_proxy") if parts.scheme == "https" else ("HTTP_PROXY",
                                                                           "http_proxy")
    proxy = next((env[n] for n in names if env.get(n)), None)
    if not proxy or _no_proxy(host, port, env.get("NO_PROXY") or env.get("no_proxy") or ""):
        return None
    return proxy


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Go's NO_PROXY matching (golang.org/x/net/http/httpproxy)."""
    for raw in no_proxy.lower().split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        entry_port = None
        if entry.count(":") == 1:
            entry, _, p = entry.partition(":")
            entry_port = int(p) if p.isdigit() else None
        if entry_port is not None and entry_port != port:
            continue
        entry = entry[1:] if entry.startswith("*.") else entry
        if entry.startswith("."):
            if host.endswith(entry):
                return True
        elif host == entry or host.endswith("." + entry):
            return True
    return False


# --- TLS ----------------------------------------------------------------------------


def ssl_context(tls: TlsMaterial) -> ssl.SSLContext:
    try:
        if tls.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=tls.ca_file, cadata=tls.ca_data)
        if tls.cert_file or tls.cert_pem:
            with tempfile.TemporaryDirectory(prefix="kubeproxy-tls-") as tmp:
                cert = tls.cert_file or _write(Path(tmp) / "cert.pem", tls.cert_pem or "")
                key = tls.key_file or _write(Path(tmp) / "key.pem", tls.key_pem or "")
                ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ClientError(f"TLS setup: {err}") from err
    return ctx


def _write(path: Path, text: str) -> str:
    path.touch(mode=0o600)
    path.write_text(text)
    return str(path)


class Connection(http.client.HTTPConnection):
    """An HTTP(S) connection that may go through a proxy and verifies ``server_name``."""

    def __init__(self, host: str, port: int, *, timeout: float,
                 context: ssl.SSLContext | None, server_name: str,
                 on_connect: Callable[[], None]) -> None:
        super().__init__(host, port, timeout=timeout)
        self._context = context
        self._server_name = server_name
        self._on_connect = on_connect

    def connect(self) -> None:
        super().connect()  # TCP, and the CONNECT tunnel if set_tunnel() was called
        self._on_connect()
        if self._context is not None:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


# --- the transport ------------------------------------------------------------------


class Transport:
    def __init__(self, access: ClusterAccess, auth: Authenticator, *,
                 limiter: RateLimiter | None = None, user_agent: str = "",
                 accept: str = "application/json",
                 env: Mapping[str, str] = os.environ, max_idle: int = MAX_IDLE) -> None:
        self.access = access
        self.auth = auth
        self.limiter = limiter
        self.user_agent = user_agent
        self.accept = accept
        self.max_idle = max_idle
        url = urlsplit(access.server)
        self._scheme, self._host = url.scheme, url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.proxy = proxy_for(access, env)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._tls: TlsMaterial | None = None
        self._context: ssl.SSLContext | None = None
        self.connections = 0  # TCP connections opened, for tests and metrics
        if access.tls:
            self._context_for(auth.credentials().tls)  # fail at start on bad material

    def _context_for(self, tls: TlsMaterial) -> ssl.SSLContext:
        with self._lock:
            if self._context is not None and tls == self._tls:
                return self._context
        context = ssl_context(tls)
        with self._lock:
            self._tls, self._context = tls, context
            stale, self._idle = self._idle, []
        for conn in stale:
            conn.close()
        return context

    def _counted(self) -> None:
        with self._lock:
            self.connections += 1

    def _new(self, creds: Credentials, timeout: float) -> Connection:
        context = self._context_for(creds.tls) if self._scheme == "https" else None
        server_name = creds.tls.server_name or self._host
        if self.proxy is None:
            return Connection(self._host, self._port, timeout=timeout, context=context,
                              server_name=server_name, on_connect=self._counted)
        conn = Connection(self.proxy.host, self.proxy.port, timeout=timeout,
                          context=context, server_name=server_name, on_connect=self._counted)
        if self._scheme == "https":
            headers = ({"Proxy-Authorization": self.proxy.authorization}
                       if self.proxy.authorization else None)
            conn.set_tunnel(self._host, self._port, headers)
        return conn

    def _take(self, creds: Credentials, timeout: float, reuse: bool
              ) -> tuple[Connection, bool]:
        if reuse:
            if self._scheme == "https":
                self._context_for(creds.tls)  # drops the idle ones if the material changed
            with self._lock:
                if self._idle:
                    conn = self._idle.pop()
                    conn.timeout = timeout
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout)
                    return conn, True
        return self._new(creds, timeout), False

    def release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
                ) -> None:
        """A response read to its end: keep its connection if the server lets us."""
        if resp.will_close or not isinstance(conn, Connection):
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(self, target: str, *, timeout: float, watch: bool = False
                ) -> tuple[Connection, http.client.HTTPResponse]:
        """GET ``target`` (path and query, below the server's prefix); the response is
        open, its status not checked. A watch gets a connection of its own."""
        if self.limiter is not None and not watch:
            self.limiter.wait()  # client-go does not rate-limit watches either
        creds = self.auth.credentials()
        conn, resp = self._send(target, creds, timeout, reuse=not watch)
        if resp.status == 401 and self.auth.unauthorized(creds):
            resp.read()
            self.release(conn, resp)
            conn, resp = self._send(target, self.auth.credentials(), timeout, reuse=not watch)
        return conn, resp

    def _send(self, target: str, creds: Credentials, timeout: float, reuse: bool
              ) -> tuple[Connection, http.client.HTTPResponse]:
        path = self.prefix + target
        if self.proxy is not None and self._scheme == "http":
            path = f"http://{self._host}:{self._port}{path}"  # absolute-form, via the proxy
        for attempt in (1, 2):
            conn, reused = self._take(creds, timeout, reuse and attempt == 1)
            try:
                conn.putrequest("GET", path, skip_accept_encoding=True)
                conn.putheader("Accept", self.accept)
                conn.putheader("User-Agent", self.user_agent)
                if self.proxy is not None and self._scheme == "http" and self.proxy.authorization:
                    conn.putheader("Proxy-Authorization", self.proxy.authorization)
                for name, value in creds.headers:
                    conn.putheader(name, value)
                conn.endheaders()
                return conn, conn.getresponse()
            except _STALE as err:
                conn.close()
                if not reused:
                    raise TransportError(f"GET {target}: {err}") from err
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise TransportError(f"GET {target}: {err}") from err
        raise AssertionError("unreachable")  # the second attempt never reuses
