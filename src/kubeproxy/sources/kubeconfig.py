"""Reading a kubeconfig: which API server, and how to authenticate to it.

Theory of operation
-------------------
Like client-go's loader, reduced to what a node proxy uses: the ``current-context``
names a cluster (server URL, ``certificate-authority`` or ``certificate-authority-data``,
``insecure-skip-tls-verify``) and a user (``token`` / ``tokenFile``,
``client-certificate(-data)`` + ``client-key(-data)``). Relative file paths are relative
to the kubeconfig's directory. ``--master`` overrides the server URL. With neither a
kubeconfig nor ``--master``, the in-cluster service account is used, as upstream does
in a DaemonSet. The result is one frozen :class:`ClusterAccess`; errors name the file
and the key.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kubeproxy.config import ConfigError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeconfigError(ConfigError):
    """The kubeconfig cannot be read or lacks what we need; names the file and key."""


@dataclass(frozen=True)
class ClusterAccess:
    server: str  # http(s)://host[:port][/prefix]
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    insecure: bool = False  # insecure-skip-tls-verify
    token: str | None = None
    token_file: str | None = None  # re-read on every request (rotated tokens)
    client_cert_file: str | None = None
    client_cert_data: str | None = None  # PEM text
    client_key_file: str | None = None
    client_key_data: str | None = None  # PEM text

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KubeconfigError(f"server: {self.server!r} is not an http(s) URL")
        if (self.client_cert_file or self.client_cert_data) and not (
                self.client_key_file or self.client_key_data):
            raise KubeconfigError("user: a client certificate needs a client key")

    @property
    def tls(self) -> bool:
        return urlsplit(self.server).scheme == "https"


def resolve(kubeconfig: Path | None, master: str | None) -> ClusterAccess:
    """The flags' answer: a kubeconfig (maybe with --master on top), --master, in-cluster."""
    if kubeconfig is not None:
        access = load_kubeconfig(kubeconfig)
        if master:
            access = replace(access, server=master)
        return access
    if master:
        return ClusterAccess(server=master)
    return in_cluster()


def in_cluster(env: Mapping[str, str] = os.environ,
               account: Path = SERVICE_ACCOUNT) -> ClusterAccess:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not (account / "token").exists():
        raise KubeconfigError("no --kubeconfig or --master given, and not running in a "
                              "cluster (KUBERNETES_SERVICE_HOST or the service account "
                              "token is missing)")
    host = f"[{host}]" if ":" in host else host
    return ClusterAccess(server=f"https://{host}:{port}", ca_file=str(account / "ca.crt"),
                         token_file=str(account / "token"))


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterAccess:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KubeconfigError(f"{path}: {err}") from err
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig")
    return _Reader(path, doc).access(context)


class _Reader:
    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc

    def fail(self, key: str, what: str) -> KubeconfigError:
        return KubeconfigError(f"{self.path}: {key}: {what}")

    def named(self, section: str, name: str, inner: str) -> dict[str, Any]:
        entries = self.doc.get(section) or []
        if not isinstance(entries, list):
            raise self.fail(section, "must be a list")
        for entry in entries:
            if isinstance(entry, dict) and entry.get("name") == name:
                value = entry.get(inner) or {}
                if not isinstance(value, dict):
                    raise self.fail(f"{section}[{name}].{inner}", "must be a mapping")
                return value
        raise self.fail(section, f"no entry named {name!r}")

    def string(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = section.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", "must be a string")
        return value

    def file(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = self.string(section, key, where)
        if value is None:
            return None
        full = (self.path.parent / value) if not os.path.isabs(value) else Path(value)
        return str(full)

    def data(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = self.string(section, key, where)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise self.fail(f"{where}.{key}", "is not base64 PEM") from err

    def access(self, context: str | None) -> ClusterAccess:
        name = context or self.doc.get("current-context")
        if not isinstance(name, str) or not name:
            raise self.fail("current-context", "is not set")
        ctx = self.named("contexts", name, "context")
        cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
        if not isinstance(cluster_name, str):
            raise self.fail(f"contexts[{name}].context.cluster", "must be a string")
        cluster = self.named("clusters", cluster_name, "cluster")
        user = self.named("users", user_name, "user") if isinstance(user_name, str) else {}
        cw, uw = f"clusters[{cluster_name}].cluster", f"users[{user_name}].user"
        server = self.string(cluster, "server", cw)
        if server is None:
            raise self.fail(f"{cw}.server", "is required")
        insecure = cluster.get("insecure-skip-tls-verify", False)
        if not isinstance(insecure, bool):
            raise self.fail(f"{cw}.insecure-skip-tls-verify", "must be true or false")
        try:
            return ClusterAccess(
                server=server,
                ca_file=self.file(cluster, "certificate-authority", cw),
                ca_data=self.data(cluster, "certificate-authority-data", cw),
                insecure=insecure,
                token=self.string(user, "token", uw),
                token_file=self.file(user, "tokenFile", uw),
                client_cert_file=self.file(user, "client-certificate", uw),
                client_cert_data=self.data(user, "client-certificate-data", uw),
                client_key_file=self.file(user, "client-key", uw),
                client_key_data=self.data(user, "client-key-data", uw),
            )
        except KubeconfigError as err:
            raise KubeconfigError(f"{self.path}: {err}") from None
