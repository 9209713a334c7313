"""Read an ``nft -f`` script (or ``nft list`` output) back into the IR of :mod:`.nft_ir`.

This is the inverse of the renderer's text form, for the vocabulary kube-proxy uses: a
rule is a sequence of matches and statements, each recognised by its leading words. It
knows no policy; anything it does not understand is an error that names the line, so a
renderer bug cannot be read past silently. The tracer runs on what this returns.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from kubeproxy.errors import KubeProxyError
from kubeproxy.render.nft_ir import (
    FIELDS,
    Chain,
    Cmp,
    Dnat,
    DnatMap,
    Element,
    ElementData,
    Expr,
    Field,
    Hook,
    Item,
    Key,
    MarkSet,
    Masquerade,
    Numgen,
    Reject,
    Rule,
    SetDef,
    SetMatch,
    Update,
    Value,
    Verdict,
    VMap,
    field_types,
)

_TOKEN = re.compile(r'"[^"]*"|\{|\}|;|[^\s{};]+')
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
               "srcnat": 100}
_MULTI_WORD = sorted((f.split() for f in FIELDS), key=len, reverse=True)


class ScriptError(KubeProxyError, ValueError):
    """The script is not valid in the vocabulary we understand; names the line."""

    def __init__(self, line: int, text: str, problem: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {problem}: {text.strip()!r}")


@dataclass
class Table:
    family: str
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, SetDef] = field(default_factory=dict)
    elements: dict[str, list[Element]] = field(default_factory=dict)
    dynamic: set[str] = field(default_factory=set)  # sets the kernel fills (affinity)


def parse_script(text: str) -> dict[tuple[str, str], Table]:
    """Tables by (family, name); ``add element`` lines after the blocks are applied."""
    tables: dict[tuple[str, str], Table] = {}
    lines = _logical_lines(text)
    it = iter(lines)
    for lineno, line in it:
        words = line.split()
        if not words:
            continue
        if words[0] == "table" and len(words) >= 4 and words[3] == "{":
            table = tables.setdefault((words[1], words[2]), Table(words[1], words[2]))
            _table_block(table, it)
        elif words[:2] == ["add", "element"] and len(words) >= 5:
            found = tables.get((words[2], words[3]))
            if found is None or words[4] not in found.sets:
                raise ScriptError(lineno, line, "element of an unknown set")
            table = found
            body = line.split("{", 1)[1].rsplit("}", 1)[0]
            table.elements.setdefault(words[4], []).extend(
                _elements(table.sets[words[4]], body, lineno, line))
        else:
            raise ScriptError(lineno, line, "expected a table block")
    return tables


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines, with ``elements = { ... }`` spanning several lines joined into one."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line)
            if pending[1].count("{") == pending[1].count("}"):
                out.append(pending)
                pending = None
            continue
        if (line.startswith("elements =") or line.startswith("add element")) and \
                line.count("{") != line.count("}"):
            pending = (n, line)
            continue
        out.append((n, line))
    if pending is not None:
        raise ScriptError(pending[0], pending[1], "unterminated element list")
    return out


def _table_block(table: Table, it: Iterator[tuple[int, str]]) -> None:
    for lineno, line in it:
        words = line.split()
        if not words or words[0] == "comment":
            continue
        if words[0] == "}":
            return
        if words[0] in ("set", "map") and len(words) == 3 and words[2] == "{":
            _set_block(table, words[1], words[0] == "map", it)
        elif words[0] == "chain" and len(words) == 3 and words[2] == "{":
            table.chains[words[1]] = _chain_block(words[1], it)
        else:
            raise ScriptError(lineno, line, "expected set, map or chain")
    raise ScriptError(0, table.name, "unterminated table")


def _set_block(table: Table, name: str, is_map: bool, it: Iterator[tuple[int, str]]) -> None:
    decl: tuple[str, bool] | None = None
    comment: str | None = None
    timeout: int | None = None
    body: list[tuple[int, str]] = []
    for lineno, line in it:
        words = line.rstrip(";").split()
        if words == ["}"]:
            break
        if words[0] in ("type", "typeof"):
            decl = (" ".join(words[1:]), words[0] == "typeof")
        elif words[0] == "comment":
            comment = _unquote(" ".join(words[1:]))
        elif words[0] == "timeout":
            timeout = _duration(words[1], lineno, line)
        elif words[0] == "flags":
            if "timeout" in words[1] or "dynamic" in words[1]:
                table.dynamic.add(name)
        elif words[0] == "size":
            continue
        elif words[0] == "elements":
            body.append((lineno, line))
        else:
            raise ScriptError(lineno, line, "unknown set property")
    else:
        raise ScriptError(0, name, "unterminated set")
    if decl is None:
        raise ScriptError(0, name, "set without a type")
    spec, typeof = decl
    key, _, data = spec.partition(" : ")
    if is_map != bool(data):
        raise ScriptError(0, name, "map without data, or set with data")
    sdef = SetDef(name, key, data or None, typeof=typeof, comment=comment, timeout=timeout)
    if timeout is not None:
        table.dynamic.add(name)
    table.sets[name] = sdef
    for lineno, line in body:
        inner = line.split("{", 1)[1].rsplit("}", 1)[0]
        table.elements.setdefault(name, []).extend(_elements(sdef, inner, lineno, line))


def _chain_block(name: str, it: Iterator[tuple[int, str]]) -> Chain:
    hook: Hook | None = None
    comment: str | None = None
    rules: list[Rule] = []
    for lineno, line in it:
        if line == "}":
            return Chain(name, tuple(rules), hook, comment)
        if line.startswith("type "):
            hook = _hook(line, lineno)
        elif line.startswith("comment "):
            comment = _unquote(line[len("comment "):])
        elif line:
            rules.append(parse_rule(line, lineno))
    raise ScriptError(0, name, "unterminated chain")


def _hook(line: str, lineno: int) -> Hook:
    m = re.match(r"type (filter|nat) hook (\w+) priority ([^;]+);", line)
    if not m or m.group(2) not in ("prerouting", "input", "forward", "output", "postrouting"):
        raise ScriptError(lineno, line, "unsupported base chain")
    prio = m.group(3).split()
    try:
        value = int(prio[0]) if prio[0].lstrip("-").isdigit() else _PRIORITIES[prio[0]]
        if len(prio) == 3:
            value += int(prio[2]) * (1 if prio[1] == "+" else -1)
    except (KeyError, ValueError, IndexError):
        raise ScriptError(lineno, line, "bad priority") from None
    return Hook(m.group(1), m.group(2), value)  # type: ignore[arg-type]


# -- rules ----------------------------------------------------------------------------


def parse_rule(line: str, lineno: int = 0) -> Rule:
    tokens = _TOKEN.findall(line)
    comment: str | None = None
    if len(tokens) >= 2 and tokens[-2] == "comment":
        comment = _unquote(tokens[-1])
        tokens = tokens[:-2]
    parser = _RuleParser(tokens, line, lineno)
    return Rule(tuple(parser.items()), comment)


class _RuleParser:
    def __init__(self, tokens: list[str], line: str, lineno: int) -> None:
        self.t = tokens
        self.i = 0
        self.line = line
        self.lineno = lineno

    def error(self, problem: str) -> ScriptError:
        return ScriptError(self.lineno, self.line, problem)

    def peek(self, k: int = 0) -> str:
        return self.t[self.i + k] if self.i + k < len(self.t) else ""

    def take(self, expect: str | None = None) -> str:
        tok = self.peek()
        if not tok or (expect is not None and tok != expect):
            raise self.error(f"expected {expect or 'more'} at {tok or 'end'!r}")
        self.i += 1
        return tok

    def items(self) -> Iterator[Item]:
        while self.i < len(self.t):
            yield self.item()

    def item(self) -> Item:
        tok = self.peek()
        if tok in ("jump", "goto"):
            self.take()
            return Verdict(tok, self.take())  # type: ignore[arg-type]
        if tok in ("accept", "drop", "return"):
            self.take()
            return Verdict(tok)  # type: ignore[arg-type]
        if tok == "reject":
            self.take()
            return Reject()
        if tok == "masquerade":
            self.take()
            if self.peek() == "fully-random":
                self.take()
            return Masquerade()
        if tok == "dnat":
            return self.dnat()
        if tok == "update":
            self.take()
            name = self.take()[1:]
            self.take("{")
            expr = self.expr()
            self.take("}")
            return Update(name, expr)
        if self.t[self.i:self.i + 4] == ["meta", "mark", "set", "meta"]:
            self.i += 5
            op = self.take()
            if op not in ("|", "^"):
                raise self.error("unsupported mark arithmetic")
            return MarkSet(op, int(self.take(), 0))  # type: ignore[arg-type]
        return self.match()

    def dnat(self) -> Item:
        self.take("dnat")
        family = self.take() if self.peek() in ("ip", "ip6") else None
        self.take("to")
        if family is None:
            dest = self.take()
            m = re.fullmatch(r"\[?([0-9a-fA-F.:]+?)\]?:(\d+)", dest)
            if not m:
                raise self.error("bad dnat destination")
            return Dnat(ipaddress.ip_address(m.group(1)), int(m.group(2)))
        key = self.key()
        self.take("map")
        return DnatMap(family, key, self.take()[1:])  # type: ignore[arg-type]

    def expr(self) -> Expr:
        if self.peek() == "numgen":
            self.take()
            mode = self.take()
            if mode not in ("random", "inc"):
                raise self.error("bad numgen mode")
            self.take("mod")
            mod = int(self.take())
            offset = 0
            if self.peek() == "offset":
                self.take()
                offset = int(self.take())
            return Numgen(mode, mod, offset)  # type: ignore[arg-type]
        for words in _MULTI_WORD:
            if self.t[self.i:self.i + len(words)] == words:
                self.i += len(words)
                return Field(" ".join(words))
        raise self.error(f"unknown expression at {self.peek()!r}")

    def key(self) -> Key:
        parts = [self.expr()]
        while self.peek() == ".":
            self.take()
            parts.append(self.expr())
        return tuple(parts)

    def match(self) -> Item:
        key = self.key()
        tok = self.peek()
        if tok == "vmap":
            self.take()
            return VMap(key, self.take()[1:])
        negate = tok == "!="
        if negate:
            self.take()
        if self.peek().startswith("@"):
            return SetMatch(key, self.take()[1:], negate)
        if len(key) != 1:
            raise self.error("a concatenation needs a set")
        expr = key[0]
        if self.peek() == "&":
            self.take()
            mask = int(self.take(), 0)
            op = self.take()
            if op not in ("==", "!="):
                raise self.error("bad masked comparison")
            return Cmp(expr, int(self.take(), 0), op == "!=", mask)
        kind = expr.type if isinstance(expr, Field) else "integer"
        return Cmp(expr, parse_value(kind, self.take(), self.error), negate)


def parse_value(kind: str, tok: str, error: object = None) -> Value:
    try:
        if kind in ("ipv4_addr", "ipv6_addr"):
            return (ipaddress.ip_network(tok, strict=False) if "/" in tok
                    else ipaddress.ip_address(tok))
        if kind in ("inet_service", "integer"):
            return int(tok, 0)
        if kind == "mark":
            return int(tok, 0)
        if kind == "ifname":
            return _unquote(tok)
        return tok
    except ValueError:
        raise ValueError(f"bad {kind} value {tok!r}") from None


def _elements(sdef: SetDef, body: str, lineno: int, line: str) -> list[Element]:
    key_types = field_types(sdef.key)
    data_types = field_types(sdef.data) if sdef.data and sdef.data != "verdict" else ()
    out = []
    for raw in _split_elements(body):
        comment: str | None = None
        key_part, _, data_part = raw.partition(" : ")
        m = re.search(r'\s+comment\s+("[^"]*")\s*$', key_part)
        if m:
            comment = _unquote(m.group(1))
            key_part = key_part[:m.start()]
        try:
            key = tuple(parse_value(t, v.strip()) for t, v in
                        zip(key_types, key_part.split(" . "), strict=True))
            data: ElementData = None
            if sdef.data == "verdict":
                words = data_part.split()
                data = Verdict(words[0], words[1] if len(words) > 1 else None)  # type: ignore[arg-type]
            elif sdef.data:
                data = tuple(parse_value(t, v.strip()) for t, v in
                             zip(data_types, data_part.split(" . "), strict=True))
        except (ValueError, IndexError) as err:
            raise ScriptError(lineno, line, f"bad element {raw!r}: {err}") from None
        out.append(Element(key, data, comment))
    return out


def _split_elements(body: str) -> Iterator[str]:
    buf, quoted = "", False
    for ch in body:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            if buf.strip():
                yield buf.strip()
            buf = ""
        else:
            buf += ch
    if buf.strip():
        yield buf.strip()


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _duration(text: str, lineno: int, line: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([dhms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ScriptError(lineno, line, "bad duration")
    return sum(int(n) * units[u] for n, u in parts)
