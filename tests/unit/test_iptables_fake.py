"""The strict iptables fake refuses what the real tools refuse, and changes nothing then.

Each rejected restore runs against the same seeded state, on both backends, and must
leave every table as it was; each accepted restore must change exactly the chains it
names. The fake is only worth something if these hold: the data plane tests build on it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import pytest

from kubeproxy.dataplane.iptables import Backend
from kubeproxy.testing.iptables import FakeIptables, rule_text

BACKENDS: tuple[Backend, ...] = ("legacy", "nft")

SEED = """\
*filter
:FOREIGN - [0:0]
-A INPUT -j FOREIGN
-A FOREIGN -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SVC-OLD - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 172.30.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SVC-A -j KUBE-SEP-A
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80
-A KUBE-SVC-OLD -j KUBE-SEP-A
COMMIT
"""


def seeded(backend: Backend) -> FakeIptables:
    fake = FakeIptables()
    res = fake.run([f"iptables-{backend}-restore", "-w", "--noflush"], SEED)
    assert res.returncode == 0, res.stderr
    return fake


def restore(fake: FakeIptables, backend: Backend, payload: str, *flags: str) -> tuple[int, str]:
    res = fake.run([f"iptables-{backend}-restore", "-w", *flags], payload)
    assert res.stdout == ""
    return res.returncode, res.stderr


def test_seed_reads_back_canonically() -> None:
    fake = seeded("nft")
    body = [line for line in fake.save_text().splitlines() if not line.startswith("#")]
    assert body == [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":FOREIGN - [0:0]",
        "-A INPUT -j FOREIGN",
        "-A FOREIGN -p tcp -m tcp --dport 22 -j ACCEPT",
        "COMMIT",
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        # User chains sorted, then rules chain by chain in that order.
        ":KUBE-SEP-A - [0:0]", ":KUBE-SERVICES - [0:0]", ":KUBE-SVC-A - [0:0]",
        ":KUBE-SVC-OLD - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80",
        "-A KUBE-SERVICES -d 172.30.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A",
        "-A KUBE-SVC-A -j KUBE-SEP-A",
        "-A KUBE-SVC-OLD -j KUBE-SEP-A",
        "COMMIT",
    ]


# -- restores that must be refused -----------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    name: str
    payload: str
    returncode: int
    stderr: str  # a regex the message must match (either backend)
    flags: tuple[str, ...] = ("--noflush",)


REJECTED = [
    Rejected("jump to an unknown chain",
             "*nat\n:KUBE-SVC-B - [0:0]\n-A KUBE-SVC-B -j KUBE-SEP-NOPE\nCOMMIT\n",
             2, r"Couldn't load target `KUBE-SEP-NOPE'.*\nError occurred at line: 3"),
    Rejected("jump to a chain declared only later",
             "*nat\n:KUBE-SVC-B - [0:0]\n-A KUBE-SVC-B -j KUBE-SEP-B\n:KUBE-SEP-B - [0:0]\n"
             "COMMIT\n", 2, r"Couldn't load target `KUBE-SEP-B'"),
    Rejected("jump to a chain of another table",
             "*filter\n-A FOREIGN -j KUBE-SVC-A\nCOMMIT\n", 2, r"`KUBE-SVC-A'"),
    Rejected("jump to a builtin chain", "*nat\n-A KUBE-SVC-OLD -j PREROUTING\nCOMMIT\n",
             2, r"`PREROUTING'"),
    Rejected("goto a target extension", "*nat\n-A KUBE-SVC-OLD -g ACCEPT\nCOMMIT\n",
             2, r"`ACCEPT'"),
    Rejected("delete a chain another chain jumps to",
             "*nat\n:KUBE-SEP-A - [0:0]\n-X KUBE-SEP-A\nCOMMIT\n", 1, r"line 3 failed"),
    Rejected("delete a chain a builtin chain jumps to",
             "*nat\n:KUBE-SERVICES - [0:0]\n-X KUBE-SERVICES\nCOMMIT\n", 1, r"line 3 failed"),
    Rejected("delete a chain that does not exist", "*nat\n-X KUBE-SEP-NOPE\nCOMMIT\n",
             1, r"line 2 failed"),
    Rejected("delete a chain that still has rules", "*nat\n-X KUBE-SVC-OLD\nCOMMIT\n",
             1, r"line 2 failed"),
    Rejected("delete a builtin chain", "*nat\n-X PREROUTING\nCOMMIT\n", 1, r"line 2 failed"),
    Rejected("flush a builtin chain", "*filter\n-F INPUT\nCOMMIT\n", 1, r"line 2 failed"),
    Rejected("a chain declared twice",
             "*nat\n:KUBE-SVC-B - [0:0]\n:KUBE-SVC-B - [0:0]\nCOMMIT\n", 1, r"line 3 failed"),
    Rejected("a rule in an undeclared, missing chain",
             "*nat\n-A KUBE-SVC-B -j KUBE-SEP-A\nCOMMIT\n", 1, r"line 2 failed"),
    Rejected("a missing COMMIT", "*nat\n:KUBE-SVC-B - [0:0]\n", 1,
             r"COMMIT expected at line 3"),
    Rejected("a missing COMMIT before the next table",
             "*nat\n:KUBE-SVC-B - [0:0]\n*filter\n:X - [0:0]\nCOMMIT\n", 2,
             r"Error occurred at line: 3"),
    Rejected("COMMIT without a newline, as fgets reads it",
             "*nat\n:KUBE-SVC-B - [0:0]\nCOMMIT", 2, r"line: 3"),
    Rejected("an unknown table", "*nope\nCOMMIT\n", 2,
             r"unable to initialize table 'nope'"),
    Rejected("a rule before any table", "-A FOREIGN -j ACCEPT\n", 1, r"line 1 failed"),
    Rejected("a policy on a user chain", "*nat\n:KUBE-SVC-B ACCEPT [0:0]\nCOMMIT\n", 1,
             r"line 2 failed"),
    Rejected("a DNAT outside the nat table",
             "*filter\n-A FOREIGN -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n", 1,
             r"line [23] failed"),  # legacy: at COMMIT (the kernel); nft: at the rule
    Rejected("an IPv6 address in an IPv4 table",
             "*nat\n-A KUBE-SVC-OLD -d fd00::1/128 -j ACCEPT\nCOMMIT\n", 2,
             r"host/network `fd00::1' not found"),
    Rejected("a chain name too long", "*nat\n:KUBE-SVC-ABCDEFGHIJKLMNOPQRSTU - [0:0]\n"
             "COMMIT\n", 2, r"28 chars max"),
    Rejected("without --noflush too: a jump to an unknown chain",
             "*nat\n:A - [0:0]\n-A A -j B\nCOMMIT\n", 2, r"`B'", flags=()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", REJECTED, ids=[c.name for c in REJECTED])
def test_rejected_restore_changes_nothing(case: Rejected, backend: Backend) -> None:
    fake = seeded(backend)
    before = fake.snapshot()
    code, stderr = restore(fake, backend, case.payload, *case.flags)
    assert code == case.returncode, stderr
    assert re.search(case.stderr, stderr), stderr
    assert stderr.startswith("iptables-restore")
    assert fake.snapshot() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_line_is_where_each_backend_reports_it(backend: Backend) -> None:
    fake = seeded(backend)
    _, stderr = restore(fake, backend, "*filter\n-A FOREIGN -j MASQUERADE\nCOMMIT\n",
                        "--noflush")
    # Legacy finds out when the kernel gets the table (COMMIT); nft names the rule.
    assert stderr == ("iptables-restore: line 3 failed\n" if backend == "legacy" else
                      "iptables-restore: line 2 failed: Invalid argument (MASQUERADE target:"
                      " only valid in nat table).\n")


def test_a_failing_table_leaves_earlier_committed_tables() -> None:
    """iptables-restore commits table by table: *filter stays, *nat is refused."""
    fake = seeded("nft")
    nat_before = fake.chains("nat")
    code, _ = restore(fake, "nft", "*filter\n:NEW - [0:0]\nCOMMIT\n*nat\n:KUBE-SVC-B - [0:0]\n"
                      "-X KUBE-SEP-NOPE\nCOMMIT\n", "--noflush")
    assert code == 1
    assert fake.chains("filter")["NEW"] == []
    assert fake.chains("nat") == nat_before


# -- restores that are accepted -------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    name: str
    payload: str
    # (table, chain) -> its rules afterwards, or None when deleted; the rest unchanged.
    changes: dict[tuple[str, str], list[str] | None]
    flags: tuple[str, ...] = ("--noflush",)
    policies: dict[str, str] | None = None  # filter builtin policies afterwards


ACCEPTED = [
    Accepted("declaring a chain flushes it", "*nat\n:KUBE-SVC-OLD - [0:0]\nCOMMIT\n",
             {("nat", "KUBE-SVC-OLD"): []}),
    Accepted("declare, then delete", "*nat\n:KUBE-SVC-OLD - [0:0]\n-X KUBE-SVC-OLD\nCOMMIT\n",
             {("nat", "KUBE-SVC-OLD"): None}),
    Accepted("rewrite a service and delete the chains it no longer uses",
             "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-A - [0:0]\n"
             ":KUBE-SVC-OLD - [0:0]\n:KUBE-SEP-B - [0:0]\n"
             "-A KUBE-SERVICES -d 172.30.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A\n"
             "-A KUBE-SVC-A -j KUBE-SEP-B\n"
             "-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.0.0.2:80\n"
             "-X KUBE-SVC-OLD\n-X KUBE-SEP-A\nCOMMIT\n",
             {("nat", "KUBE-SVC-A"): ["-A KUBE-SVC-A -j KUBE-SEP-B"],
              ("nat", "KUBE-SEP-B"): ["-A KUBE-SEP-B -p tcp -m tcp -j DNAT "
                                      "--to-destination 10.0.0.2:80"],
              ("nat", "KUBE-SVC-OLD"): None, ("nat", "KUBE-SEP-A"): None}),
    Accepted("declaring a builtin chain keeps its rules and sets its policy",
             "*filter\n:FORWARD DROP [0:0]\n:INPUT - [0:0]\nCOMMIT\n", {},
             policies={"INPUT": "ACCEPT", "FORWARD": "DROP", "OUTPUT": "ACCEPT"}),
    Accepted("counters before a rule, comments and blank lines",
             "# a comment\n\n*nat\n[5:300] -A KUBE-SVC-OLD -j RETURN\nCOMMIT\n",
             {("nat", "KUBE-SVC-OLD"): ["-A KUBE-SVC-OLD -j KUBE-SEP-A",
                                        "-A KUBE-SVC-OLD -j RETURN"]},
             flags=("--noflush", "--counters")),
    Accepted("comments are stored as iptables-save quotes them",
             '*nat\n:KUBE-SVC-OLD - [0:0]\n-A KUBE-SVC-OLD -m comment --comment "plain" '
             "-j RETURN\n-A KUBE-SVC-OLD -m comment --comment 'ns1/svc1:p80' -j RETURN\n"
             "COMMIT\n",
             {("nat", "KUBE-SVC-OLD"): [
                 "-A KUBE-SVC-OLD -m comment --comment plain -j RETURN",
                 '-A KUBE-SVC-OLD -m comment --comment "ns1/svc1:p80" -j RETURN']}),
    Accepted("insert and delete rules",
             "*nat\n-I KUBE-SVC-OLD 1 -j RETURN\n-D KUBE-SVC-OLD -j KUBE-SEP-A\n"
             "-N KUBE-NEW\nCOMMIT\n",
             {("nat", "KUBE-SVC-OLD"): ["-A KUBE-SVC-OLD -j RETURN"],
              ("nat", "KUBE-NEW"): []}),
    Accepted("a goto to a chain", "*nat\n-A KUBE-SVC-OLD -g KUBE-SEP-A\nCOMMIT\n",
             {("nat", "KUBE-SVC-OLD"): ["-A KUBE-SVC-OLD -j KUBE-SEP-A",
                                        "-A KUBE-SVC-OLD -g KUBE-SEP-A"]}),
    Accepted("without --noflush a section replaces its table",
             "*filter\n:ONLY - [0:0]\n-A ONLY -j ACCEPT\nCOMMIT\n",
             {("filter", "FOREIGN"): None, ("filter", "INPUT"): [],
              ("filter", "ONLY"): ["-A ONLY -j ACCEPT"]}, flags=()),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ACCEPTED, ids=[c.name for c in ACCEPTED])
def test_accepted_restore_changes_what_it_names(case: Accepted, backend: Backend) -> None:
    fake = seeded(backend)
    want = {table: fake.chains(table, backend=backend) for table in ("filter", "nat")}
    for (table, chain), rules in case.changes.items():
        if rules is None:
            del want[table][chain]
        else:
            want[table][chain] = rules
    code, stderr = restore(fake, backend, case.payload, *case.flags)
    assert (code, stderr) == (0, "")
    got = {table: fake.chains(table, backend=backend) for table in ("filter", "nat")}
    assert got == want
    if case.policies:
        text = fake.save_text(backend=backend, table="filter")
        assert all(f":{c} {p} [0:0]" in text for c, p in case.policies.items())
    # What was written reads back and restores to the same state elsewhere.
    copy = FakeIptables()
    assert copy.run(["iptables-nft-restore"], fake.save_text(backend=backend)).returncode == 0
    assert copy.save_text() == fake.save_text(backend=backend).replace("(legacy)", "(nf_tables)")


# -- single iptables commands ------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # after "iptables-nft -w"
    returncode: int
    stderr: str  # regex; "" means empty
    changes: dict[tuple[str, str], list[str]] | None = None  # (table, chain) -> rules


COMMANDS = [
    Command("new chain", "-t nat -N KUBE-NEW", 0, "", {("nat", "KUBE-NEW"): []}),
    Command("new chain that exists", "-t nat -N KUBE-SVC-A", 1,
            r"^iptables: Chain already exists\.\n$"),
    Command("new chain named like a target", "-t nat -N DNAT", 2,
            r"may not clash with target name"),
    Command("new chain in the default (filter) table", "-N KUBE-NEW", 0, "",
            {("filter", "KUBE-NEW"): []}),
    Command("check a rule that is there",
            "-t nat -C PREROUTING -m comment --comment 'kubernetes service portals' "
            "-j KUBE-SERVICES", 0, ""),
    Command("check a rule that is not", "-t nat -C PREROUTING -j KUBE-SERVICES", 1,
            r"^iptables: Bad rule \(does a matching rule exist in that chain\?\)\.\n$"),
    Command("check in a missing chain", "-t nat -C NOPE -j ACCEPT", 1,
            r"No chain/target/match by that name"),
    Command("insert at the top", "-t nat -I KUBE-SVC-A 1 -j RETURN", 0, "",
            {("nat", "KUBE-SVC-A"): ["-A KUBE-SVC-A -j RETURN", "-A KUBE-SVC-A -j KUBE-SEP-A"]}),
    Command("insert past the end", "-t nat -I KUBE-SVC-A 3 -j RETURN", 1,
            r"Index of insertion too big"),
    Command("insert a jump to a missing chain", "-t nat -I PREROUTING 1 -j KUBE-NOPE", 2,
            r"^iptables v1\.8\.10 \(nf_tables\): Couldn't load target `KUBE-NOPE'"),
    Command("append", "-t nat -A KUBE-SVC-A -j RETURN", 0, "",
            {("nat", "KUBE-SVC-A"): ["-A KUBE-SVC-A -j KUBE-SEP-A", "-A KUBE-SVC-A -j RETURN"]}),
    Command("delete a rule", "-t nat -D KUBE-SVC-A -j KUBE-SEP-A", 0, "",
            {("nat", "KUBE-SVC-A"): []}),
    Command("delete a rule that is not there", "-t nat -D KUBE-SVC-A -j RETURN", 1,
            r"Bad rule"),
    Command("an unknown table", "-t nope -N X", 3, r"table `nope'"),
    Command("MASQUERADE outside nat", "-A FOREIGN -j MASQUERADE", 1,
            r"^iptables: Invalid argument"),
    # What an operator breaks rules with (flush detection's tests use them).
    Command("flush a chain", "-t nat -F KUBE-SERVICES", 0, "", {("nat", "KUBE-SERVICES"): []}),
    Command("flush a builtin chain", "-t nat -F PREROUTING", 0, "",
            {("nat", "PREROUTING"): []}),
    Command("flush a whole table", "-t nat -F", 0, "", {
        ("nat", c): [] for c in ("PREROUTING", "KUBE-SERVICES", "KUBE-SVC-A", "KUBE-SEP-A",
                                 "KUBE-SVC-OLD")}),
    Command("flush a missing chain", "-t nat -F NOPE", 1, r"No chain/target/match"),
    Command("delete a chain with rules", "-t nat -X KUBE-SVC-A", 1, r"Directory not empty"),
    Command("delete every chain, some with rules", "-t nat -X", 1, r"Directory not empty"),
    Command("delete a builtin chain", "-t nat -X PREROUTING", 1, r"built-in chain"),
]


@pytest.mark.parametrize("case", COMMANDS, ids=[c.name for c in COMMANDS])
def test_iptables_command(case: Command) -> None:
    fake = seeded("nft")
    want = {table: fake.chains(table) for table in ("filter", "nat")}
    for (table, chain), rules in (case.changes or {}).items():
        want[table][chain] = rules
    res = fake.run(["iptables-nft", "-w", *shlex.split(case.args)])
    assert res.returncode == case.returncode, res.stderr
    assert re.search(case.stderr, res.stderr) if case.stderr else res.stderr == ""
    assert {table: fake.chains(table) for table in ("filter", "nat")} == want


def test_flush_then_delete_every_chain_of_a_table() -> None:
    fake = seeded("legacy")
    before = fake.fingerprint(4, "legacy")
    ipt = ["iptables-legacy", "-w", "-t", "nat"]
    assert fake.run([*ipt, "-F", "KUBE-SVC-A"]).returncode == 0
    res = fake.run([*ipt, "-X", "KUBE-SVC-A"])
    assert res.returncode == 1 and "Too many links" in res.stderr, "KUBE-SERVICES jumps there"
    assert fake.run([*ipt, "-F"]).returncode == 0
    assert fake.run([*ipt, "-X"]).returncode == 0
    assert set(fake.chains("nat", backend="legacy")) == {
        "PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}
    assert "FOREIGN" in fake.chains("filter", backend="legacy"), "other tables untouched"
    assert fake.fingerprint(4, "legacy") != before
    assert fake.fingerprint(4, "nft") == fake.fingerprint(6, "legacy") == dict.fromkeys(
        ("mangle", "filter", "nat"), 0)


def test_fingerprint_moves_with_writes_only() -> None:
    fake = seeded("nft")
    before = fake.fingerprint(4, "nft")
    fake.run(["iptables-nft-save", "-t", "nat"])
    fake.run(["iptables-nft", "-w", "-t", "nat", "-C", "KUBE-SVC-A", "-j", "KUBE-SEP-A"])
    assert fake.fingerprint(4, "nft") == before, "reading is not writing"
    fake.run(["iptables-nft", "-w", "-t", "nat", "-A", "KUBE-SVC-A", "-j", "RETURN"])
    assert fake.fingerprint(4, "nft") != before


# -- what the fake holds, and what it will not guess -----------------------------------


def test_backends_and_families_are_separate() -> None:
    fake = FakeIptables()
    assert fake.run(["ip6tables-legacy", "-w", "-t", "nat", "-N", "KUBE-X"]).returncode == 0
    assert "KUBE-X" in fake.chains("nat", family=6, backend="legacy")
    others: tuple[tuple[int, Backend], ...] = ((4, "legacy"), (4, "nft"), (6, "nft"))
    for family, backend in others:
        assert "KUBE-X" not in fake.chains("nat", family=family, backend=backend)
    # Only tables something was written to are listed by a bare save.
    assert fake.run(["iptables-nft-save"]).stdout == ""
    text = fake.run(["ip6tables-legacy-save"]).stdout
    assert text.startswith("# Generated by ip6tables-save v1.8.10 (legacy)")
    assert [line for line in text.splitlines() if line.startswith("*")] == ["*nat"]
    # A table can be saved by name before anything is written to it.
    assert ":POSTROUTING ACCEPT [0:0]" in fake.run(["iptables-nft-save", "-t", "nat"]).stdout
    assert fake.run(["iptables-nft-save", "-t", "nope"]).returncode == 1


def test_calls_and_sysctls_are_recorded() -> None:
    fake = FakeIptables()
    fake.run(["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"])
    fake.run(["ip6tables-nft-restore", "-w", "--noflush"], "*nat\nCOMMIT\n")
    assert fake.sysctls == {"net.ipv4.conf.all.route_localnet": "1"}
    assert fake.calls == [
        (("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"), None),
        (("ip6tables-nft-restore", "-w", "--noflush"), "*nat\nCOMMIT\n")]
    assert fake.restores(family=6) == ["*nat\nCOMMIT\n"] and fake.restores(family=4) == []


def test_injected_failure_changes_nothing_once() -> None:
    fake = seeded("nft")
    before = fake.snapshot()
    fake.fail("restore", "iptables-restore: line 1 failed")
    payload = "*nat\n:KUBE-SVC-OLD - [0:0]\nCOMMIT\n"
    assert restore(fake, "nft", payload, "--noflush") == (1, "iptables-restore: line 1 failed\n")
    assert fake.snapshot() == before
    assert restore(fake, "nft", payload, "--noflush") == (0, "")
    assert fake.snapshot() != before


UNSUPPORTED = [
    (["iptables", "-N", "X"], None),  # no backend named
    (["iptables-nft", "-w", "-t", "nat", "-L", "-n"], None),
    (["iptables-nft", "-w", "-t", "nat", "-S"], None),
    (["iptables-nft", "-t", "nat", "-D", "KUBE-SVC-A", "1"], None),
    (["iptables-nft", "-t", "nat", "-A", "KUBE-SVC-A", "-t", "filter", "-j", "RETURN"], None),
    (["iptables-nft-save", "-c"], None),
    (["iptables-nft-save", "-w"], None),
    (["iptables-nft-restore", "--test"], "*nat\nCOMMIT\n"),
    (["iptables-nft-restore", "--noflush"], None),  # no payload
    (["iptables-nft-restore", "--noflush"], "*nat\n-Z KUBE-SVC-A\nCOMMIT\n"),
    (["sysctl", "-a"], None),
    (["nft", "list", "ruleset"], None),
]


@pytest.mark.parametrize(("argv", "stdin"), UNSUPPORTED, ids=[" ".join(a) for a, _ in UNSUPPORTED])
def test_unsupported_commands_raise(argv: list[str], stdin: str | None) -> None:
    fake = seeded("nft")
    with pytest.raises(AssertionError, match=re.escape(argv[0])):
        fake.run(argv, stdin)


def test_rule_text_quotes_only_comments_that_need_it() -> None:
    assert rule_text("C", ["-m", "comment", "--comment", "a b", "-j", "X"]) == \
        '-A C -m comment --comment "a b" -j X'
    assert rule_text("C", ["-m", "comment", "--comment", 'say "hi"']) == \
        '-A C -m comment --comment "say \\"hi\\""'
    with pytest.raises(AssertionError):
        rule_text("C", ["--log-prefix", "a b"])
