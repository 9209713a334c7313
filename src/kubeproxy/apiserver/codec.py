"""Bytes <-> objects at the edge: media types, body decoding, field validation.

- `negotiate` reads the Accept header the way kube-apiserver does for JSON clients: the
  first acceptable media range wins; `as=Table` (meta.k8s.io v1/v1beta1) asks for server
  side printing, `as=PartialObjectMetadata[List]` for metadata only; protobuf is not
  offered (clients that also accept JSON fall back to it; protobuf-only gets 406).
- `read_object` parses a JSON or YAML body, checks apiVersion/kind against the URL's
  resource, and decodes it against the schema: unknown fields are dropped and, following
  `fieldValidation` (Strict | Warn (default) | Ignore), rejected with 400 or reported as
  `Warning` headers, exactly the three behaviours upstream offers. Request bodies may
  also be Kubernetes protobuf (protobuf.py); responses are always JSON or YAML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from kubeproxy.apiserver import errors, protobuf, schema
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.resources import Resource

Obj = dict[str, Any]

JSON = "application/json"
YAML = "application/yaml"


@dataclass(frozen=True)
class Output:
    form: str  # object, table, partial
    media: str  # application/json or application/yaml


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for raw in accept.split(","):
        pieces = [p.strip() for p in raw.split(";")]
        params = dict(p.split("=", 1) for p in pieces[1:] if "=" in p)
        out.append((pieces[0].lower(), {k.strip(): v.strip() for k, v in params.items()}))
    return out


def negotiate(accept: str | None) -> Output:
    if not accept or not accept.strip():
        return Output("object", JSON)
    for media, params in _media_ranges(accept):
        if media in ("application/json", "application/yaml", "*/*", "application/*"):
            base = YAML if media == "application/yaml" else JSON
            kind = params.get("as")
            if kind is None:
                return Output("object", base)
            if params.get("g") != "meta.k8s.io" or params.get("v") not in ("v1", "v1beta1"):
                continue
            if kind == "Table":
                return Output("table", base)
            if kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
                return Output("partial", base)
    raise errors.not_acceptable(accept)


def encode(obj: Any, media: str = JSON) -> bytes:
    if media == YAML:
        return yaml.safe_dump(obj, sort_keys=False).encode()
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_body(body: bytes, content_type: str | None) -> Any:
    """A JSON, YAML or Kubernetes-protobuf document; anything else is 415, unparsable 400."""
    media = (content_type or JSON).split(";")[0].strip().lower()
    if not body.strip():
        raise errors.bad_request("the request body is empty")
    if media in ("application/json", "application/merge-patch+json",
                 "application/strategic-merge-patch+json", "application/json-patch+json"):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise errors.bad_request(f"couldn't parse the request body as JSON: {exc}") from exc
    if media == protobuf.MEDIA_TYPE:
        return protobuf.decode_body(body)
    if media in ("application/yaml", "application/apply-patch+yaml", "text/yaml"):
        try:
            return yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise errors.bad_request(f"couldn't parse the request body as YAML: {exc}") from exc
    raise errors.unsupported_media_type(media)


VALIDATION_DIRECTIVES = ("Strict", "Warn", "Ignore")


@dataclass
class Decoded:
    obj: Obj
    warnings: list[str] = field(default_factory=list)


def check_type_meta(res: Resource, obj: Any) -> Obj:
    if not isinstance(obj, dict):
        raise errors.bad_request(f"the body of a {res.kind} must be a JSON object")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if api_version not in (None, "") and api_version != res.api_version:
        raise errors.bad_request(f"the API version in the data ({api_version}) does not match "
                                 f"the expected API version ({res.api_version})")
    if kind not in (None, "") and kind != res.kind:
        raise errors.bad_request(f'{kind} in version "{res.version}" cannot be handled as a '
                                 f'{res.kind}: the kind in the data ({kind}) does not match the '
                                 f"expected kind ({res.kind})")
    return obj


def decode_object(res: Resource, obj: Any, directive: str) -> Decoded:
    """Prune unknown fields; reject wrong types; apply the fieldValidation directive."""
    obj = check_type_meta(res, obj)
    pruned, report = schema.decode(res.definition, obj)
    prefix = f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
    if report.type_errors:
        raise errors.bad_request(prefix + "; ".join(report.type_errors))
    unknown = [f'unknown field "{path}"' for path in report.unknown]
    if unknown and directive == "Strict":
        raise errors.bad_request(prefix + "strict decoding error: " + ", ".join(unknown))
    return Decoded(pruned, unknown if directive == "Warn" else [])


def validation_directive(query: dict[str, list[str]]) -> str:
    value = (query.get("fieldValidation") or ["Warn"])[-1] or "Warn"
    for directive in VALIDATION_DIRECTIVES:
        if value.lower() == directive.lower():
            return directive
    raise ApiError(400, "BadRequest", f"fieldValidation: Unsupported value: {value!r}: "
                   'supported values: "Ignore", "Strict", "Warn"')
