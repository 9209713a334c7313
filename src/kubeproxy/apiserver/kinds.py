"""Strategies of the kinds a kube-proxy DaemonSet needs: ConfigMap, ServiceAccount,
DaemonSet and the four RBAC kinds; `STRATEGIES` is every kind's row (strategy.py's too).

Upstream's rules kept (pkg/apis/<group>/validation): ConfigMap keys and the `immutable`
lock; a DaemonSet's selector must be non-empty, match its template's labels and never
change, its pods restart Always, its update strategy is RollingUpdate or OnDelete (with
upstream's defaults: maxUnavailable 1, maxSurge 0, revisionHistoryLimit 10) and its pod
template gets the pod defaults; RBAC names are path segments (`system:node-proxier` is
fine), rules name verbs and either resources (with API groups) or non-resource URLs
(cluster roles only), a binding's roleRef is immutable and points at a ClusterRole (or,
from a RoleBinding, a Role), subjects are Users, Groups or ServiceAccounts (with a
namespace). Not kept: RBAC's escalation check (creating a binding to a role with more
rights than one's own needs the `bind` verb upstream; here only admins write RBAC).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kubeproxy.apiserver import names, strategy
from kubeproxy.apiserver.errors import ApiError, Cause
from kubeproxy.apiserver.selectors import LabelSelector, parse_label_selector
from kubeproxy.apiserver.strategy import Context, Strategy

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
CONFIGMAP_MAX_BYTES = 1024 * 1024  # upstream's MaxSecretSize, also used for ConfigMaps


def _no_default(obj: Obj, ctx: Context) -> None:
    del obj, ctx


def _no_carry(old: Obj, new: Obj) -> None:
    del old, new


def path_segment_name(value: str) -> list[str]:
    """RBAC object names (upstream ValidatePathSegmentName)."""
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    return [f"may not contain '{c}'" for c in ("/", "%") if c in value]


# ---- ConfigMap ----------------------------------------------------------------------------


def _configmap_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del ctx
    errs: list[Cause] = []
    data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
    for where, values in (("data", data), ("binaryData", binary)):
        for key in values:
            if len(key) > 253 or not _CONFIG_KEY.match(key):
                errs.append(Cause(f"{where}[{key}]", f"Invalid value: {key!r}: a valid config "
                                  "key must consist of alphanumeric characters, '-', '_' or "
                                  "'.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex "
                                  "used for validation is '[-._a-zA-Z0-9]+')"))
            if where == "binaryData" and key in data:
                errs.append(Cause(f"binaryData[{key}]", f"Invalid value: {key!r}: duplicate "
                                  "of key present in data"))
    size = sum(len(k) + len(str(v)) for k, v in data.items()) + \
        sum(len(k) + len(str(v)) * 3 // 4 for k, v in binary.items())
    if size > CONFIGMAP_MAX_BYTES:
        errs.append(Cause("", f"Too long: must have at most {CONFIGMAP_MAX_BYTES} bytes",
                          "FieldValueTooLong"))
    if old is not None and old.get("immutable"):
        if not obj.get("immutable"):
            errs.append(Cause("immutable", "Forbidden: field is immutable when `immutable` is "
                              "set", "FieldValueForbidden"))
        for key in ("data", "binaryData"):
            if (obj.get(key) or {}) != (old.get(key) or {}):
                errs.append(Cause(key, "Forbidden: field is immutable when `immutable` is set",
                                  "FieldValueForbidden"))
    return errs


# ---- DaemonSet ----------------------------------------------------------------------------


def _daemonset_default(obj: Obj, ctx: Context) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    strategy_ = spec.setdefault("updateStrategy", {})
    if isinstance(strategy_, dict):
        strategy_.setdefault("type", "RollingUpdate")
        if strategy_["type"] == "RollingUpdate":
            rolling = strategy_.setdefault("rollingUpdate", {})
            if isinstance(rolling, dict):
                rolling.setdefault("maxUnavailable", 1)
                rolling.setdefault("maxSurge", 0)
    spec.setdefault("revisionHistoryLimit", 10)
    template = spec.get("template")
    if isinstance(template, dict):
        pod: Obj = {"spec": template.setdefault("spec", {})}
        strategy.pod_defaults(pod, ctx)
        template["metadata"] = template.get("metadata") or {"creationTimestamp": None}
    status = obj.setdefault("status", {})
    for key in ("currentNumberScheduled", "numberMisscheduled", "desiredNumberScheduled",
                "numberReady"):
        status.setdefault(key, 0)


def _selector(spec: Obj) -> tuple[LabelSelector | None, list[Cause]]:
    raw = spec.get("selector")
    if not isinstance(raw, dict):
        return None, [Cause("spec.selector", "Required value", "FieldValueRequired")]
    labels = raw.get("matchLabels") or {}
    exprs = raw.get("matchExpressions") or []
    if not labels and not exprs:
        return None, [Cause("spec.selector", "Invalid value: \"\": empty selector is invalid "
                            "for daemonset")]
    terms = [f"{k}={v}" for k, v in sorted(labels.items())]
    for e in exprs:
        op, key, values = e.get("operator"), e.get("key", ""), e.get("values") or []
        if op in ("In", "NotIn"):
            terms.append(f"{key} {op.lower()} ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
        else:
            return None, [Cause("spec.selector.matchExpressions", f'Unsupported value: "{op}"',
                                "FieldValueNotSupported")]
    try:
        return parse_label_selector(",".join(terms)), []
    except ApiError as exc:
        return None, [Cause("spec.selector", f"Invalid value: {exc.message}")]


def _daemonset_validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    spec = obj.get("spec") or {}
    selector, errs = _selector(spec)
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if selector is not None and not selector.matches(labels):
        errs.append(Cause("spec.template.metadata.labels",
                          f"Invalid value: {labels!r}: `selector` does not match template "
                          "`labels`"))
    if old is not None and (old.get("spec") or {}).get("selector") != spec.get("selector"):
        errs.append(Cause("spec.selector", f"Invalid value: {spec.get('selector')!r}: field "
                          "is immutable"))
    pod_spec = template.get("spec") or {}
    errs += [Cause(f"spec.template.{c.field}", c.message, c.reason)
             for c in strategy.pod_spec_errors({"spec": pod_spec}, ctx)]
    if pod_spec.get("restartPolicy", "Always") != "Always":
        errs.append(Cause("spec.template.spec.restartPolicy",
                          f'Unsupported value: "{pod_spec.get("restartPolicy")}": supported '
                          'values: "Always"', "FieldValueNotSupported"))
    kind = (spec.get("updateStrategy") or {}).get("type")
    if kind not in ("RollingUpdate", "OnDelete"):
        errs.append(Cause("spec.updateStrategy.type", f'Unsupported value: "{kind}": supported '
                          'values: "OnDelete", "RollingUpdate"', "FieldValueNotSupported"))
    return errs


# ---- RBAC ---------------------------------------------------------------------------------


def _rule_errors(path: str, rule: Any, *, namespaced: bool) -> list[Cause]:
    if not isinstance(rule, dict):
        return [Cause(path, "Invalid value: must be an object")]
    errs: list[Cause] = []
    if not rule.get("verbs"):
        errs.append(Cause(f"{path}.verbs", "Required value: verbs must contain at least one "
                          "value", "FieldValueRequired"))
    urls = rule.get("nonResourceURLs") or []
    if urls:
        if namespaced:
            errs.append(Cause(f"{path}.nonResourceURLs", f"Invalid value: {urls!r}: namespaced "
                              "rules cannot apply to non-resource URLs"))
        if rule.get("apiGroups") or rule.get("resources"):
            errs.append(Cause(f"{path}.nonResourceURLs", f"Invalid value: {urls!r}: rules "
                              "cannot apply to both regular resources and non-resource URLs"))
        return errs
    if not rule.get("apiGroups"):
        errs.append(Cause(f"{path}.apiGroups", "Required value: resource rules must supply at "
                          "least one api group", "FieldValueRequired"))
    if not rule.get("resources"):
        errs.append(Cause(f"{path}.resources", "Required value: resource rules must supply at "
                          "least one resource", "FieldValueRequired"))
    return errs


def _role_validate(namespaced: bool) -> Any:
    def validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
        del old, ctx
        errs: list[Cause] = []
        for i, rule in enumerate(obj.get("rules") or []):
            errs += _rule_errors(f"rules[{i}]", rule, namespaced=namespaced)
        return errs

    return validate


def _binding_default(obj: Obj, ctx: Context) -> None:
    del ctx
    for subject in obj.get("subjects") or []:
        if isinstance(subject, dict) and "apiGroup" not in subject:
            kind = subject.get("kind")
            subject["apiGroup"] = RBAC_GROUP if kind in ("User", "Group") else ""


def _binding_validate(cluster: bool) -> Any:
    kinds = ("ClusterRole",) if cluster else ("ClusterRole", "Role")

    def validate(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
        del ctx
        errs: list[Cause] = []
        ref = obj.get("roleRef") or {}
        if ref.get("apiGroup") != RBAC_GROUP:
            errs.append(Cause("roleRef.apiGroup", f'Unsupported value: "{ref.get("apiGroup")}":'
                              f' supported values: "{RBAC_GROUP}"', "FieldValueNotSupported"))
        if ref.get("kind") not in kinds:
            supported = ", ".join(f'"{k}"' for k in sorted(kinds))
            errs.append(Cause("roleRef.kind", f'Unsupported value: "{ref.get("kind")}": '
                              f"supported values: {supported}", "FieldValueNotSupported"))
        if not ref.get("name"):
            errs.append(Cause("roleRef.name", "Required value", "FieldValueRequired"))
        else:
            errs += [Cause("roleRef.name", f"Invalid value: {ref['name']!r}: {m}")
                     for m in path_segment_name(ref["name"])]
        if old is not None and old.get("roleRef") != obj.get("roleRef"):
            errs.append(Cause("roleRef", f"Invalid value: {ref!r}: cannot change roleRef"))
        for i, subject in enumerate(obj.get("subjects") or []):
            errs += _subject_errors(f"subjects[{i}]", subject)
        return errs

    return validate


def _subject_errors(path: str, subject: Any) -> list[Cause]:
    if not isinstance(subject, dict):
        return [Cause(path, "Invalid value: must be an object")]
    errs: list[Cause] = []
    kind, group = subject.get("kind"), subject.get("apiGroup", "")
    if not subject.get("name"):
        errs.append(Cause(f"{path}.name", "Required value", "FieldValueRequired"))
    if kind == "ServiceAccount":
        if group != "":
            errs.append(Cause(f"{path}.apiGroup", f'Unsupported value: "{group}": supported '
                              'values: ""', "FieldValueNotSupported"))
        if not subject.get("namespace"):
            errs.append(Cause(f"{path}.namespace", "Required value", "FieldValueRequired"))
    elif kind in ("User", "Group"):
        if group != RBAC_GROUP:
            errs.append(Cause(f"{path}.apiGroup", f'Unsupported value: "{group}": supported '
                              f'values: "{RBAC_GROUP}"', "FieldValueNotSupported"))
    else:
        errs.append(Cause(f"{path}.kind", f'Unsupported value: "{kind}": supported values: '
                          '"Group", "ServiceAccount", "User"', "FieldValueNotSupported"))
    return errs


def _no_rules(obj: Obj, old: Obj | None, ctx: Context) -> list[Cause]:
    del obj, old, ctx
    return []


STRATEGIES: Mapping[str, Strategy] = {
    **strategy.STRATEGIES,
    # kind: name syntax, defaults, validation, update carry-over
    "ConfigMap": Strategy(names.dns1123_subdomain, _no_default, _configmap_validate,
                          _no_carry, has_status=False),
    "ServiceAccount": Strategy(names.dns1123_subdomain, _no_default, _no_rules, _no_carry,
                               has_status=False),
    "DaemonSet": Strategy(names.dns1123_subdomain, _daemonset_default, _daemonset_validate,
                          _no_carry),
    "ClusterRole": Strategy(path_segment_name, _no_default, _role_validate(False), _no_carry,
                            has_status=False),
    "Role": Strategy(path_segment_name, _no_default, _role_validate(True), _no_carry,
                     has_status=False),
    "ClusterRoleBinding": Strategy(path_segment_name, _binding_default,
                                   _binding_validate(True), _no_carry, has_status=False),
    "RoleBinding": Strategy(path_segment_name, _binding_default, _binding_validate(False),
                            _no_carry, has_status=False),
}
