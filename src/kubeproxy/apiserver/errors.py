"""The API server's one error type, and how it becomes a Kubernetes `Status`.

Everything that can go wrong while serving a request is an `ApiError` carrying the HTTP
code, the machine-readable `reason` (upstream's `metav1.StatusReason` words: NotFound,
AlreadyExists, Conflict, Invalid, BadRequest, Expired, ...) and a human message phrased
the way kube-apiserver phrases it, because kubectl prints the message verbatim and users
search for it. The HTTP edge turns any `ApiError` into a `Status` body; anything else that
escapes a handler becomes a 500 `InternalError` Status, never a dropped connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeproxy.errors import KubeProxyError


@dataclass(frozen=True)
class Cause:
    """One field-level problem, as in `Status.details.causes`."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"


@dataclass
class ApiError(KubeProxyError):
    code: int
    reason: str
    message: str
    name: str = ""
    kind: str = ""
    group: str = ""
    causes: tuple[Cause, ...] = ()
    extra_details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details: dict[str, Any] = dict(self.extra_details)
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [
                {"reason": c.reason, "message": c.message, "field": c.field} for c in self.causes
            ]
        if details:
            status["details"] = details
        return status


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        404, "NotFound", f'{_qualified(resource, group)} "{name}" not found',
        name=name, kind=resource, group=group,
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{_qualified(resource, group)} "{name}" already exists',
        name=name, kind=resource, group=group,
    )


def conflict(resource: str, name: str, why: str, group: str = "") -> ApiError:
    return ApiError(
        409, "Conflict",
        f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {why}',
        name=name, kind=resource, group=group,
    )


STALE = ("the object has been modified; please apply your changes to the latest version and "
         "try again")


def invalid(kind: str, name: str, causes: list[Cause], group: str = "") -> ApiError:
    listing = ", ".join(f"{c.field}: {c.message}" for c in causes)
    many = f"[{listing}]" if len(causes) > 1 else listing
    return ApiError(
        422, "Invalid", f'{kind} "{name}" is invalid: {many}',
        name=name, kind=kind, group=group, causes=tuple(causes),
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def too_large_resource_version(asked: int, current: int) -> ApiError:
    """A resourceVersion the server has not reached (upstream: 504 after waiting 3 s; a
    client that remembers a version from before a restart lands here and relists)."""
    return ApiError(504, "Timeout", f"Too large resource version: {asked}, current: {current}",
                    causes=(Cause("", "Too large resource version", "ResourceVersionTooLarge"),),
                    extra_details={"retryAfterSeconds": 1})


def method_not_allowed(verb: str, what: str) -> ApiError:
    return ApiError(
        405, "MethodNotAllowed", f"{verb} is not supported on {what}",
    )


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, "UnsupportedMediaType", f'the body of the request was in an unknown '
                    f'format - accepted media types include: application/json, '
                    f'application/yaml, application/vnd.kubernetes.protobuf (got '
                    f'"{content_type}")')


def not_acceptable(accept: str) -> ApiError:
    return ApiError(406, "NotAcceptable", f'only the following media types are accepted: '
                    f'application/json, application/yaml (requested "{accept}")')


def forbidden(resource: str, name: str, why: str, group: str = "") -> ApiError:
    return ApiError(
        403, "Forbidden", f'{_qualified(resource, group)} "{name}" is forbidden: {why}',
        name=name, kind=resource, group=group,
    )


def route_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")
