"""The lab's client of its own API server: the verbs the lab CLI and the agent use.

Reading (list, watch) goes through the proxy's own client (``sources.client``); this
module adds what the proxy never needs: get, create, update (of the object or its
``status`` subresource, with a retry on 409 Conflict), delete with a grace period.
JSON over plain HTTP to 127.0.0.1, one connection per request. Every failure leaves as
``ApiError`` (a ``LabError``), carrying the HTTP code and the API's reason, so callers
decide by meaning (404: gone already; 409: re-read and retry).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from kubeproxy.jsontypes import JSON
from kubeproxy.lab.errors import LabError
from kubeproxy.sources.client import Client, ClientError, StatusError, WatchStream
from kubeproxy.sources.kubeconfig import ClusterAccess, load_kubeconfig

USER_AGENT = "kubeproxy-lab/0.1"
CONFLICT_RETRIES = 8


class ApiError(LabError):
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


class LabApi:
    def __init__(self, server: str, *, timeout: float = 15.0) -> None:
        self.server = server
        url = urlsplit(server)
        self._host, self._port = url.hostname or "127.0.0.1", url.port
        self.timeout = timeout
        self.reader = Client(ClusterAccess(server=server), timeout=timeout)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path) -> LabApi:
        try:
            return cls(load_kubeconfig(kubeconfig).server)
        except (OSError, ValueError) as exc:
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
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

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
            except ApiError as exc:
                if exc.code != 409:
                    raise
        raise ApiError(
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
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, "", f"{method} {self.server}{url}: {exc}") from exc
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if resp.status >= 400 or not isinstance(doc, dict):
            raise _status(resp.status, doc, f"{method} {url}")
        return doc


def _status(code: int, doc: Any, what: str) -> ApiError:
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        return ApiError(
            int(doc.get("code") or code),
            str(doc.get("reason") or ""),
            str(doc.get("message") or what),
        )
    return ApiError(code, http.client.responses.get(code, "Error"), what)


def _translate(exc: ClientError) -> ApiError:
    if isinstance(exc, StatusError):
        return ApiError(exc.code, exc.reason, str(exc))
    return ApiError(0, "", str(exc))
