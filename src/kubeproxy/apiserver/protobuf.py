"""Reading request bodies in Kubernetes' protobuf encoding.

kubectl 1.32 and later send the bodies of its typed commands (`create namespace`,
`create service`, `run`, `expose`) as `application/vnd.kubernetes.protobuf` and do not
fall back to JSON, so the server reads that encoding too (it still only writes JSON).
The envelope is the 4-byte magic `k8s\\0` and a runtime.Unknown message
{typeMeta{apiVersion, kind}, raw}; `raw` is the object's own message, decoded here into
the same JSON shape a JSON client would have sent, using the field numbers in
`_protodata.py` (generated from a kubectl binary's embedded descriptors).

Its language is one message per line (indented lines continue it), each field
`number:jsonName:type`, with `[]` for repeated and `{}` for a string-keyed map; types are
`s` string, `i` varint integer, `z` zigzag integer, `b` bool, `f` float, `y` bytes, `e`
enum, a message name, or a message with its own JSON form: `time` (Time, MicroTime),
`ios` (IntOrString), `qty` (Quantity), `raw` (RawExtension, FieldsV1: embedded JSON),
`duration`.

Go writes non-pointer scalar fields even when they hold the zero value, where JSON would
omit them (`omitempty`); the decoder drops zero scalars to match. A pointer field set to
zero or false (rare in what kubectl sends) is therefore read as unset.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from kubeproxy.apiserver import errors
from kubeproxy.apiserver._protodata import PROTO_TEXT
from kubeproxy.apiserver.resources import RESOURCES, SUBRESOURCE_KINDS
from kubeproxy.apiserver.routes import REVIEWS

MAGIC = b"k8s\x00"
MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
_GO_ZERO_TIME = -62135596800  # 0001-01-01T00:00:00Z, Go's zero time.Time


@dataclass(frozen=True)
class ProtoField:
    name: str
    type: str  # token without [] / {}
    repeated: bool
    is_map: bool


def _entries(text: str) -> Iterator[str]:
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") and current:
            current.append(line.strip())
        elif line.strip():
            if current:
                yield " ".join(current)
            current = [line.strip()]
    if current:
        yield " ".join(current)


@cache
def messages() -> Mapping[str, Mapping[int, ProtoField]]:
    out: dict[str, dict[int, ProtoField]] = {}
    for entry in _entries(PROTO_TEXT):
        head, _, body = entry.partition(": ")
        table: dict[int, ProtoField] = {}
        for token in body.split():
            number, name, kind = token.split(":", 2)
            repeated, is_map = kind.startswith("[]"), kind.startswith("{}")
            table[int(number)] = ProtoField(name, kind[2:] if repeated or is_map else kind,
                                            repeated, is_map)
        out[head] = table
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for every field of a message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            yield number, wire, data[i:i + n]
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield number, wire, data[i:i + n]
            i += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _first(data: bytes, number: int, default: Any = None) -> Any:
    return next((v for n, _, v in _fields(data) if n == number), default)


def _special(kind: str, data: bytes) -> Any:
    if kind == "time":
        seconds = _signed(_first(data, 1, 0))
        if seconds <= _GO_ZERO_TIME:
            return None
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    if kind == "ios":
        if _first(data, 1, 0) == 1:
            return _first(data, 3, b"").decode()
        return _signed(_first(data, 2, 0))
    if kind == "qty":
        return _first(data, 1, b"").decode()
    if kind == "duration":
        return f"{_signed(_first(data, 1, 0)) / 1e9:g}s"
    raw = _first(data, 1, b"")
    return json.loads(raw) if raw else {}


def _scalar(kind: str, wire: int, value: int | bytes) -> Any:
    if kind == "s" and isinstance(value, bytes):
        return value.decode()
    if kind == "y" and isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if kind == "b" and isinstance(value, int):
        return bool(value)
    if kind in ("i", "e") and isinstance(value, int):
        return _signed(value)
    if kind == "z" and isinstance(value, int):
        return (value >> 1) ^ -(value & 1)
    if kind == "f" and isinstance(value, bytes):
        return struct.unpack("<d" if wire == 1 else "<f", value)[0]
    raise ValueError(f"field of type {kind} has wire type {wire}")


def _value(kind: str, wire: int, value: int | bytes) -> Any:
    if kind in ("time", "ios", "qty", "raw", "duration"):
        return _special(kind, value if isinstance(value, bytes) else b"")
    if "." in kind:
        if not isinstance(value, bytes):
            raise ValueError(f"message field {kind} has wire type {wire}")
        return decode_message(kind, value)
    return _scalar(kind, wire, value)


def decode_message(name: str, data: bytes) -> dict[str, Any]:
    table = messages()[name]
    out: dict[str, Any] = {}
    for number, wire, value in _fields(data):
        f = table.get(number)
        if f is None:
            continue  # a field newer than our table
        if f.is_map:
            assert isinstance(value, bytes)
            key = _first(value, 1, b"").decode()
            entry = [(w, v) for n, w, v in _fields(value) if n == 2]
            out.setdefault(f.name, {})[key] = _value(f.type, *entry[0]) if entry else ""
        elif f.repeated and wire == 2 and f.type in ("i", "e", "z", "b"):
            assert isinstance(value, bytes)  # packed
            i, items = 0, out.setdefault(f.name, [])
            while i < len(value):
                item, i = _varint(value, i)
                items.append(_scalar(f.type, 0, item))
        elif f.repeated:
            out.setdefault(f.name, []).append(_value(f.type, wire, value))
        else:
            decoded = _value(f.type, wire, value)
            if decoded in ("", 0, False, None) and not isinstance(decoded, (dict, list)):
                out.pop(f.name, None)  # Go's zero value: JSON would have omitted it
            else:
                out[f.name] = decoded
    return out


_KINDS: Mapping[tuple[str, str], str] = {
    **{(r.api_version, r.kind): r.definition for r in RESOURCES},
    **{(r.api_version, "DeleteOptions"): "meta.DeleteOptions" for r in RESOURCES},
    **{(f"{k.group}/{k.version}", k.kind): k.definition for k in SUBRESOURCE_KINDS.values()},
    **{(f"{g}/{v}", kind): definition for (g, v, _), (kind, definition) in REVIEWS.items()},
}


def decode_body(data: bytes) -> dict[str, Any]:
    """A `k8s\\0`-framed runtime.Unknown, as the JSON object it stands for."""
    if not data.startswith(MAGIC):
        raise errors.bad_request("protobuf body without the k8s\\0 prefix")
    try:
        envelope = data[len(MAGIC):]
        type_meta = _first(envelope, 1, b"")
        api_version = _first(type_meta, 1, b"").decode()
        kind = _first(type_meta, 2, b"").decode()
        encoding = _first(envelope, 3, b"").decode()
        if encoding:
            raise errors.bad_request(f"unsupported protobuf contentEncoding {encoding!r}")
        message = _KINDS.get((api_version, kind))
        if message is None:
            raise errors.bad_request(f'no kind "{kind}" is registered for version '
                                     f'"{api_version}" in protobuf bodies')
        obj = decode_message(message, _first(envelope, 2, b""))
    except (ValueError, UnicodeDecodeError, AssertionError, IndexError) as exc:
        raise errors.bad_request(f"couldn't decode the protobuf body: {exc}") from exc
    return {"apiVersion": api_version, "kind": kind, **obj}
