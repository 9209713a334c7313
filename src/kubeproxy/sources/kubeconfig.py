"""Reading a kubeconfig: which API server, and how to authenticate to it.

Theory of operation
-------------------
Like client-go's loader (``clientcmd``), reduced to one file and one context: the
``current-context`` names a cluster and a user. The result is one frozen
:class:`ClusterAccess`; every error names the file and the field
(``users[u].user.exec.apiVersion: ...``), and the CLI turns it into exit code 2.

What is read, per section:

* cluster: ``server``, ``certificate-authority(-data)``, ``insecure-skip-tls-verify``,
  ``tls-server-name``, ``proxy-url`` (``http://`` proxies), ``disable-compression``
  (we never ask for compression), and the ``client.authentication.k8s.io/exec``
  extension handed to exec plugins.
* user: ``token`` / ``tokenFile``, ``username`` + ``password``,
  ``client-certificate(-data)`` + ``client-key(-data)``, ``exec`` (credential plugins,
  ``client.authentication.k8s.io/v1`` and ``v1beta1``), impersonation (``as``,
  ``as-uid``, ``as-groups``, ``as-user-extra``).

Anything a kubeconfig asks for that we cannot honour is an error at start, never
dropped: ``auth-provider``, an exec ``apiVersion`` we do not speak, ``interactiveMode:
Always`` (a daemon has no terminal), a proxy scheme other than http, a file that does not
exist, an exec command not found. Relative paths (files, and an exec command containing
a ``/``) are relative to the kubeconfig's directory, as clientcmd resolves them. The
combinations clientcmd rejects are rejected here too (token and basic auth together, a
CA with insecure-skip-tls-verify, both a file and its ``-data``, impersonation extras
without a user). Unknown keys are ignored, as clientcmd ignores them.

``--master`` overrides the server URL. With neither a kubeconfig nor ``--master``, the
in-cluster service account is used, as upstream does in a DaemonSet
(``KUBERNETES_SERVICE_HOST``/``PORT``, the token and CA under the service-account
directory, which tests inject). Files are only named here; reading them (and re-reading
them when they rotate) is the client's job (``sources.auth``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kubeproxy.errors import ConfigError

log = logging.getLogger("kubeproxy.kubeconfig")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
EXEC_EXTENSION = "client.authentication.k8s.io/exec"  # cluster extension for exec plugins
INTERACTIVE_MODES = ("Never", "IfAvailable", "Always")


class KubeconfigError(ConfigError):
    """The kubeconfig cannot be read or lacks what we need; names the file and key."""


@dataclass(frozen=True)
class ExecConfig:
    """A credential plugin (``users[].user.exec``)."""

    command: str  # resolved: absolute, or a bare name found in PATH
    api_version: str  # one of EXEC_API_VERSIONS
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    provide_cluster_info: bool = False
    interactive_mode: str = "IfAvailable"
    install_hint: str = ""
    cluster_config: str | None = None  # JSON of the cluster's exec extension, if any

    def __post_init__(self) -> None:
        if self.api_version not in EXEC_API_VERSIONS:
            raise KubeconfigError(f"apiVersion: {self.api_version!r} is not one of "
                                  f"{', '.join(EXEC_API_VERSIONS)}")
        if self.interactive_mode not in INTERACTIVE_MODES:
            raise KubeconfigError(f"interactiveMode: {self.interactive_mode!r} is not one "
                                  f"of {', '.join(INTERACTIVE_MODES)}")


@dataclass(frozen=True)
class Impersonation:
    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class ClusterAccess:
    server: str  # http(s)://host[:port][/prefix]
    ca_file: str | None = None
    ca_data: str | None = None  # PEM text
    insecure: bool = False  # insecure-skip-tls-verify
    tls_server_name: str | None = None  # SNI and the name the certificate must carry
    proxy_url: str | None = None  # http://[user:pass@]host:port; None: *_PROXY env
    token: str | None = None
    token_file: str | None = None  # re-read when it changes (rotated tokens)
    username: str | None = None  # basic auth
    password: str | None = None
    client_cert_file: str | None = None  # re-read when it changes (rotated certificates)
    client_cert_data: str | None = None  # PEM text
    client_key_file: str | None = None
    client_key_data: str | None = None  # PEM text
    exec: ExecConfig | None = None
    impersonate: Impersonation | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KubeconfigError(f"server: {self.server!r} is not an http(s) URL")
        has_cert = bool(self.client_cert_file or self.client_cert_data)
        has_key = bool(self.client_key_file or self.client_key_data)
        if has_cert != has_key:
            raise KubeconfigError("client-certificate: a client certificate needs a client "
                                  "key (and a key a certificate)")
        if self.proxy_url is not None:
            proxy = urlsplit(self.proxy_url)
            if proxy.scheme != "http" or not proxy.hostname:
                raise KubeconfigError(f"proxy-url: {self.proxy_url!r}: only http:// proxies "
                                      "are supported")
        if self.insecure and (self.ca_file or self.ca_data):
            raise KubeconfigError("insecure-skip-tls-verify: cannot be used together with "
                                  "a certificate authority")

    @property
    def tls(self) -> bool:
        return urlsplit(self.server).scheme == "https"


def resolve(kubeconfig: Path | None, master: str | None, *,
            env: Mapping[str, str] = os.environ,
            service_account: Path = SERVICE_ACCOUNT) -> ClusterAccess:
    """The flags' answer: a kubeconfig (maybe with --master on top), --master, in-cluster."""
    if kubeconfig is not None:
        access = load_kubeconfig(kubeconfig, env=env)
        if master:
            try:
                access = replace(access, server=master)
            except KubeconfigError as err:
                raise KubeconfigError(f"--master: {err}") from None
        return access
    if master:
        try:
            return ClusterAccess(server=master)
        except KubeconfigError as err:
            raise KubeconfigError(f"--master: {err}") from None
    return in_cluster(env, service_account)


def in_cluster(env: Mapping[str, str] = os.environ,
               account: Path = SERVICE_ACCOUNT) -> ClusterAccess:
    """client-go's InClusterConfig: the service's address from the environment, the
    service account's token (re-read as the kubelet rotates it) and CA."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port or not (account / "token").exists():
        raise KubeconfigError("no --kubeconfig or --master given, and not running in a "
                              "cluster (KUBERNETES_SERVICE_HOST or the service account "
                              f"token {account / 'token'} is missing)")
    host = f"[{host}]" if ":" in host else host
    ca: str | None = str(account / "ca.crt")
    if not (account / "ca.crt").exists():
        # client-go logs this and falls back to the system's roots; so do we.
        log.warning("in-cluster: %s is missing; using the system's CA roots", ca)
        ca = None
    return ClusterAccess(server=f"https://{host}:{port}", ca_file=ca,
                         token_file=str(account / "token"))


def load_kubeconfig(path: Path, context: str | None = None, *,
                    env: Mapping[str, str] = os.environ) -> ClusterAccess:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise KubeconfigError(f"{path}: {err}") from err
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig")
    return _Reader(path, doc, env).access(context)


# What a user section may hold, and what we do not support (each an error at start).
_UNSUPPORTED_USER = {
    "auth-provider": "auth providers are not supported (client-go removed the gcp and "
                     "azure ones); use an exec credential plugin",
}


class _Reader:
    def __init__(self, path: Path, doc: dict[str, Any], env: Mapping[str, str]) -> None:
        self.path = path
        self.doc = doc
        self.env = env

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

    def flag(self, section: dict[str, Any], key: str, where: str) -> bool:
        value = section.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", "must be true or false")
        return value

    def strings(self, section: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = section.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{where}.{key}", "must be a list of strings")
        return tuple(value)

    def relative(self, value: str) -> Path:
        return Path(value) if os.path.isabs(value) else self.path.parent / value

    def file(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = self.string(section, key, where)
        if value is None:
            return None
        full = self.relative(value)
        if not full.is_file():
            raise self.fail(f"{where}.{key}", f"{full}: no such file")
        return str(full)

    def data(self, section: dict[str, Any], key: str, where: str) -> str | None:
        value = self.string(section, key, where)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as err:
            raise self.fail(f"{where}.{key}", "is not base64 PEM") from err

    def one_of(self, section: dict[str, Any], key: str, where: str) -> tuple[str | None,
                                                                            str | None]:
        """A file key and its ``-data`` twin: clientcmd refuses both at once."""
        if section.get(key) and section.get(f"{key}-data"):
            raise self.fail(f"{where}.{key}", f"both {key} and {key}-data are set")
        return self.file(section, key, where), self.data(section, f"{key}-data", where)

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
        for key, why in _UNSUPPORTED_USER.items():
            if user.get(key):
                raise self.fail(f"{uw}.{key}", why)
        ca_file, ca_data = self.one_of(cluster, "certificate-authority", cw)
        cert_file, cert_data = self.one_of(user, "client-certificate", uw)
        key_file, key_data = self.one_of(user, "client-key", uw)
        token, token_file = self.string(user, "token", uw), self.file(user, "tokenFile", uw)
        username, password = self.string(user, "username", uw), self.string(user, "password",
                                                                            uw)
        if (token or token_file) and (username or password):
            raise self.fail(uw, "more than one authentication method: token and basic auth")
        # ClusterAccess checks its own invariants; its messages start with the key.
        where_is = {"server": cw, "proxy-url": cw, "insecure-skip-tls-verify": cw,
                    "client-certificate": uw}
        self.flag(cluster, "disable-compression", cw)  # we never ask for compression
        try:
            return ClusterAccess(
                server=server, ca_file=ca_file, ca_data=ca_data,
                insecure=self.flag(cluster, "insecure-skip-tls-verify", cw),
                tls_server_name=self.string(cluster, "tls-server-name", cw),
                proxy_url=self.string(cluster, "proxy-url", cw),
                token=token, token_file=token_file, username=username, password=password,
                client_cert_file=cert_file, client_cert_data=cert_data,
                client_key_file=key_file, client_key_data=key_data,
                exec=self.exec(user, uw, cluster, cw),
                impersonate=self.impersonation(user, uw),
            )
        except KubeconfigError as err:
            text = str(err)
            for key, where in where_is.items():
                if text.startswith(f"{key}:"):
                    raise self.fail(f"{where}.{key}", text[len(key) + 1:].strip()) from None
            raise KubeconfigError(f"{self.path}: {err}") from None

    def exec(self, user: dict[str, Any], uw: str, cluster: dict[str, Any], cw: str
             ) -> ExecConfig | None:
        spec = user.get("exec")
        if spec is None:
            return None
        where = f"{uw}.exec"
        if not isinstance(spec, dict):
            raise self.fail(where, "must be a mapping")
        command = self.string(spec, "command", where)
        if command is None:
            raise self.fail(f"{where}.command", "is required")
        api_version = self.string(spec, "apiVersion", where)
        if api_version is None:
            raise self.fail(f"{where}.apiVersion", "is required")
        if api_version not in EXEC_API_VERSIONS:
            raise self.fail(f"{where}.apiVersion", f"{api_version!r} is not supported "
                            f"(supported: {', '.join(EXEC_API_VERSIONS)})")
        mode = self.string(spec, "interactiveMode", where)
        if mode is None and api_version.endswith("/v1"):
            raise self.fail(f"{where}.interactiveMode", f"is required for {api_version}")
        mode = mode or "IfAvailable"
        if mode not in INTERACTIVE_MODES:
            raise self.fail(f"{where}.interactiveMode", f"{mode!r} is not one of "
                            f"{', '.join(INTERACTIVE_MODES)}")
        if mode == "Always":
            raise self.fail(f"{where}.interactiveMode", "Always needs a terminal, and a "
                            "node proxy has none")
        hint = self.string(spec, "installHint", where) or ""
        return ExecConfig(
            command=self.command(command, f"{where}.command", hint),
            api_version=api_version, args=self.strings(spec, "args", where),
            env=self.exec_env(spec.get("env"), f"{where}.env"),
            provide_cluster_info=self.flag(spec, "provideClusterInfo", where),
            interactive_mode=mode, install_hint=hint,
            cluster_config=self.exec_extension(cluster, cw))

    def command(self, command: str, where: str, hint: str) -> str:
        if os.sep in command:
            full = self.relative(command)
            if not full.is_file():
                raise self.fail(where, f"{full}: no such file" + (f" ({hint})" if hint else ""))
            return str(full)
        found = shutil.which(command, path=self.env.get("PATH", os.defpath))
        if found is None:
            raise self.fail(where, f"{command!r} is not in PATH" + (f" ({hint})" if hint
                                                                     else ""))
        return found

    def exec_env(self, value: object, where: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(where, "must be a list of {name, value}")
        out = []
        for i, item in enumerate(value):
            if (not isinstance(item, dict) or not isinstance(item.get("name"), str)
                    or not isinstance(item.get("value"), str)):
                raise self.fail(f"{where}[{i}]", "must have a string name and value")
            out.append((item["name"], item["value"]))
        return tuple(out)

    def exec_extension(self, cluster: dict[str, Any], cw: str) -> str | None:
        extensions = cluster.get("extensions") or []
        if not isinstance(extensions, list):
            raise self.fail(f"{cw}.extensions", "must be a list")
        for item in extensions:
            if isinstance(item, dict) and item.get("name") == EXEC_EXTENSION:
                return json.dumps(item.get("extension"), sort_keys=True)
        return None

    def impersonation(self, user: dict[str, Any], uw: str) -> Impersonation | None:
        name = self.string(user, "as", uw)
        uid = self.string(user, "as-uid", uw) or ""
        groups = self.strings(user, "as-groups", uw)
        raw = user.get("as-user-extra") or {}
        if not isinstance(raw, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
                for k, v in raw.items()):
            raise self.fail(f"{uw}.as-user-extra", "must map strings to lists of strings")
        extra = tuple(sorted((k, tuple(v)) for k, v in raw.items()))
        if name is None:
            if uid or groups or extra:
                raise self.fail(f"{uw}.as", "as-uid, as-groups or as-user-extra need a user "
                                "to impersonate")
            return None
        return Impersonation(name, uid, groups, extra)
