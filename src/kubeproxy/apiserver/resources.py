"""The resources this server serves: one literal table, read by every other module.

Discovery documents, URL routing, OpenAPI paths, field selectors and Table printing all
start from a `Resource` row, so adding a resource is adding a row (plus its validation in
strategy.py and its columns in table.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    definition: str  # schema.py short name of the kind's type
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ("status",)
    # Read-only text subresources (pods/log): GET only, not objects, so neither the
    # discovery documents nor the OpenAPI ones list them here.
    text_subresources: tuple[str, ...] = ()
    # Field selector labels beyond metadata.name and metadata.namespace (upstream's
    # per-kind GetAttrs / AddFieldLabelConversionFunc lists).
    field_labels: tuple[str, ...] = ()
    # DELETE answers with the object itself (upstream's ReturnDeletedObject) rather than a
    # Status; the OpenAPI document (and so the generated clients) say which.
    returns_deleted_object: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Resource name qualified by group, as in `kubectl get pods` / errors."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def prefix(self) -> str:
        """URL prefix of the group version: /api/v1 or /apis/<group>/<version>."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


RESOURCES: tuple[Resource, ...] = (
    # Namespaces: cluster-scoped; `default` and the kube-* ones always exist.
    Resource("", "v1", "namespaces", "namespace", "Namespace", False, "core.Namespace",
             short_names=("ns",), field_labels=("status.phase",)),
    # Nodes: cluster-scoped; the lab registers one per node namespace.
    Resource("", "v1", "nodes", "node", "Node", False, "core.Node",
             short_names=("no",), field_labels=("spec.unschedulable",)),
    # Pods: the lab's endpoint controller watches them (spec.nodeName selects a node's pods).
    Resource("", "v1", "pods", "pod", "Pod", True, "core.Pod",
             short_names=("po",), categories=("all",),
             field_labels=("spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                           "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                           "status.podIP", "status.nominatedNodeName"),
             returns_deleted_object=True, text_subresources=("log",)),
    # Services: what kube-proxy programs.
    Resource("", "v1", "services", "service", "Service", True, "core.Service",
             short_names=("svc",), categories=("all",),
             field_labels=("spec.clusterIP", "spec.type"), returns_deleted_object=True),
    # EndpointSlices: written by the endpoint controller, read by kube-proxy.
    Resource("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice",
             True, "disc.EndpointSlice", subresources=(), field_labels=("addressType",)),
    # ConfigMaps: a DaemonSet's configuration (kube-proxy's KubeProxyConfiguration).
    Resource("", "v1", "configmaps", "configmap", "ConfigMap", True, "core.ConfigMap",
             short_names=("cm",), subresources=()),
    # ServiceAccounts: who a DaemonSet's pods are; `token` issues their bound tokens.
    Resource("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", True,
             "core.ServiceAccount", short_names=("sa",), subresources=("token",),
             returns_deleted_object=True),
    # DaemonSets: one pod per node (kube-proxy's deployment); the lab's kubelet runs them.
    Resource("apps", "v1", "daemonsets", "daemonset", "DaemonSet", True, "apps.DaemonSet",
             short_names=("ds",), categories=("all",)),
    # RBAC: what the authorizer (rbac.py) reads on every authenticated request.
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole",
             False, "rbac.ClusterRole", subresources=()),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding",
             "ClusterRoleBinding", False, "rbac.ClusterRoleBinding", subresources=()),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", True, "rbac.Role",
             subresources=()),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding",
             True, "rbac.RoleBinding", subresources=()),
)


@dataclass(frozen=True)
class SubresourceKind:
    """A subresource whose body is not its resource's kind (upstream's "connecter" or
    "creater" subresources), with the verbs it takes."""

    group: str
    version: str
    kind: str
    definition: str
    verbs: tuple[str, ...]


# Subresources other than `status` (which is the resource's own kind, get/patch/update).
SUBRESOURCE_KINDS: Mapping[str, SubresourceKind] = {
    # serviceaccounts/token: POST a TokenRequest, get it back with status.token.
    "token": SubresourceKind("authentication.k8s.io", "v1", "TokenRequest",
                             "authn.TokenRequest", ("create",)),
}


def subresource_verbs(sub: str) -> tuple[str, ...]:
    found = SUBRESOURCE_KINDS.get(sub)
    return found.verbs if found else SUBRESOURCE_VERBS

BY_GROUP_VERSION: Mapping[tuple[str, str], Mapping[str, Resource]] = {
    gv: {r.plural: r for r in RESOURCES if (r.group, r.version) == gv}
    for gv in {(r.group, r.version) for r in RESOURCES}
}
BY_KEY: Mapping[str, Resource] = {r.key: r for r in RESOURCES}
NAMESPACES = BY_KEY["namespaces"]
SERVICES = BY_KEY["services"]
PODS = BY_KEY["pods"]
NODES = BY_KEY["nodes"]
ENDPOINTSLICES = BY_KEY["endpointslices.discovery.k8s.io"]
SERVICEACCOUNTS = BY_KEY["serviceaccounts"]
CLUSTERROLES = BY_KEY["clusterroles.rbac.authorization.k8s.io"]
CLUSTERROLEBINDINGS = BY_KEY["clusterrolebindings.rbac.authorization.k8s.io"]
ROLES = BY_KEY["roles.rbac.authorization.k8s.io"]
ROLEBINDINGS = BY_KEY["rolebindings.rbac.authorization.k8s.io"]

# Group versions in discovery order.
GROUP_VERSIONS: tuple[tuple[str, str], ...] = (
    ("", "v1"), ("apps", "v1"), ("discovery.k8s.io", "v1"), ("rbac.authorization.k8s.io", "v1"))


def lookup(group: str, version: str, plural: str) -> Resource | None:
    return BY_GROUP_VERSION.get((group, version), {}).get(plural)


def field_value(obj: Mapping[str, Any], label: str) -> str:
    """The string a field selector compares against (upstream renders bools as words)."""
    cur: Any = obj
    for part in label.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if cur is None:
        return "false" if label in ("spec.unschedulable", "spec.hostNetwork") else ""
    return str(cur)
