"""The iptables data plane against the real kernel, inside a namespace the test makes.

What `iptables-save` reads back must equal what was rendered; a partial sync must
touch only the changed service's chains; a failed restore must leave the old rules;
cleanup must leave nothing.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.dataplane.iptables import Backend, IptablesDataPlane
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import Cluster, Family, NamespacedName, parse_cidr
from kubeproxy.render.iptables import KUBE_FIREWALL, TOP_CHAINS, Ruleset
from tests.builders import NODE, Obj, feature_cluster, render_iptables

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]
BACKENDS: tuple[Backend, ...] = ("legacy", "nft")


@pytest.fixture
def netns() -> Iterator[NetnsRunner]:
    name = f"kpt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield NetnsRunner(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)




def render(objs: list[Obj]) -> dict[Family, Ruleset]:
    cluster: Cluster = decode_objects(objs)
    assert not cluster.errors
    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),
                                                       parse_cidr("fd00:180::/64", "t")))
    return render_iptables(cluster, config)


def tables(text: str) -> dict[str, list[str]]:
    """iptables-save text -> table -> its lines (chains and rules, in order)."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        elif line.startswith((":", "-A")):
            current.append(line)
    return out


def readback(runner: NetnsRunner, family: int, backend: Backend) -> dict[str, list[str]]:
    base = "iptables" if family == 4 else "ip6tables"
    res = runner.run([f"{base}-{backend}-save"])
    assert res.returncode == 0, res.stderr
    return tables(res.stdout)


def chains_of(lines: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith(":"):
            out.setdefault(line[1:].split()[0], [])
        else:
            out.setdefault(line.split()[1], []).append(line)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sync_reads_back_as_rendered(netns: NetnsRunner, backend: Backend) -> None:
    rulesets = render(feature_cluster())
    for family, ruleset in rulesets.items():
        IptablesDataPlane(netns, family, backend).sync(ruleset)
        want = tables(ruleset.save_text())
        got = readback(netns, family, backend)
        for table in ("filter", "nat", "mangle"):
            assert got[table] == want[table], f"IPv{family} {table} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sync_touches_only_the_changed_service(netns: NetnsRunner,
                                                       backend: Backend) -> None:
    plane = IptablesDataPlane(netns, 4, backend)
    before_rs = render(feature_cluster())[4]
    plane.sync(before_rs)
    before = chains_of(readback(netns, 4, backend)["nat"])

    # svc2 loses an endpoint and svc3 disappears; svc1 is unchanged.
    after_rs = render(feature_cluster(endpoints_svc2=1, with_svc3=False))[4]
    changed = {NamespacedName("ns2", "svc2"), NamespacedName("ns3", "svc3")}
    stats = plane.sync(after_rs, changed)
    after = chains_of(readback(netns, 4, backend)["nat"])

    assert after == chains_of(tables(after_rs.save_text())["nat"])
    svc1_chains = {c for c, o in after_rs.owners.items() if o == NamespacedName("ns1", "svc1")}
    assert svc1_chains and all(after[c] == before[c] for c in svc1_chains)
    gone = set(before) - set(after)
    assert gone and all(c.startswith(("KUBE-SEP-", "KUBE-SVL-", "KUBE-SVC-")) for c in gone)
    assert stats.chains_deleted == len(gone)
    # Only svc2's chains were sent, plus the top-level chains that changed (svc3's rules
    # left KUBE-SERVICES); the others stay as they are.
    svc2 = {c for c, o in after_rs.owners.items() if o == NamespacedName("ns2", "svc2")}
    tops = {(t, c) for t in ("filter", "nat") for c, rules in after_rs.tables[t].items()
            if (c in TOP_CHAINS[t] or c == KUBE_FIREWALL) and before_rs.tables[t][c] != rules}
    assert ("nat", "KUBE-SERVICES") in tops and len(tops) < 10
    assert stats.chains_written == len(svc2) + len(tops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_sync_removes_chains_it_did_not_write(netns: NetnsRunner, backend: Backend) -> None:
    IptablesDataPlane(netns, 4, backend).sync(render(feature_cluster())[4])
    fresh = IptablesDataPlane(netns, 4, backend)  # a restarted proxy
    smaller = render(feature_cluster(with_svc3=False))[4]
    fresh.sync(smaller)
    assert readback(netns, 4, backend)["nat"] == tables(smaller.save_text())["nat"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_restore_keeps_previous_rules(netns: NetnsRunner, backend: Backend) -> None:
    plane = IptablesDataPlane(netns, 4, backend)
    good = render(feature_cluster())[4]
    plane.sync(good)
    broken = render(feature_cluster(endpoints_svc2=1))[4]
    chain = next(c for c in broken.tables["nat"] if c.startswith("KUBE-SVC-"))
    broken.tables["nat"][chain].append(f"-A {chain} -j KUBE-NO-SUCH-CHAIN")
    with pytest.raises(DataPlaneError, match="restore"):
        plane.sync(broken)
    assert readback(netns, 4, backend)["nat"] == tables(good.save_text())["nat"]
    assert plane.needs_full


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_leaves_nothing(netns: NetnsRunner, backend: Backend) -> None:
    for family, ruleset in render(feature_cluster()).items():
        IptablesDataPlane(netns, family, backend).sync(ruleset)
    # Someone else's chain in the same table must survive our cleanup.
    netns.run([f"iptables-{backend}", "-t", "nat", "-N", "OTHER-CHAIN"])
    for family in (4, 6):
        IptablesDataPlane(netns, family, backend).cleanup()
    for family in (4, 6):
        text = "\n".join("\n".join(v) for v in readback(netns, family, backend).values())
        assert "KUBE-" not in text
    assert ":OTHER-CHAIN" in "\n".join(readback(netns, 4, backend)["nat"])


def test_detect_backend_prefers_the_one_in_use(netns: NetnsRunner) -> None:
    from kubeproxy.dataplane.iptables import detect_backend

    assert detect_backend(netns) == "nft"  # nothing anywhere: nft, as iptables-wrapper
    IptablesDataPlane(netns, 4, "legacy").sync(render(feature_cluster())[4])
    assert detect_backend(netns) == "legacy"
