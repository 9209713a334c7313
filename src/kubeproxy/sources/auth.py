"""Credentials for the API server, kept fresh: tokens, token files, exec plugins, certs.

Theory of operation
-------------------
:class:`Authenticator` turns a :class:`~kubeproxy.sources.kubeconfig.ClusterAccess` into
a :class:`Credentials` snapshot per request: the headers to send (``Authorization``,
``Impersonate-*``) and the :class:`TlsMaterial` the connection must be made with. The
snapshot is a value: the transport compares it with the one its TLS context was built
from and builds a new context when it differs, which is how rotated certificates take
effect.

Sources, as client-go has them:

* ``token``: static. ``username``/``password``: basic auth.
* ``tokenFile`` (:class:`TokenFile`): re-read when the file changes (inode, size or
  mtime: the kubelet rotates projected service-account tokens by swapping a symlink).
* client certificate and key files: their stat signature is part of the TLS material,
  so a rotated pair means a new TLS context (and new connections) on the next request.
* ``exec`` (:class:`ExecPlugin`): run the plugin with its args and env plus
  ``KUBERNETES_EXEC_INFO`` (an ExecCredential with ``spec.interactive: false`` and, with
  ``provideClusterInfo``, the cluster); parse ``status.token`` or
  ``status.clientCertificateData`` + ``clientKeyData``; cache until
  ``status.expirationTimestamp`` (forever without one).

A 401 calls :meth:`Authenticator.unauthorized` with the snapshot that was refused: the
exec cache is dropped (if it still holds what was refused) and the token file re-read,
and the caller retries once when that can change anything. A static token gets no retry.
A static token or certificate takes precedence over the plugin's, as in client-go.
Failures of a plugin are :class:`AuthError` (a ClientError): the informer backs off and
tries again, as it does for a server that is down.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubeproxy.errors import ClientError
from kubeproxy.sources.kubeconfig import ClusterAccess, ExecConfig

EXEC_TIMEOUT = 60.0  # seconds a credential plugin may take
Stat = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: missing


class AuthError(ClientError):
    """Credentials could not be obtained (an exec plugin failed, a file is unreadable)."""


@dataclass(frozen=True)
class ExecCredential:
    token: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    expires: float | None = None  # epoch seconds; None: until a 401


@dataclass(frozen=True)
class TlsMaterial:
    """Everything a TLS context is built from; equal material, same context."""

    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    stamp: tuple[Stat, ...] = ()  # the files' signatures when this was taken


@dataclass(frozen=True)
class Credentials:
    headers: tuple[tuple[str, str], ...]
    tls: TlsMaterial
    exec_credential: ExecCredential | None = None  # what a 401 refers to
    token_file_stamp: Stat = None


def stat(path: str | None) -> Stat:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile:
    """A bearer token file, re-read whenever its stat signature changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: Stat = None
        self._token = ""
        self.reads = 0

    def get(self) -> tuple[str, Stat]:
        now = stat(self.path)
        with self._lock:
            if now is None or now != self._stamp:
                try:
                    with open(self.path) as f:
                        token = f.read().strip()
                except OSError as err:
                    raise AuthError(f"tokenFile {self.path}: {err}") from err
                self._token, self._stamp = token, now
                self.reads += 1
            return self._token, self._stamp

    def forget(self, stamp: Stat) -> None:
        """A 401 with the token read at ``stamp``: read the file again next time."""
        with self._lock:
            if stamp == self._stamp:
                self._stamp = None


class ExecPlugin:
    """Runs a credential plugin; caches its answer until it expires or is refused."""

    def __init__(self, config: ExecConfig, access: ClusterAccess, *,
                 clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] = os.environ,
                 timeout: float = EXEC_TIMEOUT) -> None:
        self.config = config
        self.access = access
        self._clock = clock
        self._environ = environ
        self._timeout = timeout
        self._lock = threading.Lock()
        self._cached: ExecCredential | None = None
        self.runs = 0

    def get(self) -> ExecCredential:
        with self._lock:
            cached = self._cached
            if cached is None or (cached.expires is not None
                                  and self._clock() >= cached.expires):
                cached = self._cached = self._run()
            return cached

    def forget(self, refused: ExecCredential) -> None:
        """A 401 with ``refused``: run the plugin again next time (as client-go does)."""
        with self._lock:
            if self._cached is refused:
                self._cached = None

    def exec_info(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"interactive": False}
        if self.config.provide_cluster_info:
            spec["cluster"] = _cluster_info(self.access, self.config)
        return {"kind": "ExecCredential", "apiVersion": self.config.api_version,
                "spec": spec}

    def _run(self) -> ExecCredential:
        cfg = self.config
        env = {**self._environ, **dict(cfg.env),
               "KUBERNETES_EXEC_INFO": json.dumps(self.exec_info())}
        argv = [cfg.command, *cfg.args]
        self.runs += 1
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=self._timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise AuthError(f"exec plugin {cfg.command}: {err}"
                            + (f" ({cfg.install_hint})" if cfg.install_hint else "")) from err
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()[-500:]
            raise AuthError(f"exec plugin {cfg.command}: exit status {proc.returncode}"
                            + (f": {stderr}" if stderr else ""))
        return parse_exec_credential(proc.stdout, cfg.api_version)


def parse_exec_credential(out: bytes, api_version: str) -> ExecCredential:
    """A plugin's stdout -> its credential; AuthError says what is wrong with it."""
    try:
        doc = json.loads(out)
    except ValueError as err:
        raise AuthError(f"exec plugin: the output is not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
        raise AuthError("exec plugin: the output is not an ExecCredential")
    if doc.get("apiVersion") != api_version:
        raise AuthError(f"exec plugin: apiVersion {doc.get('apiVersion')!r}, but the "
                        f"kubeconfig asked for {api_version!r}")
    status = doc.get("status")
    if not isinstance(status, dict):
        raise AuthError("exec plugin: status: missing")
    token, cert, key = (status.get(k) or None for k in
                        ("token", "clientCertificateData", "clientKeyData"))
    for name, value in (("token", token), ("clientCertificateData", cert),
                        ("clientKeyData", key)):
        if value is not None and not isinstance(value, str):
            raise AuthError(f"exec plugin: status.{name}: must be a string")
    if bool(cert) != bool(key):
        raise AuthError("exec plugin: status: clientCertificateData and clientKeyData "
                        "come together")
    if not token and not cert:
        raise AuthError("exec plugin: status: neither a token nor a client certificate")
    expires = status.get("expirationTimestamp")
    when: float | None = None
    if expires is not None:
        try:
            when = datetime.fromisoformat(str(expires).replace("Z", "+00:00")).timestamp()
        except ValueError as err:
            raise AuthError(f"exec plugin: status.expirationTimestamp: {expires!r} is not "
                            "RFC 3339") from err
    return ExecCredential(token, cert, key, when)


def _cluster_info(access: ClusterAccess, cfg: ExecConfig) -> dict[str, Any]:
    """``spec.cluster`` of KUBERNETES_EXEC_INFO (provideClusterInfo)."""
    info: dict[str, Any] = {"server": access.server}
    if access.tls_server_name:
        info["tls-server-name"] = access.tls_server_name
    if access.insecure:
        info["insecure-skip-tls-verify"] = True
    ca = access.ca_data
    if ca is None and access.ca_file:
        try:
            with open(access.ca_file) as f:
                ca = f.read()
        except OSError as err:
            raise AuthError(f"certificate-authority {access.ca_file}: {err}") from err
    if ca:
        info["certificate-authority-data"] = base64.b64encode(ca.encode()).decode()
    if access.proxy_url:
        info["proxy-url"] = access.proxy_url
    if cfg.cluster_config is not None:
        info["config"] = json.loads(cfg.cluster_config)
    return info


class Authenticator:
    def __init__(self, access: ClusterAccess, *, clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.access = access
        self.token_file = TokenFile(access.token_file) if access.token_file else None
        self.plugin = (ExecPlugin(access.exec, access, clock=clock, environ=environ)
                       if access.exec else None)
        self._impersonation = _impersonation_headers(access)

    def credentials(self) -> Credentials:
        a = self.access
        headers: list[tuple[str, str]] = []
        token, token_stamp, cred = a.token, None, None
        if token is None and self.token_file is not None:
            token, token_stamp = self.token_file.get()
        static_cert = bool(a.client_cert_file or a.client_cert_data)
        if self.plugin is not None and (token is None or not static_cert):
            # The plugin is asked only for what the kubeconfig does not give itself.
            cred = self.plugin.get()
            token = token or cred.token
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        elif a.username is not None or a.password is not None:
            basic = base64.b64encode(f"{a.username or ''}:{a.password or ''}".encode())
            headers.append(("Authorization", f"Basic {basic.decode()}"))
        headers.extend(self._impersonation)
        use_exec_cert = cred is not None and cred.cert_pem and not static_cert
        tls = TlsMaterial(
            ca_file=a.ca_file, ca_data=a.ca_data, insecure=a.insecure,
            server_name=a.tls_server_name,
            cert_file=a.client_cert_file, key_file=a.client_key_file,
            cert_pem=cred.cert_pem if use_exec_cert and cred else a.client_cert_data,
            key_pem=cred.key_pem if use_exec_cert and cred else a.client_key_data,
            stamp=tuple(stat(p) for p in (a.ca_file, a.client_cert_file, a.client_key_file)
                        if p is not None))
        return Credentials(tuple(headers), tls, cred, token_stamp)

    def unauthorized(self, refused: Credentials) -> bool:
        """The server said 401 to ``refused``: refresh what can be refreshed; True when a
        retry may now succeed."""
        retry = False
        if self.token_file is not None and refused.token_file_stamp is not None:
            self.token_file.forget(refused.token_file_stamp)
            retry = True  # the kubelet may have rotated it under us
        if self.plugin is not None and refused.exec_credential is not None:
            self.plugin.forget(refused.exec_credential)
            retry = True  # the plugin may well answer something new
        return retry


def _impersonation_headers(access: ClusterAccess) -> tuple[tuple[str, str], ...]:
    imp = access.impersonate
    if imp is None:
        return ()
    out = [("Impersonate-User", imp.user)]
    if imp.uid:
        out.append(("Impersonate-Uid", imp.uid))
    out.extend(("Impersonate-Group", g) for g in imp.groups)
    for key, values in imp.extra:
        out.extend((f"Impersonate-Extra-{_escape_extra_key(key)}", v) for v in values)
    return tuple(out)


def _escape_extra_key(key: str) -> str:
    """client-go percent-encodes extra keys (header names allow few characters)."""
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               "!#$&'*+-.^_`|~")
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode())
                   for c in key)
