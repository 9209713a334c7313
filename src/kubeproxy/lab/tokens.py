"""What the lab's kubelet mounts into a Pod for its service account, as the real kubelet's
projected volume `kube-api-access-*` at /var/run/secrets/kubernetes.io/serviceaccount.

Theory of operation. `project` asks the API server for a token of the Pod's
ServiceAccount (`spec.serviceAccountName`, default `default`) bound to the Pod (TokenRequest
with `boundObjectRef`: the token stops working when the Pod is deleted), and writes three
files into a directory, each replaced atomically: `token`, `ca.crt` (the lab CA,
`LabStore.ca_cert`) and `namespace`. In-cluster clients (client-go's rest.InClusterConfig,
our `sources.kubeconfig`) read exactly these, with `KUBERNETES_SERVICE_HOST/PORT`.
The kubelet asks for 3607 s and refreshes once 80 % of the lifetime has passed
(`refresh_due`); a token file re-read on change (our `tokenFile`) picks the new one up.
"""

from __future__ import annotations

import calendar
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kubeproxy.lab.api import LabApi, Token
from kubeproxy.util.jsontypes import JSON

KUBELET_EXPIRATION = 3607  # what the kubelet asks for (upstream: 1 h + 7 s)
REFRESH_AT = 0.8  # of the lifetime, as the kubelet's token manager


@dataclass(frozen=True)
class Projected:
    token: Token
    issued: float  # epoch seconds, the caller's clock when the token came
    expires: float  # epoch seconds


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def project(api: LabApi, ca_cert: Path, pod: JSON, directory: Path, *,
            expiration_seconds: int = KUBELET_EXPIRATION) -> Projected:
    """Write token, ca.crt and namespace for ``pod`` (an API object with metadata.uid)
    into ``directory``. Raises the API's LabApiError (404 when the ServiceAccount is missing,
    as a real kubelet then fails the Pod's volume)."""
    meta = pod["metadata"]
    namespace = meta.get("namespace") or "default"
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    now = time.time()
    token = api.request_token(namespace, account, pod=(meta["name"], meta["uid"]),
                              expiration_seconds=expiration_seconds)
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "token", token.token, 0o600)
    _write(directory / "ca.crt", ca_cert.read_text(), 0o644)
    _write(directory / "namespace", namespace, 0o644)
    expires = float(calendar.timegm(time.strptime(token.expiration, "%Y-%m-%dT%H:%M:%SZ")))
    return Projected(token, now, expires)


def refresh_due(projected: Projected, now: float) -> bool:
    """True once 80 % of the token's lifetime is over (the kubelet's rule)."""
    return now >= projected.issued + REFRESH_AT * (projected.expires - projected.issued)
