"""Requests -> responses: the verbs of the Kubernetes API over the store.

`Api.handle` takes a parsed `Request` and returns a `Response` (status, bytes, headers)
or a `Stream` (a watch), all three plain data from messages.py, and never touches a
socket, so it can be exercised directly. Every failure leaves as an `ApiError` and is
rendered as a `Status` here; the HTTP edge only adds a last-resort 500 for bugs.

Verbs: get, list (labelSelector, fieldSelector, limit, continue), watch (see watch.py),
create (POST), update (PUT, 409 on a stale resourceVersion), patch (JSON patch, merge
patch, strategic merge patch, and server-side apply approximated as create-or-merge,
without field ownership), delete (gracePeriodSeconds, preconditions, dryRun) and
deletecollection; `status` subresources for the kinds that have one. Output is JSON (or
YAML), a Table for `kubectl get`, or PartialObjectMetadata, as negotiated in codec.py.

With `ApiConfig.auth` set, every request is first authenticated (auth.py: client
certificate, service-account token, anonymous only for health and version) and then
authorized (rbac.py) before any of the above: 401 / 403 as kube-apiserver answers.
`serviceaccounts/NAME/token` (POST a TokenRequest) issues service-account tokens.
Writes of Roles, ClusterRoles and their bindings are checked for privilege escalation
(escalation.py) with the caller's identity, and `selfsubjectaccessreviews` (POST, never
stored) answers `kubectl auth can-i` with the same authorizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import (
    access,
    auth,
    codec,
    discovery,
    errors,
    escalation,
    openapi,
    openapi_pb,
    patch,
    routes,
    selectors,
    table,
    watch,
)
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.messages import Query, Request, Response, Stream, status_response
from kubeproxy.apiserver.rbac import RBAC_GROUP, UserInfo
from kubeproxy.apiserver.resources import GROUP_VERSIONS, Resource
from kubeproxy.apiserver.store import Store

Obj = dict[str, Any]
PROTO_V2 = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


@dataclass(frozen=True)
class ApiConfig:
    bookmark_interval: float = 60.0  # seconds between BOOKMARK events on a watch
    watch_timeout: float = 1800.0  # when the client does not send timeoutSeconds
    auth: auth.AuthConfig | None = None  # None: no authentication, no authorization
    # pods/log: (namespace, pod) -> what its container wrote (the lab's kubelet keeps a
    # file per Pod); None: no logs are kept, every log reads empty.
    pod_logs: Callable[[str, str], bytes] | None = None


def _last(query: Query, key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _bool(query: Query, key: str) -> bool | None:
    value = _last(query, key)
    if value is None:
        return None
    if value.lower() in ("", "true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise errors.bad_request(f"{key}: Invalid value: {value!r}: must be true or false")


def _int(query: Query, key: str) -> int | None:
    value = _last(query, key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise errors.bad_request(f"{key}: Invalid value: {value!r}: must be an integer") from exc


def _dry_run(values: Any) -> bool:
    if values in (None, [], ""):
        return False
    values = values if isinstance(values, list) else [values]
    if all(v == "All" for v in values):
        return True
    raise errors.bad_request(f'dryRun: Unsupported value: {values!r}: supported values: "All"')


def _warning_headers(warnings: list[str]) -> list[tuple[str, str]]:
    return [("Warning", '299 - "' + w.replace("\\", "\\\\").replace('"', '\\"') + '"')
            for w in warnings]


class Api:
    def __init__(self, hub: Hub, *, clock: Callable[[], float],
                 config: ApiConfig | None = None) -> None:
        self.hub = hub
        self.clock = clock
        self.config = config or ApiConfig()

    def handle(self, req: Request) -> Response | Stream:
        try:
            route = routes.parse(req.path)
            user = None
            if self.config.auth is not None:
                user = self._check_access(self.config.auth, route, req)
            if route is None:
                raise errors.route_not_found()
            if isinstance(route, routes.Fixed):
                return self._fixed(route, req)
            if isinstance(route, routes.Review):
                return self._review(route, req, user)
            return self._resource(route, req, user)
        except ApiError as exc:
            return status_response(exc)

    # ---- authentication, authorization, tokens (access.py) ------------------------------

    def _check_access(self, config: auth.AuthConfig, route: routes.Route | None,
                      req: Request) -> UserInfo:
        return access.check(self.hub, config, self.clock(), route, req)

    def _review(self, route: routes.Review, req: Request, user: UserInfo | None) -> Response:
        """POST selfsubjectaccessreviews (kubectl auth can-i): answered, never stored."""
        if req.method != "POST":
            raise errors.method_not_allowed(req.method, req.path)
        body = codec.parse_body(req.body, req.headers.get("content-type"))
        doc = access.self_subject_access_review(self.hub, user, body)
        return Response(201, codec.encode(doc))

    @staticmethod
    def _guard(store: Store, user: UserInfo | None, route: routes.ResourceRoute, obj: Obj,
               old: Obj | None) -> None:
        """RBAC escalation prevention for writes of RBAC objects (escalation.py)."""
        if user is not None and route.resource.group == RBAC_GROUP:
            escalation.check_write(user, route.resource.plural, route.namespace or "", obj,
                                   old, store.policy())

    def _token(self, route: routes.ResourceRoute, req: Request) -> Response:
        """POST serviceaccounts/NAME/token: a TokenRequest answered with status.token."""
        if self.config.auth is None:
            raise errors.route_not_found()  # as kube-apiserver without a signing key
        doc = access.token_request(self.hub, self.config.auth, self.clock(), route, req)
        return Response(201, codec.encode(doc))

    # ---- discovery, OpenAPI, version --------------------------------------------------

    def _fixed(self, route: routes.Fixed, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            raise errors.method_not_allowed(req.method, req.path)
        accept = req.headers.get("accept", "")
        what = route.what
        if what in ("api", "apis"):
            version = discovery.aggregated_version(accept)
            if version is not None:
                body = discovery.aggregated(version, core=what == "api")
                return Response(200, codec.encode(body), discovery.aggregated_content_type(version))
            doc = discovery.api_versions(req.server_address) if what == "api" else \
                discovery.api_group_list()
            return Response(200, codec.encode(doc))
        if what == "group":
            group = discovery.api_group(route.group)
            if group is None:
                raise errors.route_not_found()
            return Response(200, codec.encode(group))
        if what == "resources":
            listing = discovery.api_resource_list(route.group, route.version)
            if listing is None:
                raise errors.route_not_found()
            return Response(200, codec.encode(listing))
        if what == "version":
            return Response(200, codec.encode(discovery.SERVER_VERSION))
        if what == "health":
            return Response(200, b"ok", "text/plain; charset=utf-8")
        if what == "openapi-v2":
            if "protobuf" in accept:
                return Response(200, _v2_protobuf(), PROTO_V2)
            return Response(200, codec.encode(openapi.v2_document()))
        return self._openapi_v3(route.extra)

    @staticmethod
    def _openapi_v3(path: str) -> Response:
        if not path:
            return Response(200, codec.encode(openapi.v3_root()))
        for group, version in GROUP_VERSIONS:
            if path == openapi.group_version_path(group, version):
                return Response(200, openapi.v3_bytes(group, version))
        raise errors.route_not_found()

    # ---- resources ----------------------------------------------------------------------

    def _resource(self, route: routes.ResourceRoute, req: Request,
                  user: UserInfo | None = None) -> Response | Stream:
        res, method = route.resource, req.method
        all_namespaces = res.namespaced and route.namespace is None
        if route.name is None:
            if method in ("GET", "HEAD"):
                watching = route.watch_prefix or bool(_bool(req.query, "watch"))
                return self._watch(route, req) if watching else self._list(route, req)
            if all_namespaces:
                raise errors.method_not_allowed(method, req.path)
            if method == "POST":
                return self._create(route, req, user)
            if method == "DELETE":
                return self._delete_collection(route, req)
        elif route.watch_prefix:
            if method == "GET":
                return self._watch(route, req)
        elif route.subresource == "token":
            if method == "POST":
                return self._token(route, req)
        elif route.subresource in route.resource.text_subresources:
            if method == "GET":
                return self._log(route, req)
        elif method in ("GET", "HEAD"):
            return self._get(route, req)
        elif method == "PUT":
            return self._update(route, req, user)
        elif method == "PATCH":
            return self._patch(route, req, user)
        elif method == "DELETE" and route.subresource is None:
            return self._delete(route, req)
        raise errors.method_not_allowed(method, req.path)

    def _render(self, res: Resource, out: codec.Output, obj: Obj) -> Obj:
        if out.form == "table":
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            return table.to_table(res, [obj], now=self.clock(), list_meta=meta)
        if out.form == "partial":
            return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj.get("metadata", {})}
        return obj

    def _ok(self, res: Resource, req: Request, obj: Obj, status: int = 200,
            warnings: list[str] | None = None) -> Response:
        out = codec.negotiate(req.headers.get("accept"))
        body = codec.encode(self._render(res, out, obj), out.media)
        return Response(status, body, out.media, _warning_headers(warnings or []))

    def _get(self, route: routes.ResourceRoute, req: Request) -> Response:
        res = route.resource
        obj = self.hub.call(lambda s: s.get(res, route.namespace, route.name or ""))
        return self._ok(res, req, obj)

    def _log(self, route: routes.ResourceRoute, req: Request) -> Response:
        """pods/log: the Pod's output as text (``tailLines`` honoured; ``follow`` is
        answered with what there is so far)."""
        res, namespace, name = route.resource, route.namespace or "", route.name or ""
        self.hub.call(lambda s: s.get(res, namespace, name))  # 404 for a missing Pod
        text = self.config.pod_logs(namespace, name) if self.config.pod_logs else b""
        tail = _int(req.query, "tailLines")
        if tail is not None and tail >= 0:
            lines = text.splitlines(keepends=True)
            text = b"".join(lines[len(lines) - tail:] if tail else [])
        return Response(200, text, content_type="text/plain")

    def _selectors(self, res: Resource, query: Query) -> tuple[selectors.LabelSelector,
                                                               selectors.FieldSelector]:
        labels = selectors.parse_label_selector(_last(query, "labelSelector"))
        fields = selectors.parse_field_selector(_last(query, "fieldSelector"), res)
        return labels, fields

    def _list(self, route: routes.ResourceRoute, req: Request) -> Response:
        res = route.resource
        out = codec.negotiate(req.headers.get("accept"))
        labels, fields = self._selectors(res, req.query)
        limit = _int(req.query, "limit")
        if limit is not None and limit < 0:
            raise errors.bad_request(f"limit: Invalid value: {limit}: must be >= 0")
        token = _last(req.query, "continue")
        result = self.hub.call(lambda s: s.list(res, route.namespace, labels=labels, fields=fields,
                                                limit=limit, continue_token=token))
        meta: Obj = {"resourceVersion": str(result.resource_version)}
        if result.continue_token:
            meta["continue"] = result.continue_token
        if result.remaining is not None:
            meta["remainingItemCount"] = result.remaining
        if out.form == "table":
            doc = table.to_table(res, result.items, now=self.clock(), list_meta=meta,
                                 include=_last(req.query, "includeObject") or "Metadata")
        elif out.form == "partial":
            doc = {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                   "metadata": meta, "items": [
                       {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": i["metadata"]} for i in result.items]}
        else:
            items = [{k: v for k, v in i.items() if k not in ("kind", "apiVersion")}
                     for i in result.items]
            doc = {"kind": res.list_kind, "apiVersion": res.api_version, "metadata": meta,
                   "items": items}
        return Response(200, codec.encode(doc, out.media), out.media)

    def _watch(self, route: routes.ResourceRoute, req: Request) -> Stream:
        res = route.resource
        out = codec.negotiate(req.headers.get("accept"))
        labels, fields = self._selectors(res, req.query)
        if route.name is not None:
            name_term = selectors.FieldTerm("metadata.name", False, route.name)
            fields = selectors.FieldSelector((*fields.terms, name_term))
        raw_rv = _last(req.query, "resourceVersion")
        start: int | None = None
        if raw_rv not in (None, "", "0"):
            try:
                start = int(raw_rv)
            except ValueError as exc:
                raise errors.bad_request(f"resourceVersion: Invalid value: {raw_rv!r}: must be "
                                         "an integer") from exc
        initial_end = bool(_bool(req.query, "sendInitialEvents"))
        if initial_end:
            start = None
        timeout = _int(req.query, "timeoutSeconds") or self.config.watch_timeout
        request = watch.WatchRequest(res, route.namespace, labels, fields, start, float(timeout),
                                     bool(_bool(req.query, "allowWatchBookmarks")), initial_end)
        include = _last(req.query, "includeObject") or "Metadata"

        def render(obj: Obj) -> Obj:
            if out.form == "table":
                return table.to_table(res, [obj], now=self.clock(), include=include,
                                      list_meta={"resourceVersion":
                                                 obj["metadata"].get("resourceVersion", "")})
            return self._render(res, out, obj)

        chunks = watch.stream(self.hub, request, render,
                              bookmark_interval=self.config.bookmark_interval)
        return Stream(codec.JSON, chunks)

    def _decode(self, res: Resource, req: Request) -> codec.Decoded:
        directive = codec.validation_directive(dict(req.query))
        body = codec.parse_body(req.body, req.headers.get("content-type"))
        return codec.decode_object(res, body, directive)

    @staticmethod
    def _check_namespace(route: routes.ResourceRoute, obj: Obj) -> None:
        sent = (obj.get("metadata") or {}).get("namespace")
        if route.resource.namespaced and sent not in (None, "") and sent != route.namespace:
            raise errors.bad_request("the namespace of the provided object does not match the "
                                     "namespace sent on the request")

    def _create(self, route: routes.ResourceRoute, req: Request,
                user: UserInfo | None = None) -> Response:
        res = route.resource
        decoded = self._decode(res, req)
        self._check_namespace(route, decoded.obj)
        dry = _dry_run(req.query.get("dryRun"))

        def run(s: Store) -> Obj:
            self._guard(s, user, route, decoded.obj, None)
            return s.create(res, route.namespace, decoded.obj, dry_run=dry)

        obj = self.hub.call(run)
        return self._ok(res, req, obj, 201, decoded.warnings)

    def _update(self, route: routes.ResourceRoute, req: Request,
                user: UserInfo | None = None) -> Response:
        res = route.resource
        decoded = self._decode(res, req)
        self._check_namespace(route, decoded.obj)
        sent = (decoded.obj.get("metadata") or {}).get("name")
        if sent not in (None, route.name):
            raise errors.bad_request(f"the name of the object ({sent}) does not match the name "
                                     f"on the URL ({route.name})")
        dry = _dry_run(req.query.get("dryRun"))

        def run(s: Store) -> Obj:
            self._guard(s, user, route, decoded.obj, s.find(res, route.namespace,
                                                            route.name or ""))
            return s.update(res, route.namespace, route.name or "", decoded.obj,
                            subresource=route.subresource, dry_run=dry)

        obj = self.hub.call(run)
        return self._ok(res, req, obj, 200, decoded.warnings)

    def _patch(self, route: routes.ResourceRoute, req: Request,
               user: UserInfo | None = None) -> Response:
        res, name = route.resource, route.name or ""
        media = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
        apply_patch = _PATCHERS.get(media)
        if apply_patch is None:
            raise errors.unsupported_media_type(media or "<none>")
        document = codec.parse_body(req.body, media)
        directive = codec.validation_directive(dict(req.query))
        dry = _dry_run(req.query.get("dryRun"))
        warnings: list[str] = []

        def run(store: Store) -> tuple[Obj, int]:
            def patched(current: Obj) -> Obj:
                decoded = codec.decode_object(res, apply_patch(current, document, res),
                                              directive)
                warnings.extend(decoded.warnings)
                self._guard(store, user, route, decoded.obj, current)
                return decoded.obj

            if media == "application/apply-patch+yaml":
                if not _last(req.query, "fieldManager"):
                    raise errors.bad_request("PATCH requests with apply patch type must specify "
                                             "a fieldManager")
                try:
                    store.get(res, route.namespace, name)
                except ApiError as exc:
                    if exc.code != 404:
                        raise
                    created = codec.decode_object(res, _apply_create(document, res, name),
                                                  directive)
                    warnings.extend(created.warnings)
                    self._check_namespace(route, created.obj)
                    self._guard(store, user, route, created.obj, None)
                    return store.create(res, route.namespace, created.obj, dry_run=dry), 201
            return store.patch(res, route.namespace, name, patched,
                               subresource=route.subresource, dry_run=dry), 200

        obj, code = self.hub.call(run)
        return self._ok(res, req, obj, code, warnings)

    def _delete_options(self, req: Request) -> tuple[int | None, Obj, bool]:
        options: Obj = {}
        if req.body.strip():
            parsed = codec.parse_body(req.body, req.headers.get("content-type"))
            if not isinstance(parsed, dict):
                raise errors.bad_request("DeleteOptions must be a JSON object")
            options = parsed
        grace = _int(req.query, "gracePeriodSeconds")
        if grace is None and options.get("gracePeriodSeconds") is not None:
            if not isinstance(options["gracePeriodSeconds"], int):
                raise errors.bad_request("gracePeriodSeconds must be an integer")
            grace = options["gracePeriodSeconds"]
        dry = _dry_run(req.query.get("dryRun") or options.get("dryRun"))
        pre = options.get("preconditions") or {}
        if not isinstance(pre, dict):
            raise errors.bad_request("preconditions must be an object")
        return grace, pre, dry

    def _delete(self, route: routes.ResourceRoute, req: Request) -> Response:
        res, name = route.resource, route.name or ""
        grace, pre, dry = self._delete_options(req)
        result = self.hub.call(lambda s: s.delete(res, route.namespace, name, grace=grace,
                                                  preconditions=pre, dry_run=dry))
        if res.returns_deleted_object or not result.deleted:
            return self._ok(res, req, result.obj)
        meta = result.obj["metadata"]
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                  "details": {"name": name, "group": res.group, "kind": res.plural,
                              "uid": meta.get("uid", "")}}
        return Response(200, codec.encode(status))

    def _delete_collection(self, route: routes.ResourceRoute, req: Request) -> Response:
        res = route.resource
        labels, fields = self._selectors(res, req.query)
        grace, _, dry = self._delete_options(req)

        def run(store: Store) -> list[Obj]:
            items = store.list(res, route.namespace, labels=labels, fields=fields).items
            out = []
            for item in items:
                meta = item["metadata"]
                out.append(store.delete(res, meta.get("namespace"), meta["name"], grace=grace,
                                        dry_run=dry).obj)
            return out

        deleted = self.hub.call(run)
        items = [{k: v for k, v in i.items() if k not in ("kind", "apiVersion")} for i in deleted]
        doc = {"kind": res.list_kind, "apiVersion": res.api_version,
               "metadata": {"resourceVersion": str(self.hub.call(lambda s: s.resource_version))},
               "items": items}
        return Response(200, codec.encode(doc))


def _v2_protobuf() -> bytes:
    return _PROTO_CACHE.setdefault("v2", openapi_pb.document(openapi.v2_document()))


_PROTO_CACHE: dict[str, bytes] = {}


def _apply_create(document: Any, res: Resource, name: str) -> Obj:
    if not isinstance(document, dict):
        raise errors.bad_request("an apply patch must be an object")
    meta = document.get("metadata") or {}
    if meta.get("name") not in (None, name):
        raise errors.bad_request(f"the name of the object ({meta.get('name')}) does not match "
                                 f"the name on the URL ({name})")
    return {**document, "kind": res.kind, "apiVersion": res.api_version}


def _smp(current: Obj, document: Any, res: Resource) -> Obj:
    result = patch.strategic_merge_patch(current, document, res.definition)
    assert isinstance(result, dict)
    return result


def _merge(current: Obj, document: Any, res: Resource) -> Obj:
    del res
    result = patch.merge_patch(current, document)
    if not isinstance(result, dict):
        raise errors.bad_request("a merge patch must be a JSON object")
    return result


def _json_patch(current: Obj, document: Any, res: Resource) -> Obj:
    del res
    result = patch.json_patch(current, document)
    if not isinstance(result, dict):
        raise ApiError(422, "Invalid", "the JSON patch produced something that is not an object")
    return result


def _apply(current: Obj, document: Any, res: Resource) -> Obj:
    """Server-side apply, approximated: the applied configuration's maps merge into the
    object and its lists replace the object's (allocated values such as NodePorts are
    carried over by the strategy). There is no field ownership, so a field dropped from
    the configuration is not removed from the object."""
    if not isinstance(document, dict):
        raise errors.bad_request("an apply patch must be an object")
    return _merge(current, document, res)


_PATCHERS: Mapping[str, Callable[[Obj, Any, Resource], Obj]] = {
    "application/strategic-merge-patch+json": _smp,
    "application/merge-patch+json": _merge,
    "application/json-patch+json": _json_patch,
    "application/apply-patch+yaml": _apply,
}
