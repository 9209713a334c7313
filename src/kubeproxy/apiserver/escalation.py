"""RBAC's guards on writing RBAC: escalation prevention and ClusterRole aggregation.

Theory of operation. kube-apiserver does not let a user hand out permissions they do not
hold (pkg/registry/rbac/{role,clusterrole,rolebinding,clusterrolebinding}/policybased):

* creating or updating a Role / ClusterRole is allowed to members of `system:masters`,
  to users the authorizer allows the `escalate` verb on that role, and otherwise only
  when every rule of the role is *covered* by the rules the user already holds (in the
  role's namespace; cluster-wide for a ClusterRole). A ClusterRole with an
  `aggregationRule` (now or before the update) needs full authority, as upstream: it
  would otherwise collect rules the user never held.
* creating or updating a RoleBinding / ClusterRoleBinding is allowed to `system:masters`,
  to users allowed the `bind` verb on the referenced role (in the binding's namespace),
  and otherwise only when the referenced role's rules are covered by the user's own.

"Covered" is upstream's `Covers` (pkg/registry/rbac/validation/policy_comparator.go):
each requested rule is broken down into single (verb, group, resource, name) or (verb,
URL) rules, and each of those must fit in one rule the user holds; `*` matches all, a
held `*/status` covers any `x/status`, a held URL ending in `*` covers its prefix. The
refusal is a 403 phrased as upstream's ("... is attempting to grant RBAC permissions not
currently held:" and the missing rules in upstream's compact notation).

ClusterRole aggregation (pkg/controller/clusterroleaggregation): a ClusterRole with an
`aggregationRule.clusterRoleSelectors` gets as its rules the union of the rules of every
other ClusterRole whose labels match one of the selectors, in name order, without
duplicates. :func:`aggregated_rules` computes them; the aggregation controller applies
it after every ClusterRole write (controllers.py), synchronously, inside that write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubeproxy.apiserver import errors
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.rbac import (
    MASTERS,
    RBAC_GROUP,
    Attributes,
    Policy,
    UserInfo,
    authorize,
    bindings_for,
)
from kubeproxy.apiserver.selectors import LabelSelector, parse_label_selector

Obj = dict[str, Any]
FULL_AUTHORITY: tuple[Obj, ...] = (
    {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
    {"nonResourceURLs": ["*"], "verbs": ["*"]},
)
ROLE_KINDS = {"roles": "Role", "clusterroles": "ClusterRole"}
BINDING_KINDS = {"rolebindings": "RoleBinding", "clusterrolebindings": "ClusterRoleBinding"}


# ---- covers ---------------------------------------------------------------------------------


def _strings(rule: Obj, key: str) -> list[str]:
    return [str(v) for v in rule.get(key) or []]


def breakdown(rule: Obj) -> list[Obj]:
    """One rule per (group, resource, verb[, name]) or per (URL, verb): BreakdownRule."""
    out: list[Obj] = []
    verbs = _strings(rule, "verbs")
    for group in _strings(rule, "apiGroups"):
        for resource in _strings(rule, "resources"):
            for verb in verbs:
                names: list[str | None] = [*_strings(rule, "resourceNames")]
                for name in names or [None]:
                    sub: Obj = {"apiGroups": [group], "resources": [resource],
                                "verbs": [verb]}
                    if name is not None:
                        sub["resourceNames"] = [name]
                    out.append(sub)
    for url in _strings(rule, "nonResourceURLs"):
        out += [{"nonResourceURLs": [url], "verbs": [verb]} for verb in verbs]
    return out


def _has_all(held: list[str], wanted: list[str]) -> bool:
    return all(w in held for w in wanted)


def _resources_covered(held: list[str], wanted: list[str]) -> bool:
    if "*" in held or _has_all(held, wanted):
        return True
    for path in wanted:
        if path in held:
            continue
        if "/" not in path or "*/" + path.split("/", 1)[1] not in held:
            return False
    return True


def _url_covered(owner: str, path: str) -> bool:
    return owner == path or (owner.endswith("*") and path.startswith(owner.rstrip("*")))


def rule_covers(owner: Obj, sub: Obj) -> bool:
    """upstream's ruleCovers: ``owner`` (held) covers ``sub`` (one broken-down rule)."""
    verbs, groups = _strings(owner, "verbs"), _strings(owner, "apiGroups")
    owner_names, sub_names = _strings(owner, "resourceNames"), _strings(sub, "resourceNames")
    urls = _strings(owner, "nonResourceURLs")
    return (("*" in verbs or _has_all(verbs, _strings(sub, "verbs")))
            and ("*" in groups or _has_all(groups, _strings(sub, "apiGroups")))
            and _resources_covered(_strings(owner, "resources"), _strings(sub, "resources"))
            and (not owner_names if not sub_names else
                 not owner_names or _has_all(owner_names, sub_names))
            and all(any(_url_covered(o, p) for o in urls)
                    for p in _strings(sub, "nonResourceURLs")))


def uncovered(held: Iterable[Obj], wanted: Iterable[Obj]) -> list[Obj]:
    """The broken-down rules of ``wanted`` that no rule of ``held`` covers (Covers)."""
    owners = list(held)
    return [sub for rule in wanted for sub in breakdown(rule)
            if not any(rule_covers(o, sub) for o in owners)]


def compact_string(rule: Obj) -> str:
    """rbacv1helpers.CompactString: ``{APIGroups:[""], Resources:["pods"], Verbs:["get"]}``."""
    parts = []
    for key, label in (("apiGroups", "APIGroups"), ("resources", "Resources"),
                       ("nonResourceURLs", "NonResourceURLs"),
                       ("resourceNames", "ResourceNames"), ("verbs", "Verbs")):
        values = _strings(rule, key)
        if values:
            parts.append(f"{label}:[" + " ".join(f'"{v}"' for v in values) + "]")
    return "{" + ", ".join(parts) + "}"


def _compact(rules: list[Obj]) -> list[Obj]:
    """CompactRules: broken-down rules that differ only in their verb, as one rule."""
    merged: dict[tuple[tuple[str, ...], ...], Obj] = {}
    for rule in rules:
        key = tuple(tuple(_strings(rule, k)) for k in ("apiGroups", "resources",
                                                       "nonResourceURLs", "resourceNames"))
        if key in merged:
            merged[key]["verbs"] = [*merged[key]["verbs"], *_strings(rule, "verbs")]
        else:
            merged[key] = {k: list(v) for k, v in rule.items()}
    return list(merged.values())


def rules_for(user: UserInfo, namespace: str, policy: Policy) -> list[Obj]:
    """Every rule the user holds in ``namespace`` ("" = cluster-wide only): RulesFor."""
    out: list[Obj] = []
    for binding, ns in bindings_for(user, namespace, policy):
        ref = binding.get("roleRef") or {}
        name = str(ref.get("name", ""))
        if ref.get("kind") == "ClusterRole":
            out += policy.cluster_roles.get(name, ())
        else:
            out += policy.roles.get((ns, name), ())
    return out


def confirm_no_escalation(user: UserInfo, namespace: str, rules: Iterable[Obj],
                          policy: Policy) -> str | None:
    """None when the user holds every rule; else upstream's message of what is missing."""
    missing = uncovered(rules_for(user, namespace, policy), rules)
    if not missing:
        return None
    groups = "[" + " ".join(f'"{g}"' for g in user.groups) + "]"
    lines = sorted({compact_string(r) for r in _compact(missing)})
    return (f'user "{user.name}" (groups={groups}) is attempting to grant RBAC permissions '
            f"not currently held:\n" + "\n".join(lines))


# ---- the guards ------------------------------------------------------------------------------


def _allowed(user: UserInfo, verb: str, resource: str, namespace: str, name: str,
             policy: Policy) -> bool:
    attrs = Attributes(user, verb, True, RBAC_GROUP, resource, "", namespace, name)
    return authorize(attrs, policy).allowed


def check_write(user: UserInfo, plural: str, namespace: str, obj: Obj, old: Obj | None,
                policy: Policy) -> None:
    """Raise the 403 ApiError when ``user`` may not write ``obj`` (a Role, ClusterRole,
    RoleBinding or ClusterRoleBinding; ``old`` is the stored one on an update)."""
    if MASTERS in user.groups or (plural not in ROLE_KINDS and plural not in BINDING_KINDS):
        return
    name = str((obj.get("metadata") or {}).get("name", ""))
    if plural in ROLE_KINDS:
        aggregating = any(o is not None and (o.get("aggregationRule") or {}).get(
            "clusterRoleSelectors") for o in (obj, old))
        if plural == "clusterroles" and aggregating:
            if confirm_no_escalation(user, "", FULL_AUTHORITY, policy) is not None:
                raise errors.forbidden(plural, name, "must have cluster-admin privileges to "
                                       "use the aggregationRule", RBAC_GROUP)
            return
        if _allowed(user, "escalate", plural, namespace, name, policy):
            return
        why = confirm_no_escalation(user, namespace, obj.get("rules") or [], policy)
    else:
        ref = obj.get("roleRef") or {}
        ref_plural = "clusterroles" if ref.get("kind") == "ClusterRole" else "roles"
        ref_name = str(ref.get("name", ""))
        if _allowed(user, "bind", ref_plural, namespace, ref_name, policy):
            return
        if ref_plural == "clusterroles":
            rules = policy.cluster_roles.get(ref_name)
        else:
            rules = policy.roles.get((namespace, ref_name))
        if rules is None:
            raise errors.not_found(ref_plural, ref_name, RBAC_GROUP)
        why = confirm_no_escalation(user, namespace, rules, policy)
    if why is not None:
        raise errors.forbidden(plural, name, why, RBAC_GROUP)


# ---- aggregation ----------------------------------------------------------------------------


def selectors_of(role: Obj) -> list[LabelSelector] | None:
    """A ClusterRole's aggregationRule selectors; None when it does not aggregate."""
    rule = role.get("aggregationRule")
    raw = rule.get("clusterRoleSelectors") if isinstance(rule, dict) else None
    if not raw:
        return None
    out = []
    for sel in raw:
        if not isinstance(sel, dict):
            continue
        terms = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
        for e in sel.get("matchExpressions") or []:
            op, key, values = e.get("operator"), e.get("key", ""), e.get("values") or []
            terms.append({"In": f"{key} in ({','.join(values)})",
                          "NotIn": f"{key} notin ({','.join(values)})",
                          "Exists": key, "DoesNotExist": f"!{key}"}.get(str(op), ""))
        try:
            out.append(parse_label_selector(",".join(t for t in terms if t)))
        except ApiError:
            continue  # a selector that cannot parse selects nothing
    return out


def aggregated_rules(role: Obj, cluster_roles: Mapping[str, Obj]) -> list[Obj] | None:
    """The rules an aggregated ClusterRole must hold (None: it does not aggregate)."""
    selectors = selectors_of(role)
    if selectors is None:
        return None
    own = role["metadata"]["name"]
    rules: list[Obj] = []
    for selector in selectors:  # as the controller: selector by selector
        for name in sorted(cluster_roles):
            labels = cluster_roles[name]["metadata"].get("labels") or {}
            if name == own or not selector.matches(labels):
                continue
            for rule in cluster_roles[name].get("rules") or []:
                if rule not in rules:
                    rules.append(rule)
    return rules
