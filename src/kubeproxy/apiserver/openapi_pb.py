"""Encode the OpenAPI v2 document as gnostic's `openapi.v2.Document` protobuf.

kubectl fetches /openapi/v2 with `Accept: application/com.github.proto-openapi.spec.v2@v1.0
+protobuf` and only understands protobuf there (client-go's discovery client unmarshals
the bytes with proto.Unmarshal), so JSON will not do. Rather than depend on a protobuf
library for one message tree, this module writes the wire format directly for the subset
of gnostic's OpenAPIv2.proto that our document uses. Field numbers below are from
github.com/google/gnostic-models openapiv2/OpenAPIv2.proto. Vendor extensions travel as
`NamedAny{name, Any{yaml}}` with JSON (valid YAML) text, which is how kube-openapi reads
`x-kubernetes-group-version-kind` and the patch-strategy extensions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Obj = dict[str, Any]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, value: Any) -> bytes:
    return _len(field, str(value).encode()) if value not in (None, "") else b""


def _strs(field: int, values: Iterable[Any]) -> bytes:
    return b"".join(_len(field, str(v).encode()) for v in values)


def _bool(field: int, value: Any) -> bytes:
    return _varint(field << 3) + b"\x01" if value else b""


def _extensions(field: int, obj: Obj) -> bytes:
    """Every `x-` key as NamedAny{name=1, value=2: Any{yaml=2}}."""
    return b"".join(
        _len(field, _str(1, k) + _len(2, _str(2, json.dumps(v, sort_keys=True))))
        for k, v in obj.items()
        if k.startswith("x-")
    )


def schema(s: Obj) -> bytes:
    out = _str(1, s.get("$ref")) + _str(2, s.get("format")) + _str(4, s.get("description"))
    out += _strs(19, s.get("required", []))
    if isinstance(s.get("additionalProperties"), dict):
        out += _len(21, _len(1, schema(s["additionalProperties"])))  # AdditionalPropertiesItem
    if "type" in s:
        out += _len(22, _strs(1, [s["type"]]))  # TypeItem{value}
    if "items" in s:
        out += _len(23, _len(1, schema(s["items"])))  # ItemsItem{schema}
    out += b"".join(_len(24, schema(a)) for a in s.get("allOf", []))
    if "properties" in s:
        named = b"".join(_len(1, _str(1, k) + _len(2, schema(v))) for k, v in
                         s["properties"].items())
        out += _len(25, named)  # Properties{additional_properties: NamedSchema}
    return out + _extensions(31, s)


def _parameter(p: Obj) -> bytes:
    if p["in"] == "body":
        body = (_str(1, p.get("description")) + _str(2, p["name"]) + _str(3, "body")
                + _bool(4, p.get("required")) + _len(5, schema(p["schema"])))
        parameter = _len(1, body)  # Parameter.body_parameter
    elif p["in"] == "path":
        sub = (_bool(1, p.get("required")) + _str(2, "path") + _str(3, p.get("description"))
               + _str(4, p["name"]) + _str(5, p.get("type")))
        parameter = _len(2, _len(4, sub))  # NonBodyParameter.path_parameter_sub_schema
    else:
        sub = (_bool(1, p.get("required")) + _str(2, "query") + _str(3, p.get("description"))
               + _str(4, p["name"]) + _str(6, p.get("type")) + _bool(20, p.get("uniqueItems")))
        parameter = _len(2, _len(3, sub))  # NonBodyParameter.query_parameter_sub_schema
    return _len(1, parameter)  # ParametersItem.parameter


def _responses(responses: Obj) -> bytes:
    out = b""
    for code, r in responses.items():
        response = _str(1, r.get("description"))
        if "schema" in r:
            response += _len(2, _len(1, schema(r["schema"])))  # SchemaItem.schema
        out += _len(1, _str(1, code) + _len(2, _len(1, response)))  # NamedResponseValue
    return out


def _operation(op: Obj) -> bytes:
    out = _strs(1, op.get("tags", [])) + _str(3, op.get("description"))
    out += _str(5, op.get("operationId")) + _strs(6, op.get("produces", []))
    out += _strs(7, op.get("consumes", []))
    out += b"".join(_len(8, _parameter(p)) for p in op.get("parameters", []))
    out += _len(9, _responses(op.get("responses", {})))
    out += _strs(10, op.get("schemes", []))
    return out + _extensions(13, op)


_METHODS = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6, "head": 7, "patch": 8}


def _path_item(item: Obj) -> bytes:
    out = b"".join(_len(num, _operation(item[m])) for m, num in _METHODS.items() if m in item)
    return out + b"".join(_len(9, _parameter(p)) for p in item.get("parameters", []))


def document(doc: Obj) -> bytes:
    info = doc.get("info", {})
    out = _str(1, doc.get("swagger", "2.0"))
    out += _len(2, _str(1, info.get("title")) + _str(2, info.get("version")))
    paths = b"".join(_len(2, _str(1, p) + _len(2, _path_item(item)))
                     for p, item in doc.get("paths", {}).items())
    out += _len(8, paths)
    definitions = b"".join(_len(1, _str(1, name) + _len(2, schema(s)))
                           for name, s in doc.get("definitions", {}).items())
    return out + _len(9, definitions)
