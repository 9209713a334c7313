"""Kubeconfigs -> ClusterAccess, or an error at start that names the file and the field.

One table per outcome: every kind of credential client-go reads, and every kubeconfig
it (or we) refuse. Files a kubeconfig names are created by the test, relative to the
kubeconfig's directory, since a missing file is itself an error.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.errors import ConfigError
from kubeproxy.sources.kubeconfig import (
    ClusterAccess,
    ExecConfig,
    Impersonation,
    KubeconfigError,
    in_cluster,
    load_kubeconfig,
    resolve,
)

Obj = dict[str, Any]
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
B64 = base64.b64encode(PEM.encode()).decode()
FILES = ("ca.crt", "c.pem", "k.pem", "token", "bin/plugin")
V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"


def kubeconfig(tmp: Path, cluster: Obj, user: Obj | None = None, current: str = "c") -> Path:
    for name in FILES:
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text("x")
        (tmp / name).chmod(0o755)
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": current,
           "clusters": [{"name": "k", "cluster": cluster}],
           "users": [{"name": "u", "user": user or {}}],
           "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}},
                        {"name": "other", "context": {"cluster": "missing", "user": "u"}}]}
    path = tmp / "kubeconfig"
    path.write_text(json.dumps(doc))
    return path


def exec_(**over: Any) -> Obj:
    return {"command": "bin/plugin", "apiVersion": V1, "interactiveMode": "Never", **over}


HTTPS = {"server": "https://k:6443"}
GOOD: list[tuple[str, Obj, Obj | None, Callable[[Path], ClusterAccess]]] = [
    ("plain-http", {"server": "http://127.0.0.1:8080"}, None,
     lambda d: ClusterAccess("http://127.0.0.1:8080")),
    ("ca-data-token", {**HTTPS, "certificate-authority-data": B64}, {"token": "abc"},
     lambda d: ClusterAccess("https://k:6443", ca_data=PEM, token="abc")),
    ("relative-ca-file-token-file", {**HTTPS, "certificate-authority": "ca.crt"},
     {"tokenFile": "token"},
     lambda d: ClusterAccess("https://k:6443", ca_file=f"{d}/ca.crt",
                             token_file=f"{d}/token")),
    ("insecure-client-cert-files", {"server": "https://k", "insecure-skip-tls-verify": True},
     {"client-certificate": "c.pem", "client-key": "k.pem"},
     lambda d: ClusterAccess("https://k", insecure=True, client_cert_file=f"{d}/c.pem",
                             client_key_file=f"{d}/k.pem")),
    ("client-cert-data", {"server": "https://k"},
     {"client-certificate-data": B64, "client-key-data": B64},
     lambda d: ClusterAccess("https://k", client_cert_data=PEM, client_key_data=PEM)),
    ("basic-auth", HTTPS, {"username": "admin", "password": "pw"},
     lambda d: ClusterAccess("https://k:6443", username="admin", password="pw")),
    ("tls-server-name-proxy-url",
     {**HTTPS, "tls-server-name": "kubernetes", "proxy-url": "http://p:3128",
      "disable-compression": True}, None,
     lambda d: ClusterAccess("https://k:6443", tls_server_name="kubernetes",
                             proxy_url="http://p:3128")),
    ("impersonation", HTTPS,
     {"token": "t", "as": "jane", "as-uid": "42", "as-groups": ["dev", "ops"],
      "as-user-extra": {"scopes": ["view", "edit"], "a/b": ["1"]}},
     lambda d: ClusterAccess("https://k:6443", token="t", impersonate=Impersonation(
         "jane", "42", ("dev", "ops"), (("a/b", ("1",)), ("scopes", ("view", "edit")))))),
    ("exec-v1-eks", HTTPS,
     {"exec": exec_(args=["eks", "get-token", "--cluster-name", "c1"],
                    env=[{"name": "AWS_PROFILE", "value": "prod"}])},
     lambda d: ClusterAccess("https://k:6443", exec=ExecConfig(
         f"{d}/bin/plugin", V1, ("eks", "get-token", "--cluster-name", "c1"),
         (("AWS_PROFILE", "prod"),), interactive_mode="Never"))),
    ("exec-v1beta1-defaults-ifavailable-cluster-info",
     {**HTTPS, "extensions": [{"name": "client.authentication.k8s.io/exec",
                               "extension": {"audience": "x"}}]},
     {"exec": {"command": f"bin{os.sep}plugin", "apiVersion": V1BETA1,
               "provideClusterInfo": True}},
     lambda d: ClusterAccess("https://k:6443", exec=ExecConfig(
         f"{d}/bin/plugin", V1BETA1, provide_cluster_info=True,
         cluster_config='{"audience": "x"}'))),
    ("exec-bare-command-from-path", HTTPS, {"exec": exec_(command="sh")},
     lambda d: ClusterAccess("https://k:6443", exec=ExecConfig(
         str(shutil.which("sh")), V1,
         interactive_mode="Never"))),
]


@pytest.mark.parametrize(("cluster", "user", "want"), [g[1:] for g in GOOD],
                         ids=[g[0] for g in GOOD])
def test_kubeconfig(tmp_path: Path, cluster: Obj, user: Obj | None,
                    want: Callable[[Path], ClusterAccess]) -> None:
    assert load_kubeconfig(kubeconfig(tmp_path, cluster, user)) == want(tmp_path)


UW = r"users\[u\]\.user"
BAD: list[tuple[str, Obj, Obj | None, str, str]] = [
    ("not-http", {"server": "ftp://x"}, None, "c", r"server: 'ftp://x' is not an http"),
    ("no-server", {}, None, "c", r"clusters\[k\].cluster.server: is required"),
    ("no-context", HTTPS, None, "nope", "contexts: no entry named 'nope'"),
    ("no-cluster", HTTPS, None, "other", "clusters: no entry named 'missing'"),
    ("bad-base64", {**HTTPS, "certificate-authority-data": "%%%"}, None, "c",
     "certificate-authority-data: is not base64"),
    ("insecure-not-bool", {**HTTPS, "insecure-skip-tls-verify": "yes"}, None, "c",
     "insecure-skip-tls-verify: must be true or false"),
    ("insecure-with-ca", {**HTTPS, "insecure-skip-tls-verify": True,
                          "certificate-authority": "ca.crt"}, None, "c",
     r"cluster\.insecure-skip-tls-verify: cannot be used together with a certificate"),
    ("cert-without-key", HTTPS, {"client-certificate": "c.pem"}, "c",
     rf"{UW}\.client-certificate: a client certificate needs a client key"),
    ("key-without-cert", HTTPS, {"client-key-data": B64}, "c", "needs a client key"),
    ("file-and-data", {**HTTPS, "certificate-authority": "ca.crt",
                       "certificate-authority-data": B64}, None, "c",
     "certificate-authority: both certificate-authority and certificate-authority-data"),
    ("missing-ca-file", {**HTTPS, "certificate-authority": "nope.crt"}, None, "c",
     r"cluster\.certificate-authority: .*/nope.crt: no such file"),
    ("missing-cert-file", HTTPS, {"client-certificate": "/no/c.pem", "client-key": "k.pem"},
     "c", rf"{UW}\.client-certificate: /no/c.pem: no such file"),
    ("missing-token-file", HTTPS, {"tokenFile": "gone"}, "c",
     rf"{UW}\.tokenFile: .*/gone: no such file"),
    ("token-and-basic", HTTPS, {"token": "t", "username": "u"}, "c",
     "more than one authentication method"),
    ("socks-proxy", {**HTTPS, "proxy-url": "socks5://p:1080"}, None, "c",
     r"cluster\.proxy-url: 'socks5://p:1080': only http:// proxies"),
    ("auth-provider", HTTPS, {"auth-provider": {"name": "gcp"}}, "c",
     rf"{UW}\.auth-provider: auth providers are not supported"),
    ("exec-no-command", HTTPS, {"exec": {"apiVersion": V1}}, "c",
     rf"{UW}\.exec\.command: is required"),
    ("exec-v1alpha1", HTTPS,
     {"exec": exec_(apiVersion="client.authentication.k8s.io/v1alpha1")}, "c",
     rf"{UW}\.exec\.apiVersion: 'client.authentication.k8s.io/v1alpha1' is not supported"),
    ("exec-no-api-version", HTTPS, {"exec": {"command": "sh"}}, "c",
     r"exec\.apiVersion: is required"),
    ("exec-v1-needs-interactive-mode", HTTPS, {"exec": {"command": "sh", "apiVersion": V1}},
     "c", r"exec\.interactiveMode: is required for client.authentication.k8s.io/v1"),
    ("exec-always-interactive", HTTPS, {"exec": exec_(interactiveMode="Always")}, "c",
     r"exec\.interactiveMode: Always needs a terminal"),
    ("exec-bad-interactive-mode", HTTPS, {"exec": exec_(interactiveMode="Sometimes")}, "c",
     r"exec\.interactiveMode: 'Sometimes' is not one of"),
    ("exec-command-not-in-path", HTTPS,
     {"exec": exec_(command="no-such-plugin-xyz", installHint="brew install it")}, "c",
     r"exec\.command: 'no-such-plugin-xyz' is not in PATH \(brew install it\)"),
    ("exec-command-file-missing", HTTPS, {"exec": exec_(command="./bin/gone")}, "c",
     r"exec\.command: .*/bin/gone: no such file"),
    ("exec-bad-env", HTTPS, {"exec": exec_(env=[{"name": "A"}])}, "c",
     r"exec\.env\[0\]: must have a string name and value"),
    ("exec-args-not-strings", HTTPS, {"exec": exec_(args=[1])}, "c",
     r"exec\.args: must be a list of strings"),
    ("groups-without-user", HTTPS, {"as-groups": ["g"]}, "c",
     rf"{UW}\.as: as-uid, as-groups or as-user-extra need a user"),
    ("bad-user-extra", HTTPS, {"as": "u", "as-user-extra": {"k": "v"}}, "c",
     r"as-user-extra: must map strings to lists of strings"),
]


@pytest.mark.parametrize(("cluster", "user", "current", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_kubeconfig_errors_name_the_field(tmp_path: Path, cluster: Obj, user: Obj | None,
                                          current: str, message: str) -> None:
    with pytest.raises(KubeconfigError, match=message) as info:
        load_kubeconfig(kubeconfig(tmp_path, cluster, user, current), env={"PATH": "/bin"})
    assert isinstance(info.value, ConfigError), "the CLI turns it into exit code 2"
    assert str(info.value).startswith(f"{tmp_path}/kubeconfig: ")


def test_master_overrides_the_server(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path, {"server": "https://k"}, {"token": "t"})
    assert resolve(path, "http://127.0.0.1:1") == ClusterAccess("http://127.0.0.1:1", token="t")
    assert resolve(None, "http://m:1") == ClusterAccess("http://m:1")
    with pytest.raises(KubeconfigError, match="--master: server: 'ftp://m'"):
        resolve(None, "ftp://m")


def test_in_cluster(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeconfigError, match="not running in a cluster"):
        in_cluster(env, tmp_path)  # no token yet
    (tmp_path / "token").write_text("x")
    assert resolve(None, None, env=env, service_account=tmp_path) == ClusterAccess(
        "https://[fd00::1]:443", token_file=f"{tmp_path}/token")  # no ca.crt: system roots
    (tmp_path / "ca.crt").write_text(PEM)
    assert in_cluster(env, tmp_path) == ClusterAccess(
        "https://[fd00::1]:443", ca_file=f"{tmp_path}/ca.crt", token_file=f"{tmp_path}/token")
    with pytest.raises(KubeconfigError, match="not running in a cluster"):
        in_cluster({}, tmp_path)
