"""Regenerate src/kubeproxy/apiserver/_schemadata.py from the official Python client.

The API server needs the field catalogue of every type reachable from the kinds it serves
(Pod, Service, Node, Namespace, EndpointSlice, ConfigMap, ServiceAccount,
DaemonSet, the RBAC kinds, TokenRequest and the meta types): for pruning unknown
fields, for strict field validation and for the OpenAPI documents kubectl downloads.
The `kubernetes` client package carries exactly that catalogue in its models, so we read
it from there once, at development time, and check the compact result into the package:
the server itself never imports the client.

Run:  python tests/api/regen_schema.py > src/kubeproxy/apiserver/_schemadata.py
"""

from __future__ import annotations

import re
import sys
import textwrap
import typing
from typing import Any

# The kinds we serve, and the wrapper types the OpenAPI documents mention.
ROOTS = [
    "V1Pod", "V1PodList", "V1Service", "V1ServiceList", "V1Node", "V1NodeList",
    "V1Namespace", "V1NamespaceList", "V1EndpointSlice", "V1EndpointSliceList",
    "V1Status", "V1DeleteOptions", "V1WatchEvent",
    "V1ConfigMap", "V1ConfigMapList", "V1ServiceAccount", "V1ServiceAccountList",
    "V1DaemonSet", "V1DaemonSetList", "V1ClusterRole", "V1ClusterRoleList",
    "V1ClusterRoleBinding", "V1ClusterRoleBindingList", "V1Role", "V1RoleList",
    "V1RoleBinding", "V1RoleBindingList", "AuthenticationV1TokenRequest",
]

# Types that live in apimachinery's meta/v1 and in discovery/v1; all others are core/v1.
META = {
    "Condition", "DeleteOptions", "LabelSelector", "LabelSelectorRequirement", "ListMeta",
    "ManagedFieldsEntry", "ObjectMeta", "OwnerReference", "Preconditions", "Status",
    "StatusCause", "StatusDetails", "WatchEvent", "ShardInfo",
}
DISCOVERY = {
    "EndpointSlice", "EndpointSliceList", "Endpoint", "EndpointConditions",
    "EndpointHints", "ForZone", "ForNode", "EndpointPort",
}
APPS = {
    "DaemonSet", "DaemonSetList", "DaemonSetSpec", "DaemonSetStatus", "DaemonSetCondition",
    "DaemonSetUpdateStrategy", "RollingUpdateDaemonSet",
}
RBAC = {
    "ClusterRole", "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role",
    "RoleList", "RoleBinding", "RoleBindingList", "PolicyRule", "RoleRef", "Subject",
    "AggregationRule",
}
AUTHN = {"TokenRequest", "TokenRequestSpec", "TokenRequestStatus", "BoundObjectReference"}


def short_name(cls_name: str) -> str:
    """V1ServicePort -> core.ServicePort; DiscoveryV1EndpointPort -> disc.EndpointPort."""
    m = re.fullmatch(r"(Core|Discovery|Rbac|Authentication)?V1(\w+)", cls_name)
    if m is None:
        raise ValueError(cls_name)
    base = m.group(2)
    if m.group(1) == "Discovery" or (m.group(1) is None and base in DISCOVERY):
        return f"disc.{base}"
    if base in APPS:
        return f"apps.{base}"
    if m.group(1) == "Rbac" or (m.group(1) is None and base in RBAC):
        return f"rbac.{base}"
    if m.group(1) == "Authentication" or (m.group(1) is None and base in AUTHN):
        return f"authn.{base}"
    if m.group(1) is None and base in META:
        return f"meta.{base}"
    return f"core.{base}"


def type_token(annotation: Any, owner: str, field: str, refs: list[str]) -> str:
    """Translate a pydantic annotation into the compact token language of schema.py."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return type_token(args[0], owner, field, refs)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
                 for a in args]
        if set(inner) == {int, str}:
            return "ios"
        if set(inner) == {bytes, str}:
            return "str"  # []byte: base64 text in JSON
        if len(args) == 1:
            return type_token(args[0], owner, field, refs)
        raise ValueError(f"{owner}.{field}: {annotation}")
    if origin in (list, typing.List):  # noqa: UP006
        return "[]" + type_token(args[0], owner, field, refs)
    if origin in (dict, typing.Dict):  # noqa: UP006
        return "{}" + type_token(args[1], owner, field, refs)
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type):
        import datetime

        simple = {str: "str", int: "int", bool: "bool", float: "num",
                  datetime.datetime: "time", object: "any"}
        if annotation in simple:
            return simple[annotation]
        name = annotation.__name__
        refs.append(name)
        return short_name(name)
    raise ValueError(f"{owner}.{field}: {annotation}")


def main() -> None:
    import kubernetes.client.models as models

    seen: dict[str, list[str]] = {}
    todo = list(ROOTS)
    while todo:
        cls_name = todo.pop()
        if cls_name in seen:
            continue
        cls = getattr(models, cls_name)
        fields = []
        for py_name, info in cls.model_fields.items():
            json_name = info.serialization_alias or info.alias or py_name
            if json_name not in cls.attribute_map.values():
                raise ValueError(f"{cls_name}.{py_name}: no JSON name")
            refs: list[str] = []
            token = type_token(info.annotation, cls_name, json_name, refs)
            todo.extend(refs)
            fields.append(f"{json_name}:{token}{'!' if info.is_required() else ''}")
        seen[cls_name] = sorted(fields, key=lambda f: f.split(":")[0])
    out = ['"""Field catalogue of the served kinds; generated by tests/api/regen_schema.py.',
           "", "Do not edit by hand: regenerate. Language: see schema.py.", '"""', "",
           'SCHEMA_TEXT = """\\']
    for cls_name in sorted(seen, key=short_name):
        line = f"{short_name(cls_name)}: " + " ".join(seen[cls_name])
        out.extend(textwrap.wrap(line, width=96, subsequent_indent="    ",
                                 break_long_words=False, break_on_hyphens=False))
    out.append('"""')
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
