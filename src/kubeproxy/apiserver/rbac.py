"""Authorization: upstream's RBAC authorizer over the store's (Cluster)Roles and bindings.

Theory of operation. Every authenticated request becomes `Attributes` (who, which verb,
which resource or non-resource path, where: `attributes`). `authorize` then looks, as
kube-apiserver's RBAC authorizer does (plugin/pkg/auth/authorizer/rbac), through every
ClusterRoleBinding and, for a namespaced request, the RoleBindings of that namespace; a
binding whose subjects name the user (User), one of its groups (Group) or, for a service
account's user `system:serviceaccount:NS:NAME`, that ServiceAccount, contributes the
rules of the role it references. One matching rule allows the request; nothing denies.
A rule matches when its verbs, API groups and resources (`pods`, `pods/status`, `*`,
`*/status`) and, when it has any, resourceNames cover the request; non-resource rules
match paths exactly or by a trailing `*`. Members of `system:masters` are allowed
everything before RBAC is asked (upstream's privileged group), so an admin cannot lock
themselves out by deleting a binding.

`Policy` is a plain snapshot of the four RBAC kinds, taken under the store's lock; the
decision is pure. The denial is a 403 phrased exactly as kube-apiserver phrases it
(`forbidden`), since clients and users grep for it. The bootstrap roles and bindings the
store starts with are the table `BOOTSTRAP` (upstream's bootstrappolicy, the part the
lab needs: cluster-admin, discovery, basic-user (self reviews), public info, and
kube-proxy's system:node-proxier). Writes of RBAC objects are further guarded against
privilege escalation, and aggregated ClusterRoles filled in, by escalation.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeproxy.apiserver.errors import ApiError

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"
AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()  # e.g. authentication.kubernetes.io/pod-name


ANONYMOUS = UserInfo("system:anonymous", groups=(UNAUTHENTICATED,))


@dataclass(frozen=True)
class Attributes:
    user: UserInfo
    verb: str  # get list watch create update patch delete deletecollection
    resource_request: bool
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""  # the URL path of a non-resource request


@dataclass(frozen=True)
class Policy:
    """The RBAC objects, as the authorizer reads them."""

    cluster_roles: Mapping[str, tuple[Obj, ...]] = field(default_factory=dict)  # name -> rules
    roles: Mapping[tuple[str, str], tuple[Obj, ...]] = field(default_factory=dict)
    cluster_bindings: tuple[Obj, ...] = ()
    bindings: Mapping[str, tuple[Obj, ...]] = field(default_factory=dict)  # namespace -> ...

    @classmethod
    def of(cls, cluster_roles: Iterable[Obj], roles: Iterable[Obj],
           cluster_bindings: Iterable[Obj], bindings: Iterable[Obj]) -> Policy:
        by_ns: dict[str, list[Obj]] = {}
        for b in bindings:
            by_ns.setdefault(b["metadata"].get("namespace", ""), []).append(b)
        return cls(
            cluster_roles={r["metadata"]["name"]: tuple(r.get("rules") or [])
                           for r in cluster_roles},
            roles={(r["metadata"].get("namespace", ""), r["metadata"]["name"]):
                   tuple(r.get("rules") or []) for r in roles},
            cluster_bindings=tuple(cluster_bindings),
            bindings={ns: tuple(bs) for ns, bs in by_ns.items()},
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # why a role could not be read, as upstream's "RBAC: ..." reason


# ---- matching ---------------------------------------------------------------------------


def _subject_matches(subject: Obj, user: UserInfo) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return bool(name == user.name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        return user.name == f"{SA_PREFIX}{subject.get('namespace', '')}:{name}"
    return False


def _has(values: Iterable[str], wanted: str) -> bool:
    values = list(values)
    return "*" in values or wanted in values


def _path_matches(patterns: Iterable[str], path: str) -> bool:
    for p in patterns:
        if p == "*" or p == path or (p.endswith("*") and path.startswith(p[:-1])):
            return True
    return False


def rule_allows(rule: Obj, a: Attributes) -> bool:
    if not _has(rule.get("verbs") or [], a.verb):
        return False
    if not a.resource_request:
        return _path_matches(rule.get("nonResourceURLs") or [], a.path)
    if not _has(rule.get("apiGroups") or [], a.api_group):
        return False
    resources = list(rule.get("resources") or [])
    wanted = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    if not ("*" in resources or wanted in resources or
            (a.subresource and f"*/{a.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (a.name != "" and a.name in names)


def _rules_of(ref: Obj, namespace: str, policy: Policy, errors: list[str]
              ) -> tuple[Obj, ...]:
    name = str(ref.get("name", ""))
    if ref.get("kind") == "ClusterRole":
        rules = policy.cluster_roles.get(name)
        if rules is None:
            errors.append(f'clusterrole.{RBAC_GROUP} "{name}" not found')
        return rules or ()
    rules = policy.roles.get((namespace, name))
    if rules is None:
        errors.append(f'role.{RBAC_GROUP} "{name}" not found')
    return rules or ()


def bindings_for(user: UserInfo, namespace: str, policy: Policy
                 ) -> list[tuple[Obj, str]]:
    """(binding, the namespace its Role is looked up in) of every ClusterRoleBinding and,
    for a namespace, RoleBinding there whose subjects include ``user``."""
    scoped = [(b, "") for b in policy.cluster_bindings]
    if namespace:
        scoped += [(b, namespace) for b in policy.bindings.get(namespace, ())]
    return [(b, ns) for b, ns in scoped
            if any(_subject_matches(s, user) for s in b.get("subjects") or [])]


def authorize(a: Attributes, policy: Policy) -> Decision:
    if MASTERS in a.user.groups:
        return Decision(True)
    errors: list[str] = []
    namespace = a.namespace if a.resource_request else ""
    for binding, ns in bindings_for(a.user, namespace, policy):
        for rule in _rules_of(binding.get("roleRef") or {}, ns, policy, errors):
            if rule_allows(rule, a):
                return Decision(True)
    return Decision(False, "RBAC: " + ", ".join(errors) if errors else "")


def forbidden(a: Attributes, reason: str = "") -> ApiError:
    """403 with kube-apiserver's message (staging/.../endpoints/handlers/responsewriters)."""
    user = a.user.name
    if not a.resource_request:
        why = f'User "{user}" cannot {a.verb} path "{a.path}"'
    else:
        res = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        where = (f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope")
        why = f'User "{user}" cannot {a.verb} resource "{res}" in API group "{a.api_group}" {where}'
    if reason:
        why += f": {reason}"
    qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
    if not a.resource_request:
        return ApiError(403, "Forbidden", f"forbidden: {why}")
    if a.name:
        return ApiError(403, "Forbidden", f'{qualified} "{a.name}" is forbidden: {why}',
                        name=a.name, kind=a.resource, group=a.api_group)
    return ApiError(403, "Forbidden", f"{qualified} is forbidden: {why}", kind=a.resource,
                    group=a.api_group)


# ---- bootstrap policy (upstream plugin/pkg/auth/authorizer/rbac/bootstrappolicy) --------

_EVENTS = {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
           "verbs": ["create", "patch", "update"]}
_PUBLIC_INFO = ["/healthz", "/livez", "/readyz", "/version", "/version/"]

BOOTSTRAP_CLUSTER_ROLES: Mapping[str, tuple[Obj, ...]] = {
    # Everything, everywhere: bound to system:masters.
    "cluster-admin": ({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                      {"nonResourceURLs": ["*"], "verbs": ["*"]}),
    # What clients read before anything else: discovery and OpenAPI.
    "system:discovery": ({"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*",
                                              "/healthz", "/livez", "/openapi", "/openapi/*",
                                              "/readyz", "/version", "/version/"],
                          "verbs": ["get"]},),
    # Health and version, for everyone including unauthenticated callers.
    "system:public-info-viewer": ({"nonResourceURLs": _PUBLIC_INFO, "verbs": ["get"]},),
    # What every user may ask about themselves (kubectl auth can-i, auth whoami).
    "system:basic-user": (
        {"apiGroups": ["authorization.k8s.io"],
         "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"],
         "verbs": ["create"]},
    ),
    # kube-proxy: upstream's rules (ClusterRole system:node-proxier).
    "system:node-proxier": (
        {"apiGroups": [""], "resources": ["endpoints", "services"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        _EVENTS,
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["list", "watch"]},
    ),
}

BOOTSTRAP_CLUSTER_ROLE_BINDINGS: Mapping[str, tuple[tuple[str, str], ...]] = {
    # binding (named after its ClusterRole) -> subjects (kind, name)
    "cluster-admin": (("Group", MASTERS),),
    "system:discovery": (("Group", AUTHENTICATED),),
    "system:basic-user": (("Group", AUTHENTICATED),),
    "system:public-info-viewer": (("Group", AUTHENTICATED), ("Group", UNAUTHENTICATED)),
    "system:node-proxier": (("User", "system:kube-proxy"),),
}

_BOOTSTRAP_META = {"labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                   "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}}


def bootstrap_objects() -> list[tuple[str, Obj]]:
    """(resource key, body) of every bootstrap object, roles before bindings."""
    out: list[tuple[str, Obj]] = []
    for name, rules in BOOTSTRAP_CLUSTER_ROLES.items():
        out.append((f"clusterroles.{RBAC_GROUP}", {
            "metadata": {"name": name, **_BOOTSTRAP_META}, "rules": [dict(r) for r in rules]}))
    for name, subjects in BOOTSTRAP_CLUSTER_ROLE_BINDINGS.items():
        out.append((f"clusterrolebindings.{RBAC_GROUP}", {
            "metadata": {"name": name, **_BOOTSTRAP_META},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": k, "name": n} for k, n in subjects]}))
    return out


# ---- requests -> attributes (upstream's RequestInfoFactory) ------------------------------

_COLLECTION_VERBS = {"GET": "list", "HEAD": "list", "POST": "create", "DELETE": "deletecollection"}
_OBJECT_VERBS = {"GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
                 "DELETE": "delete", "POST": "create"}


def request_attributes(user: UserInfo, method: str, path: str, resource: Any | None, *,
                       namespace: str | None = None, name: str | None = None,
                       subresource: str | None = None, watch: bool = False) -> Attributes:
    """What RBAC is asked about one request; ``resource`` is a resources.Resource, or None
    for a non-resource path (discovery, OpenAPI, health, or no route at all)."""
    if resource is None:
        verb = "get" if method == "HEAD" else method.lower()
        return Attributes(user, verb, False, path=path)
    if watch and method in ("GET", "HEAD"):
        verb = "watch"
    elif name is None:
        verb = _COLLECTION_VERBS.get(method, method.lower())
    else:
        verb = _OBJECT_VERBS.get(method, method.lower())
    ns = namespace or ""
    if resource.plural == "namespaces" and resource.group == "" and name:
        ns = name  # a Namespace is "in" itself, so a RoleBinding there can grant it
    return Attributes(user, verb, True, resource.group, resource.plural, subresource or "",
                      ns, name or "")
