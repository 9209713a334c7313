"""The nftables data plane against a strict fake kernel: full and partial syncs.

``FakeNftables`` (kubeproxy.testing.nftables) is an in-memory nf_tables: like the
kernel (and knftables' fake) it applies a transaction all-or-nothing and refuses what
the kernel refuses, with the kernel's errno. After every sync the fake must hold exactly
what the rendered script says; partial syncs must touch only the changed Services.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

import pytest

from kubeproxy.config.types import LBAlgorithm, ProxyConfig
from kubeproxy.dataplane import nft_ops as nft
from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.netlink import encode, find_netns
from kubeproxy.dataplane.nft_ops import Op, TransactionError
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.render import nft_wire as wire
from kubeproxy.render.nft_ir import Chain, Element, Field, Rule, SetDef, SetMatch, Verdict
from kubeproxy.render.nft_parse import parse_script
from kubeproxy.render.nftables import NftRuleset
from kubeproxy.testing.nftables import FakeNftables, NoRunner
from tests.builders import (
    NODE,
    NODE_IP,
    Obj,
    endpoint,
    endpoint_slice,
    node,
    render_nftables_ruleset,
    service,
)

# -- helpers -------------------------------------------------------------------------

SVC1 = NamespacedName("ns1", "svc1")
SVC2 = NamespacedName("ns1", "svc2")


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


def assert_holds(fake: FakeNftables, rs: NftRuleset) -> None:
    """The fake kernel holds exactly what the ruleset's script says."""
    want = tables_of(rs.script())
    got = tables_of("".join(fake.text(f) for f in sorted(fake.tables)))
    assert got.keys() == want.keys()
    for family in want:
        for part, name in zip(range(3), ("chains", "sets", "elements"), strict=True):
            assert got[family][part] == want[family][part], f"{family} {name} differ"


def ops_of(fake: FakeNftables, last: int = 1) -> list[Op]:
    return [op for tx in fake.transactions[-last:] for op in tx]


def subject(op: Op) -> str:
    """The chain or set an operation is about ("" for the table itself)."""
    match op:
        case nft.AddRule(_, chain, _):
            return chain
        case nft.AddTable() | nft.DeleteTable():
            return ""
        case _:
            return op.name


def basic(eps: tuple[str, ...] = ("10.180.0.1", "10.180.1.1"), **svc: Any) -> list[Obj]:
    return [service("svc1", **svc),
            endpoint_slice("svc1", [endpoint(ip, node=NODE if ip.startswith("10.180.0")
                                             else "node2") for ip in eps])]


def other(ip: str = "172.30.0.42", eps: tuple[str, ...] = ("10.180.0.2",)) -> list[Obj]:
    return [service("svc2", cluster_ip=ip),
            endpoint_slice("svc2", [endpoint(e) for e in eps])]


# -- full syncs ----------------------------------------------------------------------


def test_full_sync_writes_the_script() -> None:
    fake = FakeNftables()
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
    fake = FakeNftables()
    rs = ruleset(cluster(*objs))
    NftablesDataPlane(NoRunner(), fake).sync(rs)
    assert_holds(fake, rs)


def test_second_full_sync_rewrites_and_keeps_affinity_state() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(sessionAffinity="ClientIP")))
    plane.sync(rs)
    plane.sync(rs)
    assert_holds(fake, rs)
    flushed = {op.name for op in ops_of(fake) if isinstance(op, nft.FlushSet)}
    assert "service-ips" in flushed
    assert not any(name.startswith("affinity-") for name in flushed)


def test_fresh_instance_takes_over_an_existing_table() -> None:
    fake = FakeNftables()
    NftablesDataPlane(NoRunner(), fake).sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic()))  # svc2 went away while no proxy ran
    NftablesDataPlane(NoRunner(), fake).sync(rs)  # a restarted proxy
    ops = ops_of(fake, 2)
    assert nft.DeleteChain("ip", "nat-prerouting") in ops
    assert_holds(fake, rs)


def test_a_family_without_services_keeps_its_table_until_unused() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    assert set(fake.tables) == {"ip", "ip6"}  # the node has an IPv6 address
    rs = ruleset([node(), *basic()])
    plane.sync(rs)
    assert set(fake.tables) == {"ip"}


# -- partial syncs -------------------------------------------------------------------


def test_partial_sync_touches_only_the_changed_service() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic(eps=("10.180.0.1", "10.180.1.1", "10.180.1.5")), *other()))
    stats = plane.sync(rs, [SVC1])
    assert not stats.full
    names = {subject(op) for op in ops_of(fake)}
    assert not any("svc2" in n for n in names), names
    assert_holds(fake, rs)


def test_endpoint_change_of_same_count_writes_only_elements() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    rs = ruleset(cluster(*basic(eps=("10.180.0.1", "10.180.1.9")), *other()))
    stats = plane.sync(rs, [SVC1])
    kinds = {type(op) for op in ops_of(fake)}
    assert kinds == {nft.AddElements, nft.DeleteElements}, kinds
    assert stats.chains_written == 0
    assert_holds(fake, rs)


def test_unchanged_service_writes_nothing() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(), *other()))
    plane.sync(rs)
    stats = plane.sync(ruleset(cluster(*basic(), *other())), [SVC1, SVC2])
    assert stats.ops == 0


def test_removed_service_leaves_no_trace() -> None:
    fake = FakeNftables()
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
    fake = FakeNftables()
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
    fake = FakeNftables()
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
    fake = FakeNftables()
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
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*first)))
    plane.sync(ruleset(cluster(*first, *second)), [SVC2])
    (elem,) = fake.tables["ip"].elements["service-nodeports"].values()
    assert isinstance(elem.data, Verdict) and elem.data.chain and "svc1" in elem.data.chain


def test_fixed_part_change_forces_a_full_sync() -> None:
    fake = FakeNftables()
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
    fake = FakeNftables()
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
    fake = FakeNftables()
    rs = ruleset(cluster(*basic()), lb_algorithm=LBAlgorithm.ROUND_ROBIN, masquerade_all=True)
    NftablesDataPlane(NoRunner(), fake).sync(rs)
    assert_holds(fake, rs)
    assert "numgen inc mod 2" in fake.text("ip")


# -- failures, cleanup, safety -------------------------------------------------------


def test_failed_transaction_changes_nothing_and_the_next_sync_recovers() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(), *other()))
    plane.sync(rs)
    before = copy.deepcopy(fake.tables)
    fake.fail(errno.EIO)
    new = ruleset(cluster(*basic(eps=("10.180.0.7",)), *other()))
    with pytest.raises(TransactionError, match="injected") as exc:
        plane.sync(new, [SVC1])
    assert exc.value.errno == errno.EIO
    assert fake.tables == before
    plane.sync(new, [SVC1])
    assert_holds(fake, new)


# What the fake must refuse, like the kernel: (name, transaction, errno). Each runs
# against BASE: chains top (jumps to target, matches @ips) and target, set ips, verdict
# map vm (1.1.1.1 goes to other), chain other.
IPS = SetDef("ips", "ipv4_addr")
VM = SetDef("vm", "ipv4_addr", "verdict")
ADDR = ipaddress.ip_address("1.1.1.1")
MATCH_IPS = Rule((SetMatch((Field("ip daddr"),), "ips"), Verdict("jump", "target")))
BASE: list[Op] = [
    nft.AddTable("ip"), nft.AddSet("ip", IPS), nft.AddSet("ip", VM),
    nft.AddChain("ip", Chain("top")), nft.AddChain("ip", Chain("target")),
    nft.AddChain("ip", Chain("other")), nft.AddRule("ip", "top", MATCH_IPS),
    nft.AddElements("ip", IPS, [Element((ADDR,))]),
    nft.AddElements("ip", VM, [Element((ADDR,), Verdict("goto", "other"))]),
]
REFUSALS: list[tuple[str, list[Op], int]] = [
    ("rule jumps to a missing chain",
     [nft.AddRule("ip", "top", Rule((Verdict("goto", "missing"),)))], errno.ENOENT),
    ("rule in a missing chain",
     [nft.AddRule("ip", "missing", Rule((Verdict("accept"),)))], errno.ENOENT),
    ("rule uses a missing set",
     [nft.AddRule("ip", "top", Rule((SetMatch((Field("ip daddr"),), "nope"),)))],
     errno.ENOENT),
    ("delete a chain a rule jumps to", [nft.DeleteChain("ip", "target")], errno.EBUSY),
    ("delete a chain a map element goes to", [nft.DeleteChain("ip", "other")],
     errno.EBUSY),
    ("delete a set a rule uses", [nft.DeleteSet("ip", "ips")], errno.EBUSY),
    ("delete a missing chain", [nft.DeleteChain("ip", "missing")], errno.ENOENT),
    ("flush a missing chain", [nft.FlushChain("ip", "missing")], errno.ENOENT),
    ("flush a missing set", [nft.FlushSet("ip", "missing")], errno.ENOENT),
    ("add to a missing set", [nft.AddElements("ip", SetDef("missing", "ipv4_addr"),
                                              [Element((ADDR,))])], errno.ENOENT),
    ("delete a missing element",
     [nft.DeleteElements("ip", IPS, [Element((ipaddress.ip_address("2.2.2.2"),))])],
     errno.ENOENT),
    ("element with other data", [nft.AddElements(
        "ip", VM, [Element((ADDR,), Verdict("goto", "target"))])], errno.EEXIST),
    ("set with another definition", [nft.AddSet("ip", SetDef("ips", "ipv4_addr",
                                                             timeout=60))], errno.EEXIST),
    ("operation on a missing table", [nft.AddChain("ip6", Chain("x"))], errno.ENOENT),
    ("delete a missing table", [nft.DeleteTable("ip6")], errno.ENOENT),
    ("map element goes to a missing chain", [nft.AddElements(
        "ip", VM, [Element((ipaddress.ip_address("3.3.3.3"),),
                           Verdict("goto", "missing"))])], errno.ENOENT),
    ("valid steps, then a bad one", [nft.AddChain("ip", Chain("x")),
                                     nft.FlushSet("ip", "ips"),
                                     nft.DeleteChain("ip", "target")], errno.EBUSY),
]


@pytest.mark.parametrize(("ops", "code"), [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_the_fake_refuses_what_the_kernel_refuses_atomically(ops: list[Op], code: int
                                                              ) -> None:
    fake = FakeNftables()
    fake.commit(BASE)
    before = copy.deepcopy(fake.tables)
    with pytest.raises(TransactionError) as exc:
        fake.commit(ops)
    assert exc.value.errno == code, exc.value
    assert fake.tables == before


def test_the_fake_accepts_what_the_kernel_accepts() -> None:
    """The counterpart of the refusals: the same objects in a valid order."""
    fake = FakeNftables()
    fake.commit(BASE)
    fake.commit([nft.FlushChain("ip", "top"), nft.DeleteChain("ip", "target"),
                 nft.DeleteSet("ip", "ips"), nft.FlushSet("ip", "vm"),
                 nft.DeleteChain("ip", "other"), nft.AddChain("ip", Chain("top")),
                 nft.AddElements("ip", VM, [])])
    assert fake.listing("ip") == nft.Listing(frozenset({"top"}), frozenset({"vm"}))
    assert fake.text("ip6") == ""


class Meddler(FakeNftables):
    """A kernel where someone else deletes ``chains`` right before we delete any."""

    def __init__(self) -> None:
        super().__init__()
        self.chains: set[str] = set()

    def commit(self, ops: Iterable[Op]) -> None:
        ops = list(ops)
        if self.chains and any(isinstance(op, nft.DeleteChain) for op in ops):
            super().commit([nft.DeleteChain("ip", c) for c in sorted(self.chains)])
            self.chains = set()
        super().commit(ops)


# The second, stale-chain transaction failing, told apart by errno: (name, inject
# (errno, or None: someone else deleted the chains), stale chains kept for the next sync,
# sync raises).
STALE_FAILURES: list[tuple[str, int | None, bool, bool]] = [
    ("still in use (Linux < 6.2): retried", errno.EBUSY, True, False),
    ("someone deleted them: forgotten", None, False, False),
    ("anything else: reported, retried", errno.EPERM, True, True),
]


@pytest.mark.parametrize(("inject", "kept", "raises"), [c[1:] for c in STALE_FAILURES],
                         ids=[c[0] for c in STALE_FAILURES])
def test_stale_chain_deletion_failures(inject: int | None, kept: bool, raises: bool
                                       ) -> None:
    fake = Meddler()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    svc2 = {c for c in fake.tables["ip"].chains if "svc2" in c}
    assert svc2
    if inject is None:
        fake.chains = svc2
    else:
        fake.fail(inject, on=nft.DeleteChain)
    rs = ruleset(cluster(*basic()))
    if raises:
        with pytest.raises(TransactionError):
            plane.sync(rs, [SVC2])
    else:
        assert plane.sync(rs, [SVC2]).chains_deleted == 0
    assert plane.stale["ip"] == (svc2 if kept else set())
    assert plane.sync(rs, [SVC2]).chains_deleted == (len(svc2) if kept else 0)
    assert not plane.stale["ip"]
    assert_holds(fake, rs)


def test_cleanup_deletes_both_tables() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    plane.cleanup()
    assert fake.tables == {}
    plane.cleanup()  # nothing left: still fine
    assert plane.sync(ruleset(cluster(*basic())), [SVC1]).full  # state was forgotten


def test_cleanup_reports_errors_other_than_no_table() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic())))
    fake.fail(errno.EPERM, on=nft.DeleteTable)
    with pytest.raises(TransactionError) as exc:
        plane.cleanup()
    assert exc.value.errno == errno.EPERM


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


# The netlink message each kind of operation becomes (the bytes are test_nft_wire's).
ENCODED: list[tuple[Op, int]] = [
    (nft.AddTable("ip"), wire.NEWTABLE),
    (nft.DeleteTable("ip"), wire.DELTABLE),
    (nft.AddChain("ip", Chain("c")), wire.NEWCHAIN),
    (nft.FlushChain("ip", "c"), wire.DELRULE),
    (nft.DeleteChain("ip", "c"), wire.DELCHAIN),
    (nft.AddRule("ip", "c", MATCH_IPS), wire.NEWRULE),
    (nft.AddSet("ip", IPS), wire.NEWSET),
    (nft.FlushSet("ip", "ips"), wire.DELSETELEM),
    (nft.DeleteSet("ip", "ips"), wire.DELSET),
    (nft.AddElements("ip", IPS, [Element((ADDR,))]), wire.NEWSETELEM),
    (nft.DeleteElements("ip", IPS, [Element((ADDR,))]), wire.DELSETELEM),
]


@pytest.mark.parametrize(("op", "kind"), ENCODED, ids=[type(c[0]).__name__ for c in ENCODED])
def test_each_operation_is_one_message(op: Op, kind: int) -> None:
    (msg,) = encode([op])
    assert (msg.type, msg.family) == (kind, wire.FAMILIES["ip"])



# -- flush detection: damage() ---------------------------------------------------------


class CountingFake(FakeNftables):
    """The fake nf_tables, counting the (costlier) rule-count reads."""

    def __init__(self) -> None:
        super().__init__()
        self.count_reads = 0

    def rule_counts(self, family: str, chains: Iterable[str]) -> dict[str, int] | None:
        self.count_reads += 1
        return super().rule_counts(family, chains)


@pytest.mark.parametrize(("name", "ops", "found"), [
    ("flush the services chain", [nft.FlushChain("ip", "services")],
     "chain ip kube-proxy services holds 0 rules"),
    ("flush a base chain", [nft.FlushChain("ip6", "nat-output")],
     "chain ip6 kube-proxy nat-output holds 0 rules"),
    ("delete the table", [nft.DeleteTable("ip")], "table ip kube-proxy is gone"),
    ("someone else's transaction", [nft.AddTable("ip")], None),
])
def test_damage_counts_chains_only_when_the_generation_moved(
        name: str, ops: list[Op], found: str | None) -> None:
    fake = CountingFake()
    plane = NftablesDataPlane(NoRunner(), fake)
    assert plane.damage() is None, "nothing written yet"
    rs = ruleset(cluster(*basic(), service("six", cluster_ip="fd00:30::6"),
                         endpoint_slice("six", [endpoint("fd00:180::6")], family="IPv6")))
    plane.sync(rs)
    assert plane.damage() is None and plane.damage() is None
    assert fake.count_reads == 0, "nothing is read while the generation holds"
    fake.commit(ops)
    got = plane.damage()
    assert fake.count_reads >= 1
    if found is None:
        assert got is None
        reads = fake.count_reads
        assert plane.damage() is None and fake.count_reads == reads, "accepted"
    else:
        assert got is not None and found in got, name
        plane.sync(rs)  # the full sync the daemon then runs
        assert plane.damage() is None
        assert_holds(fake, rs)


def test_a_failed_sync_leaves_damage_checking_by_counts() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic()))
    plane.sync(rs)
    fake.fail(errno.ENOMEM)
    with pytest.raises(TransactionError):
        plane.sync(rs)
    assert plane.generation is None and plane.damage() is None
    fake.commit([nft.FlushChain("ip", "services")])
    assert "services holds 0 rules" in (plane.damage() or "")


# -- repairs after damage from outside ----------------------------------------------------


def test_a_flushed_fixed_chain_is_repaired_without_rewriting_the_table() -> None:
    """damage() found a fixed chain flushed: the full sync that follows rewrites the
    fixed chains and diffs the Services against what was written (no element sent
    again), and the kernel holds the ruleset; a Service changed meanwhile is written."""
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    plane.sync(ruleset(cluster(*basic(), *other())))
    fake.commit([nft.FlushChain("ip", "services")])
    assert "services holds 0 rules" in (plane.damage() or "")
    after = ruleset(cluster(*basic(), *other(eps=("10.180.0.2", "10.180.0.3"))))
    stats = plane.sync(after)
    ops = ops_of(fake)

    def elements(tx: list[Op]) -> int:
        return sum(len(list(op.elements)) for op in tx if isinstance(op, nft.AddElements))
    # svc2's new endpoint only (its slot and hairpin pair), not the whole table again.
    assert 0 < elements(ops) < elements(fake.transactions[0]) // 2
    assert not any(isinstance(op, nft.AddTable | nft.AddSet) for op in ops)
    assert {subject(op) for op in ops if isinstance(op, nft.FlushChain)} >= {"services"}
    assert stats.full and stats.ops == len(ops)
    assert_holds(fake, after)
    assert plane.damage() is None


def test_a_deleted_table_is_written_whole() -> None:
    fake = FakeNftables()
    plane = NftablesDataPlane(NoRunner(), fake)
    rs = ruleset(cluster(*basic(), *other()))
    plane.sync(rs)
    fake.commit([nft.DeleteTable("ip")])
    assert "is gone" in (plane.damage() or "")
    plane.sync(rs)
    assert any(isinstance(op, nft.AddTable) for op in ops_of(fake))
    assert_holds(fake, rs)
