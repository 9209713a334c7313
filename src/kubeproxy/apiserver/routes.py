"""URL paths -> what is being asked for. Pure; no I/O.

Resource URLs follow kube-apiserver's layout:

    /api/v1/<plural>[/<name>[/<subresource>]]                         cluster-scoped, or a
                                                                      namespaced list/watch
                                                                      across namespaces
    /api/v1/namespaces/<ns>/<plural>[/<name>[/<subresource>]]         namespaced
    /apis/<group>/<version>/...                                       same, other groups
    /api/v1/watch/...                                                 legacy watch prefix

`/api/v1/namespaces/<name>[/status]` is the Namespace object itself; a third segment that
is a namespaced resource's plural makes it a namespaced collection instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeproxy.apiserver.resources import Resource, lookup


@dataclass(frozen=True)
class ResourceRoute:
    resource: Resource
    namespace: str | None  # None: cluster-scoped, or all namespaces
    name: str | None  # None: the collection
    subresource: str | None = None
    watch_prefix: bool = False


@dataclass(frozen=True)
class Fixed:
    """Non-resource endpoints: discovery, OpenAPI, version, health."""

    what: str  # api, apis, group, resources, version, health, openapi-v2, openapi-v3
    group: str = ""
    version: str = ""
    extra: str = ""  # the group-version path of an OpenAPI v3 document


@dataclass(frozen=True)
class Review:
    """A create-only virtual resource, answered at once and never stored (upstream's
    SelfSubjectAccessReview: ``kubectl auth can-i``)."""

    group: str
    version: str
    plural: str
    kind: str
    definition: str  # its protobuf message (_protodata.py)


# (group, version, plural) -> (kind, protobuf message) of every review answered.
REVIEWS: dict[tuple[str, str, str], tuple[str, str]] = {
    ("authorization.k8s.io", "v1", "selfsubjectaccessreviews"):
        ("SelfSubjectAccessReview", "authz.SelfSubjectAccessReview"),
}

Route = ResourceRoute | Fixed | Review


def parse(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p != ""]
    if not parts:
        return None
    head = parts[0]
    if len(parts) == 1 and head in ("api", "apis", "version"):
        return Fixed(head)
    if len(parts) == 1 and head in ("healthz", "livez", "readyz"):
        return Fixed("health")
    if head == "openapi":
        return _openapi(parts[1:])
    if head == "api" and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif head == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    elif head == "apis" and len(parts) == 2:
        return Fixed("group", parts[1])
    else:
        return None
    if not rest:
        return Fixed("resources", group, version)
    if len(rest) == 1 and (group, version, rest[0]) in REVIEWS:
        return Review(group, version, rest[0], *REVIEWS[(group, version, rest[0])])
    return _resource(group, version, rest)


def _openapi(rest: list[str]) -> Route | None:
    if rest == ["v2"]:
        return Fixed("openapi-v2")
    if rest and rest[0] == "v3":
        return Fixed("openapi-v3", extra="/".join(rest[1:]))
    return None


def _resource(group: str, version: str, rest: list[str]) -> ResourceRoute | None:
    watch = rest[0] == "watch"
    if watch:
        rest = rest[1:]
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        inner = lookup(group, version, rest[2])
        if inner is not None and inner.namespaced:
            return _finish(inner, rest[1], rest[3:], watch)
    res = lookup(group, version, rest[0])
    if res is None:
        return None
    if res.namespaced and len(rest) > 1:
        return None  # /api/v1/pods/<name> is not a thing
    return _finish(res, None, rest[1:], watch)


def _finish(res: Resource, namespace: str | None, tail: list[str],
            watch: bool) -> ResourceRoute | None:
    if len(tail) > 2:
        return None
    name = tail[0] if tail else None
    sub = tail[1] if len(tail) == 2 else None
    if sub is not None and sub not in (*res.subresources, *res.text_subresources):
        return None
    if watch and sub is not None:
        return None
    return ResourceRoute(res, namespace, name, sub, watch)
