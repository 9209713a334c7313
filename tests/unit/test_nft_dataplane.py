"""The nftables data plane against a strict fake kernel: full and partial syncs.

``FakeTransport`` below is an in-memory nf_tables: like the kernel (and knftables' fake)
it applies a transaction all-or-nothing and refuses what the kernel refuses (rules in
missing chains, jumps to missing chains, references to missing sets, duplicate or missing
elements, deleting what is still referenced). After every sync the fake must hold exactly
what the rendered script says; partial syncs must touch only the changed Services.
"""

from __future__ import annotations

import copy
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubeproxy.config import LBAlgorithm, ProxyConfig
from kubeproxy.dataplane.base import DataPlaneError, Result
from kubeproxy.dataplane.nftables import Listing, NftablesDataPlane, Op, find_netns
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.pipeline import render_nftables_ruleset
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
from kubeproxy.render.nft_parse import parse_script
from kubeproxy.render.nftables import TABLE, NftRuleset, chain_text
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

# -- a strict fake kernel ------------------------------------------------------------


@dataclass
class FakeTable:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, SetDef] = field(default_factory=dict)
    elements: dict[str, dict[tuple[object, ...], Element]] = field(default_factory=dict)


class FakeTransport:
    def __init__(self) -> None:
        self.tables: dict[str, FakeTable] = {}
        self.transactions: list[list[Op]] = []
        self.fail_next: str | None = None  # make the next commit fail with this message

    def listing(self, family: str) -> Listing | None:
        table = self.tables.get(family)
        if table is None:
            return None
        return Listing(frozenset(table.chains), frozenset(table.sets))

    def commit(self, ops: Iterable[Op]) -> None:
        ops = [op._replace(elements=tuple(op.elements)) for op in ops]
        self.transactions.append(ops)
        if self.fail_next is not None:
            msg, self.fail_next = self.fail_next, None
            raise DataPlaneError(msg)
        tables = copy.deepcopy(self.tables)
        for op in ops:
            _apply(tables, op)
        for family, table in tables.items():
            _check_references(family, table)
        self.tables = tables

    def text(self, family: str) -> str:
        """The table in ``nft list`` form (sets, then chains, sorted)."""
        table = self.tables[family]
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


def _fail(code: int, what: str) -> DataPlaneError:
    return DataPlaneError(f"{what}: {os.strerror(code)}")


def _apply(tables: dict[str, FakeTable], op: Op) -> None:
    if op.kind == "add-table":
        tables.setdefault(op.family, FakeTable())
        return
    table = tables.get(op.family)
    if table is None:
        raise _fail(errno.ENOENT, f"{op.kind} {op.name}: no table")
    if op.kind == "delete-table":
        del tables[op.family]
    elif op.kind == "add-chain":
        assert op.chain is not None
        old = table.chains.get(op.name)
        if old is not None and old.hook != op.chain.hook:
            raise _fail(errno.EEXIST, f"add chain {op.name}: other hook")
        if old is None:
            table.chains[op.name] = Chain(op.name, (), op.chain.hook, op.chain.comment)
    elif op.kind == "flush-chain":
        chain = _chain(table, op.name)
        table.chains[op.name] = Chain(op.name, (), chain.hook, chain.comment)
    elif op.kind == "delete-chain":
        _chain(table, op.name)
        if _referenced_chain(table, op.name):
            raise _fail(errno.EBUSY, f"delete chain {op.name}")
        del table.chains[op.name]
    elif op.kind == "add-rule":
        assert op.rule is not None
        chain = _chain(table, op.name)
        table.chains[op.name] = Chain(op.name, (*chain.rules, op.rule), chain.hook,
                                      chain.comment)
    elif op.kind == "add-set":
        assert op.sdef is not None
        old_set = table.sets.get(op.name)
        if old_set is not None and (old_set.key, old_set.data, old_set.timeout) != (
                op.sdef.key, op.sdef.data, op.sdef.timeout):
            raise _fail(errno.EEXIST, f"add set {op.name}: other definition")
        table.sets.setdefault(op.name, op.sdef)
        table.elements.setdefault(op.name, {})
    elif op.kind == "flush-set":
        _set(table, op.name)
        table.elements[op.name] = {}
    elif op.kind == "delete-set":
        _set(table, op.name)
        if _referenced_set(table, op.name):
            raise _fail(errno.EBUSY, f"delete set {op.name}")
        del table.sets[op.name]
        table.elements.pop(op.name, None)
    elif op.kind == "add-elements":
        _set(table, op.name)
        elems = table.elements[op.name]
        for e in op.elements:
            if e.key in elems and elems[e.key] != e:
                raise _fail(errno.EEXIST, f"add element {e.key} to {op.name}")
            elems[e.key] = e
    elif op.kind == "delete-elements":
        _set(table, op.name)
        elems = table.elements[op.name]
        for e in op.elements:
            if e.key not in elems:
                raise _fail(errno.ENOENT, f"delete element {e.key} from {op.name}")
            del elems[e.key]
    else:
        raise AssertionError(op.kind)


def _chain(table: FakeTable, name: str) -> Chain:
    if name not in table.chains:
        raise _fail(errno.ENOENT, f"chain {name}")
    return table.chains[name]


def _set(table: FakeTable, name: str) -> SetDef:
    if name not in table.sets:
        raise _fail(errno.ENOENT, f"set {name}")
    return table.sets[name]


def _rule_chains(rule: Rule) -> set[str]:
    return {i.chain for i in rule.items if isinstance(i, Verdict) and i.chain}


def _rule_sets(rule: Rule) -> set[str]:
    out = set()
    for i in rule.items:
        if isinstance(i, SetMatch):
            out.add(i.set)
        elif isinstance(i, VMap | DnatMap):
            out.add(i.map)
        elif isinstance(i, Update):
            out.add(i.set)
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
                    raise _fail(errno.ENOENT, f"{family} {chain.name}: jump to {target}")
            for name in _rule_sets(rule):
                if name not in table.sets:
                    raise _fail(errno.ENOENT, f"{family} {chain.name}: set {name}")
    for name, elems in table.elements.items():
        for e in elems.values():
            if isinstance(e.data, Verdict) and e.data.chain and \
                    e.data.chain not in table.chains:
                raise _fail(errno.ENOENT, f"{family} @{name}: goto {e.data.chain}")


# -- helpers -------------------------------------------------------------------------

SVC1 = NamespacedName("ns1", "svc1")
SVC2 = NamespacedName("ns1", "svc2")


class NoRunner:
    def run(self, argv: Any, stdin: str | None = None) -> Result:
        raise AssertionError("the data plane must not run commands with a transport")


def cluster(*objs: Obj) -> list[Obj]:
    return [node(ips=[NODE_IP, "fd00::2"]), *objs]


def ruleset(objs: list[Obj], **config: Any) -> NftRuleset:
    decoded = decode_objects(objs)
    assert not decoded.errors, decoded.errors
    settings: dict[str, Any] = {"hostname": NODE, "mode": "nftables",
                                "cluster_cidrs": (parse_cidr("10.0.0.0/8", "t"),)}
    settings.update(config)
    return render_nftables_ruleset(decoded, ProxyConfig(**settings))


def tables_of(text: str) -> dict[str, Any]:
    """Chains, sets and element sets per family, comparable between two listings."""
    out: dict[str, Any] = {}
    for (family, _), t in parse_script(text).items():
        out[family] = (t.chains, t.sets, {n: set(e) for n, e in t.elements.items() if e})
    return out


def assert_holds(fake: FakeTransport, rs: NftRuleset) -> None:
    """The fake kernel holds exactly what the ruleset's script says."""
    want = tables_of(rs.script())
    got = tables_of("".join(fake.text(f) for f in sorted(fake.tables)))
    assert got.keys() == want.keys()
    for family in want:
        for part, name in zip(range(3), ("chains", "sets", "elements"), strict=True):
            assert got[family][part] == want[family][part], f"{family} {name} differ"


def ops_of(fake: FakeTransport, last: int = 1) -> list[Op]:
    return [op for tx in fake.transactions[-last:] for op in tx]


def basic(eps: tuple[str, ...] = ("10.180.0.1", "10.180.1.1"), **svc: Any) -> list[Obj]:
    return [service("svc1", **svc),
            endpoint_slice("svc1", [endpoint(ip, node=NODE if ip.startswith("10.180.0")
                                             else "node2") for ip in eps])]


def other(ip: str = "172.30.0.42", eps: tuple[str, ...] = ("10.180.0.2",)) -> list[Obj]:
    return [service("svc2", cluster_ip=ip),
            endpoint_slice("svc2", [endpoint(e) for e in eps])]


# -- full syncs ----------------------------------------------------------------------


def test_full_sync_writes_the_script() -> None:
    fake = FakeTransport()
    rs = ruleset(cluster(*basic(type="NodePort", ports=[("p80", 80, "TCP", 3001)]),
                         *other()))
    stats = NftablesDataPlane(NoRunner(), fake).sync(rs)
    assert stats.full and len(fake.transactions) == 1
    assert_holds(fake, rs)


@pytest.mark.parametrize("objs", [
    basic(sessionAffinity="ClientIP"),
    basic(type="LoadBalancer", ports=[("p80", 80, "TCP", 3001)], lb_ips=["5.6.7.8"],
          externalTrafficPolicy="Local", loadBalancerSourceRanges=["203.0.113.0/25"]),
    [service("svc1")],  # no endpoints: reject
    [service("svc6", cluster_ip=["172.30.0.46", "fd00:30::46"],
             ipFamilyPolicy="PreferDualStack"),
     endpoint_slice("svc6", [endpoint("fd00:180::6")], name="v6", family="IPv6")],
], ids=["affinity", "lb-local-firewall", "no-endpoints", "ipv6"])
def test_full_sync_of_each_feature(objs: list[Obj]) -> None:
    fake = FakeTransport()
    rs = ruleset(cluster(*objs))
    NftablesDataPlane(NoRunner(), fake).sync(rs)
    assert_holds(fake, rs)


def test_second_full_sync_rewrites_and_keeps_affinity_state() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(sessionAffinity="ClientIP")))
    plane.sync(rs)
    plane.sync(rs)
    assert_holds(fake, rs)
    flushed = {op.name for op in ops_of(fake) if op.kind == "flush-set"}
    assert "service-ips" in flushed
    assert not any(name.startswith("affinity-") for name in flushed)


def test_fresh_instance_takes_over_an_existing_table() -> None:
    fake = FakeTransport()
    NftablesDataPlane(NoRunner(), fake).sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic()))  # svc2 went away while no proxy ran
    NftablesDataPlane(NoRunner(), fake).sync(rs)  # a restarted proxy
    ops = ops_of(fake, 2)
    assert any(op.kind == "delete-chain" and op.name == "nat-prerouting" for op in ops)
    assert_holds(fake, rs)


def test_a_family_without_services_keeps_its_table_until_unused() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    assert set(fake.tables) == {"ip", "ip6"}  # the node has an IPv6 address
    rs = ruleset([node(), *basic()])
    plane.sync(rs)
    assert set(fake.tables) == {"ip"}


# -- partial syncs -------------------------------------------------------------------


def test_partial_sync_touches_only_the_changed_service() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic(eps=("10.180.0.1", "10.180.1.1", "10.180.1.5")), *other()))
    stats = plane.sync(rs, [SVC1])
    assert not stats.full
    names = {op.name for op in ops_of(fake)}
    assert not any("svc2" in n for n in names), names
    assert_holds(fake, rs)


def test_endpoint_change_of_same_count_writes_only_elements() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic(eps=("10.180.0.1", "10.180.1.9")), *other()))
    stats = plane.sync(rs, [SVC1])
    kinds = {op.kind for op in ops_of(fake)}
    assert kinds == {"add-elements", "delete-elements"}, kinds
    assert stats.chains_written == 0
    assert_holds(fake, rs)


def test_unchanged_service_writes_nothing() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(), *other()))
    plane.sync(rs)
    stats = plane.sync(ruleset(cluster(*basic(), *other())), [SVC1, SVC2])
    assert stats.ops == 0


def test_removed_service_leaves_no_trace() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic()))
    stats = plane.sync(rs, [SVC2])
    assert stats.chains_deleted == 1  # in the follow-up transaction
    assert_holds(fake, rs)
    assert not any("svc2" in c for t in fake.tables.values() for c in t.chains)


def test_shared_elements_are_reference_counted() -> None:
    """Two Services with the same endpoint share its hairpin pair; two ports of one
    Service share its ClusterIP."""
    two_ports = [service("svc1", ports=[("a", 80, "TCP", 0), ("b", 81, "TCP", 0)]),
                 endpoint_slice("svc1", [endpoint("10.180.0.1")],
                                ports=[("a", 80, "TCP"), ("b", 81, "TCP")])]
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*two_ports, *other(eps=("10.180.0.1",)))))
    rs = ruleset(cluster(*two_ports))
    plane.sync(rs, [SVC2])
    assert_holds(fake, rs)
    hairpin = fake.tables["ip"].elements["hairpin-endpoints"]
    assert len(hairpin) == 1  # still used by svc1
    rs = ruleset(cluster(service("svc1", ports=[("a", 80, "TCP", 0)]),
                         endpoint_slice("svc1", [endpoint("10.180.0.1")],
                                        ports=[("a", 80, "TCP")])))
    plane.sync(rs, [SVC1])
    assert_holds(fake, rs)


def test_endpoint_maps_come_and_go_with_their_elements() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*other())))
    rs = ruleset(cluster(*other(), *basic()))
    plane.sync(rs, [SVC1])
    assert_holds(fake, rs)
    rs = ruleset(cluster(*other()))
    plane.sync(rs, [SVC1])
    assert_holds(fake, rs)
    maps = {n for n in fake.tables["ip"].sets if n.startswith("endpoints-")}
    assert len(maps) == 1  # svc2's


def test_affinity_timeout_change_recreates_the_sets() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(sessionAffinity="ClientIP"))))
    rs = ruleset(cluster(*basic(sessionAffinity="ClientIP", sessionAffinityConfig={
        "clientIP": {"timeoutSeconds": 60}})))
    plane.sync(rs, [SVC1])
    assert_holds(fake, rs)


def test_conflicting_frontends_keep_the_first_holder() -> None:
    """Two Services claiming one NodePort (invalid, the API server refuses it): the sync
    must not fail, and the Service that held it keeps it."""
    np: dict[str, Any] = {"type": "NodePort"}
    first = [service("svc1", ports=[("p80", 80, "TCP", 3001)], **np),
             endpoint_slice("svc1", [endpoint("10.180.0.1")])]
    second = [service("svc2", cluster_ip="172.30.0.42", ports=[("p80", 80, "TCP", 3001)],
                      **np), endpoint_slice("svc2", [endpoint("10.180.0.2")])]
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*first)))
    plane.sync(ruleset(cluster(*first, *second)), [SVC2])
    (elem,) = fake.tables["ip"].elements["service-nodeports"].values()
    assert isinstance(elem.data, Verdict) and elem.data.chain and "svc1" in elem.data.chain


def test_fixed_part_change_forces_a_full_sync() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    rs = ruleset(cluster(*basic()), masquerade_bit=13)
    assert plane.sync(rs, [SVC1]).full
    assert_holds(fake, rs)


def test_random_partial_syncs_converge() -> None:
    """A run of partial syncs leaves exactly what a full render describes."""
    import random

    rng = random.Random(4)
    state: dict[int, tuple[int, bool, str]] = {}
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster()))
    for _ in range(40):
        i = rng.randrange(6)
        if i in state and rng.random() < 0.3:
            del state[i]
        else:
            state[i] = (rng.randrange(4), rng.random() < 0.3,
                        rng.choice(["Cluster", "Local"]))
        objs: list[Obj] = []
        for j, (n_eps, affinity, etp) in sorted(state.items()):
            spec: dict[str, Any] = {"type": "NodePort", "externalTrafficPolicy": etp}
            if affinity:
                spec["sessionAffinity"] = "ClientIP"
            objs.append(service(f"s{j}", cluster_ip=f"172.30.1.{j + 1}",
                                ports=[("p", 80, "TCP", 30000 + j)], **spec))
            objs.append(endpoint_slice(f"s{j}", [
                endpoint(f"10.180.{k % 2}.{k + 1}", node=NODE if k % 2 == 0 else "n2")
                for k in range(n_eps)]))
        rs = ruleset(cluster(*objs))
        plane.sync(rs, [NamespacedName("ns1", f"s{i}")])
        assert_holds(fake, rs)


def test_round_robin_and_masquerade_all() -> None:
    fake = FakeTransport()
    rs = ruleset(cluster(*basic()), lb_algorithm=LBAlgorithm.ROUND_ROBIN, masquerade_all=True)
    NftablesDataPlane(NoRunner(), fake).sync(rs)
    assert_holds(fake, rs)
    assert "numgen inc mod 2" in fake.text("ip")


# -- failures, cleanup, safety -------------------------------------------------------


def test_failed_transaction_changes_nothing_and_the_next_sync_recovers() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(), *other()))
    plane.sync(rs)
    before = copy.deepcopy(fake.tables)
    fake.fail_next = "injected failure"
    new = ruleset(cluster(*basic(eps=("10.180.0.7",)), *other()))
    with pytest.raises(DataPlaneError, match="injected"):
        plane.sync(new, [SVC1])
    assert fake.tables == before
    plane.sync(new, [SVC1])
    assert_holds(fake, new)


def test_kernel_style_refusal_is_atomic() -> None:
    """A transaction the fake refuses midway leaves everything as it was."""
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic()))
    plane.sync(rs)
    before = copy.deepcopy(fake.tables)
    bad = [Op("add-chain", "ip", "x", chain=Chain("x")),
           Op("add-rule", "ip", "x", rule=Rule((Verdict("goto", "missing"),)))]
    with pytest.raises(DataPlaneError, match="missing"):
        fake.commit(bad)
    assert fake.tables == before


def test_cleanup_deletes_both_tables() -> None:
    fake = FakeTransport()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    plane.cleanup()
    assert fake.tables == {}
    plane.cleanup()  # nothing left: still fine
    assert plane.sync(ruleset(cluster(*basic())), [SVC1]).full  # state was forgotten


class StatRunner:
    def __init__(self, stdout: str) -> None:
        self.stdout = stdout

    def run(self, argv: Any, stdin: str | None = None) -> Result:
        assert argv[0] == "stat"
        return Result(0, self.stdout, "")


def test_netlink_goes_where_the_runner_runs() -> None:
    mine = os.stat("/proc/self/ns/net").st_ino
    assert find_netns(StatRunner(f"{mine}\n")) is None
    with pytest.raises(DataPlaneError, match="refusing"):
        find_netns(StatRunner("1\n"))
    with pytest.raises(DataPlaneError, match="cannot tell"):
        find_netns(StatRunner("garbage"))
