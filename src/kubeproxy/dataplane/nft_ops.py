"""The vocabulary between the nftables data plane and the kernel: typed operations.

Theory of operation
-------------------
A sync is a list of operations on one family's ``kube-proxy`` table, committed as one
transaction (all of them, or none). Each operation is a frozen dataclass naming exactly
what it needs, so a rule cannot be added without its chain's name nor elements without
their set's definition (the encoder needs it to lay the key out):

========================  ===========================================================
``AddTable``              create the table if missing (``add table``)
``DeleteTable``           delete the table and everything in it
``AddChain``              create the chain if missing; base chains with their hook
``FlushChain``            delete every rule of the chain
``DeleteChain``           delete the (empty, unreferenced) chain
``AddRule``               append a rule to a chain
``AddSet``                create the set or map if missing
``FlushSet``              delete every element of the set
``DeleteSet``             delete the (unreferenced) set
``AddElements``           add elements (read once, possibly a generator)
``DeleteElements``        delete elements, each of which must exist
========================  ===========================================================

A :class:`Transport` takes them to the kernel (dataplane/netlink.py) or to the strict
fake (kubeproxy/testing/nftables.py). Both refuse a transaction the same way: with a
:class:`TransactionError` carrying the kernel's errno, which is what callers test
(``ENOENT``: missing object, ``EBUSY``: still referenced), never the message text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from kubeproxy.errors import DataPlaneError
from kubeproxy.render.nft_ir import Chain, Element, Rule, SetDef


@dataclass(frozen=True, slots=True)
class AddTable:
    family: str


@dataclass(frozen=True, slots=True)
class DeleteTable:
    family: str


@dataclass(frozen=True, slots=True)
class AddChain:
    family: str
    chain: Chain  # its name, hook and comment; its rules come as AddRule

    @property
    def name(self) -> str:
        return self.chain.name


@dataclass(frozen=True, slots=True)
class FlushChain:
    family: str
    name: str


@dataclass(frozen=True, slots=True)
class DeleteChain:
    family: str
    name: str


@dataclass(frozen=True, slots=True)
class AddRule:
    family: str
    chain: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class AddSet:
    family: str
    sdef: SetDef

    @property
    def name(self) -> str:
        return self.sdef.name


@dataclass(frozen=True, slots=True)
class FlushSet:
    family: str
    name: str


@dataclass(frozen=True, slots=True)
class DeleteSet:
    family: str
    name: str


@dataclass(frozen=True, slots=True)
class AddElements:
    family: str
    sdef: SetDef  # the set's definition: how its keys and data are laid out
    elements: Iterable[Element]  # read once

    @property
    def name(self) -> str:
        return self.sdef.name


@dataclass(frozen=True, slots=True)
class DeleteElements:
    family: str
    sdef: SetDef
    elements: Iterable[Element]  # read once

    @property
    def name(self) -> str:
        return self.sdef.name


Op: TypeAlias = (AddTable | DeleteTable | AddChain | FlushChain | DeleteChain | AddRule
                 | AddSet | FlushSet | DeleteSet | AddElements | DeleteElements)


@dataclass(frozen=True)
class Listing:
    """The chain and set names our table holds in one family."""

    chains: frozenset[str]
    sets: frozenset[str]


class TransactionError(DataPlaneError):
    """The kernel (or the fake) refused a transaction; nothing of it was applied.

    ``errno`` is the first refusal's error number; ``errors`` lists every refusal as
    (what was refused, errno), in the order of the transaction.
    """

    def __init__(self, errors: Iterable[tuple[str, int]], prefix: str = "") -> None:
        self.errors = tuple(errors)
        if not self.errors:
            raise ValueError("a TransactionError needs at least one error")
        self.errno = self.errors[0][1]
        what, _ = self.errors[0]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"{prefix}{what}: {os.strerror(self.errno)}{more}")


class Transport(Protocol):
    """Where transactions go: the kernel (NetlinkTransport) or a fake in tests."""

    def commit(self, ops: Iterable[Op]) -> None:
        """Apply all of ``ops`` (read once, in order) atomically, or none; raise
        TransactionError when refused, DataPlaneError when it could not be sent."""

    def listing(self, family: str) -> Listing | None:
        """Chain and set names of our table in ``family``, or None if there is none."""

    def generation(self) -> int:
        """The ruleset's generation id: the kernel moves it with every transaction
        anyone commits, in any table. Cheap (one small message): flush detection reads
        it every second."""

    def rule_counts(self, family: str, chains: Iterable[str]) -> dict[str, int] | None:
        """How many rules each of ``chains`` of our table holds now (0 for a chain that
        is missing), or None when the table itself is missing. Costs one small dump per
        chain: meant for the few fixed chains, not the per-service ones."""
