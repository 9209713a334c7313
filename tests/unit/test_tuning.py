"""Node tuning at start (conntrack sysctls, oom-score-adj) over a strict fake, and the
start-up checks: privileges, iptables backend detection, cleanup of legacy tables."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kubeproxy.app import tuning
from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.iptables import detect_backend
from kubeproxy.errors import DataPlaneError
from kubeproxy.modes.iptables import ExistingTablesOnly

NODE = {  # a node with nf_conntrack loaded, kernel defaults
    tuning.CONNTRACK_MAX: "65536",
    tuning.HASHSIZE: "16384",
    "net/netfilter/nf_conntrack_tcp_timeout_established": "432000",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "60",
    "net/netfilter/nf_conntrack_udp_timeout": "30",
    "net/netfilter/nf_conntrack_udp_timeout_stream": "120",
    tuning.BE_LIBERAL: "0",
    tuning.OOM_SCORE_ADJ: "0",
}


class FakeSysctl:
    """Strict: only keys that exist can be read or written; values must be integers."""

    def __init__(self, values: dict[str, str], refuse: frozenset[str] = frozenset()) -> None:
        self.values = dict(values)
        self.refuse = refuse
        self.writes: list[tuple[str, str]] = []

    def read(self, key: str) -> str | None:
        return self.values.get(key)

    def write(self, key: str, value: str) -> None:
        if key not in self.values:
            raise AssertionError(f"write to a setting that does not exist: {key}")
        int(value)
        if key in self.refuse:
            raise PermissionError(13, "Permission denied")
        self.values[key] = value
        self.writes.append((key, value))


@pytest.mark.parametrize(("settings", "cpus", "host", "want"), [
    # defaults on 8 CPUs: max(32768 x 8, 131072) = 262144, hashsize 65536; timeouts.
    (tuning.Settings(), 8, True, {
        tuning.CONNTRACK_MAX: "262144", tuning.HASHSIZE: "65536",
        "net/netfilter/nf_conntrack_tcp_timeout_established": "86400",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "3600",
        tuning.OOM_SCORE_ADJ: "-999"}),
    # 2 CPUs: the minimum wins (131072); not in the host's netns: max left alone.
    (tuning.Settings(), 2, False, {
        "net/netfilter/nf_conntrack_tcp_timeout_established": "86400",
        "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "3600",
        tuning.OOM_SCORE_ADJ: "-999"}),
    # maxPerCore 0: leave the limit; udp timeouts and be_liberal when asked.
    (tuning.Settings(max_per_core=0, tcp_established_timeout=0, tcp_close_wait_timeout=0,
                     udp_timeout=10, udp_stream_timeout=60, tcp_be_liberal=True,
                     oom_score_adj=None), 8, True, {
        "net/netfilter/nf_conntrack_udp_timeout": "10",
        "net/netfilter/nf_conntrack_udp_timeout_stream": "60", tuning.BE_LIBERAL: "1"}),
    # already at or above: nothing (never lowered).
    (tuning.Settings(max_per_core=1000, min=1000, tcp_established_timeout=432000,
                     tcp_close_wait_timeout=60, oom_score_adj=0), 4, True, {}),
])
def test_plan(settings: tuning.Settings, cpus: int, host: bool, want: dict[str, str]
              ) -> None:
    sysctl = FakeSysctl(NODE)
    writes, _ = tuning.plan(settings, sysctl, cpus=cpus, host_netns=host)
    assert tuning.apply(writes, sysctl) == []
    assert dict(sysctl.writes) == want


def test_refused_writes_are_reported_and_the_rest_done() -> None:
    sysctl = FakeSysctl(NODE, refuse=frozenset({tuning.HASHSIZE}))
    writes, _ = tuning.plan(tuning.Settings(), sysctl, cpus=8, host_netns=True)
    errors = tuning.apply(writes, sysctl)
    assert len(errors) == 1 and "hashsize" in errors[0] and "Permission denied" in errors[0]
    assert sysctl.values[tuning.CONNTRACK_MAX] == "262144"


def test_missing_conntrack_is_a_note() -> None:
    writes, notes = tuning.plan(tuning.Settings(), FakeSysctl({tuning.OOM_SCORE_ADJ: "0"}),
                                cpus=2, host_netns=True)
    assert [w.key for w in writes] == [tuning.OOM_SCORE_ADJ]
    assert any("nf_conntrack_max: not present" in n for n in notes)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(oom_score_adj=1001), "oomScoreAdj"),
    (dict(max_per_core=-1), "maxPerCore"),
])
def test_bad_settings(settings: dict[str, int], message: str) -> None:
    with pytest.raises(Exception, match=message):
        tuning.Settings(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(("capeff", "problem"), [
    ("000001ffffffffff", None),  # root
    ("0000000000001000", None),  # only CAP_NET_ADMIN
    ("0000000000000000", "CAP_NET_ADMIN"),
])
def test_privileges(capeff: str, problem: str | None) -> None:
    got = tuning.privilege_problem(f"Name:\tx\nCapEff:\t{capeff}\n")
    assert got is None if problem is None else (got is not None and problem in got)


# --- iptables backend detection and legacy tables -------------------------------------


class Binaries:
    """A runner with only some binaries installed (others: DataPlaneError, as the real
    SubprocessRunner says "not installed"); each *-save prints ``rules[binary]``."""

    def __init__(self, rules: dict[str, str], tables: str | None = None) -> None:
        self.rules = rules
        self.tables = tables
        self.ran: list[list[str]] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        self.ran.append(list(argv))
        if argv[0] == "cat":
            return Result(0, self.tables, "") if self.tables is not None else Result(1, "", "")
        if argv[0] not in self.rules:
            raise DataPlaneError(f"{argv[0]}: not installed")
        return Result(0, self.rules[argv[0]], "")


NFT_ONLY = {"iptables-nft-save": "*nat\n-A X -j Y\n", "ip6tables-nft-save": ""}


@pytest.mark.parametrize(("rules", "want"), [
    (NFT_ONLY, "nft"),  # a host with only the *-nft binaries
    ({"iptables-legacy-save": ":KUBE-IPTABLES-HINT - [0:0]\n",
      "ip6tables-legacy-save": "", **NFT_ONLY}, "legacy"),
    ({"iptables-legacy-save": "", "ip6tables-legacy-save": ""}, "legacy"),
    ({"iptables-legacy-save": "-A a\n-A b\n", "ip6tables-legacy-save": "", **NFT_ONLY},
     "legacy"),
    ({"iptables-legacy-save": "", "ip6tables-legacy-save": "", "iptables-nft-save": "",
      "ip6tables-nft-save": ""}, "nft"),  # a tie: nft
])
def test_detect_backend(rules: dict[str, str], want: str) -> None:
    assert detect_backend(Binaries(rules)) == want


def test_detect_backend_without_any_iptables() -> None:
    with pytest.raises(DataPlaneError, match=r"no iptables backend.*not installed"):
        detect_backend(Binaries({}))


@pytest.mark.parametrize(("tables", "table", "runs"), [
    ("filter\n", "nat", False),  # nat does not exist: not created by reading it
    ("filter\nnat\n", "nat", True),
    (None, "filter", False),  # ip_tables not even loaded
])
def test_legacy_cleanup_reads_only_existing_tables(tables: str | None, table: str,
                                                   runs: bool) -> None:
    inner = Binaries({"iptables-legacy-save": "*x\n"}, tables)
    got = ExistingTablesOnly(inner).run(["iptables-legacy-save", "-t", table])
    assert (["iptables-legacy-save", "-t", table] in inner.ran) is runs
    assert got.returncode == (0 if runs else 1)
