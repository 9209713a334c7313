"""The secure server over real sockets, with the proxy's own client (`sources/`): TLS with
the lab CA, service-account tokens from TokenRequest, client certificates, RBAC.

A kube-proxy whose service account is bound to `system:node-proxier` lists and watches
what it needs; one whose binding lacks `list endpointslices` gets upstream's 403, as it
would in a cluster."""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubeproxy.lab import pki as lab_pki
from kubeproxy.lab import tokens
from kubeproxy.lab.api import LabApi, LabApiError
from kubeproxy.sources.client import Client, StatusError
from kubeproxy.sources.kubeconfig import ClusterAccess
from tests.api.conftest import Running, unique

SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
SERVICES = "/api/v1/services"
NODES = "/api/v1/nodes"
RBAC = "rbac.authorization.k8s.io"


def ca_file(api: Running) -> str:
    return str(api.kubeconfig.parent / "pki" / "ca.crt")


@pytest.fixture
def admin(secure_api: Running) -> LabApi:
    """The lab's own client, with the admin kubeconfig the server wrote."""
    return LabApi.from_kubeconfig(secure_api.kubeconfig)


@dataclass
class ProxyAccount:
    name: str
    token: str


def _account(admin: LabApi, role_rules: list[dict[str, object]] | None) -> ProxyAccount:
    """A ServiceAccount in kube-system bound to system:node-proxier, or to a ClusterRole of
    ``role_rules`` when given; its token from TokenRequest."""
    name = unique("kube-proxy")
    admin.create({"kind": "ServiceAccount", "apiVersion": "v1",
                  "metadata": {"name": name, "namespace": "kube-system"}})
    role = "system:node-proxier"
    if role_rules is not None:
        role = name
        admin.create({"kind": "ClusterRole", "apiVersion": f"{RBAC}/v1",
                      "metadata": {"name": role}, "rules": role_rules})
    admin.create({"kind": "ClusterRoleBinding", "apiVersion": f"{RBAC}/v1",
                  "metadata": {"name": name},
                  "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role},
                  "subjects": [{"kind": "ServiceAccount", "name": name,
                                "namespace": "kube-system"}]})
    return ProxyAccount(name, admin.request_token("kube-system", name).token)


@pytest.fixture
def node_proxier(admin: LabApi) -> Iterator[ProxyAccount]:
    account = _account(admin, None)
    yield account
    admin.delete("ClusterRoleBinding", None, account.name)
    admin.delete("ServiceAccount", "kube-system", account.name)


@pytest.fixture
def no_slices(admin: LabApi) -> Iterator[ProxyAccount]:
    rules: list[dict[str, object]] = [
        {"apiGroups": [""], "resources": ["services", "endpoints"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    account = _account(admin, rules)
    yield account
    admin.delete("ClusterRoleBinding", None, account.name)
    admin.delete("ClusterRole", None, account.name)
    admin.delete("ServiceAccount", "kube-system", account.name)


def proxy_client(api: Running, token: str) -> Client:
    return Client(ClusterAccess(api.url, ca_file=ca_file(api), token=token), timeout=10)


def test_token_bound_to_node_proxier_lists_and_watches(secure_api: Running, admin: LabApi,
                                                       node_proxier: ProxyAccount) -> None:
    client = proxy_client(secure_api, node_proxier.token)
    for path in (SLICES, SERVICES, NODES):
        client.list_all(path)  # a 403 would raise
    _, rv = client.list_all(SLICES)
    ns = unique("t")
    admin.create({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns}})
    try:
        seen: list[str] = []
        with client.watch(SLICES, resource_version=rv, timeout_seconds=5) as stream:
            def write() -> None:
                admin.create({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                              "metadata": {"name": "web-1", "namespace": ns},
                              "addressType": "IPv4", "endpoints": [], "ports": []})
            threading.Thread(target=write).start()
            for event in stream:
                if event["type"] == "ADDED":
                    seen.append(event["object"]["metadata"]["name"])
                    break
        assert seen == ["web-1"]
        with pytest.raises(StatusError) as denied:  # no `get` on services in system:node-proxier
            client.list_page(f"/api/v1/namespaces/{ns}/pods")
        assert denied.value.code == 403
    finally:
        admin.delete("Namespace", None, ns)


def test_binding_without_endpointslices_is_forbidden(secure_api: Running,
                                                     no_slices: ProxyAccount) -> None:
    client = proxy_client(secure_api, no_slices.token)
    client.list_all(SERVICES)
    with pytest.raises(StatusError) as listed:
        client.list_all(SLICES)
    assert str(listed.value) == (
        '403 Forbidden: endpointslices.discovery.k8s.io is forbidden: User "system:'
        f'serviceaccount:kube-system:{no_slices.name}" cannot list resource "endpointslices" '
        'in API group "discovery.k8s.io" at the cluster scope')
    with pytest.raises(StatusError) as watched:
        client.watch(SLICES, resource_version="0", timeout_seconds=5)
    assert 'cannot watch resource "endpointslices"' in str(watched.value)


def test_token_stops_working_with_its_service_account(secure_api: Running, admin: LabApi,
                                                      node_proxier: ProxyAccount) -> None:
    client = proxy_client(secure_api, node_proxier.token)
    client.list_all(SERVICES)
    admin.delete("ServiceAccount", "kube-system", node_proxier.name)
    with pytest.raises(StatusError) as refused:
        client.list_all(SERVICES)
    assert refused.value.code == 401


def test_the_lab_proxy_certificate_is_user_kube_proxy(secure_api: Running) -> None:
    pki = lab_pki.Pki(secure_api.kubeconfig.parent / "pki")
    client = Client(ClusterAccess(secure_api.url, ca_file=str(pki.ca_cert),
                                  client_cert_file=str(pki.cert("kube-proxy")),
                                  client_key_file=str(pki.key("kube-proxy"))), timeout=10)
    client.list_all(SLICES)  # the bootstrap binding system:node-proxier
    with pytest.raises(StatusError) as denied:
        client.list_page("/api/v1/pods")
    assert 'User "system:kube-proxy" cannot list resource "pods"' in str(denied.value)


def test_no_credentials_is_401_but_health_is_open(secure_api: Running) -> None:
    client = Client(ClusterAccess(secure_api.url, ca_file=ca_file(secure_api)), timeout=10)
    with pytest.raises(StatusError) as refused:
        client.list_all(SERVICES)
    assert refused.value.code == 401
    for path in ("/healthz", "/version"):
        assert _get(secure_api, path, ssl.create_default_context(cafile=ca_file(secure_api))) \
            == 200


def test_tls_is_required_and_verified(secure_api: Running, tmp_path: Path) -> None:
    port = secure_api.server.port
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/version")
        plain.getresponse()
    with pytest.raises(ssl.SSLCertVerificationError):  # the system roots do not know the CA
        _get(secure_api, "/version", ssl.create_default_context())
    other = lab_pki.ensure(tmp_path / "other-ca")  # a client certificate of another CA
    ctx = ssl.create_default_context(cafile=ca_file(secure_api))
    ctx.load_cert_chain(other.cert("admin"), other.key("admin"))
    with pytest.raises((ssl.SSLError, OSError)):
        _get(secure_api, "/api/v1/pods", ctx)


def test_lab_api_token_request_errors(admin: LabApi) -> None:
    with pytest.raises(LabApiError) as missing:
        admin.request_token("kube-system", "nobody")
    assert missing.value.code == 404


def _get(api: Running, path: str, ctx: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", api.server.port, timeout=5, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_projected_service_account_volume(secure_api: Running, admin: LabApi,
                                          node_proxier: ProxyAccount, tmp_path: Path) -> None:
    """The kubelet's projection: token bound to the Pod, the lab CA, the namespace; an
    in-cluster client reading those files (tokenFile) is the ServiceAccount."""
    pod = admin.create({"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"name": node_proxier.name, "namespace": "kube-system"},
                        "spec": {"serviceAccountName": node_proxier.name,
                                 "containers": [{"name": "kube-proxy", "image": "kp"}]}})
    pod["kind"] = "Pod"
    volume = tmp_path / "serviceaccount"
    projected = tokens.project(admin, Path(ca_file(secure_api)), pod, volume)
    assert (volume / "namespace").read_text() == "kube-system"
    assert (volume / "ca.crt").read_text() == Path(ca_file(secure_api)).read_text()
    assert (volume / "token").stat().st_mode & 0o777 == 0o600
    assert round(projected.expires - projected.issued) in (3606, 3607)
    assert not tokens.refresh_due(projected, projected.issued + 0.79 * 3607)
    assert tokens.refresh_due(projected, projected.issued + 0.81 * 3607)
    access = ClusterAccess(secure_api.url, ca_file=str(volume / "ca.crt"),
                           token_file=str(volume / "token"))
    Client(access, timeout=10).list_all(SLICES)
    admin.delete("Pod", "kube-system", pod["metadata"]["name"], grace=0)
    with pytest.raises(StatusError) as refused:  # bound to the Pod: gone with it
        Client(access, timeout=10).list_all(SLICES)
    assert refused.value.code == 401
