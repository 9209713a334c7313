"""RBAC beyond the authorizer: default ServiceAccounts, `kubectl auth can-i`
(SelfSubjectAccessReview), escalation prevention on RBAC writes, ClusterRole aggregation.

The store's controllers' work (default ServiceAccount, aggregation) is checked on the
pure store; escalation and reviews on the secure server over real sockets, as a
ServiceAccount with a bearer token (the admin kubeconfig is system:masters, which may do
anything), and `kubectl auth can-i` with the real kubectl binaries.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from kubeproxy.apiserver import resources as r
from kubeproxy.apiserver.errors import ApiError as StoreError
from kubeproxy.apiserver.escalation import check_write, compact_string, uncovered
from kubeproxy.apiserver.rbac import Policy, UserInfo
from kubeproxy.apiserver.server import KubeconfigUser, kubeconfig_text
from kubeproxy.apiserver.store import INITIAL_NAMESPACES, Store
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.sources.kubeconfig import ClusterAccess
from tests.api.conftest import Kubectl, Running, unique
from tests.fakes import FakeClock

RBAC = "rbac.authorization.k8s.io"
Obj = dict[str, Any]


def rule(groups: list[str], res: list[str], verbs: list[str], **extra: Any) -> Obj:
    return {"apiGroups": groups, "resources": res, "verbs": verbs, **extra}


# ---- the default ServiceAccount (the ServiceAccount controller) ---------------------------


def store() -> Store:
    return Store(clock=FakeClock())


def default_sa(s: Store, namespace: str) -> Obj | None:
    return s.find(r.SERVICEACCOUNTS, namespace, "default")


def test_every_namespace_has_a_default_service_account() -> None:
    s = store()
    assert all(default_sa(s, ns) is not None for ns in INITIAL_NAMESPACES)
    s.create(r.NAMESPACES, None, {"metadata": {"name": "team-a"}})
    assert default_sa(s, "team-a") is not None, "a namespace created later gets one"
    s.create(r.NAMESPACES, None, {"metadata": {"name": "dry"}}, dry_run=True)
    assert default_sa(s, "dry") is None
    first = default_sa(s, "team-a")
    assert first is not None
    uid = first["metadata"]["uid"]
    s.delete(r.SERVICEACCOUNTS, "team-a", "default")
    again = default_sa(s, "team-a")
    assert again is not None and again["metadata"]["uid"] != uid, "put back when deleted"
    s.create(r.SERVICEACCOUNTS, "team-a", {"metadata": {"name": "other"}})
    s.delete(r.SERVICEACCOUNTS, "team-a", "other")
    s.delete(r.NAMESPACES, None, "team-a")
    assert default_sa(s, "team-a") is None, "not re-made while its namespace goes"
    assert s.list(r.SERVICEACCOUNTS, "team-a").items == []


def test_a_restored_snapshot_gets_its_default_service_accounts() -> None:
    s = store()
    s.create(r.NAMESPACES, None, {"metadata": {"name": "team-b"}})
    snap = s.dump()
    snap["objects"][r.SERVICEACCOUNTS.key] = []  # a snapshot from before the controller
    again = Store.restore(snap, clock=FakeClock())
    assert default_sa(again, "team-b") is not None and default_sa(again, "default")


# ---- ClusterRole aggregation -------------------------------------------------------------


def cluster_role(name: str, rules: list[Obj], labels: dict[str, str] | None = None,
                 selectors: list[Obj] | None = None) -> Obj:
    obj: Obj = {"metadata": {"name": name, "labels": labels or {}}, "rules": rules}
    if selectors is not None:
        obj["aggregationRule"] = {"clusterRoleSelectors": selectors}
    return obj


PODS_GET = rule([""], ["pods"], ["get"])
SVC_LIST = rule([""], ["services"], ["list"])
TO_MONITOR = {"example.com/aggregate-to-monitor": "true"}


def rules_of(s: Store, name: str) -> list[Obj]:
    found = s.find(r.CLUSTERROLES, None, name)
    assert found is not None
    return list(found.get("rules") or [])


def test_aggregated_cluster_role_follows_the_roles_it_selects() -> None:
    s = store()
    s.create(r.CLUSTERROLES, None, cluster_role(
        "monitor", [], selectors=[{"matchLabels": TO_MONITOR}]))
    assert rules_of(s, "monitor") == []
    s.create(r.CLUSTERROLES, None, cluster_role("b-pods", [PODS_GET], TO_MONITOR))
    s.create(r.CLUSTERROLES, None, cluster_role("a-svc", [SVC_LIST, PODS_GET], TO_MONITOR))
    s.create(r.CLUSTERROLES, None, cluster_role("unlabelled", [rule(["*"], ["*"], ["*"])]))
    assert rules_of(s, "monitor") == [SVC_LIST, PODS_GET], "by name, without duplicates"
    s.update(r.CLUSTERROLES, None, "a-svc", cluster_role("a-svc", [SVC_LIST]))  # unlabelled
    assert rules_of(s, "monitor") == [PODS_GET]
    s.delete(r.CLUSTERROLES, None, "b-pods")
    assert rules_of(s, "monitor") == []
    # Rules written into an aggregated role by hand are replaced, as the controller does.
    s.update(r.CLUSTERROLES, None, "monitor", cluster_role(
        "monitor", [rule(["*"], ["*"], ["*"])], selectors=[{"matchLabels": TO_MONITOR}]))
    assert rules_of(s, "monitor") == []


def test_aggregation_chains_and_expressions() -> None:
    s = store()
    s.create(r.CLUSTERROLES, None, cluster_role(
        "outer", [], selectors=[{"matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["inner"]}]}]))
    s.create(r.CLUSTERROLES, None, cluster_role(
        "inner", [], {"tier": "inner"}, selectors=[{"matchLabels": TO_MONITOR}]))
    s.create(r.CLUSTERROLES, None, cluster_role("leaf", [PODS_GET], TO_MONITOR))
    assert rules_of(s, "inner") == [PODS_GET]
    assert rules_of(s, "outer") == [PODS_GET], "an aggregated role aggregated again"


# ---- escalation: the pure check ------------------------------------------------------------


@pytest.mark.parametrize(("held", "wanted", "missing"), [
    ([rule([""], ["pods"], ["get", "list"])], [rule([""], ["pods"], ["get"])], []),
    ([rule([""], ["pods"], ["get"])], [rule([""], ["pods"], ["get", "delete"])],
     ['{APIGroups:[""], Resources:["pods"], Verbs:["delete"]}']),
    ([rule(["*"], ["*"], ["*"])], [rule(["apps"], ["daemonsets"], ["create"])], []),
    ([rule([""], ["*/status"], ["get"])], [rule([""], ["pods/status"], ["get"])], []),
    ([rule([""], ["pods"], ["get"], resourceNames=["a"])],
     [rule([""], ["pods"], ["get"])],
     ['{APIGroups:[""], Resources:["pods"], Verbs:["get"]}']),  # only pod a is held
    ([rule([""], ["pods"], ["get"])], [rule([""], ["pods"], ["get"], resourceNames=["a"])],
     []),
    ([{"nonResourceURLs": ["/metrics*"], "verbs": ["get"]}],
     [{"nonResourceURLs": ["/metrics/x"], "verbs": ["get"]}], []),
    ([rule(["*"], ["*"], ["*"])], [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}],
     ['{NonResourceURLs:["/metrics"], Verbs:["get"]}']),
])
def test_covers(held: list[Obj], wanted: list[Obj], missing: list[str]) -> None:
    assert sorted(compact_string(m) for m in uncovered(held, wanted)) == missing


def policy_holding(user: str, rules: list[Obj], namespace: str = "ns1") -> Policy:
    """``user`` bound to a Role of ``rules`` in ``namespace``; cluster-admin exists."""
    return Policy.of(
        [{"metadata": {"name": "cluster-admin"}, "rules": [rule(["*"], ["*"], ["*"])]}],
        [{"metadata": {"name": "mine", "namespace": namespace}, "rules": rules}], [],
        [{"metadata": {"name": "mine", "namespace": namespace},
          "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "mine"},
          "subjects": [{"kind": "User", "name": user}]}])


BOB = UserInfo("bob", groups=("system:authenticated",))


@pytest.mark.parametrize(("plural", "obj", "held", "allowed"), [
    ("roles", {"rules": [PODS_GET]}, [PODS_GET], True),
    ("roles", {"rules": [SVC_LIST]}, [PODS_GET], False),
    ("roles", {"rules": [SVC_LIST]}, [PODS_GET, rule([RBAC], ["roles"], ["escalate"])], True),
    ("rolebindings", {"roleRef": {"kind": "Role", "name": "mine"}}, [PODS_GET], True),
    ("rolebindings", {"roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}},
     [PODS_GET], False),
    ("rolebindings", {"roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}},
     [rule([RBAC], ["clusterroles"], ["bind"], resourceNames=["cluster-admin"])], True),
    ("rolebindings", {"roleRef": {"kind": "ClusterRole", "name": "cluster-admin"}},
     [rule([RBAC], ["clusterroles"], ["bind"], resourceNames=["view"])], False),
])
def test_check_write(plural: str, obj: Obj, held: list[Obj], allowed: bool) -> None:
    policy = policy_holding("bob", held)
    body = {"metadata": {"name": "new", "namespace": "ns1"}, **obj}
    if allowed:
        check_write(BOB, plural, "ns1", body, None, policy)
    else:
        with pytest.raises(StoreError, match="not currently held") as err:
            check_write(BOB, plural, "ns1", body, None, policy)
        assert err.value.code == 403
    masters = UserInfo("root", groups=("system:masters",))
    check_write(masters, plural, "ns1", body, None, Policy())  # always


# ---- over the secure server ------------------------------------------------------------------


@dataclass
class Delegate:
    """A ServiceAccount allowed to write Roles and RoleBindings in its namespace, and to
    read pods there; nothing else."""

    namespace: str
    name: str
    token: str
    api: LabApi


def ca_file(api: Running) -> str:
    return str(api.kubeconfig.parent / "pki" / "ca.crt")


@pytest.fixture
def admin(secure_api: Running) -> LabApi:
    return LabApi.from_kubeconfig(secure_api.kubeconfig)


@pytest.fixture
def delegate(secure_api: Running, admin: LabApi) -> Iterator[Delegate]:
    ns, name = unique("team"), unique("delegate")
    admin.create({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns}})
    admin.create({"kind": "ServiceAccount", "apiVersion": "v1",
                  "metadata": {"name": name, "namespace": ns}})
    admin.create({"kind": "Role", "apiVersion": f"{RBAC}/v1",
                  "metadata": {"name": "delegate", "namespace": ns},
                  "rules": [rule([RBAC], ["roles", "rolebindings"],
                                 ["get", "create", "update", "patch"]),
                            rule([""], ["pods"], ["get", "list"])]})
    admin.create({"kind": "RoleBinding", "apiVersion": f"{RBAC}/v1",
                  "metadata": {"name": "delegate", "namespace": ns},
                  "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": "delegate"},
                  "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]})
    token = admin.request_token(ns, name).token
    api = LabApi(ClusterAccess(secure_api.url, ca_file=ca_file(secure_api), token=token))
    yield Delegate(ns, name, token, api)
    admin.delete("Namespace", None, ns)


def role(ns: str, name: str, rules: list[Obj]) -> Obj:
    return {"kind": "Role", "apiVersion": f"{RBAC}/v1",
            "metadata": {"name": name, "namespace": ns}, "rules": rules}


def binding(ns: str, name: str, kind: str, ref: str, sa: str) -> Obj:
    return {"kind": "RoleBinding", "apiVersion": f"{RBAC}/v1",
            "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": RBAC, "kind": kind, "name": ref},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}


def merge_patch(d: Delegate, path: str, doc: Obj) -> tuple[int, str]:
    """PATCH (merge patch) as the delegate: (status, body)."""
    url = urlsplit(d.api.server)
    tls = ssl.create_default_context(cafile=d.api.access.ca_file)
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=tls, timeout=10)
    try:
        conn.request("PATCH", path, body=json.dumps(doc), headers={
            "Authorization": f"Bearer {d.token}",
            "Content-Type": "application/merge-patch+json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def refused(call: Any) -> LabApiError:
    with pytest.raises(LabApiError) as err:
        call()
    assert err.value.code == 403, err.value
    return err.value


def test_a_user_cannot_grant_what_it_does_not_hold(delegate: Delegate, admin: LabApi) -> None:
    d, ns = delegate, delegate.namespace
    d.api.create(role(ns, "pod-reader", [rule([""], ["pods"], ["get"])]))  # held: fine
    err = refused(lambda: d.api.create(role(ns, "secrets", [rule([""], ["secrets"],
                                                                 ["get"])])))
    user = f"system:serviceaccount:{ns}:{d.name}"
    assert (f'roles.rbac.authorization.k8s.io "secrets" is forbidden: user "{user}" '
            f'(groups=["system:serviceaccounts" "system:serviceaccounts:{ns}" '
            f'"system:authenticated"]) is attempting to grant RBAC permissions not '
            f'currently held:\n{{APIGroups:[""], Resources:["secrets"], Verbs:["get"]}}'
            ) in str(err)
    # Updating a role, by PUT or by PATCH, is checked the same way.
    grown = role(ns, "pod-reader", [rule([""], ["pods", "secrets"], ["get"])])
    refused(lambda: d.api.update(grown))
    patched = merge_patch(d, f"/apis/{RBAC}/v1/namespaces/{ns}/roles/pod-reader",
                          {"rules": grown["rules"]})
    assert patched[0] == 403 and "not currently held" in patched[1], patched
    # Binding: to a role whose rules it holds, yes; to cluster-admin, no.
    d.api.create(binding(ns, "readers", "Role", "pod-reader", d.name))
    refused(lambda: d.api.create(binding(ns, "admins", "ClusterRole", "cluster-admin",
                                         d.name)))
    assert admin.get("Role", ns, "pod-reader")["rules"] == [rule([""], ["pods"], ["get"])]


def test_escalate_and_bind_verbs_lift_the_check(delegate: Delegate, admin: LabApi) -> None:
    d, ns = delegate, delegate.namespace
    admin.create(role(ns, "lift", [rule([RBAC], ["roles"], ["escalate"]),
                                   rule([RBAC], ["clusterroles"], ["bind"],
                                        resourceNames=["cluster-admin"])]))
    admin.create(binding(ns, "lift", "Role", "lift", d.name))
    d.api.create(role(ns, "secrets", [rule([""], ["secrets"], ["get"])]))
    d.api.create(binding(ns, "admins", "ClusterRole", "cluster-admin", d.name))
    assert admin.get("RoleBinding", ns, "admins")["roleRef"]["name"] == "cluster-admin"


def test_aggregation_rule_needs_full_authority(secure_api: Running, admin: LabApi) -> None:
    name = unique("roles-writer")
    admin.create({"kind": "ServiceAccount", "apiVersion": "v1",
                  "metadata": {"name": name, "namespace": "kube-system"}})
    admin.create({"kind": "ClusterRole", "apiVersion": f"{RBAC}/v1",
                  "metadata": {"name": name},
                  "rules": [rule([RBAC], ["clusterroles"], ["create", "escalate"])]})
    admin.create({"kind": "ClusterRoleBinding", "apiVersion": f"{RBAC}/v1",
                  "metadata": {"name": name},
                  "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name},
                  "subjects": [{"kind": "ServiceAccount", "name": name,
                                "namespace": "kube-system"}]})
    try:
        token = admin.request_token("kube-system", name).token
        api = LabApi(ClusterAccess(secure_api.url, ca_file=ca_file(secure_api), token=token))
        agg_name, part_name = unique("agg"), unique("part")
        agg: Obj = {"kind": "ClusterRole", "apiVersion": f"{RBAC}/v1",
                    "metadata": {"name": agg_name},
                    "aggregationRule": {"clusterRoleSelectors": [
                        {"matchLabels": TO_MONITOR}]}}
        err = refused(lambda: api.create(agg))
        assert "must have cluster-admin privileges to use the aggregationRule" in str(err)
        api.create({**agg, "aggregationRule": None, "rules": [SVC_LIST]})  # escalate: fine
        admin.delete("ClusterRole", None, agg_name)
        # The admin may; the role then holds the rules of the roles it selects.
        admin.create(agg)
        part: Obj = {"kind": "ClusterRole", "apiVersion": f"{RBAC}/v1",
                     "metadata": {"name": part_name, "labels": TO_MONITOR},
                     "rules": [PODS_GET]}
        admin.create(part)
        assert admin.get("ClusterRole", None, agg_name)["rules"] == [PODS_GET]
        admin.delete("ClusterRole", None, part_name)
        admin.delete("ClusterRole", None, agg_name)
    finally:
        admin.delete("ClusterRoleBinding", None, name)
        admin.delete("ClusterRole", None, name)
        admin.delete("ServiceAccount", "kube-system", name)


# ---- kubectl auth can-i, and the default ServiceAccount through kubectl -------------------


def as_token(k: Kubectl, api: Running, tmp_path: Path, token: str, *args: str
             ) -> subprocess.CompletedProcess[str]:
    ca = Path(ca_file(api)).read_text()
    config = tmp_path / "token.kubeconfig"
    config.write_text(kubeconfig_text(api.url, ca_pem=ca, user=KubeconfigUser(token=token)))
    return subprocess.run([str(k.binary), f"--kubeconfig={config}", *args],  # type: ignore[attr-defined]
                          capture_output=True, text=True, timeout=60, check=False)


def test_kubectl_auth_can_i(secure_kubectl: Kubectl, secure_api: Running, delegate: Delegate,
                            tmp_path: Path) -> None:
    k, ns = secure_kubectl, delegate.namespace
    yes = k("auth", "can-i", "create", "daemonsets.apps", "-n", "kube-system")
    assert yes.stdout.strip() == "yes"  # the admin: system:masters
    cases = [  # (kubectl auth can-i arguments, answer)
        (("get", "pods", "-n", ns), "yes"),
        (("list", "pods", "-n", ns), "yes"),
        (("delete", "pods", "-n", ns), "no"),
        (("get", "pods", "-n", "default"), "no"),  # a RoleBinding is one namespace's
        (("list", "endpointslices.discovery.k8s.io", "-A"), "no"),
        (("create", "roles.rbac.authorization.k8s.io", "-n", ns), "yes"),
        (("get", "/healthz"), "yes"),  # system:public-info-viewer
        (("get", "/metrics"), "no"),
    ]
    for args, want in cases:
        got = as_token(k, secure_api, tmp_path, delegate.token, "auth", "can-i", *args)
        assert got.stdout.strip() == want, (args, got.stdout, got.stderr)
        assert got.returncode == (0 if want == "yes" else 1), (args, got.stderr)


def test_kubectl_sees_the_default_service_account(secure_kubectl: Kubectl,
                                                  admin: LabApi) -> None:
    ns = unique("fresh")
    secure_kubectl("create", "namespace", ns)
    try:
        got = secure_kubectl("get", "serviceaccount", "default", "-n", ns, "-o", "name")
        assert got.stdout.strip() == "serviceaccount/default"
        token = secure_kubectl("create", "token", "default", "-n", ns).stdout.strip()
        assert token.count(".") == 2  # a JWT for the default ServiceAccount
    finally:
        admin.delete("Namespace", None, ns)
