"""Label and field selectors: parse the query-string syntax, match objects.

Label selectors follow apimachinery/pkg/labels: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
`a notin (x)`, `a`, `!a`, `a>3`, `a<3`, comma-joined (AND). Field selectors follow
apimachinery/pkg/fields: `f=v`, `f==v`, `f!=v`, comma-joined, with `\\,` `\\=` `\\\\`
escapes; only the labels a resource declares are allowed (anything else is a 400, as
upstream answers "field label not supported").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeproxy.apiserver import names
from kubeproxy.apiserver.errors import bad_request
from kubeproxy.apiserver.resources import Resource, field_value

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VAL = r"[-A-Za-z0-9_.]*"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^!\s*({_KEY})$"), "!"),
    (re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VAL})$"), "eq"),
    (re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^()]*)\)$"), "set"),
    (re.compile(rf"^({_KEY})\s*([<>])\s*(-?\d+)$"), "cmp"),
    (re.compile(rf"^({_KEY})$"), "exists"),
)


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op in ("exists", "!"):
            return present == (self.op == "exists")
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        number = _int(value)
        if not present or number is None:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == "gt" else number < bound


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_label_selector(text: str | None) -> LabelSelector:
    if not text or not text.strip():
        return LabelSelector()
    reqs = []
    for raw in _split_top(text):
        part = raw.strip()
        req = _parse_requirement(part)
        problems = names.qualified_name(req.key)
        problems += [p for v in req.values if req.op not in ("gt", "lt")
                     for p in names.label_value(v)]
        if problems:
            raise bad_request(f"unable to parse requirement: {part!r}: {'; '.join(problems)}")
        reqs.append(req)
    return LabelSelector(tuple(reqs))


def _parse_requirement(part: str) -> Requirement:
    for pattern, shape in _PATTERNS:
        m = pattern.match(part)
        if m is None:
            continue
        if shape in ("!", "exists"):
            return Requirement(m.group(1), shape)
        if shape == "eq":
            op = "!=" if m.group(2) == "!=" else "="
            return Requirement(m.group(1), op, (m.group(3),))
        if shape == "set":
            values = tuple(v.strip() for v in m.group(3).split(","))
            if not all(values):
                break
            return Requirement(m.group(1), m.group(2), values)
        return Requirement(m.group(1), "gt" if m.group(2) == ">" else "lt", (m.group(3),))
    raise bad_request(f"unable to parse requirement: found '{part}', expected: a label "
                      "selector requirement such as 'key=value', 'key in (v1,v2)' or '!key'")


@dataclass(frozen=True)
class FieldTerm:
    label: str
    negate: bool
    value: str


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[FieldTerm, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, t.label) == t.value) != t.negate for t in self.terms)

    def value_of(self, label: str) -> str | None:
        """The required value of `label` if the selector pins it (`label=v`)."""
        for t in self.terms:
            if t.label == label and not t.negate:
                return t.value
        return None


def _split_escaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]
            i += 2
            continue
        if ch == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_field_selector(text: str | None, resource: Resource) -> FieldSelector:
    if not text or not text.strip():
        return FieldSelector()
    allowed = {"metadata.name", "metadata.namespace", *resource.field_labels}
    terms = []
    for raw in _split_escaped(text, ","):
        part = raw.strip()
        m = re.match(r"^((?:[^=!\\]|\\.)+?)\s*(!=|==|=)(.*)$", part)
        if m is None:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        label = _unescape(m.group(1).strip())
        if label not in allowed:
            raise bad_request(f'field label not supported: {label}')
        terms.append(FieldTerm(label, m.group(2) == "!=", _unescape(m.group(3).strip())))
    return FieldSelector(tuple(terms))
