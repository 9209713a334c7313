"""Validation and defaults of ConfigMaps, ServiceAccounts, DaemonSets and the RBAC kinds,
straight into the store: a table of named objects -> accepted, or the field upstream names."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.apiserver import resources as r
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.resources import Resource
from kubeproxy.apiserver.store import Store

Obj = dict[str, Any]
G = "rbac.authorization.k8s.io"
CM, SA, DS = r.BY_KEY["configmaps"], r.SERVICEACCOUNTS, r.BY_KEY["daemonsets.apps"]


def ds(labels: Obj | None = None, selector: Obj | None = None, **spec: Any) -> Obj:
    return {"metadata": {"name": "kube-proxy"}, "spec": {
        "selector": {"matchLabels": {"k8s-app": "kube-proxy"}} if selector is None else selector,
        "template": {"metadata": {"labels": labels or {"k8s-app": "kube-proxy"}},
                     "spec": {"containers": [{"name": "kube-proxy", "image": "kp:1"}],
                              **spec}}}}


def crb(ref_kind: str = "ClusterRole", subjects: list[Obj] | None = None, **ref: Any) -> Obj:
    return {"metadata": {"name": "b"},
            "roleRef": {"apiGroup": G, "kind": ref_kind, "name": "view", **ref},
            "subjects": subjects if subjects is not None else
            [{"kind": "ServiceAccount", "name": "kp", "namespace": "kube-system"}]}


@dataclass(frozen=True)
class Case:
    name: str
    res: Resource
    body: Obj
    error: str | None  # a substring of the 422 message; None: accepted


CASES = [
    Case("configmap", CM, {"metadata": {"name": "kube-proxy"},
                           "data": {"config.conf": "mode: nftables", "KEY_2.x": ""}}, None),
    Case("configmap-bad-key", CM, {"metadata": {"name": "c"}, "data": {"a/b": "x"}},
         "data[a/b]: Invalid value: 'a/b': a valid config key must consist of"),
    Case("configmap-key-in-both", CM, {"metadata": {"name": "c"}, "data": {"k": "x"},
                                       "binaryData": {"k": "eA=="}},
         "binaryData[k]: Invalid value: 'k': duplicate of key present in data"),
    Case("configmap-bad-name", CM, {"metadata": {"name": "Kube_Proxy"}},
         "metadata.name: Invalid value: 'Kube_Proxy': a lowercase RFC 1123 subdomain"),
    Case("serviceaccount", SA, {"metadata": {"name": "kube-proxy"}}, None),
    Case("daemonset", DS, ds(), None),
    Case("daemonset-match-expressions", DS, ds(selector={"matchExpressions": [
        {"key": "k8s-app", "operator": "In", "values": ["kube-proxy", "x"]}]}), None),
    Case("daemonset-selector-mismatch", DS, ds(labels={"k8s-app": "other"}),
         "spec.template.metadata.labels: Invalid value: {'k8s-app': 'other'}: `selector` does "
         "not match template `labels`"),
    Case("daemonset-no-selector", DS, {**ds(), "spec": {**ds()["spec"], "selector": None}},
         "spec.selector: Required value"),
    Case("daemonset-empty-selector", DS, ds(selector={}),
         "empty selector is invalid for daemonset"),
    Case("daemonset-restart-never", DS, ds(restartPolicy="Never"),
         'spec.template.spec.restartPolicy: Unsupported value: "Never": supported values: '
         '"Always"'),
    Case("daemonset-no-image", DS, {**ds(), "spec": {**ds()["spec"], "template": {
        "metadata": {"labels": {"k8s-app": "kube-proxy"}},
        "spec": {"containers": [{"name": "c"}]}}}},
         "spec.template.spec.containers[0].image: Required value"),
    Case("daemonset-bad-strategy", DS, {**ds(), "spec": {**ds()["spec"], "updateStrategy": {
        "type": "Recreate"}}}, 'spec.updateStrategy.type: Unsupported value: "Recreate"'),
    Case("clusterrole", r.CLUSTERROLES, {"metadata": {"name": "system:kp"}, "rules": [
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get"]},
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}, None),
    Case("clusterrole-name-with-slash", r.CLUSTERROLES, {"metadata": {"name": "a/b"}},
         "metadata.name: Invalid value: 'a/b': may not contain '/'"),
    Case("rule-without-verbs", r.CLUSTERROLES, {"metadata": {"name": "x"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": []}]},
         "rules[0].verbs: Required value: verbs must contain at least one value"),
    Case("rule-without-groups", r.CLUSTERROLES, {"metadata": {"name": "x"}, "rules": [
        {"resources": ["pods"], "verbs": ["get"]}]},
         "rules[0].apiGroups: Required value: resource rules must supply at least one api "
         "group"),
    Case("rule-both-kinds", r.CLUSTERROLES, {"metadata": {"name": "x"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "nonResourceURLs": ["/x"],
         "verbs": ["get"]}]},
         "rules cannot apply to both regular resources and non-resource URLs"),
    Case("role-non-resource-url", r.ROLES, {"metadata": {"name": "x"}, "rules": [
        {"nonResourceURLs": ["/x"], "verbs": ["get"]}]},
         "namespaced rules cannot apply to non-resource URLs"),
    Case("clusterrolebinding", r.CLUSTERROLEBINDINGS, crb(), None),
    Case("clusterrolebinding-to-role", r.CLUSTERROLEBINDINGS, crb("Role"),
         'roleRef.kind: Unsupported value: "Role": supported values: "ClusterRole"'),
    Case("binding-wrong-group", r.CLUSTERROLEBINDINGS, crb(apiGroup="rbac"),
         'roleRef.apiGroup: Unsupported value: "rbac"'),
    Case("binding-sa-without-namespace", r.CLUSTERROLEBINDINGS,
         crb(subjects=[{"kind": "ServiceAccount", "name": "kp"}]),
         "subjects[0].namespace: Required value"),
    Case("binding-unknown-subject-kind", r.CLUSTERROLEBINDINGS,
         crb(subjects=[{"kind": "Robot", "name": "r"}]),
         'subjects[0].kind: Unsupported value: "Robot"'),
    Case("rolebinding-to-role", r.ROLEBINDINGS, crb("Role"), None),
]


@pytest.fixture
def store() -> Store:
    return Store(clock=lambda: 1_700_000_000.0, rng=random.Random(1))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_create(store: Store, case: Case) -> None:
    namespace = "kube-system" if case.res.namespaced else None
    if case.error is None:
        store.create(case.res, namespace, copy.deepcopy(case.body))
        return
    with pytest.raises(ApiError) as refused:
        store.create(case.res, namespace, copy.deepcopy(case.body))
    assert refused.value.code == 422 and refused.value.reason == "Invalid"
    assert case.error in refused.value.message


def test_daemonset_defaults_and_status(store: Store) -> None:
    created = store.create(DS, "kube-system", {**ds(), "status": {"numberReady": 5}})
    spec = created["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate",
                                      "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert spec["revisionHistoryLimit"] == 10
    pod_spec = spec["template"]["spec"]
    assert (pod_spec["restartPolicy"], pod_spec["dnsPolicy"],
            pod_spec["terminationGracePeriodSeconds"]) == ("Always", "ClusterFirst", 30)
    assert created["status"] == {"currentNumberScheduled": 0, "numberMisscheduled": 0,
                                 "desiredNumberScheduled": 0, "numberReady": 0}
    status = store.update(DS, "kube-system", "kube-proxy",
                          {**created, "status": {**created["status"], "numberReady": 2}},
                          subresource="status")
    assert status["status"]["numberReady"] == 2 and status["metadata"]["generation"] == 1
    changed = copy.deepcopy(status)
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "kp:2"
    updated = store.update(DS, "kube-system", "kube-proxy", changed)
    assert updated["metadata"]["generation"] == 2 and updated["status"]["numberReady"] == 2


def test_daemonset_selector_is_immutable(store: Store) -> None:
    created = store.create(DS, "kube-system", ds())
    changed = copy.deepcopy(created)
    changed["spec"]["selector"] = {"matchLabels": {"k8s-app": "kube-proxy", "x": "y"}}
    changed["spec"]["template"]["metadata"]["labels"]["x"] = "y"
    with pytest.raises(ApiError) as refused:
        store.update(DS, "kube-system", "kube-proxy", changed)
    assert "spec.selector: Invalid value" in refused.value.message
    assert "field is immutable" in refused.value.message


def test_binding_role_ref_is_immutable_subjects_are_not(store: Store) -> None:
    created = store.create(r.CLUSTERROLEBINDINGS, None, crb())
    assert created["subjects"][0]["apiGroup"] == ""  # defaulted for a ServiceAccount
    more = copy.deepcopy(created)
    more["subjects"].append({"kind": "User", "name": "alice"})
    updated = store.update(r.CLUSTERROLEBINDINGS, None, "b", more)
    assert updated["subjects"][1]["apiGroup"] == G  # defaulted for a User
    changed = copy.deepcopy(updated)
    changed["roleRef"]["name"] = "cluster-admin"
    with pytest.raises(ApiError) as refused:
        store.update(r.CLUSTERROLEBINDINGS, None, "b", changed)
    assert "roleRef: Invalid value" in refused.value.message
    assert "cannot change roleRef" in refused.value.message


def test_immutable_configmap(store: Store) -> None:
    created = store.create(CM, "default", {"metadata": {"name": "c"}, "data": {"k": "v"},
                                           "immutable": True})
    for change in ({"data": {"k": "w"}}, {"immutable": False}):
        with pytest.raises(ApiError) as refused:
            store.update(CM, "default", "c", {**created, **change})
        assert "Forbidden: field is immutable when `immutable` is set" in refused.value.message
    labelled = copy.deepcopy(created)
    labelled["metadata"]["labels"] = {"a": "b"}
    store.update(CM, "default", "c", labelled)  # metadata may still change


def test_bootstrap_policy_exists_from_the_start(store: Store) -> None:
    proxier = store.get(r.CLUSTERROLES, None, "system:node-proxier")
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
            "verbs": ["list", "watch"]} in proxier["rules"]
    binding = store.get(r.CLUSTERROLEBINDINGS, None, "system:node-proxier")
    assert binding["subjects"] == [{"apiGroup": G, "kind": "User", "name": "system:kube-proxy"}]
    admin = store.get(r.CLUSTERROLEBINDINGS, None, "cluster-admin")
    assert admin["subjects"] == [{"apiGroup": G, "kind": "Group", "name": "system:masters"}]
    assert store.get(r.NAMESPACES, None, "kube-system")
