"""Label and field selectors, and URL routing, as tables."""

from __future__ import annotations

import pytest

from kubeproxy.apiserver import resources as r
from kubeproxy.apiserver import routes
from kubeproxy.apiserver.errors import ApiError
from kubeproxy.apiserver.selectors import parse_field_selector, parse_label_selector

LABELS = {"app": "web", "tier": "fe", "n": "5"}

LABEL_CASES = [
    # (selector, matches LABELS)
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app!=web", False),
    ("app=db", False),
    ("missing!=x", True),
    ("app in (web,db)", True),
    ("app notin (web)", False),
    ("app", True),
    ("!app", False),
    ("!missing", True),
    ("app=web,tier=fe", True),
    ("app=web,tier=be", False),
    ("n>3", True),
    ("n<3", False),
    ("example.com/key", False),
]


@pytest.mark.parametrize("selector,expect", LABEL_CASES)
def test_label_selector(selector: str, expect: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expect


def test_empty_label_value_is_a_value() -> None:
    assert parse_label_selector("app=").matches({"app": ""})
    assert not parse_label_selector("app=").matches({"app": "web"})


@pytest.mark.parametrize("selector", ["=web", "app in web", "a b=c", "app=we b", "app in ()"])
def test_bad_label_selector_is_bad_request(selector: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_label_selector(selector)
    assert err.value.code == 400


POD = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"},
       "status": {"phase": "Running"}}

FIELD_CASES = [
    ("metadata.name=p", True),
    ("metadata.name==p", True),
    ("metadata.name!=p", False),
    ("metadata.namespace=ns,spec.nodeName=n1", True),
    ("spec.nodeName=n2", False),
    ("spec.nodeName=", False),
    ("status.phase=Running", True),
    ("spec.hostNetwork=false", True),
]


@pytest.mark.parametrize("selector,expect", FIELD_CASES)
def test_field_selector(selector: str, expect: bool) -> None:
    assert parse_field_selector(selector, r.PODS).matches(POD) is expect


@pytest.mark.parametrize("selector", ["spec.nodeName=n1", "spec.bogus=x", "nonsense"])
def test_unsupported_field_label_is_bad_request(selector: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_field_selector(selector, r.SERVICES)
    assert err.value.code == 400


ROUTES: list[tuple[str, routes.Route | None]] = [
    ("/api", routes.Fixed("api")),
    ("/apis", routes.Fixed("apis")),
    ("/api/v1", routes.Fixed("resources", "", "v1")),
    ("/apis/discovery.k8s.io", routes.Fixed("group", "discovery.k8s.io")),
    ("/apis/discovery.k8s.io/v1", routes.Fixed("resources", "discovery.k8s.io", "v1")),
    ("/version", routes.Fixed("version")),
    ("/healthz", routes.Fixed("health")),
    ("/openapi/v2", routes.Fixed("openapi-v2")),
    ("/openapi/v3/api/v1", routes.Fixed("openapi-v3", extra="api/v1")),
    ("/api/v1/pods", routes.ResourceRoute(r.PODS, None, None)),
    ("/api/v1/namespaces/ns/pods", routes.ResourceRoute(r.PODS, "ns", None)),
    ("/api/v1/namespaces/ns/pods/p", routes.ResourceRoute(r.PODS, "ns", "p")),
    ("/api/v1/namespaces/ns/pods/p/status", routes.ResourceRoute(r.PODS, "ns", "p", "status")),
    ("/api/v1/namespaces/ns/pods/p/log", routes.ResourceRoute(r.PODS, "ns", "p", "log")),
    ("/api/v1/watch/namespaces/ns/services",
     routes.ResourceRoute(r.SERVICES, "ns", None, None, True)),
    ("/api/v1/nodes/n1/status", routes.ResourceRoute(r.NODES, None, "n1", "status")),
    ("/api/v1/namespaces", routes.ResourceRoute(r.NAMESPACES, None, None)),
    ("/api/v1/namespaces/ns", routes.ResourceRoute(r.NAMESPACES, None, "ns")),
    ("/api/v1/namespaces/ns/status", routes.ResourceRoute(r.NAMESPACES, None, "ns", "status")),
    ("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/e",
     routes.ResourceRoute(r.ENDPOINTSLICES, "ns", "e")),
    ("/apis/discovery.k8s.io/v1/endpointslices",
     routes.ResourceRoute(r.ENDPOINTSLICES, None, None)),
    ("/api/v1/configmaps", routes.ResourceRoute(r.BY_KEY["configmaps"], None, None)),
    ("/api/v1/namespaces/ns/serviceaccounts/sa/token",
     routes.ResourceRoute(r.SERVICEACCOUNTS, "ns", "sa", "token")),
    ("/apis/rbac.authorization.k8s.io/v1/clusterroles/system:node-proxier",
     routes.ResourceRoute(r.CLUSTERROLES, None, "system:node-proxier")),
    # not served
    ("/", None),
    ("/api/v1/secrets", None),
    ("/api/v1/namespaces/ns/secrets", None),
    ("/api/v1/namespaces/ns/serviceaccounts/sa/status", None),
    ("/apis/apps/v1/namespaces/ns/deployments", None),
    ("/api/v1/pods/p", None),
    ("/api/v1/namespaces/ns/services/s/log", None),  # only pods have a log
    ("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices/e/status", None),
    ("/api/v1/namespaces/ns/pods/p/status/extra", None),
    ("/apis/apps/v1/deployments", None),
]


@pytest.mark.parametrize("path,expect", ROUTES, ids=[p for p, _ in ROUTES])
def test_routes(path: str, expect: routes.Route | None) -> None:
    assert routes.parse(path) == expect
