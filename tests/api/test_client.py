"""The official `kubernetes` Python client against the server: the semantics informers and
controllers rely on (list + watch from a resourceVersion, 410 and relist, selectors,
pagination, optimistic concurrency, bookmarks), and malformed requests over the wire."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes import client, config, watch

from tests.api.conftest import Running, _api_client, unique

# The client's own annotations are partial (Optional everywhere, untyped helpers): the
# tests treat what it returns as Any and assert on the values instead.
Watch: Any = watch.Watch
new_client_from_config: Any = config.new_client_from_config


def meta(name: str, **labels: str) -> Any:
    return client.V1ObjectMeta(name=name, labels=labels or None)


def service(name: str, **labels: str) -> Any:
    return client.V1Service(metadata=meta(name, **labels),
                            spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80)]))


def pod(name: str, node: str, **labels: str) -> Any:
    return client.V1Pod(metadata=meta(name, **labels), spec=client.V1PodSpec(
        node_name=node, containers=[client.V1Container(name="c", image="img:1")]))


def collect(func: Any, *args: Any, count: int, **kwargs: Any) -> list[tuple[str, str]]:
    """The first `count` (type, name) events of a watch."""
    w = Watch()
    out: list[tuple[str, str]] = []
    for event in w.stream(func, *args, timeout_seconds=5, **kwargs):
        out.append((event["type"], event["raw_object"]["metadata"].get("name", "")))
        if len(out) == count:
            w.stop()
    return out


def test_kubeconfig_loads_and_lists(api: Running) -> None:
    api_client = new_client_from_config(config_file=str(api.kubeconfig))
    core: Any = client.CoreV1Api(api_client)
    namespaces = core.list_namespace()
    assert {"default", "kube-system"} <= {n.metadata.name for n in namespaces.items}


def test_list_then_watch_from_resource_version(api_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    core.create_namespaced_service(namespace, service("a"))
    listed = core.list_namespaced_service(namespace)
    assert [s.metadata.name for s in listed.items] == ["a"]
    core.create_namespaced_service(namespace, service("b"))
    core.patch_namespaced_service("a", namespace, {"metadata": {"labels": {"v": "2"}}})
    core.delete_namespaced_service("b", namespace)
    events = collect(core.list_namespaced_service, namespace, count=3,
                     resource_version=listed.metadata.resource_version)
    assert events == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]


def test_watch_without_resource_version_starts_with_the_current_state(api_client: Any,
                                                                      namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    core.create_namespaced_service(namespace, service("x"))
    assert collect(core.list_namespaced_service, namespace, count=1) == [("ADDED", "x")]


def test_watch_resumed_after_410_relists_and_sees_deletions(fresh_api: Running) -> None:
    core: Any = client.CoreV1Api(_api_client(fresh_api.url))
    for name in ("keep", "doomed"):
        core.create_namespaced_service("default", service(name))
    listed = core.list_namespaced_service("default")
    old_rv = listed.metadata.resource_version
    core.delete_namespaced_service("doomed", "default")
    for i in range(6):  # push the deletion out of the 4-change history
        core.create_namespaced_service("default", service(f"filler{i}"))
    with pytest.raises(client.ApiException) as err:
        collect(core.list_namespaced_service, "default", count=1, resource_version=old_rv)
    assert err.value.status == 410
    relisted = core.list_namespaced_service("default")
    names = {s.metadata.name for s in relisted.items}
    assert "doomed" not in names and "keep" in names
    core.delete_namespaced_service("keep", "default")
    events = collect(core.list_namespaced_service, "default", count=1,
                     resource_version=relisted.metadata.resource_version)
    assert events == [("DELETED", "keep")]


def test_label_and_field_selectors(api_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("p1", "node-a", app="web", tier="fe"))
    core.create_namespaced_pod(namespace, pod("p2", "node-b", app="web"))
    core.create_namespaced_pod(namespace, pod("p3", "node-a", app="db"))

    def names(**kw: Any) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod(namespace, **kw).items]

    assert names(label_selector="app=web") == ["p1", "p2"]
    assert names(label_selector="app in (web,db),!tier") == ["p2", "p3"]
    assert names(field_selector="spec.nodeName=node-a") == ["p1", "p3"]
    assert names(field_selector="metadata.name=p2") == ["p2"]
    assert names(field_selector="spec.nodeName=node-a", label_selector="app=db") == ["p3"]
    everywhere = core.list_pod_for_all_namespaces(field_selector=f"metadata.namespace={namespace}")
    assert sorted(p.metadata.name for p in everywhere.items) == ["p1", "p2", "p3"]
    with pytest.raises(client.ApiException) as err:
        core.list_namespaced_pod(namespace, field_selector="spec.bogus=1")
    assert err.value.status == 400
    events = collect(core.list_namespaced_pod, namespace, count=1,
                     field_selector="spec.nodeName=node-b")
    assert events == [("ADDED", "p2")]


def test_limit_and_continue(api_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    for i in range(7):
        core.create_namespaced_service(namespace, service(f"s{i}"))
    pages, seen, token = 0, [], None
    while True:
        page = core.list_namespaced_service(namespace, limit=3, _continue=token)
        pages += 1
        seen += [s.metadata.name for s in page.items]
        token = page.metadata._continue
        if not token:
            break
        assert page.metadata.remaining_item_count == 7 - len(seen)
    assert pages == 3 and seen == [f"s{i}" for i in range(7)]


def test_stale_update_is_a_conflict(api_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    first = core.create_namespaced_service(namespace, service("s"))
    core.patch_namespaced_service("s", namespace, {"metadata": {"labels": {"a": "1"}}})
    first.metadata.labels = {"a": "2"}
    with pytest.raises(client.ApiException) as err:
        core.replace_namespaced_service("s", namespace, first)
    assert err.value.status == 409
    assert json.loads(err.value.body or "{}")["reason"] == "Conflict"
    current = core.read_namespaced_service("s", namespace)
    current.metadata.labels = {"a": "3"}
    assert core.replace_namespaced_service("s", namespace, current).metadata.labels == {"a": "3"}


def test_bookmarks_arrive_when_asked_for(api_client: Any, namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    w = Watch()
    kinds = []
    for event in w.stream(core.list_namespaced_service, namespace, timeout_seconds=3,
                          allow_watch_bookmarks=True, resource_version="1"):
        kinds.append(event["type"])
        if event["type"] == "BOOKMARK":
            assert int(event["raw_object"]["metadata"]["resourceVersion"]) > 1
            w.stop()
    assert "BOOKMARK" in kinds


def test_graceful_pod_deletion_is_seen_as_modified_then_deleted(api_client: Any,
                                                                 namespace: str) -> None:
    core: Any = client.CoreV1Api(api_client)
    rv = core.create_namespaced_pod(namespace, pod("g", "node-a")).metadata.resource_version
    deleted = core.delete_namespaced_pod("g", namespace, grace_period_seconds=1)
    assert deleted.metadata.deletion_timestamp is not None
    started = time.monotonic()
    events = collect(core.list_namespaced_pod, namespace, count=2, resource_version=rv)
    assert events == [("MODIFIED", "g"), ("DELETED", "g")]
    assert time.monotonic() - started < 4


def test_endpointslices_and_nodes_through_the_client(api_client: Any, namespace: str) -> None:
    disc: Any = client.DiscoveryV1Api(api_client)
    es = client.V1EndpointSlice(
        metadata=meta("web-x", **{"kubernetes.io/service-name": "web"}), address_type="IPv4",
        endpoints=[client.V1Endpoint(addresses=["10.0.0.1"],
                                     conditions=client.V1EndpointConditions(ready=True))],
        ports=[client.DiscoveryV1EndpointPort(port=80, protocol="TCP", name="http")])
    created = disc.create_namespaced_endpoint_slice(namespace, es)
    assert created.endpoints[0].addresses == ["10.0.0.1"]
    listed = disc.list_namespaced_endpoint_slice(
        namespace, label_selector="kubernetes.io/service-name=web")
    assert [e.metadata.name for e in listed.items] == ["web-x"]
    core: Any = client.CoreV1Api(api_client)
    name = unique("node")
    core.create_node(client.V1Node(metadata=meta(name), spec=client.V1NodeSpec(
        pod_cidr="10.244.9.0/24")))
    status = {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.9"}]}}
    patched = core.patch_node_status(name, status)
    assert patched.status.addresses[0].address == "192.168.0.9"
    assert core.read_node(name).spec.pod_cidrs == ["10.244.9.0/24"]
    core.delete_node(name)


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("method,path,body,headers,code", [
    ("POST", "/api/v1/namespaces/default/services", b'{"kind": "Service", ', {}, 400),
    ("POST", "/api/v1/namespaces/default/services",
     b'{"kind":"Pod","apiVersion":"v1","metadata":{"name":"x"}}', {}, 400),
    ("GET", "/api/v1/namespaces/default/gadgets", None, {}, 404),
    ("GET", "/nothing/here", None, {}, 404),
    ("BREW", "/api/v1/namespaces", None, {}, 405),
    ("POST", "/api/v1/namespaces/default/services",
     b'{"metadata":{"name":"bad"},"spec":{"ports":[{"port":0}]}}', {}, 422),
    ("PATCH", "/api/v1/namespaces/default/services/none", b"{}",
     {"Content-Type": "application/merge-patch+json"}, 404),
    ("POST", "/api/v1/namespaces/default/services", b"x" * 100,
     {"Content-Type": "application/x-www-form-urlencoded"}, 415),
])
def test_malformed_requests_over_the_wire_get_a_status(
        api: Running, method: str, path: str, body: bytes | None, headers: dict[str, str],
        code: int) -> None:
    status, doc = _raw(api.url, method, path, body, headers)
    assert status == code
    assert doc["kind"] == "Status" and doc["status"] == "Failure" and doc["code"] == code


def test_the_server_survives_a_broken_request_line(api: Running) -> None:
    import socket

    parts = urlsplit(api.url)
    with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=5) as sock:
        sock.sendall(b"GET / / / HTTP/1.1\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):  # the server closes after an unparsable request
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b'"kind":"Status"' in reply
    status, doc = _raw(api.url, "GET", "/version")
    assert status == 200 and doc["major"] == "1"


# --- the proxy's own client (sources.client) against the server --------------------


def test_own_client_lists_from_the_watch_cache_then_watches(api: Running,
                                                            api_client: Any,
                                                            namespace: str) -> None:
    """What an informer does at start, end to end: a list at resourceVersion 0 (many
    pages' worth, over one kept-alive connection), then a watch from its version."""
    from kubeproxy.sources.client import Client, ClientOptions
    from kubeproxy.sources.kubeconfig import load_kubeconfig

    core: Any = client.CoreV1Api(api_client)
    for i in range(5):
        core.create_namespaced_service(namespace, service(f"s{i}"))
    own = Client(load_kubeconfig(api.kubeconfig), options=ClientOptions(qps=-1))
    path = f"/api/v1/namespaces/{namespace}/services"
    items, rv = own.list_all(path, page_size=2, resource_version="0")
    assert [i["metadata"]["name"] for i in items] == [f"s{i}" for i in range(5)]
    for _ in range(5):
        own.list_page(path, limit=1)
    assert own.transport.connections == 1, "lists share one kept-alive connection"
    core.delete_namespaced_service("s0", namespace)
    with own.watch(path, resource_version=rv, timeout_seconds=5) as stream:
        event = next(e for e in stream if e["type"] != "BOOKMARK")
    assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "s0")
    assert own.transport.connections == 2, "the watch had a connection of its own"
    own.close()
