"""Fixtures for the API server tests: a running server, kubectl, the Python client.

The server runs in this process on a free 127.0.0.1 port (threads), with a short bookmark
interval so bookmark tests are quick; it is always stopped. `api` is the open plain-HTTP
server (most tests speak raw HTTP to it); `secure_api` is configured as the lab runs it
(TLS with a CA of its own, client certificates, service-account tokens, RBAC). kubectl
runs as a real subprocess against a kubeconfig the server wrote, with a private discovery
cache, for each version in KUBECTL_VERSIONS that is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.apiserver import ApiServer, ServerConfig
from kubeproxy.apiserver.auth import AuthConfig
from kubeproxy.apiserver.server import KubeconfigUser, TlsFiles
from kubeproxy.lab import pki as lab_pki

SDK_BIN = Path("/usr/lib/google-cloud-sdk/bin")
KUBECTL_VERSIONS = ("1.27", "1.33")


@dataclass
class Running:
    server: ApiServer
    kubeconfig: Path

    @property
    def url(self) -> str:
        return self.server.url


def start_server(tmp: Path, **overrides: Any) -> Running:
    config = ServerConfig(**{"bookmark_interval": 0.3, **overrides})
    server = ApiServer(config).start()
    kubeconfig = tmp / "kubeconfig"
    server.write_kubeconfig(str(kubeconfig))
    return Running(server, kubeconfig)


def start_secure(tmp: Path, **overrides: Any) -> Running:
    """A server as the lab runs it: TLS, client certificates, service-account tokens,
    RBAC; its kubeconfig is the admin's (O=system:masters)."""
    pki = lab_pki.ensure(tmp / "pki")
    security = {
        "tls": TlsFiles(str(pki.cert("apiserver")), str(pki.key("apiserver")),
                        str(pki.ca_cert)),
        "auth": AuthConfig(pki.sa_key.read_bytes().strip()),
        "kubeconfig_user": KubeconfigUser(pki.cert("admin").read_text(),
                                          pki.key("admin").read_text()),
    }
    return start_server(tmp, **{**security, **overrides})


@pytest.fixture(scope="session")
def secure_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_secure(tmp_path_factory.mktemp("secure-apiserver"))
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_server(tmp_path_factory.mktemp("apiserver"))
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture
def fresh_api(tmp_path: Path) -> Iterator[Running]:
    """A server of one's own, for tests that count resourceVersions or need a tiny history."""
    running = start_server(tmp_path, history=4)
    try:
        yield running
    finally:
        running.server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace(api: Running) -> Iterator[str]:
    """A namespace of the test's own on the shared server, deleted afterwards."""
    from kubernetes import client

    name = unique("t")
    core = client.CoreV1Api(_api_client(api.url))
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


def _api_client(url: str) -> Any:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


@pytest.fixture
def api_client(api: Running) -> Any:
    return _api_client(api.url)


def kubectl_path(version: str) -> Path | None:
    path = SDK_BIN / f"kubectl.{version}"
    return path if path.exists() else None


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(params=KUBECTL_VERSIONS, ids=lambda v: f"kubectl{v}")
def kubectl(request: pytest.FixtureRequest, api: Running,
            tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    return _kubectl(request.param, api, tmp_path_factory.getbasetemp() / "kubectl-cache")


@pytest.fixture(params=KUBECTL_VERSIONS, ids=lambda v: f"kubectl{v}")
def secure_kubectl(request: pytest.FixtureRequest, secure_api: Running,
                   tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl with the secure server's admin kubeconfig (CA + client certificate)."""
    return _kubectl(request.param, secure_api,
                    tmp_path_factory.getbasetemp() / "kubectl-secure-cache")


def _kubectl(version: str, api: Running, cache_base: Path) -> Kubectl:
    binary = kubectl_path(version)
    if binary is None:
        pytest.skip(f"kubectl {version} is not installed")
    cache = Path(f"{cache_base}-{version}")

    def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(binary), f"--kubeconfig={api.kubeconfig}", f"--cache-dir={cache}"]
        if namespace is not None:
            argv.append(f"--namespace={namespace}")
        proc = subprocess.run(argv + list(args), input=stdin, capture_output=True, text=True,
                              timeout=60, env={**os.environ, **(env or {})}, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    run.binary = binary  # type: ignore[attr-defined]
    run.cache = cache  # type: ignore[attr-defined]
    return run


def kubectl_argv(run: Kubectl, api: Running, *args: str, namespace: str | None = None
                 ) -> Sequence[str]:
    argv = [str(run.binary), f"--kubeconfig={api.kubeconfig}",  # type: ignore[attr-defined]
            f"--cache-dir={run.cache}"]  # type: ignore[attr-defined]
    if namespace is not None:
        argv.append(f"--namespace={namespace}")
    return argv + list(args)


def have_root_and_ip() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None
