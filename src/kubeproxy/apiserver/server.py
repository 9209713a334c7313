"""Assembling and running the API server: listeners, store, reaper, kubeconfig.

`ApiServer` owns one store (behind a Hub), one `Api`, and one HTTP server per listening
socket: the root-namespace listener, which must be a loopback address (the API is meant
for this machine and the lab, nobody else), plus one socket inside each requested lab
network namespace (netns.py). A reaper thread finishes graceful deletions when their
grace period is over. `start()` returns once every socket is listening, so a kubeconfig
written after it is a readiness signal; `stop()` closes watches, connections and sockets.

With `state_file` the store outlives the process: it is restored from that file when it
exists, and the file is rewritten (atomically, under the store's lock) after every
change, before the change is answered. A restarted server therefore comes back with the
same objects, UIDs and resourceVersions; only the watch history is gone (storage.py).
One JSON file rewritten per change costs O(objects) per write: right for the lab's
hundreds of objects, not for a bench with tens of thousands (which runs without it).

With `tls` every listener speaks TLS (the server certificate must cover 127.0.0.1; one
CA signs it and verifies client certificates), and with `auth` every request is
authenticated and authorized (auth.py, rbac.py). The written kubeconfig then carries the
CA and the credential in `kubeconfig_user` (the lab's: an admin client certificate).
Without them the server is the open plain-HTTP one that in-process tests and benches use.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kubeproxy.apiserver import services
from kubeproxy.apiserver.auth import AuthConfig
from kubeproxy.apiserver.handlers import Api, ApiConfig
from kubeproxy.apiserver.http import ApiHTTPServer, server_context
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.netns import netns_socket
from kubeproxy.apiserver.store import Store, StoreConfig

CLUSTER_NAME = "kubeproxy-lab"
log = logging.getLogger("kubeproxy.apiserver")


@dataclass(frozen=True)
class NetnsListener:
    netns: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> NetnsListener:
        """NAME:IP:PORT."""
        name, host, port = text.rsplit(":", 2) if text.count(":") >= 2 else ("", "", "")
        if not name or not host or not port.isdigit():
            raise ValueError(f"expected NAME:IP:PORT, got {text!r}")
        ipaddress.IPv4Address(host)
        return cls(name, host, int(port))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the serving certificate and key, and the CA clients trust (which also
    verifies client certificates)."""

    cert_file: str
    key_file: str
    ca_file: str


@dataclass(frozen=True)
class KubeconfigUser:
    """The credential the written kubeconfig carries (PEM text or a token)."""

    cert_pem: str | None = None
    key_pem: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    netns: tuple[NetnsListener, ...] = ()
    history: int = 1000
    service_cidr: str = "10.96.0.0/16"
    node_port_range: tuple[int, int] = (30000, 32767)
    bookmark_interval: float = 60.0
    watch_timeout: float = 1800.0
    reap_interval: float = 0.2
    state_file: str | None = None  # restore from it if it exists; rewrite on every change
    tls: TlsFiles | None = None  # None: plain HTTP
    auth: AuthConfig | None = None  # None: no authentication and no authorization
    kubeconfig_user: KubeconfigUser | None = None
    pod_log_dir: str | None = None  # pods/log reads <dir>/<namespace>_<pod>.log

    def __post_init__(self) -> None:
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"the root-namespace listener must be a loopback address, "
                             f"not {self.host}: the lab API is not for other machines")
        ipaddress.IPv4Network(self.service_cidr)
        first, last = self.node_port_range
        if not 0 < first <= last < 65536:
            raise ValueError(f"bad NodePort range {first}-{last}")


def _b64(pem: str) -> str:
    return base64.b64encode(pem.encode()).decode()


def kubeconfig_text(server_url: str, name: str = CLUSTER_NAME, *, ca_pem: str | None = None,
                    user: KubeconfigUser | None = None) -> str:
    cluster = f"    server: {server_url}\n"
    if ca_pem is not None:
        cluster += f"    certificate-authority-data: {_b64(ca_pem)}\n"
    creds = ""
    if user is not None and user.cert_pem and user.key_pem:
        creds += (f"    client-certificate-data: {_b64(user.cert_pem)}\n"
                  f"    client-key-data: {_b64(user.key_pem)}\n")
    if user is not None and user.token:
        creds += f"    token: {user.token}\n"
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: {name}\n"
        "  cluster:\n"
        f"{cluster}"
        "users:\n"
        f"- name: {name}\n"
        + (f"  user:\n{creds}" if creds else "  user: {}\n") +
        "contexts:\n"
        f"- name: {name}\n"
        "  context:\n"
        f"    cluster: {name}\n"
        f"    user: {name}\n"
        "    namespace: default\n"
        f"current-context: {name}\n"
        "preferences: {}\n"
    )


def write_kubeconfig(path: str, server_url: str, *, ca_pem: str | None = None,
                     user: KubeconfigUser | None = None) -> None:
    """Atomically (rename), so a reader never sees half a file; private when it holds a
    credential."""
    text = kubeconfig_text(server_url, ca_pem=ca_pem, user=user)
    _write_atomic(path, text, 0o600 if user is not None else 0o644)


def _write_atomic(path: str, text: str, mode: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_store(path: str | None, config: StoreConfig, *, clock: Callable[[], float],
               rng: random.Random | None) -> Store:
    """The store saved in ``path`` (ValueError if damaged), or a new one."""
    if path is None or not os.path.exists(path):
        return Store(config, clock=clock, rng=rng)
    try:
        with open(path) as f:
            snapshot = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"state file {path}: {exc}") from exc
    try:
        return Store.restore(snapshot, config, clock=clock, rng=rng)
    except ValueError as exc:
        raise ValueError(f"state file {path}: {exc}") from exc


def snapshot_writer(path: str) -> Callable[[Store], None]:
    """Hub.on_change: rewrite ``path`` with the store's state."""
    def write(store: Store) -> None:
        try:
            _write_atomic(path, json.dumps(store.dump(), separators=(",", ":")), 0o600)
        except OSError as exc:  # the change stands in memory; a restart would lose it
            log.error("cannot write the state file %s: %s", path, exc)

    return write


class ApiServer:
    def __init__(self, config: ServerConfig | None = None, *,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.config = cfg = config or ServerConfig()
        network = services.ServiceNetwork(ipaddress.IPv4Network(cfg.service_cidr),
                                          *cfg.node_port_range)
        self.store = load_store(cfg.state_file, StoreConfig(history=cfg.history, network=network),
                                clock=clock, rng=rng)
        self._save = snapshot_writer(cfg.state_file) if cfg.state_file else None
        self.hub = Hub(self.store, on_change=self._save)
        self.api = Api(self.hub, clock=clock,
                       config=ApiConfig(bookmark_interval=cfg.bookmark_interval,
                                        watch_timeout=cfg.watch_timeout, auth=cfg.auth,
                                        pod_logs=_log_reader(cfg.pod_log_dir)))
        self._tls = (server_context(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.ca_file)
                     if cfg.tls is not None else None)
        self._servers: list[ApiHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        return int(self._servers[0].server_port)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls is not None else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    def start(self) -> ApiServer:
        cfg = self.config
        sockets = [socket.create_server((cfg.host, cfg.port), reuse_port=False)]
        try:
            sockets += [netns_socket(n.netns, n.host, n.port) for n in cfg.netns]
        except BaseException:
            for s in sockets:
                s.close()
            raise
        if self._save is not None:
            self._save(self.store)  # the file exists (and is current) from the start
        for sock in sockets:
            self._serve(sock)
        self._spawn(self._reap_loop, "apiserver-reaper")
        return self

    def _serve(self, sock: socket.socket) -> None:
        server = ApiHTTPServer(sock, self.api, self._tls)
        self._servers.append(server)
        self._spawn(functools.partial(server.serve_forever, poll_interval=0.1),
                    f"apiserver-{sock.getsockname()}")

    def listen_in(self, listener: NetnsListener) -> None:
        """Add a listener inside a network namespace to a running server (a new lab node)."""
        self._serve(netns_socket(listener.netns, listener.host, listener.port))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _reap_loop(self) -> None:
        while not self._stopping.wait(self.config.reap_interval):
            self.hub.call(lambda s: s.reap())

    def stop(self) -> None:
        self._stopping.set()
        self.hub.close()
        for server in self._servers:
            server.shutdown()
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def write_kubeconfig(self, path: str) -> None:
        ca_pem = None
        if self.config.tls is not None:
            with open(self.config.tls.ca_file) as f:
                ca_pem = f.read()
        write_kubeconfig(path, self.url, ca_pem=ca_pem, user=self.config.kubeconfig_user)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _log_reader(directory: str | None) -> Callable[[str, str], bytes] | None:
    """pods/log from the files the lab's kubelet writes (``<ns>_<pod>.log``)."""
    if directory is None:
        return None

    def read(namespace: str, name: str) -> bytes:
        try:
            return (Path(directory) / f"{namespace}_{name}.log").read_bytes()
        except OSError:
            return b""
    return read
