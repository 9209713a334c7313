"""The client's credentials and connections, against small real servers on 127.0.0.1.

Each test starts what it needs in this process: an HTTP(S) server that records every
request and counts the TCP connections it accepted, an HTTP CONNECT proxy that counts
its tunnels, a certificate authority made with the ``openssl`` binary, and credential
plugins that are real executable scripts written to tmp_path. Time (token expiry, the
QPS bucket) is injected; no test sleeps to wait for it.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubeproxy import __version__
from kubeproxy.sources.auth import AuthError, parse_exec_credential
from kubeproxy.sources.client import Client, ClientOptions, StatusError, TransportError
from kubeproxy.sources.kubeconfig import ClusterAccess, ExecConfig, Impersonation
from kubeproxy.sources.transport import RateLimiter, _env_proxy, proxy_for

V1 = "client.authentication.k8s.io/v1"
LIST = {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
        "items": []}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


# --- a recording server -------------------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    all_headers: list[tuple[str, str]]
    peer_cn: str | None


Respond = Callable[[Seen], int]  # the status to answer (200: an empty NodeList)


@dataclass
class Server:
    respond: Respond = lambda seen: 200
    tls: ssl.SSLContext | None = None
    drop_idle: bool = False  # close each connection after one answer, without saying so
    seen: list[Seen] = field(default_factory=list)
    accepts: int = 0

    def start(self) -> Server:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                del format, args

            def do_GET(self) -> None:
                cn = None
                if isinstance(self.connection, ssl.SSLSocket):
                    cert: Any = self.connection.getpeercert() or {}
                    cn = dict(x[0] for x in cert.get("subject", ())).get("commonName")
                seen = Seen(self.path, dict(self.headers.items()), list(self.headers.items()),
                            cn)
                outer.seen.append(seen)
                code = outer.respond(seen)
                body = json.dumps(LIST if code == 200 else {
                    "kind": "Status", "code": code, "reason": "Unauthorized"}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = outer.drop_idle

        class Httpd(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                outer.accepts += 1
                return sock, addr

        self.httpd = Httpd(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(**kw: Any) -> Server:
        made.append(Server(**kw).start())
        return made[-1]

    yield make
    for s in made:
        s.stop()


def nodes(client: Client) -> list[Any]:
    items: list[Any] = client.list_page("/api/v1/nodes")["items"]
    return items


# --- exec credential plugins ----------------------------------------------------------

# A plugin whose n-th token expires 600 s * n after T0.
PLUGIN = """#!{python}
import json, os, sys
from datetime import datetime, timezone
count = os.environ["COUNT_FILE"]
with open(count, "a") as f:
    f.write("run\\n")
n = len(open(count).read().split())
with open(os.environ["INFO_FILE"], "w") as f:
    f.write(os.environ["KUBERNETES_EXEC_INFO"] + "\\n" + " ".join(sys.argv[1:]))
expires = datetime.fromtimestamp(float(os.environ["T0"]) + 600 * n, timezone.utc)
status = {{"token": f"tok-{{n}}",
          "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}
if os.environ.get("CERT"):
    status = {{"clientCertificateData": open(os.environ["CERT"]).read(),
              "clientKeyData": open(os.environ["KEY"]).read()}}
print(json.dumps({{"kind": "ExecCredential", "apiVersion": "{api}", "status": status}}))
"""
T0 = 1_700_000_000.0


def plugin(tmp: Path, api: str = V1, **env: str) -> ExecConfig:
    script = tmp / "plugin.py"
    script.write_text(PLUGIN.format(python=sys.executable, api=api))
    script.chmod(0o755)
    env = {"COUNT_FILE": str(tmp / "count"), "INFO_FILE": str(tmp / "info"), "T0": str(T0),
           **env}
    return ExecConfig(str(script), api, ("get-token", "--cluster", "c1"),
                      tuple(env.items()), provide_cluster_info=True,
                      interactive_mode="Never")


def runs(tmp: Path) -> int:
    return len((tmp / "count").read_text().split()) if (tmp / "count").exists() else 0


def test_exec_plugin_cached_until_expiry_and_rerun_on_401(serve: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    revoked: set[str] = set()
    server = serve(respond=lambda s: 401 if s.headers["Authorization"] in revoked else 200)
    now = [T0]
    access = ClusterAccess(server.url, exec=plugin(tmp_path), proxy_url=None)
    client = Client(access, clock=lambda: now[0])
    assert runs(tmp_path) == 0, "the plugin runs on the first request, not at start"
    nodes(client)
    nodes(client)
    assert runs(tmp_path) == 1, "cached until expirationTimestamp"
    now[0] = T0 + 601
    nodes(client)
    nodes(client)
    assert runs(tmp_path) == 2, "re-run after expiry, then cached again"
    revoked.add("Bearer tok-2")
    nodes(client)  # 401 with tok-2: the plugin runs again and the request is retried
    assert runs(tmp_path) == 3
    assert [s.headers["Authorization"] for s in server.seen] == [
        "Bearer tok-1", "Bearer tok-1", "Bearer tok-2", "Bearer tok-2", "Bearer tok-2",
        "Bearer tok-3"]
    revoked.update({"Bearer tok-3", "Bearer tok-4"})
    with pytest.raises(StatusError, match="401") as err:
        nodes(client)  # refused again after the re-run: no third try
    assert err.value.code == 401 and runs(tmp_path) == 4 and len(server.seen) == 8
    info, argv = (tmp_path / "info").read_text().split("\n")
    assert argv == "get-token --cluster c1"
    assert json.loads(info) == {"kind": "ExecCredential", "apiVersion": V1, "spec": {
        "interactive": False, "cluster": {"server": server.url}}}


def test_a_failing_plugin_is_an_auth_error(serve: Callable[..., Server],
                                           tmp_path: Path) -> None:
    server = serve()
    script = tmp_path / "broken"
    script.write_text("#!/bin/sh\necho 'no credentials for you' >&2\nexit 3\n")
    script.chmod(0o755)
    client = Client(ClusterAccess(server.url, exec=ExecConfig(str(script), V1,
                                                              interactive_mode="Never")))
    with pytest.raises(AuthError, match="exit status 3: no credentials for you"):
        nodes(client)
    assert server.seen == []


@pytest.mark.parametrize(("out", "message"), [
    (b"not json", "the output is not JSON"),
    (b'{"kind": "Secret"}', "not an ExecCredential"),
    (b'{"kind": "ExecCredential", "apiVersion": "client.authentication.k8s.io/v1beta1",'
     b' "status": {"token": "t"}}', "apiVersion .*v1beta1.*, but the kubeconfig asked for"),
    (b'{"kind": "ExecCredential", "apiVersion": "%s"}' % V1.encode(), "status: missing"),
    (b'{"kind": "ExecCredential", "apiVersion": "%s", "status": {}}' % V1.encode(),
     "neither a token nor a client certificate"),
    (b'{"kind": "ExecCredential", "apiVersion": "%s", "status": {"clientKeyData": "k"}}'
     % V1.encode(), "come together"),
    (b'{"kind": "ExecCredential", "apiVersion": "%s", "status": {"token": "t",'
     b' "expirationTimestamp": "tomorrow"}}' % V1.encode(), "is not RFC 3339"),
])
def test_bad_plugin_output(out: bytes, message: str) -> None:
    with pytest.raises(AuthError, match=message):
        parse_exec_credential(out, V1)


def test_plugin_output_parsed() -> None:
    cred = parse_exec_credential(json.dumps({
        "kind": "ExecCredential", "apiVersion": V1,
        "status": {"token": "t", "expirationTimestamp": "2023-11-14T22:13:20Z"}}).encode(), V1)
    assert (cred.token, cred.expires) == ("t", T0)


# --- tokens, impersonation, user agent ------------------------------------------------


def test_token_file_is_reread_when_it_rotates(serve: Callable[..., Server],
                                              tmp_path: Path) -> None:
    valid = {"Bearer one"}
    server = serve(respond=lambda s: 200 if s.headers["Authorization"] in valid else 401)
    token = tmp_path / "token"
    token.write_text("one\n")
    client = Client(ClusterAccess(server.url, token_file=str(token)))
    for _ in range(3):
        nodes(client)
    assert client.auth.token_file is not None and client.auth.token_file.reads == 1
    # The kubelet's way: a new file swapped in by rename (a new inode).
    (tmp_path / "token.new").write_text("two\n")
    (tmp_path / "token.new").rename(token)
    valid = {"Bearer two"}
    nodes(client)
    assert client.auth.token_file.reads == 2
    assert [s.headers["Authorization"] for s in server.seen] == ["Bearer one"] * 3 + [
        "Bearer two"]


def test_static_token_gets_no_retry_on_401(serve: Callable[..., Server]) -> None:
    server = serve(respond=lambda s: 401)
    with pytest.raises(StatusError, match="401"):
        nodes(Client(ClusterAccess(server.url, token="bad")))
    assert len(server.seen) == 1


def test_impersonation_basic_auth_and_user_agent(serve: Callable[..., Server]) -> None:
    server = serve()
    access = ClusterAccess(server.url, username="admin", password="pw",
                           impersonate=Impersonation("jane", "42", ("dev", "ops"),
                                                     (("scopes/x", ("a", "b")),)))
    nodes(Client(access))
    (seen,) = server.seen
    assert seen.headers["Authorization"] == "Basic YWRtaW46cHc="
    assert [(k, v) for k, v in seen.all_headers if k.startswith("Impersonate")] == [
        ("Impersonate-User", "jane"), ("Impersonate-Uid", "42"),
        ("Impersonate-Group", "dev"), ("Impersonate-Group", "ops"),
        ("Impersonate-Extra-scopes%2Fx", "a"), ("Impersonate-Extra-scopes%2Fx", "b")]
    assert seen.headers["User-Agent"].startswith(f"kube-proxy/v{__version__} (linux/")
    assert seen.headers["User-Agent"].endswith(") kubeproxy")
    assert seen.headers["Accept"] == "application/json"


# --- connections ----------------------------------------------------------------------


def test_requests_share_one_kept_alive_connection(serve: Callable[..., Server]) -> None:
    server = serve()
    client = Client(ClusterAccess(server.url), options=ClientOptions(qps=-1))
    for _ in range(20):
        nodes(client)
    assert (len(server.seen), server.accepts, client.transport.connections) == (20, 1, 1)


def test_a_connection_the_server_dropped_is_replaced(serve: Callable[..., Server]) -> None:
    server = serve(drop_idle=True)
    client = Client(ClusterAccess(server.url))
    for _ in range(3):
        nodes(client)  # each reuse finds the connection closed: a new one, no error
    assert (len(server.seen), server.accepts) == (3, 3)


# --- TLS ------------------------------------------------------------------------------


class Pki:
    """A CA (made with the openssl binary) issuing certificates for the tests."""

    def __init__(self, tmp: Path, name: str = "ca") -> None:
        self.tmp, self.name = tmp, name
        self.run("req", "-x509", *self.KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt",
                 "-days", "1", "-subj", f"/CN={name}")
        self.ca = tmp / f"{name}.crt"

    KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def run(self, *argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=self.tmp, check=True, capture_output=True,
                       timeout=60)

    def issue(self, name: str, cn: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
        (self.tmp / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        self.run("req", *self.KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}")
        self.run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{self.name}.crt", "-CAkey",
                 f"{self.name}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext")
        return self.tmp / f"{name}.crt", self.tmp / f"{name}.key"

    def server_context(self, name: str = "server", san: str = "IP:127.0.0.1",
                       sni: list[str] | None = None) -> ssl.SSLContext:
        crt, key = self.issue(name, name, san)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(crt, key)
        tls.load_verify_locations(self.ca)
        tls.verify_mode = ssl.CERT_OPTIONAL
        if sni is not None:
            tls.sni_callback = lambda sock, name, ctx: sni.append(name)
        return tls


@needs_openssl
def test_ca_client_certificate_and_rotation(serve: Callable[..., Server],
                                            tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server = serve(tls=pki.server_context())
    crt, key = pki.issue("client", "system:kube-proxy")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(crt, cert_file)
    shutil.copy(key, key_file)
    client = Client(ClusterAccess(server.url, ca_data=pki.ca.read_text(),
                                  client_cert_file=str(cert_file),
                                  client_key_file=str(key_file)))
    nodes(client)
    nodes(client)
    # Rotation: new files under the same names; the next request makes a new context.
    crt2, key2 = pki.issue("client2", "system:kube-proxy:rotated")
    for src, dst in ((crt2, cert_file), (key2, key_file)):
        shutil.copy(src, dst.with_suffix(".new"))
        dst.with_suffix(".new").rename(dst)
    nodes(client)
    assert [s.peer_cn for s in server.seen] == ["system:kube-proxy"] * 2 + [
        "system:kube-proxy:rotated"]
    assert server.accepts == 2, "one connection per certificate"


@needs_openssl
def test_tls_server_name_and_verification(serve: Callable[..., Server],
                                          tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    sni: list[str] = []
    server = serve(tls=pki.server_context(san="DNS:kubernetes", sni=sni))
    ca = str(pki.ca)
    nodes(Client(ClusterAccess(server.url, ca_file=ca, tls_server_name="kubernetes")))
    assert sni == ["kubernetes"]
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        nodes(Client(ClusterAccess(server.url, ca_file=ca)))  # 127.0.0.1 is not in it
    other = Pki(tmp_path, "other-ca")
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        nodes(Client(ClusterAccess(server.url, ca_file=str(other.ca),
                                   tls_server_name="kubernetes")))
    nodes(Client(ClusterAccess(server.url, insecure=True)))
    assert len(server.seen) == 2


@needs_openssl
def test_exec_plugin_client_certificate(serve: Callable[..., Server], tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server = serve(tls=pki.server_context())
    crt, key = pki.issue("exec", "from-the-plugin")
    client = Client(ClusterAccess(server.url, ca_file=str(pki.ca),
                                  exec=plugin(tmp_path, CERT=str(crt), KEY=str(key))))
    nodes(client)
    assert server.seen[0].peer_cn == "from-the-plugin"
    assert "Authorization" not in server.seen[0].headers


# --- proxies --------------------------------------------------------------------------


class ConnectProxy:
    """An HTTP proxy: CONNECT tunnels (counted), and absolute-form GETs relayed."""

    def __init__(self, auth: str | None = None) -> None:
        self.tunnels: list[str] = []
        self.forwarded: list[str] = []
        self.auth = auth
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            request, _, rest = head.partition(b"\r\n\r\n")
            lines = request.decode().split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            if self.auth is not None and headers.get("Proxy-Authorization") != self.auth:
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Content-Length: 0\r\n\r\n")
                return
            if method == "CONNECT":
                self.tunnels.append(target)
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                self.forwarded.append(target)
                host_port = target.split("/")[2]
                host, port = host_port.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                upstream.sendall(head)
                rest = b""
            with upstream:
                if rest:
                    upstream.sendall(rest)
                self.relay(conn, upstream)

    @staticmethod
    def relay(a: socket.socket, b: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([a, b], [], [], 5)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()


@needs_openssl
def test_https_through_a_connect_proxy(serve: Callable[..., Server], tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    server = serve(tls=pki.server_context())
    proxy = ConnectProxy(auth="Basic dTpwQHNz")  # u:p@ss
    try:
        access = ClusterAccess(server.url, ca_file=str(pki.ca), token="t",
                               proxy_url=f"http://u:p%40ss@127.0.0.1:{proxy.port}")
        client = Client(access)
        for _ in range(3):
            nodes(client)
        port = server.httpd.server_address[1]
        assert proxy.tunnels == [f"127.0.0.1:{port}"], "one tunnel, kept alive"
        assert [s.headers["Authorization"] for s in server.seen] == ["Bearer t"] * 3
        with pytest.raises(TransportError, match="407"):
            nodes(Client(ClusterAccess(server.url, ca_file=str(pki.ca),
                                       proxy_url=proxy.url)))  # no proxy credentials
    finally:
        proxy.close()


def test_http_through_a_proxy_uses_absolute_form(serve: Callable[..., Server]) -> None:
    server = serve()
    proxy = ConnectProxy()
    try:
        nodes(Client(ClusterAccess(server.url, proxy_url=proxy.url)))
        assert proxy.forwarded == [f"{server.url}/api/v1/nodes"] and proxy.tunnels == []
        assert len(server.seen) == 1
    finally:
        proxy.close()


@pytest.mark.parametrize(("server", "env", "want"), [
    ("https://k:6443", {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
    ("https://k:6443", {"https_proxy": "p:3128"}, "p:3128"),
    ("https://k:6443", {"HTTP_PROXY": "http://p:3128"}, None),  # wrong scheme
    ("http://k:8080", {"HTTP_PROXY": "http://p:3128"}, "http://p:3128"),
    ("https://127.0.0.1:6443", {"HTTPS_PROXY": "http://p"}, None),  # loopback: never
    ("https://localhost:6443", {"HTTPS_PROXY": "http://p"}, None),
    ("https://k.example.com", {"HTTPS_PROXY": "http://p", "NO_PROXY": "example.com"}, None),
    ("https://example.com", {"HTTPS_PROXY": "http://p", "NO_PROXY": ".example.com"},
     "http://p"),  # a leading dot: subdomains only
    ("https://a.example.com", {"HTTPS_PROXY": "http://p", "no_proxy": "*.example.com"}, None),
    ("https://10.96.0.1", {"HTTPS_PROXY": "http://p", "NO_PROXY": "10.0.0.0/8"}, None),
    ("https://10.96.0.1", {"HTTPS_PROXY": "http://p", "NO_PROXY": "10.96.0.2"}, "http://p"),
    ("https://k:6443", {"HTTPS_PROXY": "http://p", "NO_PROXY": "k:443"}, "http://p"),
    ("https://k:6443", {"HTTPS_PROXY": "http://p", "NO_PROXY": "x, k:6443"}, None),
    ("https://k", {"HTTPS_PROXY": "http://p", "NO_PROXY": "*"}, None),
])
def test_proxy_from_the_environment(server: str, env: dict[str, str],
                                    want: str | None) -> None:
    assert _env_proxy(server, env) == want


def test_kubeconfig_proxy_url_wins_over_the_environment() -> None:
    proxy = proxy_for(ClusterAccess("https://127.0.0.1", proxy_url="http://p:1"),
                      {"NO_PROXY": "*"})
    assert proxy is not None and (proxy.host, proxy.port) == ("p", 1)


# --- QPS ------------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


@pytest.mark.parametrize(("qps", "burst", "gaps", "waits"), [
    # client-go's kube-proxy defaults: 10 at once, then one every 200 ms.
    (5.0, 10, [0.0] * 12, [0.0] * 10 + [0.2, 0.2]),
    # Idle time refills the bucket, up to burst and no further.
    (5.0, 2, [0.0, 0.0, 0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0, 0.0, 0.2]),
    (1.0, 1, [0.0, 0.5, 0.0], [0.0, 0.5, 1.0]),
], ids=["defaults", "refill-capped", "partial-refill"])
def test_rate_limiter(qps: float, burst: int, gaps: list[float], waits: list[float]) -> None:
    t = FakeTime()
    limiter = RateLimiter(qps, burst, clock=t.clock, sleep=t.sleep)
    got = []
    for gap in gaps:
        t.now += gap
        got.append(round(limiter.wait(), 6))
    assert got == waits


def test_client_options() -> None:
    assert ClientOptions().limiter() is not None
    limiter = ClientOptions(qps=0, burst=0).limiter()  # zero: client-go's defaults
    assert limiter is not None and (limiter.qps, limiter.burst) == (5.0, 10)
    assert ClientOptions(qps=-1).limiter() is None  # negative: no limit
    with pytest.raises(ValueError, match="content type"):
        ClientOptions(content_type="text/yaml")
    assert ClientOptions(content_type="application/vnd.kubernetes.protobuf")


def test_lists_are_rate_limited_and_watches_are_not(serve: Callable[..., Server]) -> None:
    server = serve()
    client = Client(ClusterAccess(server.url))
    t = FakeTime()
    client.transport.limiter = RateLimiter(1.0, 2, clock=t.clock, sleep=t.sleep)
    for _ in range(3):
        nodes(client)
    assert t.slept == [1.0]
    for _ in range(3):
        with client.watch("/api/v1/nodes", resource_version="1", timeout_seconds=5):
            pass
    assert t.slept == [1.0] and len(server.seen) == 6
