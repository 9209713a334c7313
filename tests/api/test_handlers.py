"""Requests straight into `handlers.Api` (no sockets): discovery, OpenAPI, and every kind of
malformed request, which must come back as a Kubernetes Status with the right code."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubeproxy.apiserver import openapi, openapi_pb, schema
from kubeproxy.apiserver.codec import decode_object
from kubeproxy.apiserver.handlers import Api, ApiConfig
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.messages import Request, Response, Stream
from kubeproxy.apiserver.resources import SERVICES
from kubeproxy.apiserver.store import Store, StoreConfig
from kubeproxy.apiserver.table import human_duration, to_table

NOW = 1_700_000_000.0


@pytest.fixture
def app() -> Api:
    store = Store(clock=lambda: NOW, rng=random.Random(1))
    return Api(Hub(store), clock=lambda: NOW, config=ApiConfig(bookmark_interval=0.01))


def call(app: Api, method: str, path: str, body: Any = None, *, query: str = "",
         content_type: str = "application/json", accept: str = "application/json") -> Response:
    from urllib.parse import parse_qs

    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    result = app.handle(Request(method, path, parse_qs(query, keep_blank_values=True),
                                {"content-type": content_type, "accept": accept}, raw))
    assert isinstance(result, Response)
    return result


def status_of(resp: Response) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(resp.body)
    assert doc["kind"] == "Status" and doc["apiVersion"] == "v1"
    assert doc["status"] == "Failure" and doc["code"] == resp.status
    return doc


SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
       "spec": {"ports": [{"port": 80}]}}
SVCS = "/api/v1/namespaces/default/services"


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    body: Any
    code: int
    reason: str
    query: str = ""
    content_type: str = "application/json"
    accept: str = "application/json"
    setup: list[Any] = field(default_factory=list)


BAD = [
    Bad("unparsable JSON", "POST", SVCS, b"{not json", 400, "BadRequest"),
    Bad("empty body", "POST", SVCS, b"", 400, "BadRequest"),
    Bad("body is a list", "POST", SVCS, [1, 2], 400, "BadRequest"),
    Bad("wrong kind", "POST", SVCS, {**SVC, "kind": "Pod"}, 400, "BadRequest"),
    Bad("wrong apiVersion", "POST", SVCS, {**SVC, "apiVersion": "apps/v1"}, 400, "BadRequest"),
    Bad("namespace mismatch", "POST", SVCS, {**SVC, "metadata": {"name": "s", "namespace": "x"}},
        400, "BadRequest"),
    Bad("unknown resource", "GET", "/api/v1/namespaces/default/widgets", None, 404, "NotFound"),
    Bad("unknown group", "GET", "/apis/apps/v1/deployments", None, 404, "NotFound"),
    Bad("missing object", "GET", SVCS + "/nope", None, 404, "NotFound"),
    Bad("port out of range", "POST", SVCS,
        {**SVC, "spec": {"ports": [{"port": 70000}]}}, 422, "Invalid"),
    Bad("wrong JSON type", "POST", SVCS,
        {**SVC, "spec": {"ports": [{"port": "eighty"}]}}, 400, "BadRequest"),
    Bad("unknown field, strict", "POST", SVCS, {**SVC, "spec": {"ports": [{"port": 80}],
                                                              "bogus": True}},
        400, "BadRequest", query="fieldValidation=Strict"),
    Bad("bad fieldValidation", "POST", SVCS, SVC, 400, "BadRequest", query="fieldValidation=Loud"),
    Bad("name mismatch on PUT", "PUT", SVCS + "/other", SVC, 400, "BadRequest", setup=[SVC]),
    Bad("stale resourceVersion", "PUT", SVCS + "/s",
        {**SVC, "metadata": {"name": "s", "resourceVersion": "1"}}, 409, "Conflict",
        setup=[SVC]),
    Bad("create twice", "POST", SVCS, SVC, 409, "AlreadyExists", setup=[SVC]),
    Bad("bad label selector", "GET", SVCS, None, 400, "BadRequest", query="labelSelector=a%20b"),
    Bad("unsupported field selector", "GET", SVCS, None, 400, "BadRequest",
        query="fieldSelector=spec.nodeName%3Dx"),
    Bad("negative limit", "GET", SVCS, None, 400, "BadRequest", query="limit=-1"),
    Bad("garbage continue", "GET", SVCS, None, 400, "BadRequest", query="continue=zzz"),
    Bad("bad watch resourceVersion", "GET", SVCS, None, 400, "BadRequest",
        query="watch=1&resourceVersion=abc"),
    Bad("unsupported patch type", "PATCH", SVCS + "/s", {}, 415, "UnsupportedMediaType",
        content_type="text/plain", setup=[SVC]),
    Bad("garbage protobuf body", "POST", SVCS, b"\x0a\x00", 400, "BadRequest",
        content_type="application/vnd.kubernetes.protobuf"),
    Bad("truncated protobuf body", "POST", SVCS, b"k8s\x00\x0a\x7f", 400, "BadRequest",
        content_type="application/vnd.kubernetes.protobuf"),
    Bad("CBOR body", "POST", SVCS, b"\xd9\xd9\xf7", 415, "UnsupportedMediaType",
        content_type="application/cbor"),
    Bad("protobuf only", "GET", SVCS, None, 406, "NotAcceptable",
        accept="application/vnd.kubernetes.protobuf"),
    Bad("POST to an object", "POST", SVCS + "/s", SVC, 405, "MethodNotAllowed"),
    Bad("POST across namespaces", "POST", "/api/v1/services", SVC, 405, "MethodNotAllowed"),
    Bad("PUT on discovery", "PUT", "/api/v1", SVC, 405, "MethodNotAllowed"),
    Bad("json patch that does not apply", "PATCH", SVCS + "/s",
        [{"op": "remove", "path": "/spec/nope"}], 422, "Invalid",
        content_type="application/json-patch+json", setup=[SVC]),
    Bad("merge patch to an invalid object", "PATCH", SVCS + "/s",
        {"spec": {"type": "Magic"}}, 422, "Invalid",
        content_type="application/merge-patch+json", setup=[SVC]),
    Bad("apply without fieldManager", "PATCH", SVCS + "/s", b"metadata: {name: s}", 400,
        "BadRequest", content_type="application/apply-patch+yaml"),
    Bad("bad dryRun", "POST", SVCS, SVC, 400, "BadRequest", query="dryRun=Some"),
    Bad("delete the default namespace", "DELETE", "/api/v1/namespaces/default", None, 403,
        "Forbidden"),
    Bad("bad DeleteOptions", "DELETE", SVCS + "/s", b"[]", 400, "BadRequest", setup=[SVC]),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_malformed_requests_get_a_status(app: Api, case: Bad) -> None:
    for obj in case.setup:
        assert call(app, "POST", SVCS, obj).status == 201
    resp = call(app, case.method, case.path, case.body, query=case.query,
                content_type=case.content_type, accept=case.accept)
    doc = status_of(resp)
    assert (resp.status, doc["reason"]) == (case.code, case.reason), doc["message"]


def test_invalid_names_the_field(app: Api) -> None:
    doc = status_of(call(app, "POST", SVCS, {**SVC, "spec": {"ports": [{"port": 70000}]}}))
    message = "Invalid value: 70000: must be between 1 and 65535, inclusive"
    # targetPort defaults to port, so it is out of range too (as upstream reports it)
    assert doc["details"]["causes"] == [
        {"reason": "FieldValueInvalid", "field": "spec.ports[0].port", "message": message},
        {"reason": "FieldValueInvalid", "field": "spec.ports[0].targetPort", "message": message}]
    assert doc["message"] == (f'Service "s" is invalid: [spec.ports[0].port: {message}, '
                              f"spec.ports[0].targetPort: {message}]")


def _pb_len(number: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _pb_int(number: int, value: int) -> bytes:
    assert value < 128
    return bytes([number << 3, value])


def test_protobuf_bodies_as_kubectl_1_32_sends_them(app: Api) -> None:
    meta = _pb_len(1, b"pb") + _pb_len(11, _pb_len(1, b"app") + _pb_len(2, b"web"))
    meta += _pb_len(8, b"")  # creationTimestamp: Go's zero Time
    port = (_pb_len(1, b"http") + _pb_len(2, b"TCP") + _pb_int(3, 80)
            + _pb_len(4, _pb_int(1, 1) + _pb_len(3, b"web")) + _pb_int(5, 0))
    spec = _pb_len(1, port) + _pb_len(2, _pb_len(1, b"app") + _pb_len(2, b"web"))
    spec += _pb_len(3, b"") + _pb_len(4, b"ClusterIP")  # zero scalars are dropped
    service = _pb_len(1, meta) + _pb_len(2, spec) + _pb_len(3, b"")
    envelope = b"k8s\x00" + _pb_len(1, _pb_len(1, b"v1") + _pb_len(2, b"Service"))
    envelope += _pb_len(2, service)
    resp = call(app, "POST", SVCS, envelope, content_type="application/vnd.kubernetes.protobuf")
    assert resp.status == 201, resp.body
    obj = json.loads(resp.body)
    assert obj["metadata"]["labels"] == {"app": "web"}
    assert obj["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 80,
                                     "targetPort": "web"}]
    assert obj["spec"]["selector"] == {"app": "web"} and obj["spec"]["clusterIP"] == "10.96.0.2"


def test_unknown_fields_warn_by_default_and_are_dropped(app: Api) -> None:
    resp = call(app, "POST", SVCS, {**SVC, "spec": {"ports": [{"port": 80}], "bogus": 1}})
    assert resp.status == 201
    assert resp.headers == [("Warning", '299 - "unknown field \\"spec.bogus\\""')]
    assert "bogus" not in json.loads(resp.body)["spec"]


def test_create_get_list_delete(app: Api) -> None:
    created = json.loads(call(app, "POST", SVCS, SVC).body)
    assert created["spec"]["clusterIP"] == "10.96.0.2"
    got = json.loads(call(app, "GET", SVCS + "/s").body)
    assert got == created
    listed = json.loads(call(app, "GET", SVCS).body)
    assert listed["kind"] == "ServiceList" and listed["items"][0]["metadata"]["name"] == "s"
    assert "kind" not in listed["items"][0]  # upstream's typed lists carry no item TypeMeta
    deleted = call(app, "DELETE", SVCS + "/s")
    assert deleted.status == 200 and json.loads(deleted.body)["kind"] == "Service"
    assert call(app, "GET", SVCS + "/s").status == 404


def test_delete_of_a_node_returns_a_success_status(app: Api) -> None:
    call(app, "POST", "/api/v1/nodes", {"metadata": {"name": "n1"}})
    doc = json.loads(call(app, "DELETE", "/api/v1/nodes/n1").body)
    assert doc["kind"] == "Status" and doc["status"] == "Success"
    assert doc["details"]["name"] == "n1" and doc["details"]["kind"] == "nodes"


def test_table_for_kubectl_get(app: Api) -> None:
    call(app, "POST", SVCS, SVC)
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    doc = json.loads(call(app, "GET", SVCS, accept=accept).body)
    assert doc["kind"] == "Table"
    assert [c["name"] for c in doc["columnDefinitions"]] == [
        "Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
    assert doc["rows"][0]["cells"] == ["s", "ClusterIP", "10.96.0.2", "<none>", "80/TCP", "0s",
                                       "<none>"]
    assert doc["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_watch_is_a_stream_of_json_lines(app: Api) -> None:
    call(app, "POST", SVCS, SVC)
    from urllib.parse import parse_qs

    result = app.handle(Request("GET", SVCS, parse_qs("watch=1&timeoutSeconds=1"),
                                {"accept": "application/json"}))
    assert isinstance(result, Stream)
    first = next(c for c in result.chunks if c)
    event = json.loads(first)
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "s"


def test_watch_list_marks_the_end_of_the_initial_events(app: Api) -> None:
    call(app, "POST", SVCS, SVC)
    from urllib.parse import parse_qs

    query = parse_qs("watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
                     "&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
    result = app.handle(Request("GET", SVCS, query, {"accept": "application/json"}))
    assert isinstance(result, Stream)
    events = []
    for chunk in result.chunks:
        if chunk:
            events.append(json.loads(chunk))
        if len(events) == 2:
            break
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_an_expired_resource_version_is_an_error_event() -> None:
    small = Api(Hub(Store(StoreConfig(history=1), clock=lambda: NOW)), clock=lambda: NOW)
    call(small, "POST", SVCS, SVC)
    call(small, "POST", SVCS, {**SVC, "metadata": {"name": "t"}})
    from urllib.parse import parse_qs

    result = small.handle(Request("GET", SVCS, parse_qs("watch=1&resourceVersion=1"),
                                  {"accept": "application/json"}))
    assert isinstance(result, Stream)
    event = json.loads(next(c for c in result.chunks if c))
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert list(result.chunks) == []  # and the stream ends


@pytest.mark.parametrize("accept,content_type", [
    ("application/json", "application/json"),
    ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
     "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
    ("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList",
     "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"),
])
def test_discovery_shape_follows_accept(app: Api, accept: str, content_type: str) -> None:
    for path in ("/api", "/apis"):
        resp = call(app, "GET", path, accept=accept)
        assert resp.status == 200 and resp.content_type == content_type


def test_resource_list_names_every_resource(app: Api) -> None:
    core = json.loads(call(app, "GET", "/api/v1").body)
    names = {r["name"] for r in core["resources"]}
    assert names == {"namespaces", "namespaces/status", "nodes", "nodes/status", "pods",
                     "pods/status", "services", "services/status", "configmaps",
                     "serviceaccounts", "serviceaccounts/token"}
    token = next(r for r in core["resources"] if r["name"] == "serviceaccounts/token")
    assert (token["group"], token["version"], token["kind"], token["verbs"]) == \
        ("authentication.k8s.io", "v1", "TokenRequest", ["create"])
    disc = json.loads(call(app, "GET", "/apis/discovery.k8s.io/v1").body)
    assert [r["name"] for r in disc["resources"]] == ["endpointslices"]
    apps = json.loads(call(app, "GET", "/apis/apps/v1").body)
    assert [r["name"] for r in apps["resources"]] == ["daemonsets", "daemonsets/status"]
    rbac = json.loads(call(app, "GET", "/apis/rbac.authorization.k8s.io/v1").body)
    assert [r["name"] for r in rbac["resources"]] == ["clusterroles", "clusterrolebindings",
                                                       "roles", "rolebindings"]


def test_openapi_v3_declares_field_validation_for_every_kind() -> None:
    for group, version, kind in (("", "v1", "Service"), ("", "v1", "Pod"), ("", "v1", "Node"),
                                 ("discovery.k8s.io", "v1", "EndpointSlice"),
                                 ("", "v1", "ConfigMap"), ("", "v1", "ServiceAccount"),
                                 ("apps", "v1", "DaemonSet"),
                                 ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding")):
        doc = openapi.v3_document(group, version)
        patches = [op for item in doc["paths"].values() for m, op in item.items()
                   if m == "patch" and op["x-kubernetes-group-version-kind"]["kind"] == kind]
        assert patches and all(any(p["name"] == "fieldValidation" for p in op["parameters"])
                               for op in patches)
        refs = json.dumps(doc).count("#/components/schemas/")
        assert refs > 100
        schemas = doc["components"]["schemas"]
        for ref in {s.split('"')[0] for s in json.dumps(doc).split("#/components/schemas/")[1:]}:
            assert ref in schemas, ref


def test_openapi_patch_metadata_matches_upstream() -> None:
    defs = openapi.v2_document()["definitions"]
    ports = defs["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"]
    assert ports["x-kubernetes-patch-merge-key"] == "port"
    assert ports["x-kubernetes-patch-strategy"] == "merge"
    containers = defs["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name"
    gvk = defs["io.k8s.api.discovery.v1.EndpointSlice"]["x-kubernetes-group-version-kind"]
    assert gvk == [{"group": "discovery.k8s.io", "kind": "EndpointSlice", "version": "v1"}]


def _read_fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """A tiny protobuf reader: (field, wire type, payload) at the top level."""
    out: list[tuple[int, int, bytes | int]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field_no, wire, varint()))
        elif wire == 2:
            n = varint()
            out.append((field_no, wire, data[i:i + n]))
            i += n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def test_openapi_v2_protobuf_is_well_formed() -> None:
    doc = openapi_pb.document(openapi.v2_document())
    top = _read_fields(doc)
    assert top[0] == (1, 2, b"2.0")
    assert [f for f, _, _ in top] == [1, 2, 8, 9]
    definitions = _read_fields(top[3][2])  # type: ignore[arg-type]
    names = {_read_fields(payload)[0][2] for _, _, payload in definitions}  # type: ignore[arg-type]
    assert b"io.k8s.api.core.v1.Service" in names and len(names) == len(
        openapi.v2_document()["definitions"])


def test_schema_decode_reports_unknown_and_mistyped_fields() -> None:
    obj = {"metadata": {"name": "x", "extra": 1},
           "spec": {"ports": [{"port": 80, "targetPort": "http", "zzz": 2}],
                    "selector": {"a": "b"}}}
    pruned, report = schema.decode("core.Service", obj)
    assert report.unknown == ["metadata.extra", "spec.ports[0].zzz"]
    assert report.type_errors == []
    assert pruned == {"metadata": {"name": "x"},
                      "spec": {"ports": [{"port": 80, "targetPort": "http"}],
                               "selector": {"a": "b"}}}
    _, report = schema.decode("core.Pod", {"spec": {"containers": [
        {"name": "c", "resources": {"limits": {"cpu": 1, "memory": "1Gi"}}}]}})
    assert report.type_errors == []  # Quantities take numbers and strings
    _, report = schema.decode("core.Service", {"spec": {"ports": {"port": 80}}})
    assert report.type_errors and "cannot unmarshal object" in report.type_errors[0]


def test_decode_object_checks_type_meta() -> None:
    decoded = decode_object(SERVICES, {"apiVersion": "v1", "kind": "Service",
                                       "metadata": {"name": "s"}}, "Strict")
    assert decoded.obj["metadata"]["name"] == "s"


@pytest.mark.parametrize("seconds,text", [
    (-5, "<invalid>"), (0, "0s"), (119, "119s"), (121, "2m1s"), (600, "10m"), (3 * 3600, "3h"),
    (3 * 3600 + 60, "3h1m"), (47 * 3600, "47h"), (50 * 3600, "2d2h"), (30 * 86400, "30d"),
    (3 * 365 * 86400, "3y"), (10 * 365 * 86400, "10y"),
])
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


def test_service_table_cells_for_every_type() -> None:
    def row(spec: dict[str, Any], status: dict[str, Any] | None = None) -> list[Any]:
        obj = {"metadata": {"name": "s", "creationTimestamp": "2023-11-14T22:12:20Z"},
               "spec": spec, "status": status or {}}
        cells: list[Any] = to_table(SERVICES, [obj], now=NOW)["rows"][0]["cells"]
        return cells

    assert row({"type": "NodePort", "clusterIP": "10.96.0.5",
                "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                          {"port": 53, "nodePort": 30053, "protocol": "UDP"}],
                "selector": {"b": "2", "a": "1"}}) == [
        "s", "NodePort", "10.96.0.5", "<none>", "80:30080/TCP,53:30053/UDP", "60s", "a=1,b=2"]
    assert row({"type": "LoadBalancer", "clusterIP": "10.96.0.5", "ports": []})[3] == "<pending>"
    assert row({"type": "LoadBalancer", "ports": []},
               {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})[3] == "1.2.3.4"
    assert row({"type": "ExternalName", "externalName": "example.com"})[3] == "example.com"
    assert row({"type": "ClusterIP", "clusterIP": "None"})[2] == "None"


def test_pod_logs_as_text() -> None:
    """pods/log (kubectl logs): the kubelet's output for the Pod, tailLines honoured;
    a missing Pod is 404, a Pod with no output reads empty; nothing but GET."""
    logs = {("default", "p"): b"one\ntwo\nthree\n"}
    store = Store(clock=lambda: NOW, rng=random.Random(1))
    api = Api(Hub(store), clock=lambda: NOW,
              config=ApiConfig(pod_logs=lambda ns, name: logs.get((ns, name), b"")))
    pods = "/api/v1/namespaces/default/pods"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "i"}]}}
    assert call(api, "POST", pods, pod).status == 201
    got = call(api, "GET", pods + "/p/log")
    assert (got.status, got.body, got.content_type) == (200, b"one\ntwo\nthree\n", "text/plain")
    assert call(api, "GET", pods + "/p/log", query="tailLines=2").body == b"two\nthree\n"
    assert call(api, "GET", pods + "/p/log", query="tailLines=0").body == b""
    assert call(api, "GET", pods + "/q/log").status == 404
    assert call(api, "POST", pods + "/p/log", {}).status == 405
    assert call(app_without_logs(), "GET", "/api/v1/namespaces/default/pods/x/log").status == 404


def app_without_logs() -> Api:
    return Api(Hub(Store(clock=lambda: NOW, rng=random.Random(1))), clock=lambda: NOW)
