"""The lab's client of its own API server: the verbs the lab CLI and the agent use.

Reading (list, watch) goes through the proxy's own client (``sources.client``); this
module adds what the proxy never needs: get, create, update (of the object or its
``status`` subresource, with a retry on 409 Conflict), delete with a grace period.
JSON to 127.0.0.1, one connection per request, over TLS with the credentials of the
lab's kubeconfig (the lab CA, the admin's client certificate: ``from_kubeconfig``; the
proxy's ``sources.auth`` builds the headers and TLS context, so both clients authenticate
alike). Every failure leaves as ``LabApiError`` (a ``LabError``), carrying the HTTP code and
the API's reason, so callers decide by meaning (404: gone already; 409: re-read and retry).

``request_token`` is the kubelet's TokenRequest: a service-account token for a Pod,
bound to it (the API server refuses the token once the Pod or the ServiceAccount is gone).
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from kubeproxy.errors import LabError
from kubeproxy.sources.auth import Authenticator
from kubeproxy.sources.client import Client, ClientError, StatusError, WatchStream
from kubeproxy.sources.kubeconfig import ClusterAccess, load_kubeconfig
from kubeproxy.sources.transport import ssl_context
from kubeproxy.util.jsontypes import JSON

USER_AGENT = "kubeproxy-lab/0.1"
CONFLICT_RETRIES = 8


class LabApiError(LabError):
    """A request to the lab's API server failed; code 0 means no answer at all."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"API server: {code} {reason}: {message}" if code else message)


@dataclass(frozen=True)
class Kind:
    prefix: str  # /api/v1 or /apis/<group>/<version>
    plural: str
    namespaced: bool


KINDS: dict[str, Kind] = {
    "Namespace": Kind("/api/v1", "namespaces", False),
    "Node": Kind("/api/v1", "nodes", False),
    "Pod": Kind("/api/v1", "pods", True),
    "Service": Kind("/api/v1", "services", True),
    "EndpointSlice": Kind("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "ConfigMap": Kind("/api/v1", "configmaps", True),
    "ServiceAccount": Kind("/api/v1", "serviceaccounts", True),
    "DaemonSet": Kind("/apis/apps/v1", "daemonsets", True),
    "ClusterRole": Kind("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": Kind("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings",
                               False),
    "Role": Kind("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": Kind("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
}


def path(
    kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    """The URL path of a collection (all namespaces when namespace is None) or object."""
    k = KINDS[kind]
    out = k.prefix
    if k.namespaced and namespace is not None:
        out += f"/namespaces/{namespace}"
    out += f"/{k.plural}"
    if name is not None:
        out += f"/{name}" + (f"/{sub}" if sub else "")
    return out


def object_path(obj: JSON, sub: str | None = None) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") if KINDS[obj["kind"]].namespaced else None
    return path(
        obj["kind"],
        namespace or "default" if KINDS[obj["kind"]].namespaced else None,
        meta["name"],
        sub,
    )


@dataclass(frozen=True)
class Token:
    """A TokenRequest's answer."""

    token: str
    expiration: str  # status.expirationTimestamp, RFC 3339


class LabApi:
    def __init__(self, server: str | ClusterAccess, *, timeout: float = 15.0) -> None:
        access = server if isinstance(server, ClusterAccess) else ClusterAccess(server=server)
        self.access = access
        self.server = access.server
        url = urlsplit(access.server)
        self._host, self._port = url.hostname or "127.0.0.1", url.port
        self.timeout = timeout
        self._auth = Authenticator(access)
        self._tls: ssl.SSLContext | None = None
        self.reader = Client(access, timeout=timeout)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path) -> LabApi:
        """The lab's API with the kubeconfig's server, CA and credentials."""
        try:
            return cls(load_kubeconfig(kubeconfig))
        except (OSError, ValueError, ClientError) as exc:
            raise LabError(f"cannot read the lab's kubeconfig {kubeconfig}: {exc}") from exc

    # ---- reading

    def list(
        self, kind: str, namespace: str | None = None, *, label_selector: str = ""
    ) -> tuple[list[JSON], str]:
        """Items (with kind set) and the list's resourceVersion."""
        try:
            items, rv = self.reader.list_all(path(kind, namespace), label_selector=label_selector)
        except ClientError as exc:
            raise _translate(exc) from exc
        for item in items:
            item.setdefault("kind", kind)
        return items, rv

    def watch(
        self,
        kind: str,
        resource_version: str,
        timeout_seconds: int,
        stall_timeout: float | None = None,
    ) -> WatchStream:
        """``stall_timeout``: end with an error when no event and no bookmark arrived for
        that long (a stopped API server), see ``sources.client``."""
        try:
            return self.reader.watch(
                path(kind),
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                stall_timeout=stall_timeout,
            )
        except ClientError as exc:
            raise _translate(exc) from exc

    def resource_version(self) -> int:
        """The API's current resourceVersion (a one-item list of Namespaces)."""
        doc = self.request("GET", path("Namespace"), query={"limit": "1"})
        return int((doc.get("metadata") or {}).get("resourceVersion") or 0)

    def get(self, kind: str, namespace: str | None, name: str) -> JSON:
        return self.request("GET", path(kind, namespace, name))

    # ---- writing

    def create(self, obj: JSON) -> JSON:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default" if KINDS[obj["kind"]].namespaced else None
        return self.request("POST", path(obj["kind"], ns), body=obj)

    def update(self, obj: JSON, sub: str | None = None) -> JSON:
        return self.request("PUT", object_path(obj, sub), body=obj)

    def delete(
        self, kind: str, namespace: str | None, name: str, grace: int | None = None
    ) -> JSON | None:
        """DELETE; None when it was gone already."""
        body: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace is not None:
            body["gracePeriodSeconds"] = max(0, grace)
        try:
            return self.request("DELETE", path(kind, namespace, name), body=body)
        except LabApiError as exc:
            if exc.code == 404:
                return None
            raise

    def request_token(
        self,
        namespace: str,
        service_account: str,
        *,
        pod: tuple[str, str] | None = None,
        audiences: Sequence[str] = (),
        expiration_seconds: int = 3600,
    ) -> Token:
        """POST serviceaccounts/NAME/token, as the kubelet does for a Pod's projected
        token: ``pod`` is (name, uid) to bind it to; audiences default to the API
        server's. 404 when the ServiceAccount (or Pod) does not exist."""
        spec: JSON = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = list(audiences)
        if pod is not None:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod[0],
                                      "uid": pod[1]}
        body = {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": service_account, "namespace": namespace}, "spec": spec}
        doc = self.request(
            "POST", path("ServiceAccount", namespace, service_account, "token"), body=body
        )
        status = doc.get("status") or {}
        return Token(str(status.get("token", "")), str(status.get("expirationTimestamp", "")))

    def mutate(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        change: Callable[[JSON], JSON | None],
        sub: str | None = None,
    ) -> JSON | None:
        """Read, change, write back; on 409 Conflict read again. change returning None
        means nothing to write (the current object is returned)."""
        for _ in range(CONFLICT_RETRIES):
            current = self.get(kind, namespace, name)
            current.setdefault("kind", kind)
            wanted = change(current)
            if wanted is None:
                return current
            try:
                return self.update(wanted, sub)
            except LabApiError as exc:
                if exc.code != 409:
                    raise
        raise LabApiError(
            409, "Conflict", f"{kind} {name}: still conflicting after {CONFLICT_RETRIES} attempts"
        )

    def request(
        self,
        method: str,
        target: str,
        *,
        body: JSON | None = None,
        query: dict[str, str] | None = None,
    ) -> JSON:
        url = target + ("?" + urlencode(query) if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn = self._connection(headers)
        except ClientError as exc:
            raise LabApiError(0, "", f"{method} {self.server}{url}: {exc}") from exc
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise LabApiError(0, "", f"{method} {self.server}{url}: {exc}") from exc
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if resp.status >= 400 or not isinstance(doc, dict):
            raise _status(resp.status, doc, f"{method} {url}")
        return doc


    def _connection(self, headers: dict[str, str]) -> http.client.HTTPConnection:
        """A new connection; adds the credentials' headers (a bearer token) to ``headers``."""
        creds = self._auth.credentials()
        headers.update(creds.headers)
        if not self.access.tls:
            return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        if self._tls is None:
            self._tls = ssl_context(creds.tls)
        return http.client.HTTPSConnection(
            self._host, self._port, timeout=self.timeout, context=self._tls
        )


def _status(code: int, doc: Any, what: str) -> LabApiError:
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return LabApiError(
            int(doc.get("code") or code),
            str(doc.get("reason") or ""),
            str(doc.get("message") or what),
        )
    return LabApiError(code, http.client.responses.get(code, "Error"), what)


def _translate(exc: ClientError) -> LabApiError:
    if isinstance(exc, StatusError):
        return LabApiError(exc.code, exc.reason, str(exc))
    return LabApiError(0, "", str(exc))
