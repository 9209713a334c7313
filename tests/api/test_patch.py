"""The three patch formats, as tables of (original, patch, expected)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.apiserver import patch
from kubeproxy.apiserver.errors import ApiError


@dataclass(frozen=True)
class Case:
    name: str
    original: Any
    patch: Any
    expect: Any
    definition: str = "core.Pod"  # the schema strategic merge patch follows


MERGE = [
    Case("maps merge", {"a": {"b": 1, "c": 2}}, {"a": {"c": 3, "d": 4}},
         {"a": {"b": 1, "c": 3, "d": 4}}),
    Case("null deletes", {"a": 1, "b": 2}, {"a": None}, {"b": 2}),
    Case("lists replace", {"a": [1, 2, 3]}, {"a": [4]}, {"a": [4]}),
    Case("scalar over map", {"a": {"b": 1}}, {"a": 5}, {"a": 5}),
    Case("map over scalar", {"a": 5}, {"a": {"b": None, "c": 1}}, {"a": {"c": 1}}),
]


@pytest.mark.parametrize("case", MERGE, ids=lambda c: c.name)
def test_merge_patch(case: Case) -> None:
    assert patch.merge_patch(case.original, case.patch) == case.expect


def _pod(*containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"containers": list(containers), **spec}}


SVC_PORTS = {"spec": {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81}]}}

STRATEGIC = [
    Case("containers merge by name",
         _pod({"name": "a", "image": "1"}, {"name": "b", "image": "1"}),
         {"spec": {"containers": [{"name": "b", "image": "2"}]}},
         _pod({"name": "a", "image": "1"}, {"name": "b", "image": "2"})),
    Case("a new container is appended",
         _pod({"name": "a", "image": "1"}),
         {"spec": {"containers": [{"name": "z", "image": "9"}]}},
         _pod({"name": "a", "image": "1"}, {"name": "z", "image": "9"})),
    Case("$patch delete removes by key",
         _pod({"name": "a", "image": "1"}, {"name": "b", "image": "1"}),
         {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}},
         _pod({"name": "b", "image": "1"})),
    Case("service ports merge by port",
         SVC_PORTS, {"spec": {"ports": [{"port": 81, "name": "bee"}, {"port": 82, "name": "c"}]}},
         {"spec": {"ports": [{"name": "a", "port": 80}, {"name": "bee", "port": 81},
                             {"name": "c", "port": 82}]}}, "core.Service"),
    Case("$setElementOrder reorders",
         SVC_PORTS, {"spec": {"$setElementOrder/ports": [{"port": 81}, {"port": 80}]}},
         {"spec": {"ports": [{"name": "b", "port": 81}, {"name": "a", "port": 80}]}},
         "core.Service"),
    Case("lists without a strategy replace",
         _pod({"name": "a", "image": "1"}, tolerations=[{"key": "x"}]),
         {"spec": {"tolerations": [{"key": "y"}]}},
         _pod({"name": "a", "image": "1"}, tolerations=[{"key": "y"}])),
    Case("finalizers union, and $deleteFromPrimitiveList removes",
         {"metadata": {"finalizers": ["a", "b"]}},
         {"metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"]}},
         {"metadata": {"finalizers": ["b", "c"]}}),
    Case("null deletes a key, maps merge",
         {"metadata": {"labels": {"a": "1", "b": "2"}}},
         {"metadata": {"labels": {"a": None, "c": "3"}}},
         {"metadata": {"labels": {"b": "2", "c": "3"}}}),
    Case("$patch replace on a map",
         {"spec": {"selector": {"a": "1", "b": "2"}}},
         {"spec": {"selector": {"$patch": "replace", "c": "3"}}},
         {"spec": {"selector": {"c": "3"}}}, "core.Service"),
    Case("$patch replace on a list",
         _pod({"name": "a", "image": "1"}, {"name": "b", "image": "1"}),
         {"spec": {"containers": [{"$patch": "replace"}, {"name": "c", "image": "3"}]}},
         _pod({"name": "c", "image": "3"})),
    Case("$retainKeys drops other keys",
         {"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}},
         {"spec": {"volumes": [{"name": "v", "hostPath": {"path": "/x"},
                                "$retainKeys": ["name", "hostPath"]}]}},
         {"spec": {"volumes": [{"name": "v", "hostPath": {"path": "/x"}}]}}),
    Case("nested lists merge by their own keys",
         _pod({"name": "a", "image": "1", "env": [{"name": "X", "value": "1"}],
               "ports": [{"containerPort": 80}]}),
         {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}],
                                   "ports": [{"containerPort": 80, "name": "http"}]}]}},
         _pod({"name": "a", "image": "1",
               "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
               "ports": [{"containerPort": 80, "name": "http"}]})),
]


@pytest.mark.parametrize("case", STRATEGIC, ids=lambda c: c.name)
def test_strategic_merge_patch(case: Case) -> None:
    assert patch.strategic_merge_patch(case.original, case.patch, case.definition) == case.expect


def test_strategic_merge_key_missing_is_bad_request() -> None:
    with pytest.raises(ApiError) as err:
        patch.strategic_merge_patch(_pod({"name": "a"}), {"spec": {"containers": [{"image": "x"}]}},
                                    "core.Pod")
    assert err.value.code == 400


DOC = {"a": {"b": [1, 2]}, "c": "x"}

JSON_PATCH = [
    Case("add to a map", DOC, [{"op": "add", "path": "/d", "value": 1}], {**DOC, "d": 1}),
    Case("append to a list", DOC, [{"op": "add", "path": "/a/b/-", "value": 3}],
         {"a": {"b": [1, 2, 3]}, "c": "x"}),
    Case("insert into a list", DOC, [{"op": "add", "path": "/a/b/0", "value": 0}],
         {"a": {"b": [0, 1, 2]}, "c": "x"}),
    Case("remove", DOC, [{"op": "remove", "path": "/c"}], {"a": {"b": [1, 2]}}),
    Case("replace", DOC, [{"op": "replace", "path": "/a/b/1", "value": 9}],
         {"a": {"b": [1, 9]}, "c": "x"}),
    Case("move", DOC, [{"op": "move", "from": "/c", "path": "/e"}],
         {"a": {"b": [1, 2]}, "e": "x"}),
    Case("copy", DOC, [{"op": "copy", "from": "/c", "path": "/e"}], {**DOC, "e": "x"}),
    Case("test then replace", DOC, [{"op": "test", "path": "/c", "value": "x"},
                                    {"op": "replace", "path": "/c", "value": "y"}],
         {"a": {"b": [1, 2]}, "c": "y"}),
    Case("escaped pointer", {"a/b": {"~": 1}}, [{"op": "replace", "path": "/a~1b/~0",
                                               "value": 2}], {"a/b": {"~": 2}}),
]


@pytest.mark.parametrize("case", JSON_PATCH, ids=lambda c: c.name)
def test_json_patch(case: Case) -> None:
    before = repr(case.original)
    assert patch.json_patch(case.original, case.patch) == case.expect
    assert repr(case.original) == before  # the input is not modified


JSON_PATCH_ERRORS = [
    ("not a list", {"op": "add"}, 400),
    ("unknown op", [{"op": "frobnicate", "path": "/a"}], 400),
    ("missing value", [{"op": "add", "path": "/a"}], 400),
    ("bad pointer", [{"op": "remove", "path": "a"}], 400),
    ("missing path", [{"op": "remove", "path": "/nope"}], 422),
    ("replace missing", [{"op": "replace", "path": "/nope", "value": 1}], 422),
    ("index out of range", [{"op": "replace", "path": "/a/b/5", "value": 1}], 422),
    ("failed test", [{"op": "test", "path": "/c", "value": "y"}], 422),
]


@pytest.mark.parametrize("name,ops,code", JSON_PATCH_ERRORS, ids=[c[0] for c in JSON_PATCH_ERRORS])
def test_json_patch_errors(name: str, ops: Any, code: int) -> None:
    with pytest.raises(ApiError) as err:
        patch.json_patch(DOC, ops)
    assert err.value.code == code, name
