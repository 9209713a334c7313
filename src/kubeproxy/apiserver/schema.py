"""The type catalogue of the served kinds: one model for decoding, patching and OpenAPI.

kube-apiserver decodes every request body into Go structs, so fields the struct does not
know are dropped (and reported under `fieldValidation=Warn|Strict`) and values of the wrong
JSON type are rejected with a decoding error. We get the same behaviour by walking bodies
against this catalogue (`decode`). The same catalogue drives strategic merge patch (which
lists merge by key: `patch_meta`) and the OpenAPI documents kubectl downloads, so the three
can never disagree.

The field list comes from `_schemadata.py`, generated from the official Python client.
Its language is one definition per line (indented lines continue it):

    core.ServicePort: name:str port:int! targetPort:ios

`!` marks a required field; types are `str int bool num time ios` (int-or-string) `any`,
a definition (`core.X`, `meta.X`, `disc.X`, `apps.X`, `rbac.X`, `authn.X`), `[]T` (array)
and `{}T` (string-keyed map).
What the client does not record (which string maps hold Quantities, and the patch
strategies from upstream's `+patchStrategy`/`+listType` tags) is in the tables below.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from kubeproxy.apiserver._schemadata import SCHEMA_TEXT

# Short prefix -> OpenAPI definition name prefix.
PREFIXES: Mapping[str, str] = {
    "core": "io.k8s.api.core.v1.",
    "meta": "io.k8s.apimachinery.pkg.apis.meta.v1.",
    "disc": "io.k8s.api.discovery.v1.",
    "apps": "io.k8s.api.apps.v1.",
    "rbac": "io.k8s.api.rbac.v1.",
    "authn": "io.k8s.api.authentication.v1.",
}
TIME = "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"

# String-valued fields that are really resource.Quantity (accept numbers and strings).
QUANTITY_FIELDS: frozenset[tuple[str, str]] = frozenset({
    ("core.ResourceRequirements", "limits"),
    ("core.ResourceRequirements", "requests"),
    ("core.VolumeResourceRequirements", "limits"),
    ("core.VolumeResourceRequirements", "requests"),
    ("core.NodeStatus", "capacity"),
    ("core.NodeStatus", "allocatable"),
    ("core.PodSpec", "overhead"),
    ("core.PodStatus", "allocatedResources"),
    ("core.ContainerStatus", "allocatedResources"),
    ("core.EmptyDirVolumeSource", "sizeLimit"),
    ("core.ResourceFieldSelector", "divisor"),
})


@dataclass(frozen=True)
class PatchMeta:
    """How a list field merges (upstream struct tags patchStrategy / listType)."""

    strategy: str = ""  # "merge", "merge,retainKeys" or "" (replace)
    merge_key: str = ""  # patchMergeKey; empty for lists of scalars
    list_type: str = ""  # x-kubernetes-list-type: atomic | map | set
    map_keys: tuple[str, ...] = ()  # x-kubernetes-list-map-keys


_M = PatchMeta
PATCH_META: Mapping[tuple[str, str], PatchMeta] = {
    ("meta.ObjectMeta", "finalizers"): _M("merge", "", "set"),
    ("meta.ObjectMeta", "ownerReferences"): _M("merge", "uid", "map", ("uid",)),
    ("meta.ObjectMeta", "managedFields"): _M("", "", "atomic"),
    ("core.PodSpec", "volumes"): _M("merge,retainKeys", "name", "map", ("name",)),
    ("core.PodSpec", "containers"): _M("merge", "name", "map", ("name",)),
    ("core.PodSpec", "initContainers"): _M("merge", "name", "map", ("name",)),
    ("core.PodSpec", "ephemeralContainers"): _M("merge", "name", "map", ("name",)),
    ("core.PodSpec", "imagePullSecrets"): _M("merge", "name", "map", ("name",)),
    ("core.PodSpec", "hostAliases"): _M("merge", "ip", "map", ("ip",)),
    ("core.PodSpec", "topologySpreadConstraints"): _M(
        "merge", "topologyKey", "map", ("topologyKey", "whenUnsatisfiable")),
    ("core.PodSpec", "resourceClaims"): _M("merge,retainKeys", "name", "map", ("name",)),
    ("core.PodSpec", "schedulingGates"): _M("merge", "name", "map", ("name",)),
    ("core.PodSpec", "tolerations"): _M("", "", "atomic"),
    ("core.PodSpec", "readinessGates"): _M("", "", "atomic"),
    ("core.Container", "ports"): _M("merge", "containerPort", "map", ("containerPort", "protocol")),
    ("core.Container", "env"): _M("merge", "name", "map", ("name",)),
    ("core.Container", "volumeMounts"): _M("merge", "mountPath", "map", ("mountPath",)),
    ("core.Container", "volumeDevices"): _M("merge", "devicePath", "map", ("devicePath",)),
    ("core.EphemeralContainer", "ports"): _M("merge", "containerPort", "map",
                                             ("containerPort", "protocol")),
    ("core.EphemeralContainer", "env"): _M("merge", "name", "map", ("name",)),
    ("core.EphemeralContainer", "volumeMounts"): _M("merge", "mountPath", "map", ("mountPath",)),
    ("core.EphemeralContainer", "volumeDevices"): _M("merge", "devicePath", "map",
                                                     ("devicePath",)),
    ("core.PodStatus", "conditions"): _M("merge", "type", "map", ("type",)),
    ("core.PodStatus", "podIPs"): _M("merge", "ip", "map", ("ip",)),
    ("core.PodStatus", "hostIPs"): _M("merge", "ip", "atomic"),
    ("core.PodStatus", "resourceClaimStatuses"): _M("merge,retainKeys", "name", "map", ("name",)),
    ("core.ServiceSpec", "ports"): _M("merge", "port", "map", ("port", "protocol")),
    ("core.ServiceSpec", "clusterIPs"): _M("", "", "atomic"),
    ("core.ServiceSpec", "ipFamilies"): _M("", "", "atomic"),
    ("core.ServiceSpec", "externalIPs"): _M("", "", "atomic"),
    ("core.ServiceStatus", "conditions"): _M("merge", "type", "map", ("type",)),
    ("core.NodeSpec", "podCIDRs"): _M("merge", "", "set"),
    ("core.NodeSpec", "taints"): _M("", "", "atomic"),
    ("core.NodeStatus", "addresses"): _M("merge", "type", "map", ("type",)),
    ("core.NodeStatus", "conditions"): _M("merge", "type", "map", ("type",)),
    ("core.NamespaceStatus", "conditions"): _M("merge", "type", "map", ("type",)),
    ("disc.EndpointSlice", "endpoints"): _M("", "", "atomic"),
    ("disc.EndpointSlice", "ports"): _M("", "", "atomic"),
    ("disc.Endpoint", "addresses"): _M("", "", "set"),
    ("apps.DaemonSetStatus", "conditions"): _M("merge", "type", "map", ("type",)),
}

NO_PATCH_META = PatchMeta()


# ---- the type language ---------------------------------------------------------------


@dataclass(frozen=True)
class Prim:
    """str int bool num time ios qty any."""

    name: str


@dataclass(frozen=True)
class Ref:
    name: str  # short name, e.g. "core.ServicePort"


@dataclass(frozen=True)
class Arr:
    item: Type


@dataclass(frozen=True)
class Map:
    value: Type


Type = Prim | Ref | Arr | Map


@dataclass(frozen=True)
class Field:
    name: str
    type: Type
    required: bool
    patch: PatchMeta


@dataclass(frozen=True)
class Definition:
    name: str  # short name
    fields: Mapping[str, Field]

    @property
    def full_name(self) -> str:
        return full_name(self.name)


def full_name(short: str) -> str:
    prefix, _, rest = short.partition(".")
    return PREFIXES[prefix] + rest


_PRIMS = frozenset({"str", "int", "bool", "num", "time", "ios", "any"})


def _parse_type(token: str) -> Type:
    if token.startswith("[]"):
        return Arr(_parse_type(token[2:]))
    if token.startswith("{}"):
        return Map(_parse_type(token[2:]))
    if token in _PRIMS:
        return Prim(token)
    if token.split(".", 1)[0] in PREFIXES:
        return Ref(token)
    raise ValueError(f"unknown type token {token!r}")


def _entries(text: str) -> Iterator[str]:
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith(" ") and current:
            current.append(line.strip())
            continue
        if current:
            yield " ".join(current)
        current = [line.strip()]
    if current:
        yield " ".join(current)


@cache
def definitions() -> Mapping[str, Definition]:
    """All definitions by short name; parsed once."""
    out: dict[str, Definition] = {}
    for entry in _entries(SCHEMA_TEXT):
        head, _, body = entry.partition(": ")
        fields: dict[str, Field] = {}
        for token in body.split():
            fname, _, ftype = token.partition(":")
            required = ftype.endswith("!")
            parsed = _parse_type(ftype.rstrip("!"))
            if (head, fname) in QUANTITY_FIELDS:
                parsed = Map(Prim("qty")) if isinstance(parsed, Map) else Prim("qty")
            meta = PATCH_META.get((head, fname), NO_PATCH_META)
            fields[fname] = Field(fname, parsed, required, meta)
        out[head] = Definition(head, fields)
    for (dname, fname) in PATCH_META:
        if fname not in out[dname].fields:
            raise ValueError(f"PATCH_META names a missing field {dname}.{fname}")
    return out


def definition(short: str) -> Definition:
    return definitions()[short]


# ---- decoding: prune unknown fields, reject wrong JSON types -----------------------------


@dataclass
class DecodeReport:
    unknown: list[str]  # paths of dropped fields, e.g. "spec.ports[0].foo"
    type_errors: list[str]  # Go-style decoding messages


_GO_TYPES: Mapping[str, str] = {
    "str": "string", "int": "int32", "bool": "bool", "num": "float64", "time": "Time",
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def decode(short: str, obj: dict[str, Any]) -> tuple[dict[str, Any], DecodeReport]:
    """Return obj with unknown fields dropped, plus what was dropped or mistyped."""
    report = DecodeReport([], [])
    out = _decode_object(definition(short), obj, "", report)
    return out, report


def _decode_object(d: Definition, obj: dict[str, Any], path: str, rep: DecodeReport) -> Any:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        sub = f"{path}.{key}" if path else key
        f = d.fields.get(key)
        if f is None:
            rep.unknown.append(sub)
            continue
        out[key] = _decode_value(f.type, value, sub, f"{d.name.split('.', 1)[1]}.{sub}", rep)
    return out


def _decode_value(t: Type, value: Any, path: str, gofield: str, rep: DecodeReport) -> Any:
    if value is None:
        return None
    kind = _json_kind(value)

    def mismatch(go_type: str) -> None:
        rep.type_errors.append(
            f"json: cannot unmarshal {kind} into Go struct field {gofield} of type {go_type}"
        )

    if isinstance(t, Ref):
        if kind != "object":
            mismatch(t.name.split(".", 1)[1])
            return value
        return _decode_object(definition(t.name), value, path, rep)
    if isinstance(t, Arr):
        if kind != "array":
            mismatch("[]" + _go_name(t.item))
            return value
        return [_decode_value(t.item, v, f"{path}[{i}]", gofield, rep) for i, v in enumerate(value)]
    if isinstance(t, Map):
        if kind != "object":
            mismatch("map[string]" + _go_name(t.value))
            return value
        return {k: _decode_value(t.value, v, f"{path}.{k}", gofield, rep) for k, v in value.items()}
    name = t.name
    if name == "any":
        return value
    if name in ("ios", "qty"):
        if kind not in ("string", "number") or (kind == "number" and name == "ios"
                                                 and not isinstance(value, int)):
            mismatch("IntOrString" if name == "ios" else "Quantity")
        return value
    wanted = {"str": "string", "time": "string", "bool": "bool", "int": "number", "num": "number"}
    if wanted[name] != kind or (name == "int" and not isinstance(value, int)):
        mismatch(_GO_TYPES[name])
    elif name == "time" and not _TIME_RE.match(value):
        rep.type_errors.append(f'parsing time "{value}" as "2006-01-02T15:04:05Z07:00": '
                               f"cannot parse for field {gofield}")
    return value


def _go_name(t: Type) -> str:
    if isinstance(t, Prim):
        return _GO_TYPES.get(t.name, "interface {}")
    if isinstance(t, Ref):
        return t.name.split(".", 1)[1]
    return "interface {}"


# ---- lookups for strategic merge patch ---------------------------------------------------


def field_of(short: str | None, name: str) -> Field | None:
    """The field `name` of definition `short` (None when unknown or untyped)."""
    if short is None:
        return None
    return definitions()[short].fields.get(name)


def ref_name(t: Type | None) -> str | None:
    """The definition a (possibly array- or map-wrapped) type points at, if any."""
    while isinstance(t, (Arr, Map)):
        t = t.item if isinstance(t, Arr) else t.value
    return t.name if isinstance(t, Ref) else None
