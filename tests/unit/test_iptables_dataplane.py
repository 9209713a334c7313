"""The iptables data plane against the strict fake: full and partial syncs, -X, cleanup.

The fake (:mod:`kubeproxy.testing.iptables`) refuses what iptables-restore refuses and
reads back as iptables-save prints, so these are the kernel tests' questions asked
without root: does what is read back equal what was rendered, does a partial sync
write only the changed Services' chains (asserted on the restore payload), are the
chains nobody wants deleted and no others, does a refused restore leave the old rules
and make the next sync full, does cleanup leave nothing of ours and everything else.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.iptables import (
    Backend,
    IptablesDataPlane,
    detect_backend,
    edit,
    is_ours,
)
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import Family, NamespacedName, parse_cidr
from kubeproxy.nodeview import build_node_view
from kubeproxy.render.iptables import (
    KUBE_FIREWALL,
    SERVICE_CHAIN_PREFIXES,
    Ruleset,
    jump_rule,
    render,
)
from kubeproxy.testing.iptables import FakeIptables
from tests.builders import NODE, Obj, feature_cluster

BACKENDS: tuple[Backend, ...] = ("legacy", "nft")
CONFIG = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),
                                                   parse_cidr("fd00:180::/64", "t")))
SVC1 = NamespacedName("ns1", "svc1")
SVC2 = NamespacedName("ns2", "svc2")
SVC3 = NamespacedName("ns3", "svc3")
STALE = ("*nat\n:KUBE-SVC-STALESTALESTALE - [0:0]\n:KUBE-SEP-STALESTALESTALE - [0:0]\n"
         "-A KUBE-SVC-STALESTALESTALE -j KUBE-SEP-STALESTALESTALE\nCOMMIT\n")




def rules_for(objs: list[Obj], family: Family = 4) -> Ruleset:
    decoded = decode_objects(objs)
    assert not decoded.errors
    return render(build_node_view(decoded, CONFIG, family))


def tables(text: str) -> dict[str, list[str]]:
    """iptables-save text (or a restore payload) -> table -> its lines, COMMIT and
    comments left out."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        elif line and not line.startswith("#") and line != "COMMIT":
            current.append(line)
    return out


def declared(lines: list[str]) -> set[str]:
    return {line[1:].split()[0] for line in lines if line.startswith(":")}


def deleted(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines if line.startswith("-X ")}


def written(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines if line.startswith("-A ")}


def owned(ruleset: Ruleset, *services: NamespacedName) -> set[str]:
    return {c for c, o in ruleset.owners.items() if o in services}


def service_chains(chains: set[str]) -> set[str]:
    return {c for c in chains if c.startswith(SERVICE_CHAIN_PREFIXES)}


def last_restore(fake: FakeIptables, since: int) -> dict[str, list[str]]:
    [payload] = fake.restores()[since:]
    return tables(payload)


# -- full syncs ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", [4, 6])
def test_full_sync_reads_back_as_rendered(backend: Backend, family: Family) -> None:
    fake = FakeIptables()
    ruleset = rules_for(feature_cluster(), family)
    plane = IptablesDataPlane(fake, family, backend)
    stats = plane.sync(ruleset)

    # save() is iptables-save of filter and nat (with its comment lines); save_text()
    # also holds mangle, which only has our canary.
    assert tables(plane.save()) == tables(ruleset.save_text(tables=("filter", "nat")))
    mangle = fake.save_text(family=family, backend=backend, table="mangle")
    assert tables(mangle) == tables(ruleset.save_text(tables=("mangle",)))
    assert stats.chains_written >= len(ruleset.owners) > 0
    # Localhost NodePorts (IPv4 only) need route_localnet and the KUBE-FIREWALL guard.
    guarded = any(j[2] == KUBE_FIREWALL for j in ruleset.jumps)
    assert guarded == (family == 4)
    assert fake.sysctls == ({"net.ipv4.conf.all.route_localnet": "1"} if guarded else {})
    # Nothing reached the other backend or the other family.
    other = "nft" if backend == "legacy" else "legacy"
    base = "iptables" if family == 4 else "ip6tables"
    assert fake.run([f"{base}-{other}-save"]).stdout == ""
    assert fake.run([f"{'ip6tables' if family == 4 else 'iptables'}-{backend}-save"]).stdout == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_sync_twice_changes_nothing(backend: Backend) -> None:
    """The jumps' -C must find what -I wrote, or every sync would add another copy."""
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    ruleset = rules_for(feature_cluster())
    plane.sync(ruleset)
    before = fake.snapshot()
    n = len(fake.calls)
    plane.sync(ruleset, {SVC1})
    assert fake.snapshot() == before
    assert not [argv for argv, _ in fake.calls[n:] if "-I" in argv]


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_full_sync_removes_stale_chains_of_a_previous_process(backend: Backend) -> None:
    fake = FakeIptables()
    IptablesDataPlane(fake, 4, backend).sync(rules_for(feature_cluster()))
    # A previous process left chains nobody renders; someone else has a chain of theirs.
    assert fake.run([f"iptables-{backend}-restore", "-w", "--noflush"], STALE).returncode == 0
    assert fake.run([f"iptables-{backend}", "-w", "-t", "nat", "-N", "OTHER-CHAIN"]
                    ).returncode == 0
    big, small = rules_for(feature_cluster()), rules_for(feature_cluster(with_svc3=False))

    fresh = IptablesDataPlane(fake, 4, backend)  # a restarted proxy: it wrote nothing yet
    n = len(fake.restores())
    fresh.sync(small, {SVC1})  # a partial sync asked for, a full one done
    nat = last_restore(fake, n)["nat"]

    stale = {"KUBE-SVC-STALESTALESTALE", "KUBE-SEP-STALESTALESTALE"} | owned(big, SVC3)
    assert deleted(nat) == stale
    # What the kernel already holds as rendered (svc1's and svc2's chains) is not
    # written again: the full sync compares and writes the difference.
    assert service_chains(declared(nat)) == stale and not service_chains(written(nat))
    readback = tables(fresh.save())
    assert ":OTHER-CHAIN - [0:0]" in readback["nat"]
    readback["nat"].remove(":OTHER-CHAIN - [0:0]")
    assert readback == tables(small.save_text(tables=("filter", "nat")))


# -- partial syncs ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sync_rewrites_only_the_changed_services(backend: Backend) -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    before = rules_for(feature_cluster())
    plane.sync(before)
    svc1_rules = {c: fake.chains("nat", backend=backend)[c] for c in owned(before, SVC1)}

    # svc2 loses an endpoint and svc3 disappears; svc1 is unchanged.
    after = rules_for(feature_cluster(endpoints_svc2=1, with_svc3=False))
    n = len(fake.restores())
    stats = plane.sync(after, {SVC2, SVC3})
    nat = last_restore(fake, n)["nat"]

    gone = owned(before, SVC2, SVC3) - set(after.owners)
    assert gone & owned(before, SVC2) and owned(before, SVC3) <= gone
    assert service_chains(written(nat)) == owned(after, SVC2)
    assert service_chains(declared(nat)) == owned(after, SVC2) | gone
    assert deleted(nat) == gone
    assert not any(c in line for c in owned(after, SVC1) for line in nat
                   if not line.startswith("-A KUBE-SERVICES "))
    assert stats.chains_deleted == len(gone)
    # What the kernel holds is the new render, svc1's chains untouched.
    assert tables(plane.save()) == tables(after.save_text(tables=("filter", "nat")))
    assert {c: fake.chains("nat", backend=backend)[c] for c in owned(after, SVC1)} == svc1_rules


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sync_is_one_restore_and_nothing_else(backend: Backend) -> None:
    """No `-C` per jump (each reads the whole table: 1 s for nat at 10,000 services)."""
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    plane.sync(rules_for(feature_cluster()))
    n = len(fake.calls)
    plane.sync(rules_for(feature_cluster(endpoints_svc2=1)), {SVC2})
    assert [argv[0] for argv, _ in fake.calls[n:]] == [f"iptables-{backend}-restore"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sync_leaves_unchanged_tables_and_top_chains_out(backend: Backend) -> None:
    """svc2 loses one of its endpoints: only nat and svc2's own chains are named (a legacy
    kernel rewrites every table named; KUBE-SERVICES is 10,000 rules at 10,000
    services); the kernel still holds exactly the new render."""
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    plane.sync(rules_for(feature_cluster()))
    after = rules_for(feature_cluster(endpoints_svc2=1))
    n = len(fake.restores())
    plane.sync(after, {SVC2})
    sent = last_restore(fake, n)
    assert set(sent) == {"nat"}, "no mangle canary, no filter table"
    assert written(sent["nat"]) == owned(after, SVC2)
    assert tables(plane.save()) == tables(after.save_text(tables=("filter", "nat")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sync_restores_a_missing_jump_in_its_restore(backend: Backend) -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    ruleset = rules_for(feature_cluster())
    plane.sync(ruleset)
    jump = next(j for j in ruleset.jumps if j[:3] == ("nat", "PREROUTING", "KUBE-SERVICES"))
    assert fake.run([f"iptables-{backend}", "-w", "-t", "nat", "-D",
                     *shlex.split(jump_rule(jump))[1:]]).returncode == 0
    n = len(fake.calls)
    plane.sync(ruleset)
    assert [argv[0] for argv, _ in fake.calls[n:]].count(f"iptables-{backend}") == 0
    assert tables(plane.save()) == tables(ruleset.save_text(tables=("filter", "nat")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_service_loses_its_chains_and_no_other(backend: Backend) -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    before = rules_for(feature_cluster())
    plane.sync(before)
    kept = {c: r for c, r in fake.chains("nat", backend=backend).items()
            if c in owned(before, SVC1, SVC2)}

    after = rules_for(feature_cluster(with_svc3=False))
    n = len(fake.restores())
    plane.sync(after, {SVC3})
    nat = last_restore(fake, n)["nat"]

    assert deleted(nat) == owned(before, SVC3) != set()
    assert not service_chains(written(nat))
    chains = fake.chains("nat", backend=backend)
    assert not owned(before, SVC3) & set(chains)
    assert {c: chains[c] for c in kept} == kept


@dataclass(frozen=True)
class Failure:
    name: str
    broken: bool  # render a rule the kernel refuses
    inject: bool  # or make the restore itself fail
    match: str


FAILURES = [
    Failure("a jump to a missing chain", broken=True, inject=False,
            match="Couldn't load target `KUBE-NO-SUCH-CHAIN'"),
    Failure("iptables-restore fails", broken=False, inject=True, match="line 7 failed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FAILURES, ids=[c.name for c in FAILURES])
def test_failed_restore_keeps_the_rules_and_forces_a_full_sync(case: Failure,
                                                               backend: Backend) -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    good = rules_for(feature_cluster())
    plane.sync(good)
    before = fake.snapshot()

    broken = rules_for(feature_cluster(endpoints_svc2=1))
    if case.broken:
        chain = sorted(c for c in owned(broken, SVC2) if c.startswith("KUBE-SVC-"))[0]
        broken.tables["nat"][chain].append(f"-A {chain} -j KUBE-NO-SUCH-CHAIN")
    if case.inject:
        fake.fail("restore", "iptables-restore: line 7 failed")
    with pytest.raises(DataPlaneError, match=case.match):
        plane.sync(broken, {SVC2})
    assert fake.snapshot() == before
    assert plane.needs_full

    # The next sync, though asked to be partial, is full: it compares every chain
    # with the kernel and writes those that differ (svc2's), whatever was asked.
    after = rules_for(feature_cluster(endpoints_svc2=1))
    n = len(fake.restores())
    plane.sync(after, {SVC1})
    nat = last_restore(fake, n)["nat"]
    differ = {c for c in after.owners if good.tables["nat"].get(c) != after.tables["nat"][c]}
    assert differ and differ <= owned(after, SVC2)
    assert service_chains(written(nat)) == differ
    assert deleted(nat) == set(good.owners) - set(after.owners) != set()
    assert tables(plane.save()) == tables(after.save_text(tables=("filter", "nat")))
    assert not plane.needs_full


# -- cleanup -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_leaves_nothing_of_ours_and_spares_the_rest(backend: Backend) -> None:
    fake = FakeIptables()
    for family in (4, 6):
        IptablesDataPlane(fake, family, backend).sync(rules_for(feature_cluster(), family))
    ipt = f"iptables-{backend}"
    for args in (["-t", "nat", "-N", "OTHER-CHAIN"],
                 ["-t", "nat", "-A", "OTHER-CHAIN", "-j", "RETURN"],
                 ["-t", "nat", "-I", "PREROUTING", "1", "-j", "OTHER-CHAIN"],
                 ["-A", "INPUT", "-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT"]):
        assert fake.run([ipt, "-w", *args]).returncode == 0, args
    assert "KUBE-" in fake.snapshot()

    planes = [IptablesDataPlane(fake, family, backend) for family in (4, 6)]
    for plane in planes:
        plane.cleanup()
    assert "KUBE-" not in fake.snapshot()
    nat, filt = fake.chains("nat", backend=backend), fake.chains("filter", backend=backend)
    assert nat["OTHER-CHAIN"] == ["-A OTHER-CHAIN -j RETURN"]
    assert nat["PREROUTING"] == ["-A PREROUTING -j OTHER-CHAIN"]
    assert filt["INPUT"] == ["-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]
    assert all(plane.needs_full and not plane.written for plane in planes)

    # A sync after cleanup puts everything back.
    ruleset = rules_for(feature_cluster())
    planes[0].sync(ruleset, {SVC1})
    readback = tables(planes[0].save())
    assert set(readback["nat"]) - set(tables(ruleset.save_text())["nat"]) == {
        ":OTHER-CHAIN - [0:0]", "-A OTHER-CHAIN -j RETURN", "-A PREROUTING -j OTHER-CHAIN"}


def test_cleanup_of_nothing_writes_nothing() -> None:
    fake = FakeIptables()
    IptablesDataPlane(fake, 4, "nft").cleanup()
    assert fake.restores() == [] and fake.snapshot() == ""


# -- which backend ---------------------------------------------------------------------


@dataclass(frozen=True)
class Detect:
    name: str
    # (backend, family, iptables arguments) run before detecting
    seed: tuple[tuple[Backend, Family, str], ...]
    want: Backend


def _rules(backend: Backend, family: Family, n: int) -> tuple[tuple[Backend, Family, str], ...]:
    return tuple((backend, family, f"-A INPUT -p tcp -m tcp --dport {22 + i} -j ACCEPT")
                 for i in range(n))


DETECT = [
    Detect("nothing anywhere: nft", (), "nft"),
    Detect("more legacy rules", _rules("legacy", 4, 2) + _rules("nft", 4, 1), "legacy"),
    Detect("more nft rules", _rules("legacy", 4, 1) + _rules("nft", 6, 2), "nft"),
    Detect("a tie goes to nft", _rules("legacy", 4, 2) + _rules("nft", 4, 2), "nft"),
    Detect("rules of both families count",
           _rules("legacy", 4, 1) + _rules("legacy", 6, 2) + _rules("nft", 4, 2), "legacy"),
    Detect("the hint chain in legacy wins over more nft rules",
           (("legacy", 4, "-t mangle -N KUBE-IPTABLES-HINT"), *_rules("nft", 4, 3)), "legacy"),
    Detect("the hint chain in nft wins over more legacy rules",
           (("nft", 6, "-t mangle -N KUBE-IPTABLES-HINT"), *_rules("legacy", 4, 3)), "nft"),
    Detect("kubelet's canary is a hint too",
           (("legacy", 6, "-t nat -N KUBE-KUBELET-CANARY"), *_rules("nft", 4, 3)), "legacy"),
]


@pytest.mark.parametrize("case", DETECT, ids=[c.name for c in DETECT])
def test_detect_backend(case: Detect) -> None:
    fake = FakeIptables()
    for backend, family, args in case.seed:
        argv = [f"{'iptables' if family == 4 else 'ip6tables'}-{backend}", "-w", *args.split()]
        assert fake.run(argv).returncode == 0, argv
    n = len(fake.calls)
    assert detect_backend(fake) == case.want
    assert all(argv[0].endswith("-save") for argv, _ in fake.calls[n:])  # it only reads


# --- flush detection: damage() ---------------------------------------------------------


def saves(fake: FakeIptables, since: int) -> list[str]:
    """The tables read back (iptables-save -t TABLE) since call ``since``."""
    return [argv[-1] for argv, _ in fake.calls[since:] if argv[0].endswith("-save")]


@dataclass(frozen=True)
class Outside:
    name: str
    args: tuple[str, ...]  # an operator's iptables command, after the binary
    found: str | None  # what damage() reports (a fragment), None: ours is intact


OUTSIDE = [
    Outside("flush nat KUBE-SERVICES", ("-t", "nat", "-F", "KUBE-SERVICES"),
            "nat table: chain KUBE-SERVICES holds 0 rules"),
    Outside("flush nat", ("-t", "nat", "-F"), "nat table: chain KUBE-MARK-MASQ holds 0"),
    Outside("delete the mangle canary", ("-t", "mangle", "-X", "KUBE-PROXY-CANARY"),
            "mangle table: chain KUBE-PROXY-CANARY is gone"),
    Outside("delete our jump", ("-t", "nat", "-D", "POSTROUTING", "-m", "comment",
                                "--comment", "kubernetes postrouting rules", "-j",
                                "KUBE-POSTROUTING"),
            "the jump from POSTROUTING to KUBE-POSTROUTING is gone"),
    Outside("someone else's chain", ("-t", "filter", "-N", "OTHER"), None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OUTSIDE, ids=[c.name for c in OUTSIDE])
def test_damage_reads_the_tables_only_when_the_fingerprint_moved(backend: Backend,
                                                                 case: Outside) -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend, watch=fake)
    assert plane.damage() is None, "nothing written yet"
    plane.sync(rules_for(feature_cluster()))
    n = len(fake.calls)
    assert plane.damage() is None and plane.damage() is None
    assert saves(fake, n) == [], "nothing is read while the fingerprint holds"
    assert fake.run([f"iptables-{backend}", "-w", *case.args]).returncode == 0
    n = len(fake.calls)
    found = plane.damage()
    read = saves(fake, n)
    if backend == "legacy":  # a fingerprint per table: only the one that moved is read
        assert read == [case.args[1]]
    else:  # one generation for all: read in order, up to the first damage found
        assert read and read == ["mangle", "filter", "nat"][:len(read)]
    if case.found is None:
        assert found is None
        n = len(fake.calls)
        assert plane.damage() is None and saves(fake, n) == [], "the new fingerprint holds"
    else:
        assert found is not None and case.found in found and f"IPv4 {backend}" in found
        assert plane.damage() == found, "still damaged until a sync"
        plane.sync(rules_for(feature_cluster()), None)
        assert plane.damage() is None


def test_damage_without_a_watch_reads_every_time() -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 6, "nft")
    plane.sync(rules_for(feature_cluster(), 6))
    n = len(fake.calls)
    assert plane.damage() is None and plane.damage() is None
    assert saves(fake, n) == ["mangle", "filter", "nat"] * 2
    assert fake.run(["ip6tables-nft", "-t", "nat", "-F", "KUBE-SERVICES"]).returncode == 0
    assert "(IPv6 nft) nat table: chain KUBE-SERVICES holds 0" in (plane.damage() or "")


def test_cleanup_forgets_what_was_written() -> None:
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, "legacy", watch=fake)
    plane.sync(rules_for(feature_cluster()))
    plane.cleanup()
    assert plane.damage() is None, "nothing of ours is expected any more"


# -- top-level chains edited in place ---------------------------------------------------


def test_edit_deletes_what_went_and_inserts_what_came_at_its_place() -> None:
    old = ["-A C -j A", "-A C -j B", "-A C -j D", "-A C -j E"]
    new = ["-A C -j A", "-A C -j X", "-A C -j B", "-A C -j E"]
    assert edit("C", old, new) == ["-D C -j D", "-I C 2 -j X"]
    # A rule at the end goes in at len + 1, which iptables accepts.
    assert edit("C", old, [*old, "-A C -j F"]) == ["-I C 5 -j F"]


@pytest.mark.parametrize("old,new", [
    (["-A C -j A", "-A C -j B", "-A C -j D"], ["-A C -j B", "-A C -j A", "-A C -j D"]),
    (["-A C -j A", "-A C -j A", "-A C -j B"], ["-A C -j A", "-A C -j A"]),
    (["-A C -j A", "-A C -j B"], ["-A C -j X", "-A C -j Y"]),
], ids=["order changed", "a rule twice", "most of the chain changed"])
def test_edit_gives_up_where_a_rewrite_is_right(old: list[str], new: list[str]) -> None:
    assert edit("C", old, new) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sync_edits_kube_services_in_place(backend: Backend) -> None:
    """svc3 goes: its KUBE-SERVICES rules are deleted one by one, the chain is not
    declared (which would flush it), and the kernel holds exactly the new render."""
    fake = FakeIptables()
    plane = IptablesDataPlane(fake, 4, backend)
    plane.sync(rules_for(feature_cluster()))
    after = rules_for(feature_cluster(with_svc3=False))
    n = len(fake.restores())
    plane.sync(after, {SVC3})
    restore = fake.restores()[n]
    nat = restore[restore.index("*nat"):]
    assert ":KUBE-SERVICES " not in nat and "\n-D KUBE-SERVICES " in nat
    assert tables(plane.save()) == tables(after.save_text(tables=("filter", "nat")))


# -- full syncs write what differs -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sync_of_intact_rules_leaves_filter_and_nat_alone(backend: Backend) -> None:
    """The hourly full sync, or a restart, with the kernel holding the render: only the
    (small) mangle canary is declared; the 10,000-rule nat table is not rewritten."""
    fake = FakeIptables()
    ruleset = rules_for(feature_cluster())
    IptablesDataPlane(fake, 4, backend).sync(ruleset)
    n = len(fake.restores())
    IptablesDataPlane(fake, 4, backend).sync(ruleset)
    assert set(last_restore(fake, n)) == {"mangle"}
    assert tables(fake.save_text(backend=backend)) == tables(ruleset.save_text())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outside", [
    ("-t", "nat", "-F", "KUBE-SERVICES"),
    ("-t", "nat", "-F"),
    ("-t", "nat", "-D", "KUBE-MARK-MASQ", "-j", "MARK", "--set-xmark", "0x4000/0x4000"),
], ids=["flush KUBE-SERVICES", "flush nat", "delete a rule"])
def test_a_repair_writes_what_was_damaged_and_reads_nothing_again(
        backend: Backend, outside: tuple[str, ...]) -> None:
    """damage() reads the table that moved; the full sync that follows reuses that read
    (its fingerprint has not moved) and writes only the chains that differ."""
    fake = FakeIptables()
    ruleset = rules_for(feature_cluster())
    plane = IptablesDataPlane(fake, 4, backend, watch=fake)
    plane.sync(ruleset)
    kernel = fake.chains("nat", backend=backend)
    assert fake.run([f"iptables-{backend}", "-w", *outside]).returncode == 0
    damaged = {c for c, rules in fake.chains("nat", backend=backend).items()
               if rules != kernel[c] and is_ours(c)}  # builtin chains: their jumps
    assert damaged and plane.damage() is not None
    n, reads = len(fake.restores()), len(fake.calls)
    plane.sync(ruleset)
    assert [argv[-1] for argv, _ in fake.calls[reads:] if argv[0].endswith("-save")] == \
        (["filter"] if backend == "legacy" else []), "nat is not read twice"
    nat = last_restore(fake, n)["nat"]
    assert written(nat) | declared(nat) >= damaged - {"KUBE-PROXY-CANARY"}
    assert {c for c in written(nat) if c in kernel} <= damaged
    assert tables(fake.save_text(backend=backend)) == tables(ruleset.save_text())
