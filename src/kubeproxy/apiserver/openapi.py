"""The OpenAPI documents kubectl downloads: /openapi/v2 and /openapi/v3.

Why kubectl needs them:
- `--validate` (on by default) first asks whether the server does field validation
  itself: it looks for a PATCH operation tagged with the kind's
  `x-kubernetes-group-version-kind` that takes a `fieldValidation` query parameter (in
  the v3 document, falling back to v2). We declare it, so kubectl sends
  `fieldValidation=Strict` and the server rejects unknown fields (see schema.decode).
  kubectl still downloads and parses the v2 document (as protobuf, see openapi_pb.py).
- client-side `kubectl apply` computes its three-way strategic merge patch from the
  schema's `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`.
- `kubectl explain` walks the v3 document's `components.schemas`.
Both documents come from the one catalogue in schema.py and the resources table, so they
always describe exactly what the server serves. Field descriptions are not carried.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from kubeproxy.apiserver import schema
from kubeproxy.apiserver.discovery import SERVER_VERSION
from kubeproxy.apiserver.resources import GROUP_VERSIONS, RESOURCES, SUBRESOURCE_KINDS, Resource

Obj = dict[str, Any]

PATCH_TYPES = ["application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json", "application/apply-patch+yaml"]
JSON_TYPES = ["application/json", "application/yaml"]
DELETE_OPTIONS = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions"
STATUS = "io.k8s.apimachinery.pkg.apis.meta.v1.Status"
PATCH = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch"
WATCH_EVENT = "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent"

# Query parameters per action (upstream's names; all strings/ints/bools).
_WRITE = (("dryRun", "string"), ("fieldManager", "string"), ("fieldValidation", "string"))
_QUERY: dict[str, tuple[tuple[str, str], ...]] = {
    "get": (),
    "list": (("allowWatchBookmarks", "boolean"), ("continue", "string"),
             ("fieldSelector", "string"), ("labelSelector", "string"), ("limit", "integer"),
             ("resourceVersion", "string"), ("resourceVersionMatch", "string"),
             ("sendInitialEvents", "boolean"), ("timeoutSeconds", "integer"),
             ("watch", "boolean")),
    "post": _WRITE,
    "put": _WRITE,
    "patch": (*_WRITE, ("force", "boolean")),
    "delete": (("dryRun", "string"), ("gracePeriodSeconds", "integer"),
               ("propagationPolicy", "string")),
    "deletecollection": (("dryRun", "string"), ("gracePeriodSeconds", "integer"),
                         ("labelSelector", "string"), ("fieldSelector", "string")),
}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    operation_id: str
    action: str  # x-kubernetes-action
    resource: Resource
    path_params: tuple[str, ...]
    body: str | None  # definition the request body is
    response: str  # definition of the 200 body
    consumes: tuple[str, ...] = ("*/*",)


def _gvk(r: Resource) -> Obj:
    return {"group": r.group, "kind": r.kind, "version": r.version}


def _operations() -> list[Operation]:
    ops: list[Operation] = []
    for r in RESOURCES:
        gv = ("Core" if not r.group else r.group.split(".")[0].capitalize()) + r.version.upper()
        scope = "Namespaced" if r.namespaced else ""
        base = f"{r.prefix}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else \
            f"{r.prefix}/{r.plural}"
        params: tuple[str, ...] = ("namespace",) if r.namespaced else ()
        item, kind = f"{base}/{{name}}", schema.full_name(r.definition)
        lst = kind + "List"

        def op(path: str, method: str, verb: str, action: str, ps: tuple[str, ...],
               body: str | None, response: str, suffix: str = "", res: Resource = r,
               consumes: tuple[str, ...] = ("*/*",), infix: str = "", gv: str = gv,
               scope: str = scope) -> None:
            op_id = f"{verb}{gv}{infix}{scope}{res.kind}{suffix}"
            ops.append(Operation(path, method, op_id, action, res, ps, body, response, consumes))

        op(base, "get", "list", "list", params, None, lst)
        op(base, "post", "create", "post", params, kind, kind)
        op(base, "delete", "delete", "deletecollection", params, DELETE_OPTIONS, STATUS,
           infix="Collection")
        op(item, "get", "read", "get", (*params, "name"), None, kind)
        op(item, "put", "replace", "put", (*params, "name"), kind, kind)
        op(item, "patch", "patch", "patch", (*params, "name"), PATCH, kind,
           consumes=tuple(PATCH_TYPES))
        op(item, "delete", "delete", "delete", (*params, "name"), DELETE_OPTIONS,
           kind if r.returns_deleted_object else STATUS)
        for sub in r.subresources:
            path, ps, tail = f"{item}/{sub}", (*params, "name"), sub.capitalize()
            other = SUBRESOURCE_KINDS.get(sub)
            if other is not None:  # serviceaccounts/token: POST a TokenRequest
                body = schema.full_name(other.definition)
                op(path, "post", "create", "post", ps, body, body, tail)
                continue
            op(path, "get", "read", "get", ps, None, kind, tail)
            op(path, "put", "replace", "put", ps, kind, kind, tail)
            op(path, "patch", "patch", "patch", ps, PATCH, kind, tail, consumes=tuple(PATCH_TYPES))
        if r.namespaced:
            ops.append(Operation(f"{r.prefix}/{r.plural}", "get",
                                 f"list{gv}{r.kind}ForAllNamespaces", "list", r, (), None, lst))
    return ops


# ---- schemas ------------------------------------------------------------------------------


def _type_schema(t: schema.Type, ref: Callable[[str], Obj]) -> Obj:
    if isinstance(t, schema.Ref):
        return ref(schema.full_name(t.name))
    if isinstance(t, schema.Arr):
        return {"type": "array", "items": _type_schema(t.item, ref)}
    if isinstance(t, schema.Map):
        if t.value == schema.Prim("any"):
            return {"type": "object"}
        return {"type": "object", "additionalProperties": _type_schema(t.value, ref)}
    simple: dict[str, Obj] = {
        "str": {"type": "string"}, "int": {"type": "integer", "format": "int64"},
        "bool": {"type": "boolean"}, "num": {"type": "number", "format": "double"},
        "any": {"type": "object"},
    }
    special = {"time": schema.TIME, "ios": schema.INT_OR_STRING, "qty": schema.QUANTITY}
    if t.name in special:
        return ref(special[t.name])
    return dict(simple[t.name])


def _gvk_of_definition(short: str) -> list[Obj]:
    found = []
    for r in RESOURCES:
        if short == r.definition:
            found.append(_gvk(r))
        elif short == r.definition + "List":
            found.append({**_gvk(r), "kind": r.kind + "List"})
    for other in SUBRESOURCE_KINDS.values():
        if short == other.definition:
            found.append({"group": other.group, "kind": other.kind, "version": other.version})
    if short in ("meta.DeleteOptions", "meta.Status", "meta.WatchEvent"):
        kind = short.split(".")[1]
        found = [{"group": g, "kind": kind, "version": v} for g, v in GROUP_VERSIONS]
    return found


def definitions(ref: Callable[[str], Obj], *, v3: bool) -> dict[str, Obj]:
    out: dict[str, Obj] = {
        schema.TIME: {"type": "string", "format": "date-time"},
        schema.QUANTITY: ({"oneOf": [{"type": "string"}, {"type": "number"}]} if v3
                          else {"type": "string"}),
        schema.INT_OR_STRING: {"type": "string", "format": "int-or-string"},
        PATCH: {"type": "object", "description": "Patch is provided to give a concrete name "
                "and type to the Kubernetes PATCH request body."},
    }
    for short, d in sorted(schema.definitions().items()):
        props: dict[str, Obj] = {}
        for name, f in sorted(d.fields.items()):
            prop = _type_schema(f.type, ref)
            if v3 and "$ref" in prop:
                prop = {"allOf": [prop], "default": {}}
            meta = f.patch
            if meta.strategy:
                prop["x-kubernetes-patch-strategy"] = meta.strategy
            if meta.merge_key:
                prop["x-kubernetes-patch-merge-key"] = meta.merge_key
            if meta.list_type:
                prop["x-kubernetes-list-type"] = meta.list_type
            if meta.map_keys:
                prop["x-kubernetes-list-map-keys"] = list(meta.map_keys)
            props[name] = prop
        body: Obj = {"type": "object", "properties": props}
        required = sorted(n for n, f in d.fields.items() if f.required)
        if required:
            body["required"] = required
        gvks = _gvk_of_definition(short)
        if gvks:
            body["x-kubernetes-group-version-kind"] = gvks
        out[d.full_name] = body
    return out


# ---- v2 -----------------------------------------------------------------------------------


def _v2_ref(name: str) -> Obj:
    return {"$ref": f"#/definitions/{name}"}


def _v2_operation(o: Operation) -> Obj:
    params: list[Obj] = []
    if o.body is not None:
        params.append({"name": "body", "in": "body", "required": o.method != "delete",
                       "schema": _v2_ref(o.body)})
    params += [{"name": n, "in": "query", "type": t, "uniqueItems": True}
               for n, t in _QUERY[o.action]]
    responses: Obj = {"200": {"description": "OK", "schema": _v2_ref(o.response)}}
    if o.method == "post":
        responses["201"] = {"description": "Created", "schema": _v2_ref(o.response)}
    responses["401"] = {"description": "Unauthorized"}
    return {
        "tags": [o.resource.group.split(".")[0] + "_" + o.resource.version if o.resource.group
                 else "core_v1"],
        "description": f"{o.action} {o.resource.kind}",
        "operationId": o.operation_id,
        "consumes": list(o.consumes),
        "produces": JSON_TYPES,
        "schemes": ["https"],
        "parameters": params,
        "responses": responses,
        "x-kubernetes-action": o.action,
        "x-kubernetes-group-version-kind": _gvk(o.resource),
    }


def _path_parameters(o: Operation, v3: bool) -> list[Obj]:
    out = []
    for name in o.path_params:
        p: Obj = {"name": name, "in": "path", "required": True,
                  "description": f"{name} of the {o.resource.kind}"}
        if v3:
            p["schema"] = {"type": "string", "uniqueItems": True}
        else:
            p.update({"type": "string", "uniqueItems": True})
        out.append(p)
    return out


@cache
def v2_document() -> Obj:
    paths: dict[str, Obj] = {}
    for o in _operations():
        entry = paths.setdefault(o.path, {"parameters": _path_parameters(o, v3=False)})
        entry[o.method] = _v2_operation(o)
    return {"swagger": "2.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths, "definitions": definitions(_v2_ref, v3=False)}


# ---- v3 -----------------------------------------------------------------------------------


def _v3_ref(name: str) -> Obj:
    return {"$ref": f"#/components/schemas/{name}"}


def _v3_operation(o: Operation) -> Obj:
    op: Obj = {
        "tags": _v2_operation(o)["tags"],
        "description": f"{o.action} {o.resource.kind}",
        "operationId": o.operation_id,
        "parameters": [{"name": n, "in": "query", "schema": {"type": t, "uniqueItems": True}}
                       for n, t in _QUERY[o.action]],
        "responses": {"200": {"description": "OK", "content": {
            t: {"schema": _v3_ref(o.response)} for t in JSON_TYPES}}},
        "x-kubernetes-action": o.action,
        "x-kubernetes-group-version-kind": _gvk(o.resource),
    }
    if o.body is not None:
        types = o.consumes if o.consumes != ("*/*",) else ("*/*",)
        op["requestBody"] = {"content": {t: {"schema": _v3_ref(o.body)} for t in types},
                             "required": o.method != "delete"}
    return op


def group_version_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


@cache
def v3_document(group: str, version: str) -> Obj:
    paths: dict[str, Obj] = {}
    for o in _operations():
        if (o.resource.group, o.resource.version) != (group, version):
            continue
        entry = paths.setdefault(o.path, {"parameters": _path_parameters(o, v3=True)})
        entry[o.method] = _v3_operation(o)
    return {"openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": definitions(_v3_ref, v3=True)}}


@cache
def v3_bytes(group: str, version: str) -> bytes:
    return json.dumps(v3_document(group, version), separators=(",", ":")).encode()


@cache
def v3_root() -> Obj:
    paths = {}
    for group, version in GROUP_VERSIONS:
        digest = hashlib.sha512(v3_bytes(group, version)).hexdigest().upper()[:128]
        path = group_version_path(group, version)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}
