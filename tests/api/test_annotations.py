"""The total size of metadata.annotations: upstream's ValidateAnnotations limit.

kube-apiserver refuses an object whose annotation keys plus values (bytes, as Go's
``len``) exceed 256 KiB with 422 Invalid, cause ``metadata.annotations``
FieldValueTooLong, on create, update and patch alike. Requests go straight into
``handlers.Api`` (no sockets).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.apiserver.handlers import Api, ApiConfig
from kubeproxy.apiserver.hub import Hub
from kubeproxy.apiserver.messages import Request, Response
from kubeproxy.apiserver.store import Store
from kubeproxy.apiserver.strategy import ANNOTATIONS_SIZE_LIMIT

LIMIT = 256 * 1024
NOW = 1_700_000_000.0
SVCS = "/api/v1/namespaces/default/services"
PODS = "/api/v1/namespaces/default/pods"


def call(app: Api, method: str, path: str, body: Any,
         content_type: str = "application/json") -> Response:
    result = app.handle(Request(method, path, {}, {"content-type": content_type,
                                                   "accept": "application/json"},
                                json.dumps(body).encode()))
    assert isinstance(result, Response)
    return result


def sized(total: int, keys: int = 1, char: str = "x") -> dict[str, str]:
    """``keys`` annotations ``a0``, ``a1``, ... whose keys plus values take ``total``
    bytes (``char`` may be a multi-byte character: then its UTF-8 bytes count)."""
    width = len(char.encode())
    out: dict[str, str] = {}
    left = total
    for i in range(keys):
        key = f"a{i}"
        share = (left if i == keys - 1 else total // keys) - len(key)
        assert share % width == 0, "pick a total the character divides"
        out[key] = char * (share // width)
        left -= len(key) + share
    assert sum(len(k.encode()) + len(v.encode()) for k, v in out.items()) == total
    return out


def service(annotations: dict[str, str], name: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"ports": [{"port": 80}]}}


def pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": "img:1"}]}}


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: dict[str, Any]
    ok: bool
    content_type: str = "application/json"


CASES = [
    Case("create at exactly the limit", "POST", SVCS, service(sized(LIMIT)), True),
    Case("create one byte over", "POST", SVCS, service(sized(LIMIT + 1)), False),
    Case("keys count too: many small annotations over the limit", "POST", SVCS,
         service(sized(LIMIT + 10, keys=64)), False),
    Case("many small annotations at the limit", "POST", SVCS,
         service(sized(LIMIT, keys=64)), True),
    Case("bytes, not characters: 2-byte UTF-8 over the limit", "POST", SVCS,
         service(sized(LIMIT + 2, char="é")), False),
    Case("every kind: a Pod over the limit", "POST", PODS, pod(sized(LIMIT + 1)), False),
    Case("update growing past the limit", "PUT", SVCS + "/base",
         service(sized(LIMIT + 1), "base"), False),
    Case("update staying at the limit", "PUT", SVCS + "/base",
         service(sized(LIMIT), "base"), True),
    Case("merge patch adding past the limit", "PATCH", SVCS + "/base",
         {"metadata": {"annotations": sized(LIMIT + 1 - len("seed") - 1)}}, False,
         "application/merge-patch+json"),
    Case("merge patch adding up to the limit", "PATCH", SVCS + "/base",
         {"metadata": {"annotations": sized(LIMIT - len("seed") - 1)}}, True,
         "application/merge-patch+json"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_annotation_size_limit(case: Case) -> None:
    app = Api(Hub(Store(clock=lambda: NOW, rng=random.Random(1))), clock=lambda: NOW,
              config=ApiConfig(bookmark_interval=0.01))
    base = call(app, "POST", SVCS, service({"seed": "1"}, "base"))  # 'seed'+'1': 5 bytes
    assert base.status == 201
    resp = call(app, case.method, case.path, case.body, case.content_type)
    if case.ok:
        assert resp.status in (200, 201), resp.body[:300]
        return
    doc = json.loads(resp.body)
    assert (resp.status, doc["kind"], doc["reason"]) == (422, "Status", "Invalid")
    assert "metadata.annotations: Too long: may not be more than 262144 bytes" in doc["message"]
    assert {"field": "metadata.annotations", "reason": "FieldValueTooLong",
            "message": "Too long: may not be more than 262144 bytes"} in doc["details"]["causes"]
    after = call(app, "GET", SVCS + "/base", {})
    assert json.loads(after.body)["metadata"]["annotations"] == {"seed": "1"}, "unchanged"


def test_limit_is_upstreams() -> None:
    assert ANNOTATIONS_SIZE_LIMIT == 262144
