"""The RBAC authorizer as a table: requests x bindings -> allowed / denied, plus the 403
message kube-apiserver writes and the request -> attributes mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.apiserver import rbac, resources
from kubeproxy.apiserver.rbac import Attributes, Policy, UserInfo, authorize

Obj = dict[str, Any]
G = rbac.RBAC_GROUP

KUBE_PROXY_SA = UserInfo("system:serviceaccount:kube-system:kube-proxy", "uid-1",
                         ("system:serviceaccounts", "system:serviceaccounts:kube-system",
                          rbac.AUTHENTICATED))
ALICE = UserInfo("alice", groups=("devs", rbac.AUTHENTICATED))
ADMIN = UserInfo("kubernetes-admin", groups=(rbac.MASTERS, rbac.AUTHENTICATED))
PROXY_USER = UserInfo("system:kube-proxy", groups=(rbac.AUTHENTICATED,))


def crb(name: str, role: str, *subjects: Obj, kind: str = "ClusterRole") -> Obj:
    return {"metadata": {"name": name}, "roleRef": {"apiGroup": G, "kind": kind, "name": role},
            "subjects": list(subjects)}


def rb(ns: str, name: str, role: str, *subjects: Obj, kind: str = "Role") -> Obj:
    b = crb(name, role, *subjects, kind=kind)
    b["metadata"]["namespace"] = ns
    return b


def user(name: str) -> Obj:
    return {"kind": "User", "apiGroup": G, "name": name}


def group(name: str) -> Obj:
    return {"kind": "Group", "apiGroup": G, "name": name}


def sa(ns: str, name: str) -> Obj:
    return {"kind": "ServiceAccount", "namespace": ns, "name": name}


def role(name: str, *rules: Obj, ns: str = "") -> Obj:
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"metadata": meta, "rules": list(rules)}


def rule(verbs: str, groups: str, res: str, names: str = "") -> Obj:
    out: Obj = {"verbs": verbs.split(","), "apiGroups": groups.split(",") if groups != "-"
                else [""], "resources": res.split(",")}
    if names:
        out["resourceNames"] = names.split(",")
    return out


BOOT_ROLES = [role(n, *rules) for n, rules in rbac.BOOTSTRAP_CLUSTER_ROLES.items()]
BOOT_BINDINGS = [crb(n, n, *[{"kind": k, "apiGroup": G, "name": s} for k, s in subjects])
                 for n, subjects in rbac.BOOTSTRAP_CLUSTER_ROLE_BINDINGS.items()]
NO_SLICES = role("proxier-without-slices", rule("list,watch", "-", "services,endpoints"),
                 rule("get,list,watch", "-", "nodes"))
POD_STATUS = role("pod-status", rule("get,update,patch", "-", "pods/status"), ns="team")
ONE_CM = role("one-configmap", rule("get", "-", "configmaps", "settings"), ns="team")
STAR_STATUS = role("any-status", rule("update", "*", "*/status"))


def policy(*bindings: Obj, roles: tuple[Obj, ...] = ()) -> Policy:
    cluster = [*BOOT_ROLES, NO_SLICES, STAR_STATUS, *[r for r in roles
                                                      if "namespace" not in r["metadata"]]]
    ns_roles = [POD_STATUS, ONE_CM, *[r for r in roles if "namespace" in r["metadata"]]]
    return Policy.of(cluster, ns_roles, [*BOOT_BINDINGS, *[b for b in bindings if
                                                           "namespace" not in b["metadata"]]],
                     [b for b in bindings if "namespace" in b["metadata"]])


def res(u: UserInfo, verb: str, group_: str, resource: str, ns: str = "", name: str = "",
        sub: str = "") -> Attributes:
    return Attributes(u, verb, True, group_, resource, sub, ns, name)


def path(u: UserInfo, p: str, verb: str = "get") -> Attributes:
    return Attributes(u, verb, False, path=p)


PROXIER_SA = crb("kubeadm:node-proxier", "system:node-proxier", sa("kube-system", "kube-proxy"))
NO_SLICES_SA = crb("kp", "proxier-without-slices", sa("kube-system", "kube-proxy"))


@dataclass(frozen=True)
class Case:
    name: str
    attrs: Attributes
    bindings: tuple[Obj, ...]
    allowed: bool


CASES = [
    # kube-proxy's service account bound to system:node-proxier (kubeadm's binding)
    Case("sa-node-proxier-lists-slices", res(KUBE_PROXY_SA, "list", "discovery.k8s.io",
                                             "endpointslices"), (PROXIER_SA,), True),
    Case("sa-node-proxier-watches-slices", res(KUBE_PROXY_SA, "watch", "discovery.k8s.io",
                                               "endpointslices"), (PROXIER_SA,), True),
    Case("sa-node-proxier-gets-node", res(KUBE_PROXY_SA, "get", "", "nodes", name="n1"),
         (PROXIER_SA,), True),
    Case("sa-node-proxier-creates-events.k8s.io-events",
         res(KUBE_PROXY_SA, "create", "events.k8s.io", "events", "default"), (PROXIER_SA,), True),
    Case("sa-node-proxier-cannot-get-service", res(KUBE_PROXY_SA, "get", "", "services",
                                                   "default", "web"), (PROXIER_SA,), False),
    Case("sa-node-proxier-cannot-delete-slices",
         res(KUBE_PROXY_SA, "delete", "discovery.k8s.io", "endpointslices", "default", "s"),
         (PROXIER_SA,), False),
    Case("sa-node-proxier-cannot-read-pods", res(KUBE_PROXY_SA, "list", "", "pods"),
         (PROXIER_SA,), False),
    Case("sa-without-binding-denied", res(KUBE_PROXY_SA, "list", "", "services"), (), False),
    Case("sa-binding-lacks-endpointslices", res(KUBE_PROXY_SA, "list", "discovery.k8s.io",
                                                "endpointslices"), (NO_SLICES_SA,), False),
    Case("sa-binding-lacks-endpointslices-still-lists-services",
         res(KUBE_PROXY_SA, "list", "", "services"), (NO_SLICES_SA,), True),
    Case("sa-binding-of-other-namespace-no-match",
         res(KUBE_PROXY_SA, "list", "", "services"),
         (crb("x", "system:node-proxier", sa("default", "kube-proxy")),), False),
    # the bootstrap binding: user system:kube-proxy (the lab's proxies)
    Case("bootstrap-user-kube-proxy-lists-services", res(PROXY_USER, "list", "", "services"),
         (), True),
    Case("bootstrap-user-kube-proxy-cannot-create-services",
         res(PROXY_USER, "create", "", "services", "default"), (), False),
    # system:masters and cluster-admin
    Case("masters-anything", res(ADMIN, "delete", "apps", "daemonsets", "kube-system", "x"),
         (), True),
    Case("masters-any-path", path(ADMIN, "/metrics"), (), True),
    Case("cluster-admin-by-user-binding", res(ALICE, "deletecollection", "", "pods", "t"),
         (crb("alice-admin", "cluster-admin", user("alice")),), True),
    Case("cluster-admin-by-group-binding", res(ALICE, "create", G, "clusterroles"),
         (crb("devs-admin", "cluster-admin", group("devs")),), True),
    # RoleBindings: namespaced, to a Role or a ClusterRole
    Case("rolebinding-to-clusterrole-in-its-namespace", res(ALICE, "list", "", "pods", "team"),
         (rb("team", "view", "cluster-admin", user("alice"), kind="ClusterRole"),), True),
    Case("rolebinding-to-clusterrole-not-elsewhere", res(ALICE, "list", "", "pods", "other"),
         (rb("team", "view", "cluster-admin", user("alice"), kind="ClusterRole"),), False),
    Case("rolebinding-not-cluster-wide", res(ALICE, "list", "", "pods"),
         (rb("team", "view", "cluster-admin", user("alice"), kind="ClusterRole"),), False),
    Case("rolebinding-not-for-cluster-scoped-kinds", res(ALICE, "list", "", "nodes"),
         (rb("team", "view", "cluster-admin", user("alice"), kind="ClusterRole"),), False),
    Case("namespace-object-is-in-itself", res(ALICE, "get", "", "namespaces", "team", "team"),
         (rb("team", "view", "cluster-admin", user("alice"), kind="ClusterRole"),), True),
    # subresources
    Case("subresource-rule-allows-status", res(ALICE, "update", "", "pods", "team", "p",
                                               "status"),
         (rb("team", "st", "pod-status", user("alice")),), True),
    Case("subresource-rule-not-the-pod", res(ALICE, "update", "", "pods", "team", "p"),
         (rb("team", "st", "pod-status", user("alice")),), False),
    Case("star-slash-status", res(ALICE, "update", "apps", "daemonsets", "x", "d", "status"),
         (crb("st", "any-status", user("alice")),), True),
    Case("star-slash-status-not-main", res(ALICE, "update", "apps", "daemonsets", "x", "d"),
         (crb("st", "any-status", user("alice")),), False),
    Case("pods-rule-not-token-subresource",
         res(ALICE, "create", "", "serviceaccounts", "team", "sa", "token"),
         (rb("team", "st", "pod-status", user("alice")),), False),
    # resourceNames
    Case("resource-name-matches", res(ALICE, "get", "", "configmaps", "team", "settings"),
         (rb("team", "cm", "one-configmap", user("alice")),), True),
    Case("resource-name-other", res(ALICE, "get", "", "configmaps", "team", "secrets"),
         (rb("team", "cm", "one-configmap", user("alice")),), False),
    Case("resource-name-never-lists", res(ALICE, "list", "", "configmaps", "team"),
         (rb("team", "cm", "one-configmap", user("alice")),), False),
    # a binding to a role that does not exist grants nothing
    Case("missing-role", res(ALICE, "list", "", "pods", "team"),
         (rb("team", "ghost", "no-such-role", user("alice")),), False),
    # non-resource paths
    Case("authenticated-discovery", path(ALICE, "/apis/apps/v1"), (), True),
    Case("authenticated-openapi", path(ALICE, "/openapi/v3/api/v1"), (), True),
    Case("authenticated-not-metrics", path(ALICE, "/metrics"), (), False),
    Case("anonymous-healthz", path(rbac.ANONYMOUS, "/healthz"), (), True),
    Case("anonymous-version", path(rbac.ANONYMOUS, "/version"), (), True),
    Case("anonymous-not-discovery", path(rbac.ANONYMOUS, "/api"), (), False),
    Case("anonymous-not-resources", res(rbac.ANONYMOUS, "list", "", "pods"), (), False),
    Case("post-to-discovery-denied", path(ALICE, "/api", "post"), (), False),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_authorize(case: Case) -> None:
    assert authorize(case.attrs, policy(*case.bindings)).allowed is case.allowed


def test_missing_role_is_the_reason() -> None:
    decision = authorize(res(ALICE, "list", "", "pods", "team"),
                         policy(rb("team", "ghost", "no-such-role", user("alice"))))
    assert decision == rbac.Decision(False, f'RBAC: role.{G} "no-such-role" not found')


MESSAGES = [
    (res(KUBE_PROXY_SA, "list", "discovery.k8s.io", "endpointslices"),
     'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:kube-system:'
     'kube-proxy" cannot list resource "endpointslices" in API group "discovery.k8s.io" at '
     "the cluster scope"),
    (res(ALICE, "get", "", "pods", "team", "web", "status"),
     'pods "web" is forbidden: User "alice" cannot get resource "pods/status" in API group "" '
     'in the namespace "team"'),
    (path(ALICE, "/metrics"), 'forbidden: User "alice" cannot get path "/metrics"'),
]


@pytest.mark.parametrize(("attrs", "message"), MESSAGES, ids=["cluster", "named-sub", "path"])
def test_forbidden_message_is_upstreams(attrs: Attributes, message: str) -> None:
    err = rbac.forbidden(attrs)
    assert (err.code, err.reason, err.message) == (403, "Forbidden", message)
    if attrs.resource_request:
        details = err.to_status()["details"]
        assert details["kind"] == attrs.resource and details.get("group", "") == attrs.api_group


PODS, SVC = resources.PODS, resources.SERVICES
ATTRIBUTE_CASES = [
    ("GET collection", ("GET", None, False), "list"),
    ("GET watch=true", ("GET", None, True), "watch"),
    ("GET object", ("GET", "p", False), "get"),
    ("HEAD object", ("HEAD", "p", False), "get"),
    ("POST", ("POST", None, False), "create"),
    ("PUT", ("PUT", "p", False), "update"),
    ("PATCH", ("PATCH", "p", False), "patch"),
    ("DELETE object", ("DELETE", "p", False), "delete"),
    ("DELETE collection", ("DELETE", None, False), "deletecollection"),
    ("watch one object", ("GET", "p", True), "watch"),
]


@pytest.mark.parametrize(("name", "request_", "verb"), ATTRIBUTE_CASES,
                         ids=[c[0] for c in ATTRIBUTE_CASES])
def test_request_verbs(name: str, request_: tuple[str, str | None, bool], verb: str) -> None:
    method, obj, watch = request_
    attrs = rbac.request_attributes(ALICE, method, "/x", PODS, namespace="ns", name=obj,
                                    watch=watch)
    assert (attrs.verb, attrs.resource, attrs.namespace, attrs.resource_request) == \
        (verb, "pods", "ns", True)


def test_non_resource_attributes() -> None:
    attrs = rbac.request_attributes(ALICE, "HEAD", "/healthz", None)
    assert attrs == Attributes(ALICE, "get", False, path="/healthz")
