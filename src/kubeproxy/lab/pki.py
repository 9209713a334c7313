"""The lab's certificates and keys, made once at `lab up` with the `openssl` CLI.

Theory of operation. One CA (kept in the lab's state directory, `LabStore.pki_dir`) signs
every certificate, as kubeadm's does: the API server's serving certificate (for 127.0.0.1
and localhost, the addresses every listener has, root namespace and node namespaces
alike, plus the in-cluster `kubernetes.default.svc` names) and two client certificates,
whose subjects are the users the API server sees (auth.py): `kubernetes-admin` in group
`system:masters` (kubectl, the agent, `lab` commands: the `kubeconfig` file) and
`system:kube-proxy` (the lab's proxies: `node.kubeconfig`; RBAC allows it what the
bootstrap binding `system:node-proxier` allows, as kubeadm's kube-proxy). A random
32-byte key signs service-account tokens (HS256). Keys are ECDSA P-256 (fast to make:
the whole set, five openssl runs, takes about 0.16 s on the 2-core test VM). `ensure` is
idempotent: it makes what is missing and leaves the rest, so `restart-apiserver` finds
the same CA and keys; a new CA re-makes every certificate it signed.

Why client certificates and not a static token for the admin: it is kubeadm's admin.conf,
a certificate needs no token file on the server side, and the same mechanism identifies
the proxies (user `system:kube-proxy`) without a ServiceAccount that could be deleted.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubeproxy.errors import LabError

Runner = Callable[[Sequence[str]], None]
CA_DAYS = 3650
LEAF_DAYS = 825
CA_NAME = "kubeproxy-lab-ca"
SERVER_NAMES = ("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local")


@dataclass(frozen=True)
class Leaf:
    name: str  # file stem: <name>.crt, <name>.key
    common_name: str
    organizations: tuple[str, ...]
    usage: str  # extendedKeyUsage
    alt_names: tuple[str, ...] = ()


LEAVES: tuple[Leaf, ...] = (
    # The API server's serving certificate: every listener is 127.0.0.1.
    Leaf("apiserver", "kube-apiserver", (), "serverAuth", SERVER_NAMES),
    # kubectl, the lab agent and `lab` commands: the cluster's administrator.
    Leaf("admin", "kubernetes-admin", ("system:masters",), "clientAuth"),
    # The lab's proxies: subject to RBAC through the bootstrap system:node-proxier binding.
    Leaf("kube-proxy", "system:kube-proxy", (), "clientAuth"),
)


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _config(common_name: str, organizations: Sequence[str], extensions: Sequence[str]) -> str:
    dn = [f"CN = {common_name}"] + [f"{i}.O = {o}" for i, o in enumerate(organizations)]
    return "\n".join(["[req]", "distinguished_name = dn", "prompt = no",
                      "x509_extensions = ext", "[dn]", *dn, "[ext]", *extensions, ""])


def _ca_extensions() -> list[str]:
    return ["basicConstraints = critical, CA:TRUE",
            "keyUsage = critical, keyCertSign, cRLSign, digitalSignature",
            "subjectKeyIdentifier = hash"]


def _leaf_extensions(leaf: Leaf) -> list[str]:
    ext = ["basicConstraints = critical, CA:FALSE",
           "keyUsage = critical, digitalSignature, keyEncipherment",
           f"extendedKeyUsage = {leaf.usage}", "authorityKeyIdentifier = keyid"]
    if leaf.alt_names:
        ext.append("subjectAltName = " + ", ".join(leaf.alt_names))
    return ext


def _openssl(argv: Sequence[str]) -> None:
    try:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, text=True,
                       timeout=30)
    except FileNotFoundError as exc:
        raise LabError("the lab needs the openssl command (apt-get install openssl)") from exc
    except subprocess.CalledProcessError as exc:
        raise LabError(f"openssl {argv[0]} failed: {exc.stderr.strip()}") from exc


def _make(pki: Pki, stem: str, config: str, signer: tuple[Path, Path] | None,
          days: int, run: Runner) -> None:
    conf = pki.dir / f".{stem}.cnf"
    conf.write_text(config)
    argv = ["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-noenc", "-keyout", str(pki.key(stem)),
            "-out", str(pki.cert(stem)), "-days", str(days), "-config", str(conf)]
    if signer is not None:
        argv += ["-CA", str(signer[0]), "-CAkey", str(signer[1])]
    try:
        run(argv)
    finally:
        conf.unlink(missing_ok=True)
    os.chmod(pki.key(stem), 0o600)


def ensure(directory: Path, run: Runner = _openssl) -> Pki:
    """The lab's PKI in ``directory``: made where missing, kept where present."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    fresh_ca = not (pki.ca_cert.exists() and pki.ca_key.exists())
    if fresh_ca:
        _make(pki, "ca", _config(CA_NAME, (), _ca_extensions()), None, CA_DAYS, run)
    for leaf in LEAVES:
        if fresh_ca or not (pki.cert(leaf.name).exists() and pki.key(leaf.name).exists()):
            config = _config(leaf.common_name, leaf.organizations, _leaf_extensions(leaf))
            _make(pki, leaf.name, config, (pki.ca_cert, pki.ca_key), LEAF_DAYS, run)
    if not pki.sa_key.exists():
        fd = os.open(pki.sa_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
    return pki


def apiserver_flags(pki: Pki) -> list[str]:
    """The API server's TLS and authentication flags (kube-apiserver's names)."""
    return ["--tls-cert-file", str(pki.cert("apiserver")),
            "--tls-private-key-file", str(pki.key("apiserver")),
            "--client-ca-file", str(pki.ca_cert),
            "--service-account-signing-key-file", str(pki.sa_key),
            "--kubeconfig-client-cert", str(pki.cert("admin")),
            "--kubeconfig-client-key", str(pki.key("admin"))]


def proxy_kubeconfig(pki: Pki, server: str) -> str:
    """The kubeconfig of the lab's proxies: the lab CA, user system:kube-proxy."""
    from kubeproxy.apiserver.server import KubeconfigUser, kubeconfig_text

    user = KubeconfigUser(pki.cert("kube-proxy").read_text(), pki.key("kube-proxy").read_text())
    return kubeconfig_text(server, ca_pem=pki.ca_cert.read_text(), user=user)
