"""Parse iptables-save text into tables of chains of rules, as strictly as the kernel would.

The input is what ``iptables-save`` / ``ip6tables-save`` print (also what kube-proxy feeds
to ``iptables-restore``): ``*table`` sections holding ``:CHAIN POLICY [p:b]`` declarations,
``-A CHAIN ...`` rules and ``COMMIT``; ``#`` lines are comments. ``-N`` and ``-X`` are
accepted too, because restore input declares stale chains and then deletes them with ``-X``.
Only the tables the tracer follows packets through are accepted (mangle, nat, filter), and
of their builtin chains only those the tracer traverses (``HOOK_TABLES``) may hold rules or
a DROP policy: anything else would be silently ignored, so it is refused.

Parsing happens in two steps, because a big cluster's dump has hundreds of thousands of
rules and a trace enters a few dozen chains:

1. ``parse_iptables_save`` reads the structure eagerly: tables, chain declarations and
   policies, ``-N`` / ``-X``, and which lines are rules of which chain. A rule is only
   looked at up to its chain name; a rule for an undeclared chain is refused here.
2. ``Ruleset.chain`` parses a chain's rules the first time the chain is asked for, and
   keeps the result (so parse once, trace many is cheap). ``Ruleset.check`` parses every
   chain at once, for callers that want the whole ruleset validated.

Each rule's arguments are tokenized the way iptables-restore does (double quotes, with
backslash escapes inside them), then every option is attributed to its owner: the rule
itself (``-s``, ``-d``, ``-p``, ``-i``, ``-o``), the target after ``-j``, or the most recently
loaded ``-m`` module that knows it, as iptables resolves options (``-p tcp`` loads the tcp
module implicitly). Anything the tracer does not model (an unknown module, option, target
or command) is a :class:`RulesetParseError` naming the line: silently accepting it could
hide the very renderer bug the tracer exists to catch. So is what iptables-restore itself
would refuse and the tracer can see: a jump to an undeclared chain, a NAT target outside
the nat table or a DROP inside it, ``-m tcp`` without ``-p tcp``, a chain name longer than
28 characters. Jump loops are refused by ``Ruleset.check`` and, for the jumps a trace
takes, by the tracer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from kubeproxy.errors import TraceError
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
    split_arguments,
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

# The builtin chains of each table the tracer accepts.
BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
        "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
        "filter": ("INPUT", "FORWARD", "OUTPUT"),
    }
)
# The tables the tracer runs at each hook, in the kernel's priority order.
HOOK_TABLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "PREROUTING": ("mangle", "nat"),  # mangle (-150), then nat: DNAT (-100)
        "INPUT": ("filter",),  # delivered to this node
        "FORWARD": ("filter",),  # routed through this node
        "OUTPUT": ("nat", "filter"),  # locally originated: nat DNAT (-100), then filter (0)
        "POSTROUTING": ("nat",),  # SNAT / MASQUERADE (100)
    }
)
# Builtin chains the tracer walks; the others must stay empty with an ACCEPT policy.
TRACED_CHAINS: frozenset[tuple[str, str]] = frozenset(
    (table, hook) for hook, tables in HOOK_TABLES.items() for table in tables
)
_UNTRACED = (
    frozenset((table, chain) for table, chains in BUILTIN_CHAINS.items() for chain in chains)
    - TRACED_CHAINS
)
_MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1: iptables refuses longer names
_Policy = Literal["ACCEPT", "DROP"]


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
    policy: _Policy | None  # None for user-defined chains
    rules: tuple[Rule, ...]

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True)
class _Table:
    """A table as declared: chain policies (None: user-defined) and each chain's rules,
    as indexes into the dump's lines, not yet parsed."""

    policies: Mapping[str, _Policy | None]
    rules: Mapping[str, list[int]]


class Ruleset:
    """Tables of declared chains; each chain's rules are parsed when first asked for."""

    def __init__(self, lines: list[str], tables: Mapping[str, _Table]) -> None:
        self._lines = lines
        self._tables = tables
        self._parser = _RuleParser()
        self._parsed: dict[tuple[str, str], Chain] = {}

    def table_names(self) -> tuple[str, ...]:
        return tuple(self._tables)

    def chain_names(self, table: str) -> tuple[str, ...]:
        declared = self._tables.get(table)
        return () if declared is None else tuple(declared.policies)

    def chain(self, table: str, name: str) -> Chain | None:
        """The chain, its rules parsed; None if the table or chain is not declared."""
        chain = self._parsed.get((table, name))
        if chain is None:
            declared = self._tables.get(table)
            if declared is None or name not in declared.policies:
                return None
            rules = self._parse_rules(table, name, declared)
            chain = Chain(table, name, declared.policies[name], rules)
            self._parsed[(table, name)] = chain
        return chain

    def check(self) -> None:
        """Parse every chain now and refuse jump loops, as iptables-restore would."""
        for table, declared in self._tables.items():
            jumps: dict[str, list[Rule]] = {}
            for name in declared.policies:
                chain = self.chain(table, name)
                assert chain is not None
                jumps[name] = [r for r in chain.rules if isinstance(r.target, Jump)]
            _refuse_loops(jumps)

    def _parse_rules(self, table: str, name: str, declared: _Table) -> tuple[Rule, ...]:
        rules: list[Rule] = []
        for index, at in enumerate(declared.rules.get(name, ()), 1):
            lineno, text = at + 1, self._lines[at].strip()
            try:
                args = split_arguments(text)
                if args[0].startswith("["):  # counters from iptables-save -c
                    args = args[1:]
                rule = self._parser.parse(args[2:], table, name, index, lineno, text)
            except ValueError as err:
                raise RulesetParseError(lineno, text, str(err)) from None
            if isinstance(rule.target, Jump):
                dest = rule.target.chain
                if dest not in declared.policies:
                    problem = f"jump to undeclared chain {dest} in table {table}"
                    raise RulesetParseError(lineno, text, problem)
                if declared.policies[dest] is not None:
                    raise RulesetParseError(lineno, text, f"cannot jump to builtin chain {dest}")
            rules.append(rule)
        return tuple(rules)


# --- rules ---------------------------------------------------------------------------------


@dataclass
class _Collected:
    """One rule's options, sorted by owner, while its arguments are read."""

    generic: dict[str, tuple[str, bool]] = field(default_factory=dict)
    modules: list[tuple[str, Options]] = field(default_factory=list)
    target: tuple[str, bool] | None = None  # (name, goto)
    target_opts: Options = field(default_factory=dict)


class _RuleParser:
    """Turns one rule's arguments into a Rule; caches parsed addresses across rules."""

    def __init__(self) -> None:
        self._cidrs: dict[str, Cidr] = {}

    def parse(
        self, args: list[str], table: str, chain: str, index: int, line: int, text: str
    ) -> Rule:
        got = _Collected()
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
                self._generic(got, arg, canonical, args[i], negated)
                i += 1
                negated = False
                continue
            option = OPTION_ALIASES.get(arg, arg)
            owner, spec = self._owner(option, got)
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
        return self._build(got, table, chain, index, line, text)

    @staticmethod
    def _generic(got: _Collected, arg: str, canonical: str, value: str, negated: bool) -> None:
        """Record one of the options every rule has (-s, -p, -m, -j, ...)."""
        if negated and canonical not in NEGATABLE_GENERIC:
            raise OptionError(f"{arg} cannot be negated")
        if canonical == "match":
            if value not in MATCH_OPTIONS:
                raise OptionError(f"match module {value!r} is not modelled")
            got.modules.append((value, {}))
        elif canonical in ("jump", "goto"):
            if got.target is not None:
                raise OptionError("more than one -j/-g")
            got.target = (value, canonical == "goto")
        elif canonical in got.generic:
            raise OptionError(f"{arg} given twice")
        else:
            got.generic[canonical] = (value, negated)

    @staticmethod
    def _owner(option: str, got: _Collected) -> tuple[Options, Opt]:
        """Who an option belongs to: the target, else the latest module that knows it."""
        if got.target is not None:
            spec = TARGET_OPTIONS.get(got.target[0], {}).get(option)
            if spec is not None:
                return got.target_opts, spec
        for module, module_opts in reversed(got.modules):
            spec = MATCH_OPTIONS[module].get(option)
            if spec is not None:
                return module_opts, spec
        # `-p tcp --dport 80` loads the tcp module implicitly, as iptables does.
        proto, proto_negated = got.generic.get("proto", ("", True))
        if not proto_negated and option in PORT_OPTIONS:
            name = normalize_protocol(proto)
            if name in ("tcp", "udp", "sctp"):
                opts: Options = {}
                got.modules.append((name, opts))
                return opts, PORT_OPTIONS[option]
        raise OptionError(f"unknown option {option}")

    def _build(
        self, got: _Collected, table: str, chain: str, index: int, line: int, text: str
    ) -> Rule:
        matches: list[Match] = []
        proto: str | None = None
        for name, (value, negated) in got.generic.items():
            if name in ("src", "dst"):
                field_name: Literal["src", "dst"] = "src" if name == "src" else "dst"
                matches.append(AddressMatch(field_name, self._addresses(value, negated), negated))
            elif name == "proto":
                matches.append(ProtocolMatch(normalize_protocol(value), negated))
                proto = None if negated else normalize_protocol(value)
            elif name == "in":
                matches.append(InInterfaceMatch(value, negated))
            else:
                matches.append(OutInterfaceMatch(value, negated))
        ctx = RuleContext(proto, [])
        for module, opts in got.modules:
            matches.extend(MATCH_BUILDERS[module](opts, ctx))
        built = None
        if got.target is not None:
            name, goto = got.target
            if name in NAT_TARGETS and table != "nat":
                raise OptionError(f"{name} is only valid in the nat table")
            if name == "DROP" and table == "nat":  # iptables refuses it, so do we
                raise OptionError("the nat table is not intended for filtering: no DROP there")
            built = build_target(name, goto, got.target_opts)
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
    policies: dict[str, _Policy | None] = field(default_factory=dict)
    rules: dict[str, list[int]] = field(default_factory=dict)  # chain -> line indexes

    def declare(self, args: list[str]) -> None:
        if len(args) not in (2, 3):
            raise OptionError("a chain line is :NAME POLICY [packets:bytes]")
        name, policy = args[0], args[1]
        _check_chain_name(name)
        if name in self.policies:
            raise OptionError(f"chain {name} declared twice")
        if name in BUILTIN_CHAINS[self.name]:
            if policy not in ("ACCEPT", "DROP"):
                raise OptionError(f"builtin chain {name} needs policy ACCEPT or DROP")
            if policy == "DROP" and (self.name, name) in _UNTRACED:
                raise OptionError(f"the tracer does not follow packets through {self.name} {name}")
            self.policies[name] = "ACCEPT" if policy == "ACCEPT" else "DROP"
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

    def append(self, chain: str, at: int) -> None:
        """File the rule on line index `at` under its chain, unparsed."""
        rules = self.rules.get(chain)
        if rules is None:
            if chain not in BUILTIN_CHAINS[self.name]:
                raise OptionError(f"chain {chain} is not declared in table {self.name}")
            rules = self.rules[chain] = []
        if not rules and (self.name, chain) in _UNTRACED:
            raise OptionError(f"the tracer does not follow packets through {self.name} {chain}")
        rules.append(at)

    def finish(self) -> _Table:
        for name in BUILTIN_CHAINS[self.name]:
            self.policies.setdefault(name, "ACCEPT")  # builtin chains always exist
        return _Table(MappingProxyType(self.policies), MappingProxyType(self.rules))


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
    """Read the structure of an iptables-save (or ip6tables-save) dump.

    Raises RulesetParseError for a structural problem; a rule's own problems surface
    when its chain is first parsed (``Ruleset.chain`` / ``Ruleset.check``).
    """
    lines = text.splitlines()
    tables: dict[str, _Table] = {}
    section: _Section | None = None
    for at, raw in enumerate(lines):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        try:
            if section is not None and line.startswith("-A "):  # the bulk: just file it
                end = line.find(" ", 3)
                section.append(line[3:end] if end > 0 else line[3:], at)
            elif section is None:
                section = _start_section(line, at + 1, tables)
            elif line == "COMMIT":
                tables[section.name] = section.finish()
                section = None
            elif line[0] == ":":
                section.declare(line[1:].split())
            else:
                _command(section, split_arguments(line), at)
        except ValueError as err:
            raise RulesetParseError(at + 1, line, str(err)) from None
    if section is not None:
        raise RulesetParseError(section.line, f"*{section.name}", "table has no COMMIT")
    return Ruleset(lines, MappingProxyType(tables))


def _start_section(line: str, lineno: int, tables: Mapping[str, _Table]) -> _Section:
    if not line.startswith("*"):
        raise OptionError("expected a *table line")
    name = line[1:]
    if name not in BUILTIN_CHAINS:
        raise OptionError(f"table {name!r} is not modelled (only mangle, nat and filter)")
    if name in tables:
        raise OptionError(f"table {name} appears twice")
    return _Section(name, lineno)


def _command(section: _Section, args: list[str], at: int) -> None:
    if args[0].startswith("[") and args[0].endswith("]"):  # counters from iptables-save -c
        args = args[1:]
    if len(args) < 2:
        raise OptionError("expected -A CHAIN ..., -N CHAIN or -X CHAIN")
    command, chain = args[0], args[1]
    if command in ("-A", "--append"):
        section.append(chain, at)
    elif command in ("-N", "--new-chain") and len(args) == 2:
        section.declare([chain, "-"])
    elif command in ("-X", "--delete-chain") and len(args) == 2:
        section.delete(chain)
    else:
        raise OptionError(f"command {command} is not supported by the tracer")
