"""Parse iptables-save text into tables of chains of rules, as strictly as the kernel would.

The input is what ``iptables-save`` / ``ip6tables-save`` print (also what kube-proxy feeds
to ``iptables-restore``): ``*table`` sections holding ``:CHAIN POLICY [p:b]`` declarations,
``-A CHAIN ...`` rules and ``COMMIT``; ``#`` lines are comments. ``-N`` and ``-X`` are
accepted too, because restore input declares stale chains and then deletes them with ``-X``.

Each rule's arguments are tokenized the way iptables-restore does (double quotes, with
backslash escapes inside them), then every option is attributed to its owner: the rule
itself (``-s``, ``-d``, ``-p``, ``-i``, ``-o``), the target after ``-j``, or the most recently
loaded ``-m`` module that knows it, as iptables resolves options (``-p tcp`` loads the tcp
module implicitly). Anything the tracer does not model (an unknown module, option, target
or command) is a :class:`RulesetParseError` naming the line: silently accepting it could
hide the very renderer bug the tracer exists to catch. So is what iptables-restore itself
would refuse and the tracer can see: a jump to an undeclared chain, a NAT target outside
the nat table, ``-m tcp`` without ``-p tcp``, a chain name longer than 28 characters, a loop.

Rules are indexed by chain as they are read, so a trace only looks at the chains it enters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from kubeproxy.trace.iptables_options import (
    GENERIC_OPTIONS,
    MATCH_BUILDERS,
    MATCH_OPTIONS,
    NAT_TARGETS,
    NEGATABLE_GENERIC,
    OPTION_ALIASES,
    PORT_OPTIONS,
    TARGET_OPTIONS,
    Opt,
    OptionError,
    Options,
    RuleContext,
    build_target,
    normalize_protocol,
)
from kubeproxy.trace.iptables_rules import (
    AddressMatch,
    Cidr,
    InInterfaceMatch,
    Jump,
    Match,
    OutInterfaceMatch,
    ProtocolMatch,
    Rule,
)
from kubeproxy.trace.result import TraceError

# The builtin chains of each table the kernel knows.
BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "raw": ("PREROUTING", "OUTPUT"),
        "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
        "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
        "filter": ("INPUT", "FORWARD", "OUTPUT"),
        "security": ("INPUT", "FORWARD", "OUTPUT"),
    }
)
_MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1: iptables refuses longer names


class RulesetParseError(TraceError):
    """The ruleset text is malformed or uses something the tracer does not model."""

    def __init__(self, lineno: int, text: str, problem: str) -> None:
        super().__init__(f"line {lineno}: {problem}: {text}")
        self.lineno = lineno
        self.text = text
        self.problem = problem


@dataclass(frozen=True)
class Chain:
    table: str
    name: str
    policy: Literal["ACCEPT", "DROP"] | None  # None for user-defined chains
    rules: tuple[Rule, ...]

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True)
class Ruleset:
    """Tables by name, each a mapping of chain name to chain."""

    tables: Mapping[str, Mapping[str, Chain]]

    def chain(self, table: str, name: str) -> Chain | None:
        chains = self.tables.get(table)
        return None if chains is None else chains.get(name)


# --- tokenizing ----------------------------------------------------------------------------


def split_arguments(line: str) -> list[str]:
    """Split a rule line the way iptables-restore does.

    Whitespace separates arguments; a double quote opens a quoted part, inside which a
    backslash escapes the next character; the closing quote ends the argument. Outside
    quotes a backslash is an ordinary character. Raises ValueError on an open quote.
    """
    if '"' not in line:
        return line.split()
    args: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in line:
        if quoted:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                args.append("".join(buf))
                buf.clear()
                quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch in " \t\r\n":
            if buf:
                args.append("".join(buf))
                buf.clear()
        else:
            buf.append(ch)
    if quoted:
        raise ValueError("unterminated quote")
    if buf:
        args.append("".join(buf))
    return args


# --- rules ---------------------------------------------------------------------------------


class _RuleParser:
    """Turns one rule's arguments into a Rule; caches parsed addresses across rules."""

    def __init__(self) -> None:
        self._cidrs: dict[str, Cidr] = {}

    def parse(
        self, args: list[str], table: str, chain: str, index: int, line: int, text: str
    ) -> Rule:
        generic: dict[str, tuple[str, bool]] = {}
        modules: list[tuple[str, Options]] = []
        target: tuple[str, bool] | None = None  # (name, goto)
        target_opts: Options = {}
        negated = False
        i, n = 0, len(args)
        while i < n:
            arg = args[i]
            i += 1
            if arg == "!":
                if negated:
                    raise OptionError("'!' given twice")
                negated = True
                continue
            canonical = GENERIC_OPTIONS.get(arg)
            if canonical is not None:
                if i >= n:
                    raise OptionError(f"{arg} needs a value")
                value = args[i]
                i += 1
                if negated and canonical not in NEGATABLE_GENERIC:
                    raise OptionError(f"{arg} cannot be negated")
                if canonical == "match":
                    if value not in MATCH_OPTIONS:
                        raise OptionError(f"match module {value!r} is not modelled")
                    modules.append((value, {}))
                elif canonical in ("jump", "goto"):
                    if target is not None:
                        raise OptionError("more than one -j/-g")
                    target = (value, canonical == "goto")
                elif canonical in generic:
                    raise OptionError(f"{arg} given twice")
                else:
                    generic[canonical] = (value, negated)
                negated = False
                continue
            option = OPTION_ALIASES.get(arg, arg)
            owner, spec = self._owner(option, target, target_opts, modules, generic)
            value = ""
            if spec.takes_value:
                if i >= n:
                    raise OptionError(f"{arg} needs a value")
                value = args[i]
                i += 1
            if negated and not spec.negatable:
                raise OptionError(f"{arg} cannot be negated")
            if option in owner:
                raise OptionError(f"{arg} given twice")
            owner[option] = (value, negated)
            negated = False
        if negated:
            raise OptionError("'!' at the end of the rule")
        return self._build(generic, modules, target, target_opts, table, chain, index, line, text)

    @staticmethod
    def _owner(
        option: str,
        target: tuple[str, bool] | None,
        target_opts: Options,
        modules: list[tuple[str, Options]],
        generic: dict[str, tuple[str, bool]],
    ) -> tuple[Options, Opt]:
        """Who an option belongs to: the target, else the latest module that knows it."""
        if target is not None:
            spec = TARGET_OPTIONS.get(target[0], {}).get(option)
            if spec is not None:
                return target_opts, spec
        for module, module_opts in reversed(modules):
            spec = MATCH_OPTIONS[module].get(option)
            if spec is not None:
                return module_opts, spec
        # `-p tcp --dport 80` loads the tcp module implicitly, as iptables does.
        proto, proto_negated = generic.get("proto", ("", True))
        if not proto_negated and option in PORT_OPTIONS:
            name = normalize_protocol(proto)
            if name in ("tcp", "udp", "sctp"):
                opts: Options = {}
                modules.append((name, opts))
                return opts, PORT_OPTIONS[option]
        raise OptionError(f"unknown option {option}")

    def _build(
        self,
        generic: dict[str, tuple[str, bool]],
        modules: list[tuple[str, Options]],
        target: tuple[str, bool] | None,
        target_opts: Options,
        table: str,
        chain: str,
        index: int,
        line: int,
        text: str,
    ) -> Rule:
        matches: list[Match] = []
        proto: str | None = None
        for name, (value, negated) in generic.items():
            if name == "src":
                matches.append(AddressMatch("src", self._addresses(value, negated), negated))
            elif name == "dst":
                matches.append(AddressMatch("dst", self._addresses(value, negated), negated))
            elif name == "proto":
                matches.append(ProtocolMatch(normalize_protocol(value), negated))
                proto = None if negated else normalize_protocol(value)
            elif name == "in":
                matches.append(InInterfaceMatch(value, negated))
            else:
                matches.append(OutInterfaceMatch(value, negated))
        ctx = RuleContext(proto, [])
        for module, opts in modules:
            matches.extend(MATCH_BUILDERS[module](opts, ctx))
        built = None
        if target is not None:
            if target[0] in NAT_TARGETS and table != "nat":
                raise OptionError(f"{target[0]} is only valid in the nat table")
            built = build_target(target[0], target[1], target_opts)
        comment = "; ".join(ctx.comments) if ctx.comments else None
        return Rule(line, text, chain, index, tuple(matches), built, comment)

    def _addresses(self, value: str, negated: bool) -> tuple[Cidr, ...]:
        parts = value.split(",")
        if negated and len(parts) > 1:
            raise OptionError("'!' does not go with several addresses")
        cidrs = []
        for part in parts:
            cidr = self._cidrs.get(part)
            if cidr is None:
                try:
                    cidr = Cidr.parse(part)
                except ValueError:
                    raise OptionError(f"bad address {part!r}") from None
                self._cidrs[part] = cidr
            cidrs.append(cidr)
        return tuple(cidrs)


# --- tables --------------------------------------------------------------------------------


@dataclass
class _Section:
    """One ``*table`` ... ``COMMIT`` section while it is being read."""

    name: str
    line: int
    policies: dict[str, Literal["ACCEPT", "DROP"] | None] = field(default_factory=dict)
    rules: dict[str, list[Rule]] = field(default_factory=dict)

    def declare(self, args: list[str]) -> None:
        if len(args) not in (2, 3):
            raise OptionError("a chain line is :NAME POLICY [packets:bytes]")
        name, policy = args[0], args[1]
        _check_chain_name(name)
        if name in self.policies:
            raise OptionError(f"chain {name} declared twice")
        if name in BUILTIN_CHAINS[self.name]:
            if policy == "ACCEPT":
                self.policies[name] = "ACCEPT"
            elif policy == "DROP":
                self.policies[name] = "DROP"
            else:
                raise OptionError(f"builtin chain {name} needs policy ACCEPT or DROP")
        elif policy != "-":
            raise OptionError(f"user-defined chain {name} cannot have a policy")
        else:
            self.policies[name] = None
        self.rules[name] = []  # declaring a chain flushes it

    def delete(self, name: str) -> None:
        if name in BUILTIN_CHAINS[self.name]:
            raise OptionError(f"cannot delete builtin chain {name}")
        if self.rules.get(name):
            raise OptionError(f"cannot delete chain {name}: it has rules")
        # A chain not declared here lives only in the kernel, outside this text: ignore.
        self.policies.pop(name, None)
        self.rules.pop(name, None)

    def rules_of(self, name: str) -> list[Rule]:
        if name not in self.policies and name not in BUILTIN_CHAINS[self.name]:
            raise OptionError(f"chain {name} is not declared in table {self.name}")
        return self.rules.setdefault(name, [])

    def finish(self) -> dict[str, Chain]:
        """Resolve jumps, refuse loops, and freeze the table."""
        for name in BUILTIN_CHAINS[self.name]:
            self.policies.setdefault(name, "ACCEPT")  # builtin chains always exist
        jumps: dict[str, list[Rule]] = {}
        for name, rules in self.rules.items():
            for rule in rules:
                if isinstance(rule.target, Jump):
                    dest = rule.target.chain
                    if dest not in self.policies:
                        problem = f"jump to undeclared chain {dest} in table {self.name}"
                        raise RulesetParseError(rule.line, rule.text, problem)
                    if self.policies[dest] is not None:
                        raise RulesetParseError(
                            rule.line, rule.text, f"cannot jump to builtin chain {dest}"
                        )
                    jumps.setdefault(name, []).append(rule)
        _refuse_loops(jumps)
        chains: dict[str, Chain] = {}
        for name, policy in self.policies.items():
            chains[name] = Chain(self.name, name, policy, tuple(self.rules.get(name, ())))
        return chains


def _check_chain_name(name: str) -> None:
    if len(name) > _MAX_CHAIN_NAME:
        raise OptionError(f"chain name {name} is longer than {_MAX_CHAIN_NAME} characters")
    if name.startswith(("-", "!")) or name in TARGET_OPTIONS:
        raise OptionError(f"{name!r} cannot be a chain name")


def _refuse_loops(jumps: dict[str, list[Rule]]) -> None:
    """The kernel refuses a ruleset whose jumps (or gotos) form a cycle; so do we."""
    done: set[str] = set()
    for root in jumps:
        if root in done:
            continue
        trail = [root]
        stack = [iter(jumps[root])]
        while stack:
            rule = next(stack[-1], None)
            if rule is None:
                done.add(trail.pop())
                stack.pop()
                continue
            assert isinstance(rule.target, Jump)
            dest = rule.target.chain
            if dest in trail:
                cycle = " -> ".join([*trail[trail.index(dest) :], dest])
                raise RulesetParseError(rule.line, rule.text, f"chain loop {cycle}")
            if dest not in done:
                trail.append(dest)
                stack.append(iter(jumps.get(dest, ())))


def parse_iptables_save(text: str) -> Ruleset:
    """Parse a whole iptables-save (or ip6tables-save) dump; raises RulesetParseError."""
    parser = _RuleParser()
    tables: dict[str, Mapping[str, Chain]] = {}
    section: _Section | None = None
    lineno = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        try:
            if section is None:
                section = _start_section(line, lineno, tables)
            elif line == "COMMIT":
                tables[section.name] = MappingProxyType(section.finish())
                section = None
            elif line[0] == ":":
                section.declare(line[1:].split())
            else:
                _command(section, parser, split_arguments(line), lineno, line)
        except RulesetParseError:
            raise
        except ValueError as err:
            raise RulesetParseError(lineno, line, str(err)) from None
    if section is not None:
        raise RulesetParseError(section.line, f"*{section.name}", "table has no COMMIT")
    return Ruleset(MappingProxyType(tables))


def _start_section(line: str, lineno: int, tables: dict[str, Mapping[str, Chain]]) -> _Section:
    if not line.startswith("*"):
        raise OptionError("expected a *table line")
    name = line[1:]
    if name not in BUILTIN_CHAINS:
        raise OptionError(f"unknown table {name!r}")
    if name in tables:
        raise OptionError(f"table {name} appears twice")
    return _Section(name, lineno)


def _command(section: _Section, parser: _RuleParser, args: list[str], line: int, text: str) -> None:
    if args[0].startswith("[") and args[0].endswith("]"):  # counters from iptables-save -c
        args = args[1:]
    if len(args) < 2:
        raise OptionError("expected -A CHAIN ..., -N CHAIN or -X CHAIN")
    command, chain = args[0], args[1]
    if command in ("-A", "--append"):
        rules = section.rules_of(chain)
        rules.append(parser.parse(args[2:], section.name, chain, len(rules) + 1, line, text))
    elif command in ("-N", "--new-chain") and len(args) == 2:
        section.declare([chain, "-"])
    elif command in ("-X", "--delete-chain") and len(args) == 2:
        section.delete(chain)
    else:
        raise OptionError(f"command {command} is not supported by the tracer")
