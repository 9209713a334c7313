"""Authentication and TokenRequest, straight into `handlers.Api` with auth on (no sockets,
a clock of the test's own): who gets 401, what a token says, when a token stops working."""

from __future__ import annotations

import json
import random
from collections.abc import Generator
from typing import Any

import pytest

from kubeproxy.apiserver import auth
from kubeproxy.apiserver.auth import AuthConfig, CertIdentity
from kubeproxy.apiserver.handlers import Api, ApiConfig
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.messages import Request, Response, Stream
from kubeproxy.apiserver.store import Store

NOW = 1_700_000_000.0
KEY = b"k" * 32
ADMIN = CertIdentity("kubernetes-admin", ("system:masters",))
SA_PATH = "/api/v1/namespaces/kube-system/serviceaccounts"
TOKEN_PATH = SA_PATH + "/kube-proxy/token"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(clock: Clock) -> Api:
    store = Store(clock=clock, rng=random.Random(1))
    return Api(Hub(store), clock=clock, config=ApiConfig(auth=AuthConfig(KEY)))


def call(app: Api, method: str, path: str, body: Any = None, *, cert: CertIdentity | None = None,
         token: str | None = None, query: str = "") -> Response:
    from urllib.parse import parse_qs

    headers = {"content-type": "application/json", "accept": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    raw = b"" if body is None else json.dumps(body).encode()
    result = app.handle(Request(method, path, parse_qs(query), headers, raw, client_cert=cert))
    assert isinstance(result, Response)
    return result


def doc(resp: Response) -> Any:
    return json.loads(resp.body)


def admin(app: Api, method: str, path: str, body: Any = None) -> Any:
    resp = call(app, method, path, body, cert=ADMIN)
    assert resp.status in (200, 201), resp.body
    return doc(resp)


def make_sa(app: Api, name: str = "kube-proxy") -> Any:
    return admin(app, "POST", SA_PATH, {"metadata": {"name": name}})


def bind_node_proxier(app: Api, name: str = "kube-proxy") -> None:
    admin(app, "POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "metadata": {"name": f"kubeadm:node-proxier:{name}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "system:node-proxier"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}]})


def token_for(app: Api, spec: Any = None, name: str = "kube-proxy") -> str:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": spec or {}}
    out = admin(app, "POST", f"{SA_PATH}/{name}/token", body)
    return str(out["status"]["token"])


ANONYMOUS = [("GET", "/healthz", 200), ("GET", "/livez", 200), ("GET", "/readyz", 200),
             ("GET", "/version", 200), ("GET", "/api", 401), ("GET", "/openapi/v2", 401),
             ("GET", "/api/v1/namespaces", 401), ("GET", SLICES, 401), ("GET", "/nope", 401),
             ("POST", "/api/v1/namespaces", 401),
             ("POST", "/healthz", 403)]  # anonymous on that path, but RBAC allows only get


@pytest.mark.parametrize(("method", "path", "code"), ANONYMOUS,
                         ids=[f"{m} {p}" for m, p, _ in ANONYMOUS])
def test_unauthenticated(app: Api, method: str, path: str, code: int) -> None:
    resp = call(app, method, path, {"metadata": {"name": "x"}} if method == "POST" else None)
    assert resp.status == code
    if code in (401, 403):
        assert doc(resp)["code"] == code
    if code == 401:
        assert doc(resp) == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Failure", "message": "Unauthorized",
                             "reason": "Unauthorized", "code": 401}


def test_certificate_users(app: Api) -> None:
    assert call(app, "GET", SLICES, cert=ADMIN).status == 200
    proxy = CertIdentity("system:kube-proxy")
    assert call(app, "GET", SLICES, cert=proxy).status == 200  # the bootstrap binding
    assert call(app, "GET", "/api/v1/pods", cert=proxy).status == 403
    bob = call(app, "GET", SLICES, cert=CertIdentity("bob", ("devs",)))
    assert bob.status == 403
    assert doc(bob)["message"] == (
        'endpointslices.discovery.k8s.io is forbidden: User "bob" cannot list resource '
        '"endpointslices" in API group "discovery.k8s.io" at the cluster scope')
    assert call(app, "GET", "/apis", cert=CertIdentity("bob")).status == 200  # discovery


def test_token_request_answer_and_claims(app: Api) -> None:
    sa = make_sa(app)
    pod = admin(app, "POST", "/api/v1/namespaces/kube-system/pods", {
        "metadata": {"name": "kube-proxy-abcde"},
        "spec": {"containers": [{"name": "c", "image": "i"}]}})
    out = admin(app, "POST", TOKEN_PATH, {"spec": {
        "expirationSeconds": 3607,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "kube-proxy-abcde"}}})
    assert (out["kind"], out["apiVersion"]) == ("TokenRequest", "authentication.k8s.io/v1")
    assert out["spec"]["audiences"] == [auth.DEFAULT_ISSUER]
    assert out["spec"]["boundObjectRef"]["uid"] == pod["metadata"]["uid"]
    assert out["status"]["expirationTimestamp"] == "2023-11-14T23:13:27Z"  # NOW + 3607
    claims = auth.decode_jwt(KEY, out["status"]["token"])
    assert claims["iss"] == auth.DEFAULT_ISSUER and claims["aud"] == [auth.DEFAULT_ISSUER]
    assert claims["sub"] == "system:serviceaccount:kube-system:kube-proxy"
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (int(NOW), int(NOW), int(NOW) + 3607)
    assert claims["kubernetes.io"] == {
        "namespace": "kube-system",
        "serviceaccount": {"name": "kube-proxy", "uid": sa["metadata"]["uid"]},
        "pod": {"name": "kube-proxy-abcde", "uid": pod["metadata"]["uid"]}}


def test_token_user_is_subject_to_rbac(app: Api) -> None:
    make_sa(app)
    token = token_for(app)
    denied = call(app, "GET", SLICES, token=token)
    assert denied.status == 403
    assert doc(denied)["message"].startswith(
        'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:'
        'kube-system:kube-proxy" cannot list resource "endpointslices"')
    bind_node_proxier(app)
    assert call(app, "GET", SLICES, token=token).status == 200
    watch = app.handle(Request("GET", SLICES, {"watch": ["true"]},
                               {"authorization": f"Bearer {token}"}))
    assert isinstance(watch, Stream)  # the verb "watch" is allowed too
    assert isinstance(watch.chunks, Generator)
    watch.chunks.close()
    assert call(app, "GET", "/api/v1/namespaces/default/services/x", token=token).status == 403


@pytest.mark.parametrize("why", ["expired", "sa-deleted", "sa-recreated", "pod-deleted",
                                 "tampered", "other-key", "other-audience", "garbage"])
def test_token_refused(app: Api, clock: Clock, why: str) -> None:
    make_sa(app)
    bind_node_proxier(app)
    spec: dict[str, Any] = {}
    if why == "pod-deleted":
        admin(app, "POST", "/api/v1/namespaces/kube-system/pods",
              {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
        spec = {"boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}
    if why == "other-audience":
        spec = {"audiences": ["https://vault.example"]}
    token = token_for(app, spec)
    assert why == "other-audience" or call(app, "GET", SLICES, token=token).status == 200
    if why == "expired":
        clock.now += 3600
    elif why in ("sa-deleted", "sa-recreated"):
        admin(app, "DELETE", f"{SA_PATH}/kube-proxy")
        if why == "sa-recreated":
            make_sa(app)
    elif why == "pod-deleted":
        gone = call(app, "DELETE", "/api/v1/namespaces/kube-system/pods/p", cert=ADMIN,
                    query="gracePeriodSeconds=0")
        assert gone.status == 200
    elif why == "tampered":
        head, _, sig = token.split(".")
        claims = auth.decode_jwt(KEY, token)
        claims["kubernetes.io"]["namespace"] = "default"
        token = ".".join([head, auth.encode_jwt(KEY, claims).split(".")[1], sig])
    elif why == "other-key":
        token = auth.encode_jwt(b"x" * 32, auth.decode_jwt(KEY, token))
    elif why == "garbage":
        token = "not-a-jwt"
    assert call(app, "GET", SLICES, token=token).status == 401


def test_token_valid_until_expiry(app: Api, clock: Clock) -> None:
    make_sa(app)
    bind_node_proxier(app)
    token = token_for(app, {"expirationSeconds": 600})
    clock.now += 599
    assert call(app, "GET", SLICES, token=token).status == 200
    clock.now += 1
    assert call(app, "GET", SLICES, token=token).status == 401


BAD_REQUESTS = [
    ("too-short", "kube-proxy", {"expirationSeconds": 599}, 422,
     "spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 "
     "minutes"),
    ("bound-to-secret", "kube-proxy", {"boundObjectRef": {"kind": "Secret", "name": "s"}}, 422,
     'spec.boundObjectRef.kind: Unsupported value: "Secret"'),
    ("no-such-sa", "nobody", {}, 404, 'serviceaccounts "nobody" not found'),
    ("no-such-pod", "kube-proxy", {"boundObjectRef": {"kind": "Pod", "name": "gone"}}, 404,
     'pods "gone" not found'),
    ("pod-uid-mismatch", "kube-proxy",
     {"boundObjectRef": {"kind": "Pod", "name": "p", "uid": "not-its-uid"}}, 409,
     "the UID in the bound object reference (not-its-uid) does not match"),
]


@pytest.mark.parametrize(("name", "sa", "spec", "code", "message"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_token_request_refused(app: Api, name: str, sa: str, spec: Any, code: int,
                               message: str) -> None:
    make_sa(app)
    admin(app, "POST", "/api/v1/namespaces/kube-system/pods",
          {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
    resp = call(app, "POST", f"{SA_PATH}/{sa}/token", {"spec": spec}, cert=ADMIN)
    assert resp.status == code
    assert message in doc(resp)["message"]


def test_token_request_needs_rbac(app: Api) -> None:
    make_sa(app)
    resp = call(app, "POST", TOKEN_PATH, {"spec": {}}, cert=CertIdentity("system:kube-proxy"))
    assert resp.status == 403
    assert 'cannot create resource "serviceaccounts/token" in API group "" in the namespace ' \
        '"kube-system"' in doc(resp)["message"]


def test_without_auth_there_is_no_token_endpoint() -> None:
    store = Store(clock=lambda: NOW, rng=random.Random(1))
    app = Api(Hub(store), clock=lambda: NOW)
    make_sa(app)  # no auth: the certificate is simply not looked at
    assert call(app, "POST", TOKEN_PATH, {"spec": {}}).status == 404
    assert call(app, "GET", SLICES).status == 200  # the open server stays open


def test_jwt_round_trip_and_rejections() -> None:
    token = auth.encode_jwt(KEY, {"a": 1})
    assert auth.decode_jwt(KEY, token) == {"a": 1}
    head, body, _ = token.split(".")
    none_alg = auth._b64(b'{"alg":"none","typ":"JWT"}') + f".{body}."
    for bad in (none_alg, f"{head}.{body}", f"{head}.{body}.AAAA", "a.b.c"):
        with pytest.raises(auth.InvalidToken):
            auth.decode_jwt(KEY, bad)
