"""Regenerate src/kubeproxy/apiserver/_protodata.py from a kubectl binary.

Since 1.32, kubectl's typed commands (`create namespace`, `create service`, `run`,
`expose`) send request bodies as Kubernetes protobuf, so the server must read that wire
format. Decoding needs the field numbers of every message reachable from the kinds we
serve. Kubernetes binaries embed them: each generated.pb.go registers its gzipped
FileDescriptorProto. This script finds those blobs in a kubectl binary, parses the
descriptors, and writes the reachable messages in a compact table. Field numbers never
change, so any recent kubectl gives a correct table; newer ones know more fields.

Run:  python tests/api/regen_protobuf.py /usr/lib/google-cloud-sdk/bin/kubectl.1.33 \\
          > src/kubeproxy/apiserver/_protodata.py
"""

from __future__ import annotations

import re
import sys
import textwrap
import zlib

ROOTS = (
    "k8s.io.api.core.v1.Pod", "k8s.io.api.core.v1.Service", "k8s.io.api.core.v1.Namespace",
    "k8s.io.api.core.v1.Node", "k8s.io.api.discovery.v1.EndpointSlice",
    "k8s.io.apimachinery.pkg.apis.meta.v1.DeleteOptions",
    "k8s.io.api.core.v1.ConfigMap", "k8s.io.api.core.v1.ServiceAccount",
    "k8s.io.api.apps.v1.DaemonSet", "k8s.io.api.rbac.v1.ClusterRole",
    "k8s.io.api.rbac.v1.ClusterRoleBinding", "k8s.io.api.rbac.v1.Role",
    "k8s.io.api.rbac.v1.RoleBinding", "k8s.io.api.authentication.v1.TokenRequest",
    "k8s.io.api.authorization.v1.SelfSubjectAccessReview",
)
# Messages with their own JSON form (protobuf.py converts them); not walked into.
SPECIAL = {
    "k8s.io.apimachinery.pkg.apis.meta.v1.Time": "time",
    "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime": "time",
    "k8s.io.apimachinery.pkg.apis.meta.v1.Duration": "duration",
    "k8s.io.apimachinery.pkg.util.intstr.IntOrString": "ios",
    "k8s.io.apimachinery.pkg.api.resource.Quantity": "qty",
    "k8s.io.apimachinery.pkg.runtime.RawExtension": "raw",
    "k8s.io.apimachinery.pkg.apis.meta.v1.FieldsV1": "raw",
}
# FieldDescriptorProto.Type -> token
SCALARS = {1: "f", 2: "f", 3: "i", 4: "i", 5: "i", 6: "i", 7: "i", 8: "b", 9: "s", 12: "y",
           13: "i", 15: "i", 16: "i", 17: "z", 18: "z"}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((num, value))
        elif wire == 2:
            n, i = _varint(data, i)
            out.append((num, data[i:i + n]))
            i += n
        elif wire == 5:
            out.append((num, data[i:i + 4]))
            i += 4
        elif wire == 1:
            out.append((num, data[i:i + 8]))
            i += 8
        else:
            raise ValueError(f"wire type {wire}")
    return out


def _one(fs: list[tuple[int, int | bytes]], num: int, default: int | bytes = b"") -> int | bytes:
    return next((v for n, v in fs if n == num), default)


Field = tuple[int, str, str, bool]  # number, json name, type token, repeated


def messages(blob: bytes) -> dict[str, list[Field]]:
    top = fields(blob)
    package = _one(top, 2)
    assert isinstance(package, bytes)
    out: dict[str, list[Field]] = {}

    def walk(desc: bytes, prefix: str, maps: dict[str, tuple[str, str]]) -> None:
        fs = fields(desc)
        name = _one(fs, 1)
        assert isinstance(name, bytes)
        full = f"{prefix}.{name.decode()}"
        nested_maps: dict[str, tuple[str, str]] = {}
        for n, v in fs:
            if n == 3 and isinstance(v, bytes):  # nested_type: map entries
                nested = fields(v)
                opts = _one(nested, 7)
                if isinstance(opts, bytes) and _one(fields(opts), 7, 0) == 1:
                    entry = {_one(fields(f), 3, 0): fields(f) for k, f in nested
                             if k == 2 and isinstance(f, bytes)}
                    entry_name = _one(nested, 1)
                    assert isinstance(entry_name, bytes)
                    nested_maps[f"{full}.{entry_name.decode()}"] = (_token(entry[1]),
                                                                    _token(entry[2]))
        result: list[Field] = []
        for n, v in fs:
            if n != 2 or not isinstance(v, bytes):
                continue
            f = fields(v)
            fname = _one(f, 1).decode()  # type: ignore[union-attr]
            number = _one(f, 3, 0)
            assert isinstance(number, int)
            repeated = _one(f, 4, 1) == 3
            type_name = _one(f, 6)
            if isinstance(type_name, bytes) and type_name.decode()[1:] in nested_maps:
                _, value = nested_maps[type_name.decode()[1:]]
                result.append((number, fname, "{}" + value, False))
            else:
                result.append((number, fname, _token(f), repeated))
        out[full] = result

    for n, v in top:
        if n == 4 and isinstance(v, bytes):
            walk(v, package.decode(), {})
    return out


def _token(f: list[tuple[int, int | bytes]]) -> str:
    kind = _one(f, 5, 0)
    if kind in (11, 14):
        type_name = _one(f, 6)
        assert isinstance(type_name, bytes)
        ref = type_name.decode()[1:]
        return SPECIAL.get(ref, "e" if kind == 14 else "@" + ref)
    assert isinstance(kind, int)
    return SCALARS[kind]


def descriptors(binary: str) -> dict[str, list[Field]]:
    with open(binary, "rb") as f:
        data = f.read()
    found: dict[str, list[Field]] = {}
    for m in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        try:
            blob = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[m.start():
                                                                          m.start() + 4_000_000])
        except zlib.error:
            continue
        if blob[:1] == b"\x0a" and b"generated.proto" in blob[:120]:
            try:
                found.update(messages(blob))
            except (ValueError, IndexError, AssertionError, KeyError):
                continue
    return found


SHORT = (("k8s.io.api.core.v1.", "core."), ("k8s.io.api.discovery.v1.", "disc."),
         ("k8s.io.apimachinery.pkg.apis.meta.v1.", "meta."), ("k8s.io.api.apps.v1.", "apps."),
         ("k8s.io.api.rbac.v1.", "rbac."), ("k8s.io.api.authentication.v1.", "authn."),
         ("k8s.io.api.authorization.v1.", "authz."))


def short(name: str) -> str:
    for long, s in SHORT:
        if name.startswith(long):
            return s + name[len(long):]
    raise ValueError(name)


def main() -> None:
    table = descriptors(sys.argv[1])
    seen: dict[str, list[Field]] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = table[name]
        for _, _, token, _ in seen[name]:
            ref = token.lstrip("{}")
            if ref.startswith("@"):
                todo.append(ref[1:])
    out = ['"""Protobuf field numbers of the served kinds; generated by '
           'tests/api/regen_protobuf.py.',
           "", "Do not edit by hand: regenerate. Language: see protobuf.py.", '"""', "",
           'PROTO_TEXT = """\\']
    for name in sorted(seen, key=short):
        parts = []
        for number, fname, token, repeated in sorted(seen[name]):
            ref = token.lstrip("{}")
            if ref.startswith("@"):
                token = token[: len(token) - len(ref)] + short(ref[1:])
            parts.append(f"{number}:{fname}:{'[]' if repeated else ''}{token}")
        line = f"{short(name)}: " + " ".join(parts)
        out.extend(textwrap.wrap(line, width=96, subsequent_indent="    ",
                                 break_long_words=False, break_on_hyphens=False))
    out.append('"""')
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
