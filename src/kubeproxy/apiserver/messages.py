"""What goes into `handlers.Api` and what comes out: a parsed request, a response, a watch.

These are plain data, kept apart from the verbs because more than the verbs use them:
http.py builds a `Request` from the socket and writes back a `Response` or drains a
`Stream`, and access.py authenticates and authorizes the `Request` before any verb runs.
Importing them pulls in nothing of handlers.py, so handlers.py can call access.py
without access.py importing handlers.py back. `status_response` is here too because
both the verbs and the HTTP edge render an `ApiError` the same way, as a `Status` body.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from kubeproxy.apiserver import codec
from kubeproxy.apiserver.auth import CertIdentity
from kubeproxy.apiserver.errors import ApiError

Query = Mapping[str, list[str]]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Query
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""
    server_address: str = "127.0.0.1:6443"
    client_cert: CertIdentity | None = None  # verified by the TLS layer


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = codec.JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Stream:
    content_type: str
    chunks: Iterator[bytes | None]


def status_response(exc: ApiError) -> Response:
    return Response(exc.code, codec.encode(exc.to_status()))
