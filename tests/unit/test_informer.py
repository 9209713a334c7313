"""Sources: kubeconfig, the HTTP client and informers.

The client and the informer's failure paths run against a strict fake HTTP server on
127.0.0.1: it holds a script of the exact requests it expects (path, query, headers)
and what to answer; anything else is recorded as an error and fails the test. The
informer's normal life (list, watch, bookmarks, a real 410 and the relist) runs against
the project's own API server, in this process.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from kubeproxy.apiserver import ApiServer, ServerConfig
from kubeproxy.model import NamespacedName
from kubeproxy.sources.client import (
    Client,
    GoneError,
    ProtocolError,
    StatusError,
    TransportError,
    WatchStalled,
)
from kubeproxy.sources.informer import (
    SERVICE_SELECTOR,
    SLICE_SELECTOR,
    Backoff,
    Informer,
    Replace,
    Resource,
    resources,
    to_update,
)
from kubeproxy.sources.kubeconfig import (
    ClusterAccess,
)
from kubeproxy.tracker import Tracker, Update
from tests.builders import Obj, endpoint, endpoint_slice, service

ANY = object()  # a query value the fake does not check (randomized watch timeouts)
SVC = Resource("Service", "/api/v1/services", SERVICE_SELECTOR)
SVC_Q: dict[str, object] = {"labelSelector": SERVICE_SELECTOR, "limit": "500"}
LIST0 = {**SVC_Q, "resourceVersion": "0"}  # an informer's first list: the watch cache


def relist_q(rv: str) -> dict[str, object]:
    """A relist after a watch's 410: not older than ``rv``, unpaged."""
    return {"labelSelector": SERVICE_SELECTOR, "resourceVersion": rv}


def watch_q(rv: str) -> dict[str, object]:
    return {"labelSelector": SERVICE_SELECTOR, "watch": "true", "allowWatchBookmarks": "true",
            "resourceVersion": rv, "timeoutSeconds": ANY}


# --- the strict fake API server ---------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # a JSON document (or bytes, sent as they are)
    events: list[Obj] | None = None  # a watch: one JSON line per event, chunked
    broken: bool = False  # cut the watch stream in the middle of a chunk
    hold: bool = False  # keep the watch open until the fake is closed
    silent: bool = False  # a stopped server: take the request, never answer it


@dataclass
class Expect:
    path: str
    query: Mapping[str, object]
    reply: Reply
    headers: dict[str, str] = field(default_factory=dict)


class FakeApi:
    def __init__(self, script: list[Expect], tls: ssl.SSLContext | None = None) -> None:
        self.script = list(script)
        self.errors: list[str] = []
        self.served = 0
        self.closing = threading.Event()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                del format, args

            def do_GET(self) -> None:
                fake.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.tls = tls
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.peer_certs: list[Any] = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def next(self, path: str, query: dict[str, str], headers: Any) -> Expect | None:
        with self.lock:
            if not self.script:
                self.errors.append(f"unexpected request {path} {query}")
                return None
            exp = self.script.pop(0)
            self.served += 1
        want = {k: v for k, v in exp.query.items() if v is not ANY}
        got = {k: v for k, v in query.items() if exp.query.get(k) is not ANY}
        if exp.path != path or want != got or set(exp.query) != set(query):
            self.errors.append(f"expected {exp.path} {exp.query}, got {path} {query}")
            return None
        for name, value in exp.headers.items():
            if headers.get(name) != value:
                self.errors.append(f"header {name}: {headers.get(name)!r} != {value!r}")
        return exp

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        if isinstance(h.connection, ssl.SSLSocket):
            self.peer_certs.append(h.connection.getpeercert())
        url = urlsplit(h.path)
        exp = self.next(url.path, dict(parse_qsl(url.query)), h.headers)
        reply = exp.reply if exp else Reply(500, {"kind": "Status", "code": 500})
        if reply.silent:
            self.closing.wait(10)
            return
        if reply.events is None:
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            h.send_response(reply.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for event in reply.events:
            line = json.dumps(event).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            h.wfile.flush()
        if reply.broken:
            h.wfile.write(b"40\r\n{\"type\":")  # a chunk that never ends
            h.wfile.flush()
            h.close_connection = True
            return
        if reply.hold:
            self.closing.wait(10)
        h.wfile.write(b"0\r\n\r\n")

    def close(self) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


MakeFake = Callable[..., FakeApi]


@pytest.fixture
def fake() -> Iterator[MakeFake]:
    made: list[FakeApi] = []

    def make(script: list[Expect], tls: ssl.SSLContext | None = None) -> FakeApi:
        made.append(FakeApi(script, tls))
        return made[-1]

    yield make
    for f in made:
        f.close()
    for f in made:
        assert not f.errors, f.errors


def items_list(rv: str, *items: Obj, cont: str | None = None) -> Obj:
    meta: Obj = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return {"kind": "ServiceList", "apiVersion": "v1", "metadata": meta, "items": list(items)}


def svc_obj(name: str, rv: str, port: int = 80) -> Obj:
    obj = service(name, ports=[("p80", port, "TCP", 0)])
    obj["metadata"]["resourceVersion"] = rv
    return obj


def status(code: int, reason: str, message: str = "") -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


def ev(kind: str, obj: Obj) -> Obj:
    return {"type": kind, "object": obj}


def bookmark(rv: str) -> Obj:
    return ev("BOOKMARK", {"kind": "Service", "apiVersion": "v1",
                           "metadata": {"resourceVersion": rv}})


# --- the client -------------------------------------------------------------------


def test_list_all_follows_continue_and_sends_the_token(
        fake: MakeFake) -> None:
    auth = {"Authorization": "Bearer s3cret", "Accept": "application/json"}
    api = fake([
        Expect("/prefix/api/v1/services", {**SVC_Q, "limit": "2"},
               Reply(body=items_list("7", svc_obj("a", "5"), svc_obj("b", "6"), cont="t1")),
               auth),
        Expect("/prefix/api/v1/services", {**SVC_Q, "limit": "2", "continue": "t1"},
               Reply(body=items_list("7", svc_obj("c", "7"))), auth),
    ])
    client = Client(ClusterAccess(api.url + "/prefix/", token="s3cret"))
    items, rv = client.list_all("/api/v1/services", label_selector=SERVICE_SELECTOR,
                                page_size=2)
    assert [i["metadata"]["name"] for i in items] == ["a", "b", "c"] and rv == "7"


def test_an_expired_continue_token_restarts_the_list(
        fake: MakeFake) -> None:
    api = fake([
        Expect("/api/v1/services", SVC_Q, Reply(body=items_list("7", svc_obj("a", "5"),
                                                                cont="t1"))),
        Expect("/api/v1/services", {**SVC_Q, "continue": "t1"},
               Reply(410, status(410, "Expired", "continue too old"))),
        Expect("/api/v1/services", SVC_Q, Reply(body=items_list("9", svc_obj("b", "9")))),
    ])
    items, rv = Client(ClusterAccess(api.url)).list_all("/api/v1/services",
                                                        label_selector=SERVICE_SELECTOR)
    assert [i["metadata"]["name"] for i in items] == ["b"] and rv == "9"


@pytest.mark.parametrize(("reply", "error", "text"), [
    (Reply(404, status(404, "NotFound", "the server could not find it")), StatusError,
     "404 NotFound: the server could not find it"),
    (Reply(410, status(410, "Expired", "too old resource version: 1 (5)")), GoneError,
     "410 Expired"),
    (Reply(500, b"<html>oops</html>"), StatusError, "500 Internal Server Error"),
    (Reply(403, status(403, "Forbidden", "nodes is forbidden")), StatusError, "Forbidden"),
    (Reply(200, b"not json"), ProtocolError, "not a list"),
    (Reply(200, {"items": 3}), ProtocolError, "not a list"),
])
def test_errors_are_translated(fake: MakeFake, reply: Reply,
                               error: type[Exception], text: str) -> None:
    api = fake([Expect("/api/v1/nodes", {}, reply)])
    with pytest.raises(error, match=text) as info:
        Client(ClusterAccess(api.url)).list_page("/api/v1/nodes")
    if isinstance(info.value, StatusError):
        assert info.value.code == reply.status


def test_no_server_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    with pytest.raises(TransportError, match="GET /api/v1/nodes"):
        Client(ClusterAccess(f"http://127.0.0.1:{port}"), timeout=2).list_page("/api/v1/nodes")


def test_watch_stream_events_and_breakage(fake: MakeFake) -> None:
    api = fake([
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("ADDED", svc_obj("a", "6")), bookmark("8")])),
        Expect("/api/v1/services", watch_q("8"),
               Reply(events=[ev("DELETED", svc_obj("a", "9"))], broken=True)),
    ])
    client = Client(ClusterAccess(api.url))
    with client.watch("/api/v1/services", resource_version="5", timeout_seconds=60,
                      label_selector=SERVICE_SELECTOR) as stream:
        assert [e["type"] for e in stream] == ["ADDED", "BOOKMARK"]
    seen: list[str] = []
    with pytest.raises(TransportError, match="the stream broke"), client.watch(
            "/api/v1/services", resource_version="8", timeout_seconds=60,
            label_selector=SERVICE_SELECTOR) as stream:
        seen.extend(e["type"] for e in stream)
    assert seen == ["DELETED"]


# --- decoding at the edge ---------------------------------------------------------


def test_to_update() -> None:
    good = to_update("Service", service("a"))
    assert good is not None and good.key == NamespacedName("ns1", "a") and good.obj is not None
    bad = to_update("Service", service("a", cluster_ip="999.1.1.1"))
    assert bad is not None and bad.obj is None and bad.error is not None
    assert (bad.error.kind, bad.error.ref, bad.error.field_path) == (
        "Service", "ns1/a", "spec.clusterIPs[0]")
    deleted = to_update("Service", service("a", cluster_ip="999.1.1.1"), deleted=True)
    assert deleted == Update("Service", NamespacedName("ns1", "a"), None)
    headless = to_update("Service", service("h", cluster_ip="None"))
    assert headless is not None and headless.obj is None and headless.error is None
    assert to_update("Service", {"metadata": {}}) is None
    node = to_update("Node", {"metadata": {"name": "n1", "namespace": "x"}})
    assert node is not None and node.key == NamespacedName("", "n1")


def test_the_three_resources() -> None:
    svc, eps, node = resources("node1")
    assert (svc.path, svc.label_selector) == ("/api/v1/services", SERVICE_SELECTOR)
    assert eps.label_selector == SLICE_SELECTOR
    assert (node.path, node.field_selector) == ("/api/v1/nodes", "metadata.name=node1")


# --- informers against the fake ---------------------------------------------------


class Sink:
    """What an informer emitted, folded into a tracker, with a deadline-bound wait."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[Update | Replace] = []
        self.tracker = Tracker("node1")

    def emit(self, item: Update | Replace) -> None:
        with self.cond:
            self.items.append(item)
            if isinstance(item, Replace):
                self.tracker.replace(item.kind, item.updates)
            else:
                self.tracker.update(item)
            self.cond.notify_all()

    def wait(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until what() holds: woken by emits, re-checked every 20 ms for other state."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not what():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; got {self.items}"
                self.cond.wait(min(left, 0.02))

    def names(self) -> list[str]:
        with self.cond:
            return sorted(s.name for s in self.tracker.cluster().services)

    def replaces(self) -> int:
        with self.cond:
            return sum(isinstance(i, Replace) for i in self.items)


def informer(client: Client, sink: Sink, resource: Resource = SVC) -> Informer:
    return Informer(client, resource, sink.emit, watch_timeout=(60, 120),
                    backoff=Backoff(initial=0.01, cap=0.05))


def test_informer_lists_watches_resumes_and_relists(
        fake: MakeFake) -> None:
    api = fake([
        Expect("/api/v1/services", LIST0, Reply(body=items_list("5", svc_obj("a", "4")))),
        # A normal end (timeoutSeconds): watch again from the bookmark's version.
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("ADDED", svc_obj("b", "6")), bookmark("8")])),
        Expect("/api/v1/services", watch_q("8"),
               Reply(events=[ev("MODIFIED", svc_obj("b", "9", port=81)),
                             ev("ERROR", status(410, "Expired", "too old"))])),
        # 410: relist, not older than the last version seen; it no longer holds "a".
        Expect("/api/v1/services", relist_q("9"), Reply(body=items_list("12", svc_obj("b", "9", 81),
                                                                svc_obj("c", "11")))),
        Expect("/api/v1/services", watch_q("12"),
               Reply(events=[ev("DELETED", svc_obj("c", "13"))], broken=True)),
        # A broken stream: back off, watch again from the last version (no relist).
        Expect("/api/v1/services", watch_q("13"), Reply(events=[], hold=True)),
    ])
    sink = Sink()
    inf = informer(Client(ClusterAccess(api.url)), sink).start()
    try:
        sink.wait(lambda: api.served == 6 and inf.lists == 2 and len(sink.items) == 5)
    finally:
        started = time.monotonic()
        inf.stop()
        assert time.monotonic() - started < 2, "stop() wakes a quiet watch"
    assert sink.replaces() == 2
    assert sink.names() == ["b"] and inf.resource_version == "13"
    (b,) = sink.tracker.cluster().services
    assert b.ports[0].port == 81


def test_a_relist_refused_with_410_becomes_a_consistent_read(fake: MakeFake) -> None:
    """client-go's relistResourceVersion: "0", then the last seen, then "" after the
    list at that version was itself too old."""
    api = fake([
        Expect("/api/v1/services", LIST0, Reply(body=items_list("5", svc_obj("a", "4")))),
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("ERROR", status(410, "Expired", "too old"))])),
        Expect("/api/v1/services", relist_q("5"),
               Reply(410, status(410, "Expired", "too old resource version: 5 (20)"))),
        Expect("/api/v1/services", SVC_Q, Reply(body=items_list("21", svc_obj("z", "21")))),
        Expect("/api/v1/services", watch_q("21"), Reply(events=[], hold=True)),
    ])
    sink = Sink()
    inf = informer(Client(ClusterAccess(api.url)), sink).start()
    try:
        sink.wait(lambda: sink.names() == ["z"] and api.served == 5)
    finally:
        inf.stop()
    assert inf.lists == 2 and inf.relist_resource_version() == "21"


STALL = 0.3  # seconds: the tests' stall bound (the fake sends no bookmarks)


def test_a_quiet_watch_ends_with_watch_stalled(fake: MakeFake) -> None:
    api = fake([Expect("/api/v1/services", watch_q("5"),
                       Reply(events=[ev("ADDED", svc_obj("a", "6"))], hold=True)),
                Expect("/api/v1/services", watch_q("6"), Reply(silent=True))])
    client = Client(ClusterAccess(api.url))
    seen: list[str] = []
    with pytest.raises(WatchStalled, match=r"no event or bookmark for 0\.3s"), client.watch(
            "/api/v1/services", resource_version="5", timeout_seconds=60,
            label_selector=SERVICE_SELECTOR, stall_timeout=STALL) as stream:
        seen.extend(e["type"] for e in stream)
    assert seen == ["ADDED"], "events before the stall are delivered"
    with pytest.raises(WatchStalled, match=r"no answer within 0\.3s"):
        client.watch("/api/v1/services", resource_version="6", timeout_seconds=60,
                     label_selector=SERVICE_SELECTOR, stall_timeout=STALL)


def test_informer_rewatches_a_hung_watch_from_its_resource_version(fake: MakeFake) -> None:
    """A server that stops (not closes): the stream goes quiet, then a new watch gets no
    answer at all. The informer gives each up after the bound and watches again from
    the last resourceVersion it saw, without relisting; the server resumes and the
    change made meanwhile arrives. The script is strict: a relist would be an error."""
    api = fake([
        Expect("/api/v1/services", LIST0, Reply(body=items_list("5", svc_obj("a", "4")))),
        Expect("/api/v1/services", watch_q("5"),
               Reply(events=[ev("ADDED", svc_obj("b", "6"))], hold=True)),  # goes quiet
        Expect("/api/v1/services", watch_q("6"), Reply(silent=True)),  # still stopped
        Expect("/api/v1/services", watch_q("6"),
               Reply(events=[ev("ADDED", svc_obj("c", "7"))], hold=True)),  # resumed
        *[Expect("/api/v1/services", watch_q("7"), Reply(events=[], hold=True))] * 20,
    ])
    sink = Sink()
    inf = Informer(Client(ClusterAccess(api.url)), SVC, sink.emit, watch_timeout=(60, 120),
                   stall_timeout=STALL, backoff=Backoff(initial=0.01, cap=0.05))
    inf.start()
    try:
        sink.wait(lambda: sink.names() == ["a", "b", "c"])
    finally:
        inf.stop()
    assert inf.lists == 1 and sink.replaces() == 1
    assert inf.stalls >= 2 and inf.resource_version == "7"


def test_informer_stall_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_timeout"):
        Informer(Client(ClusterAccess("http://127.0.0.1:1")), SVC, lambda _: None,
                 stall_timeout=0)


def test_informer_backs_off_while_the_server_fails(
        fake: MakeFake) -> None:
    api = fake([
        Expect("/api/v1/services", LIST0, Reply(500, status(500, "InternalError"))),
        Expect("/api/v1/services", LIST0, Reply(503, status(503, "ServiceUnavailable"))),
        Expect("/api/v1/services", LIST0, Reply(body=items_list("3", svc_obj("a", "3")))),
        Expect("/api/v1/services", watch_q("3"), Reply(events=[], hold=True)),
    ])
    sink = Sink()
    inf = informer(Client(ClusterAccess(api.url)), sink).start()
    try:
        sink.wait(lambda: sink.names() == ["a"])
    finally:
        inf.stop()
    assert api.served in (3, 4)


def test_backoff_grows_to_the_cap_and_resets() -> None:
    class NoJitter:
        def random(self) -> float:
            return 0.0

    b = Backoff(initial=0.5, cap=4.0, rng=NoJitter())  # type: ignore[arg-type]
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


# --- an informer against the project's API server ---------------------------------


def post(url: str, path: str, obj: Obj) -> None:
    req = urllib.request.Request(url + path, json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


def delete(url: str, path: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + path, method="DELETE"),
                           timeout=10).close()


@pytest.fixture
def apiserver() -> Iterator[ApiServer]:
    server = ApiServer(ServerConfig(history=4, bookmark_interval=0.2)).start()
    try:
        yield server
    finally:
        server.stop()


def test_informer_against_the_api_server_survives_410(apiserver: ApiServer) -> None:
    url = apiserver.url
    slices = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    post(url, "/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    post(url, "/api/v1/namespaces/ns1/services", service("early", cluster_ip="10.96.0.5"))
    sink = Sink()
    client = Client(ClusterAccess(url))
    svc_inf = informer(client, sink, resources("node1")[0]).start()
    try:
        sink.wait(lambda: sink.names() == ["early"])
        post(url, "/api/v1/namespaces/ns1/services", service("web", cluster_ip="10.96.0.6"))
        post(url, "/api/v1/namespaces/ns1/services",
             service("other", cluster_ip="10.96.0.7",
                     labels={"service.kubernetes.io/service-proxy-name": "x"}))
        sink.wait(lambda: sink.names() == ["early", "web"])
        # More changes at once than the server's history holds: the watch gets 410.
        for i in range(6):
            post(url, slices, endpoint_slice("junk", [endpoint(f"10.0.0.{i}")], "default",
                                             name=f"junk-{i}", labels={"junk": "y"}))
        delete(url, "/api/v1/namespaces/ns1/services/early")
        delete(url, slices + "?labelSelector=junk%3Dy")
        post(url, "/api/v1/namespaces/ns1/services", service("late", cluster_ip="10.96.0.8"))
        sink.wait(lambda: sink.names() == ["late", "web"] and svc_inf.lists >= 2)
    finally:
        svc_inf.stop()
