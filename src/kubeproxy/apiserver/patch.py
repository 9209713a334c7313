"""The three patch formats of PATCH requests, as pure functions on JSON values.

- JSON merge patch (RFC 7386, `application/merge-patch+json`): maps merge, null deletes,
  everything else (lists included) replaces.
- Strategic merge patch (`application/strategic-merge-patch+json`): a merge patch that
  knows the schema. Lists whose field is tagged `patchStrategy: merge` merge element by
  element on their `patchMergeKey` (containers by `name`, service ports by `port`, ...),
  lists of scalars with that tag are unioned; other lists replace. The directives kubectl
  emits are honoured: `$patch: replace|delete|merge`, `$retainKeys`,
  `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>`. This is the subset
  upstream's strategicpatch package implements that client-side `kubectl apply` and
  `kubectl edit` actually send.
- JSON patch (RFC 6902, `application/json-patch+json`): add, remove, replace, move, copy,
  test with JSON pointers.

Malformed patch documents raise 400 BadRequest; documents that do not apply raise 422, as
kube-apiserver does.
"""

from __future__ import annotations

import copy
from typing import Any

from kubeproxy.apiserver import schema
from kubeproxy.apiserver.errors import ApiError, bad_request


def _unprocessable(message: str) -> ApiError:
    return ApiError(422, "Invalid", message)


# ---- RFC 7386 -----------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---- strategic merge patch --------------------------------------------------------------

_DELETE = object()  # a map patched with `$patch: delete`
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"
_ORDER = "$setElementOrder/"


def strategic_merge_patch(original: dict[str, Any], patch: Any, definition: str) -> Any:
    if not isinstance(patch, dict):
        raise bad_request("strategic merge patch must be a JSON object")
    result = _merge_map(original, patch, definition)
    return {} if result is _DELETE else result


def _merge_map(original: dict[str, Any], patch: dict[str, Any], d: str | None) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _merge_map({}, {k: v for k, v in patch.items() if k != "$patch"}, d)
    if directive not in (None, "merge"):
        raise bad_request(f"unknown patch type: {directive!r} in map")
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith(_ORDER):
            continue
        if key.startswith(_DELETE_PRIMITIVE):
            _delete_from_primitive_list(result, key[len(_DELETE_PRIMITIVE) :], value)
            continue
        if value is None:
            result.pop(key, None)
            continue
        f = schema.field_of(d, key)
        sub = schema.ref_name(f.type) if f is not None else None
        if isinstance(value, dict):
            current = result.get(key)
            merged = _merge_map(current if isinstance(current, dict) else {}, value, sub)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, f, sub)
        else:
            result[key] = value
    for key, order in patch.items():
        if key.startswith(_ORDER) and isinstance(result.get(key[len(_ORDER) :]), list):
            field = key[len(_ORDER) :]
            f = schema.field_of(d, field)
            result[field] = _reorder(result[field], order, f.patch.merge_key if f else "")
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list):
            raise bad_request("$retainKeys must be a list")
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _delete_from_primitive_list(result: dict[str, Any], field: str, values: Any) -> None:
    if not isinstance(values, list):
        raise bad_request(f"{_DELETE_PRIMITIVE}{field} must be a list")
    current = result.get(field)
    if isinstance(current, list):
        result[field] = [v for v in current if v not in values]


def _strip(value: Any, d: str | None) -> Any:
    """A fresh element: merged into nothing, so directives inside it are resolved."""
    return _merge_map({}, value, d) if isinstance(value, dict) else value


def _merge_list(original: Any, patch: list[Any], f: schema.Field | None, sub: str | None
                ) -> list[Any]:
    strategy = f.patch.strategy if f is not None else ""
    if "merge" not in strategy:
        return [_strip(v, sub) for v in patch if not _is_directive(v)]
    current = copy.deepcopy(original) if isinstance(original, list) else []
    if any(_is_directive(v, "replace") for v in patch):
        return [_strip(v, sub) for v in patch if not _is_directive(v)]
    key = f.patch.merge_key if f is not None else ""
    if not key:  # a set of scalars: union, order kept
        return current + [v for v in patch if v not in current]
    for element in patch:
        if not isinstance(element, dict) or key not in element:
            raise bad_request(f"map: {element!r} does not contain declared merge key: {key}")
        index = next((i for i, c in enumerate(current)
                      if isinstance(c, dict) and c.get(key) == element[key]), None)
        if element.get("$patch") == "delete":
            current = [c for c in current
                       if not (isinstance(c, dict) and c.get(key) == element[key])]
            continue
        if index is None:
            current.append(_strip(element, sub))
        else:
            merged = _merge_map(current[index], element, sub)
            current[index] = merged
    return current


def _is_directive(value: Any, which: str | None = None) -> bool:
    return (isinstance(value, dict) and set(value) == {"$patch"}
            and (which is None or value["$patch"] == which))


def _reorder(items: list[Any], order: Any, key: str) -> list[Any]:
    if not isinstance(order, list):
        raise bad_request("$setElementOrder must be a list")

    def ident(item: Any) -> Any:
        return item.get(key) if key and isinstance(item, dict) else item

    wanted = [ident(o) for o in order]
    ranked = [i for i in items if ident(i) in wanted]
    ranked.sort(key=lambda i: wanted.index(ident(i)))
    return ranked + [i for i in items if ident(i) not in wanted]


# ---- RFC 6902 -----------------------------------------------------------------------------


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise bad_request(f"invalid JSON pointer: {path!r}")
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise _unprocessable(f"invalid array index {token!r}")
    i = int(token)
    if i > len(container) or (i == len(container) and not for_add):
        raise _unprocessable(f"array index {i} out of bounds")
    return i


def _parent(doc: Any, tokens: list[str], path: str) -> Any:
    cur = doc
    for token in tokens[:-1]:
        if isinstance(cur, dict) and token in cur:
            cur = cur[token]
        elif isinstance(cur, list):
            cur = cur[_index(cur, token, for_add=False)]
        else:
            raise _unprocessable(f"doc is missing path: {path!r}")
    return cur


def _get(doc: Any, path: Any) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return doc
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise _unprocessable(f"doc is missing path: {path!r}")


def _remove(doc: Any, path: Any) -> Any:
    tokens = _pointer(path)
    if not tokens:
        raise _unprocessable("cannot remove the whole document")
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise _unprocessable(f"unable to remove nonexistent key: {last}: missing value")


def _add(doc: Any, path: Any, value: Any, *, replace: bool) -> Any:
    tokens = _pointer(path)
    if not tokens:
        return value
    parent = _parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise _unprocessable(f"replace operation does not apply: doc is missing key: {path}")
        parent[last] = value
    elif isinstance(parent, list):
        if replace:
            parent[_index(parent, last, for_add=False)] = value
        else:
            parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise _unprocessable(f"doc is missing path: {path!r}")
    return doc


def json_patch(document: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise bad_request("json patch must be a JSON array of operations")
    doc = copy.deepcopy(document)
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise bad_request(f"invalid json patch operation: {op!r}")
        kind, path = op["op"], op.get("path")
        if kind in ("add", "replace", "test") and "value" not in op:
            raise bad_request(f"json patch {kind} operation is missing 'value'")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]), replace=False)
        elif kind == "replace":
            doc = _add(doc, path, copy.deepcopy(op["value"]), replace=True)
        elif kind == "remove":
            _remove(doc, path)
        elif kind in ("move", "copy"):
            value = _get(doc, op.get("from"))
            if kind == "move":
                _remove(doc, op.get("from"))
            doc = _add(doc, path, copy.deepcopy(value), replace=False)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise _unprocessable(f"testing value {path} failed: test failed")
        else:
            raise bad_request(f"unexpected json patch operation {kind!r}")
    return doc
