"""A strict, in-memory nf_tables: the nftables data plane's Transport in tests.

Theory of operation
-------------------
:class:`FakeNftables` holds one ``kube-proxy`` table per family as plain values (chains
with their rules, set definitions, elements by key). Like the kernel, and like the fake
knftables ships, it applies a transaction all-or-nothing: every operation is applied to
a copy, the copy is checked for dangling references, and only then replaces the state.
It refuses what the kernel refuses, with the kernel's errno in a
:class:`~kubeproxy.dataplane.nft_ops.TransactionError`:

* ``ENOENT``: an operation on a missing table, chain, set or element; a rule jumping to
  a missing chain or using a missing set; a verdict map element going to a missing chain;
* ``EBUSY``: deleting a chain or set something still refers to;
* ``EEXIST``: re-adding a base chain with another hook, a set with another definition,
  or an element with other data.

Like the kernel it counts committed transactions in ``generation`` (NFT_MSG_GETGEN),
so flush detection can be tested: a test changes the tables "from outside" by
committing to the fake itself (``kernel.commit([FlushChain("ip", "services")])``), as
``nft`` would. ``rule_counts`` answers as the kernel's filtered rule dump does.

``text(family)`` renders a table the way ``nft list`` does (sorted), for assertions;
``fail(code, on=...)`` makes a later transaction fail as the kernel would, to test the
callers' error paths. Every transaction is kept (``transactions``) with its elements
read out, so tests can assert what was sent.
"""

from __future__ import annotations

import copy
import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, assert_never

from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.nft_ops import (
    AddChain,
    AddElements,
    AddRule,
    AddSet,
    AddTable,
    DeleteChain,
    DeleteElements,
    DeleteSet,
    DeleteTable,
    FlushChain,
    FlushSet,
    Listing,
    Op,
    TransactionError,
)
from kubeproxy.render.nft_ir import (
    Chain,
    DnatMap,
    Element,
    Rule,
    SetDef,
    SetMatch,
    Update,
    Verdict,
    VMap,
    field_types,
)
from kubeproxy.render.nftables import TABLE, chain_text


@dataclass
class FakeTable:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, SetDef] = field(default_factory=dict)
    elements: dict[str, dict[tuple[object, ...], Element]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fault:
    code: int
    on: type[Any] | None  # fail the first transaction holding an op of this type
    what: str


class FakeNftables:
    """An nf_tables Transport that keeps the tables in memory and is as strict as the
    kernel (see the module docstring)."""

    def __init__(self) -> None:
        self.tables: dict[str, FakeTable] = {}
        self.transactions: list[list[Op]] = []
        self._faults: list[_Fault] = []
        self._generation = 1

    def fail(self, code: int, on: type[Any] | None = None, what: str = "injected failure"
             ) -> None:
        """Refuse the next transaction (holding an operation of type ``on``, if given)
        with errno ``code``, changing nothing; once."""
        self._faults.append(_Fault(code, on, what))

    def listing(self, family: str) -> Listing | None:
        table = self.tables.get(family)
        if table is None:
            return None
        return Listing(frozenset(table.chains), frozenset(table.sets))

    def generation(self) -> int:
        return self._generation

    def rule_counts(self, family: str, chains: Iterable[str]) -> dict[str, int] | None:
        table = self.tables.get(family)
        if table is None:
            return None
        return {name: len(table.chains[name].rules) if name in table.chains else 0
                for name in chains}

    def commit(self, ops: Iterable[Op]) -> None:
        done = [_read(op) for op in ops]
        self.transactions.append(done)
        for fault in self._faults:
            if fault.on is None or any(isinstance(op, fault.on) for op in done):
                self._faults.remove(fault)
                raise TransactionError([(fault.what, fault.code)])
        tables = copy.deepcopy(self.tables)
        for op in done:
            _apply(tables, op)
        for family, table in tables.items():
            _check_references(family, table)
        self.tables = tables
        self._generation += 1

    def listed(self) -> str:
        """Both families' tables, as ``dataplane.nftables.listed`` reads the kernel's."""
        return "".join(self.text(family) for family in ("ip", "ip6"))

    def text(self, family: str) -> str:
        """The table in ``nft list`` form (sets, then chains, sorted); "" if none."""
        table = self.tables.get(family)
        if table is None:
            return ""
        out = [f"table {family} {TABLE} {{"]
        for name in sorted(table.sets):
            sdef = table.sets[name]
            key_types = field_types(sdef.key)
            data_types = field_types(sdef.data) if sdef.data and sdef.data != "verdict" else ()
            elems = sorted(e.text(key_types, data_types)
                           for e in table.elements.get(name, {}).values())
            out.extend(sdef.text(elems))
        for name in sorted(table.chains):
            out.extend(chain_text(table.chains[name]))
        out.append("}")
        return "\n".join(out) + "\n"


class NoRunner:
    """A Runner for a data plane given a transport: it must not run anything."""

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        raise AssertionError(f"the data plane ran {list(argv)} although it has a transport")


def _read(op: Op) -> Op:
    """``op`` with its elements read out (they may be a generator, read once)."""
    if isinstance(op, AddElements | DeleteElements):
        return replace(op, elements=tuple(op.elements))
    return op


def _refuse(code: int, what: str) -> TransactionError:
    return TransactionError([(what, code)])


def _apply(tables: dict[str, FakeTable], op: Op) -> None:
    if isinstance(op, AddTable):
        tables.setdefault(op.family, FakeTable())
        return
    table = tables.get(op.family)
    if table is None:
        raise _refuse(errno.ENOENT, f"{type(op).__name__} in {op.family}: no table")
    match op:
        case DeleteTable(family):
            del tables[family]
        case AddChain(_, chain):
            old = table.chains.get(chain.name)
            if old is not None and old.hook != chain.hook:
                raise _refuse(errno.EEXIST, f"add chain {chain.name}: other hook")
            if old is None:
                table.chains[chain.name] = Chain(chain.name, (), chain.hook, chain.comment)
        case FlushChain(_, name):
            old = _chain(table, name)
            table.chains[name] = Chain(name, (), old.hook, old.comment)
        case DeleteChain(_, name):
            _chain(table, name)
            if _referenced_chain(table, name):
                raise _refuse(errno.EBUSY, f"delete chain {name}")
            del table.chains[name]
        case AddRule(_, name, rule):
            old = _chain(table, name)
            table.chains[name] = Chain(name, (*old.rules, rule), old.hook, old.comment)
        case AddSet(_, sdef):
            have = table.sets.get(sdef.name)
            if have is not None and (have.key, have.data, have.timeout) != (
                    sdef.key, sdef.data, sdef.timeout):
                raise _refuse(errno.EEXIST, f"add set {sdef.name}: other definition")
            table.sets.setdefault(sdef.name, sdef)
            table.elements.setdefault(sdef.name, {})
        case FlushSet(_, name):
            _set(table, name)
            table.elements[name] = {}
        case DeleteSet(_, name):
            _set(table, name)
            if _referenced_set(table, name):
                raise _refuse(errno.EBUSY, f"delete set {name}")
            del table.sets[name]
            table.elements.pop(name, None)
        case AddElements(_, sdef, elements):
            _set(table, sdef.name)
            elems = table.elements[sdef.name]
            for e in elements:
                if e.key in elems and elems[e.key] != e:
                    raise _refuse(errno.EEXIST, f"add element {e.key} to {sdef.name}")
                elems[e.key] = e
        case DeleteElements(_, sdef, elements):
            _set(table, sdef.name)
            elems = table.elements[sdef.name]
            for e in elements:
                if e.key not in elems:
                    raise _refuse(errno.ENOENT, f"delete element {e.key} from {sdef.name}")
                del elems[e.key]
        case _:
            assert_never(op)


def _chain(table: FakeTable, name: str) -> Chain:
    if name not in table.chains:
        raise _refuse(errno.ENOENT, f"chain {name}")
    return table.chains[name]


def _set(table: FakeTable, name: str) -> SetDef:
    if name not in table.sets:
        raise _refuse(errno.ENOENT, f"set {name}")
    return table.sets[name]


def _rule_chains(rule: Rule) -> set[str]:
    return {i.chain for i in rule.items if isinstance(i, Verdict) and i.chain}


def _rule_sets(rule: Rule) -> set[str]:
    out = set()
    for i in rule.items:
        if isinstance(i, SetMatch | Update):
            out.add(i.set)
        elif isinstance(i, VMap | DnatMap):
            out.add(i.map)
    return out


def _referenced_chain(table: FakeTable, name: str) -> bool:
    if any(name in _rule_chains(r) for c in table.chains.values() for r in c.rules):
        return True
    return any(isinstance(e.data, Verdict) and e.data.chain == name
               for elems in table.elements.values() for e in elems.values())


def _referenced_set(table: FakeTable, name: str) -> bool:
    return any(name in _rule_sets(r) for c in table.chains.values() for r in c.rules)


def _check_references(family: str, table: FakeTable) -> None:
    for chain in table.chains.values():
        for rule in chain.rules:
            for target in _rule_chains(rule):
                if target not in table.chains:
                    raise _refuse(errno.ENOENT, f"{family} {chain.name}: jump to {target}")
            for name in _rule_sets(rule):
                if name not in table.sets:
                    raise _refuse(errno.ENOENT, f"{family} {chain.name}: set {name}")
    for name, elems in table.elements.items():
        for e in elems.values():
            if isinstance(e.data, Verdict) and e.data.chain and \
                    e.data.chain not in table.chains:
                raise _refuse(errno.ENOENT, f"{family} @{name}: goto {e.data.chain}")
