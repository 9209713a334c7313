"""The nftables data plane against the real kernel, inside namespaces the test makes.

What ``nft list`` reads back must equal what was rendered, and the kernel must hold
exactly what ``nft -f`` of the rendered script gives it (the netlink encoding is nft's);
a partial sync must touch only the changed Service; a failed transaction must leave the
previous rules; cleanup must leave no kube-proxy table.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.dataplane.netlink import NetlinkTransport
from kubeproxy.dataplane.nft_ops import TransactionError
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.render import nft_wire as wire
from kubeproxy.render.nft_ir import Chain, Rule, Verdict
from kubeproxy.render.nft_parse import parse_script
from kubeproxy.render.nftables import NftRuleset, ServiceObjects
from tests.builders import (
    NODE,
    Obj,
    endpoint,
    endpoint_slice,
    node,
    render_nftables_ruleset,
    service,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]
SVC2 = NamespacedName("ns1", "svc2")


def nft(ns: NetnsRunner, *args: str, stdin: str | None = None) -> str:
    """``nft ARGS`` inside the namespace; its output (it must succeed)."""
    res = ns.run(["nft", *args], stdin)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _namespace() -> Iterator[NetnsRunner]:
    name = f"kpn-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield NetnsRunner(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


netns = pytest.fixture(_namespace)
other_netns = pytest.fixture(_namespace)


def objects(svc2_endpoints: int = 2, with_svc4: bool = True) -> list[Obj]:
    objs: list[Obj] = [
        node(ips=["192.168.0.2", "fd00::2"]),
        service("svc1", sessionAffinity="ClientIP"),
        endpoint_slice("svc1", [endpoint("10.180.0.1"), endpoint("10.180.1.1", node="n2")]),
        service("svc2", cluster_ip="172.30.0.42", type="NodePort",
                ports=[("p80", 80, "TCP", 3002), ("dns", 53, "UDP", 3053)]),
        endpoint_slice("svc2", [endpoint(f"10.180.0.{10 + i}") for i in range(svc2_endpoints)],
                       ports=[("p80", 8080, "TCP"), ("dns", 53, "UDP")]),
        service("svc3", cluster_ip="172.30.0.43", type="LoadBalancer",
                ports=[("p80", 80, "TCP", 3003)], lb_ips=["5.6.7.8"],
                externalTrafficPolicy="Local", loadBalancerSourceRanges=["203.0.113.0/25"]),
        endpoint_slice("svc3", [endpoint("10.180.0.3"), endpoint("10.180.1.3", node="n2")]),
        service("svc6", cluster_ip=["172.30.0.46", "fd00:30::46"],
                ipFamilyPolicy="PreferDualStack"),
        endpoint_slice("svc6", [endpoint("10.180.0.6")], name="v4"),
        endpoint_slice("svc6", [endpoint("fd00:180::6")], name="v6", family="IPv6"),
    ]
    if with_svc4:
        objs.append(service("svc4", cluster_ip="172.30.0.44", externalIPs=["192.168.99.4"]))
    return objs


def config() -> ProxyConfig:
    return ProxyConfig(hostname=NODE, mode="nftables", cluster_cidrs=(
        parse_cidr("10.0.0.0/8", "t"), parse_cidr("fd00:180::/64", "t")))


def ruleset(objs: list[Obj]) -> NftRuleset:
    decoded = decode_objects(objs)
    assert not decoded.errors
    return render_nftables_ruleset(decoded, config())


def structure(text: str) -> dict[Any, Any]:
    return {key: (t.chains, t.sets, {n: set(e) for n, e in t.elements.items() if e})
            for key, t in parse_script(text).items()}


def kernel_objects(ns: NetnsRunner) -> dict[str, Any]:
    """Chains, rules and sets as the kernel dumps them, without handles and ids."""
    transport = NetlinkTransport(f"/run/netns/{ns.ns}")
    out: dict[str, Any] = {}
    try:
        for family, fam in wire.FAMILIES.items():
            chains = sorted(tuple(sorted((k, v) for k, v in wire.parse_attrs(b).items()
                                         if k not in (2, 6)))  # handle, use count
                            for b in transport.dump(wire.GETCHAIN, fam))
            rules = sorted((a.get(2), a.get(4), a.get(7)) for a in (
                wire.parse_attrs(b) for b in transport.dump(wire.GETRULE, fam)))
            sets = sorted(tuple(sorted((k, v) for k, v in wire.parse_attrs(b).items()
                                       if k not in (10, 16, 19, 20)))  # ids, handles, counts
                          for b in transport.dump(wire.GETSET, fam))
            out[family] = (chains, rules, sets)
    finally:
        transport.close()
    return out


def test_full_sync_is_what_was_rendered(netns: NetnsRunner) -> None:
    rs = ruleset(objects())
    stats = NftablesDataPlane(netns).sync(rs)
    assert stats.full
    assert structure(nft(netns, "list", "ruleset")) == structure(rs.script())


def test_the_kernel_holds_what_nft_would_write(netns: NetnsRunner,
                                               other_netns: NetnsRunner) -> None:
    rs = ruleset(objects())
    NftablesDataPlane(netns).sync(rs)
    nft(other_netns, "-f", "-", stdin=rs.script())
    ours, nfts = kernel_objects(netns), kernel_objects(other_netns)
    for family in ours:
        for part, name in enumerate(("chains", "rules", "sets")):
            assert ours[family][part] == nfts[family][part], f"{family} {name}"


def test_the_script_passes_nft_check(netns: NetnsRunner) -> None:
    nft(netns, "-c", "-f", "-", stdin=ruleset(objects()).script())


def test_partial_sync_changes_only_the_changed_service(netns: NetnsRunner) -> None:
    plane = NftablesDataPlane(netns)
    plane.sync(ruleset(objects()))
    before = structure(nft(netns, "list", "ruleset"))
    rs = ruleset(objects(svc2_endpoints=3))
    stats = plane.sync(rs, [SVC2])
    assert not stats.full and stats.chains_written > 0
    after = structure(nft(netns, "list", "ruleset"))
    assert after == structure(rs.script())
    for key in before:
        old_chains, _, old_elems = before[key]
        new_chains, _, new_elems = after[key]
        changed = {n for n in old_chains.keys() | new_chains.keys()
                   if old_chains.get(n) != new_chains.get(n)}
        assert all("/svc2/" in n for n in changed), changed
        for name in old_elems.keys() | new_elems.keys():
            diff = old_elems.get(name, set()) ^ new_elems.get(name, set())
            assert all("svc2" in str(e) or "10.180.0.12" in str(e) for e in diff), (name, diff)


def test_removed_service_is_gone(netns: NetnsRunner) -> None:
    plane = NftablesDataPlane(netns)
    plane.sync(ruleset(objects()))
    rs = ruleset(objects(with_svc4=False))
    rs2 = ruleset([o for o in objects(with_svc4=False) if o["metadata"]["name"] != "svc3"])
    plane.sync(rs, [NamespacedName("ns1", "svc4")])
    plane.sync(rs2, [NamespacedName("ns1", "svc3"), NamespacedName("ns1", "svc4")])
    listing = nft(netns, "list", "ruleset")
    assert "svc3" not in listing and "svc4" not in listing
    assert structure(listing) == structure(rs2.script())


def test_failed_transaction_leaves_the_previous_rules(netns: NetnsRunner) -> None:
    plane = NftablesDataPlane(netns)
    plane.sync(ruleset(objects()))
    before = nft(netns, "list", "ruleset")
    bad = ruleset(objects(svc2_endpoints=3))
    fam = bad.families[0]
    good = fam.objects(SVC2)
    broken = Chain(good.chains[0].name, (*good.chains[0].rules,
                                         Rule((Verdict("goto", "no-such-chain"),))))
    fam._cache[SVC2] = ServiceObjects((broken, *good.chains[1:]), good.sets, good.elements,
                                      good.slots, good.hairpin)
    with pytest.raises(TransactionError, match="nothing changed") as exc:
        plane.sync(bad, [SVC2])
    assert exc.value.errno == errno.ENOENT  # the kernel's word for the missing chain
    assert nft(netns, "list", "ruleset") == before
    rs = ruleset(objects(svc2_endpoints=3))
    plane.sync(rs, [SVC2])
    assert structure(nft(netns, "list", "ruleset")) == structure(rs.script())


def test_cleanup_leaves_no_kube_proxy_table(netns: NetnsRunner) -> None:
    plane = NftablesDataPlane(netns)
    plane.sync(ruleset(objects()))
    nft(netns, "add", "table", "inet", "somebody-else")
    plane.cleanup()
    assert nft(netns, "list", "tables").split() == ["table", "inet", "somebody-else"]
    plane.cleanup()  # no table left: the kernel's ENOENT is no failure


def test_apply_twice_from_the_command_line(netns: NetnsRunner, tmp_path: Path) -> None:
    """A new process finds the table an earlier one wrote and takes it over."""
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump_all(objects()))
    argv = [sys.executable, "-m", "kubeproxy", "apply", "-f", str(manifest), "--mode",
            "nftables", "--hostname-override", NODE, "--cluster-cidr",
            "10.0.0.0/8,fd00:180::/64"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    # What the same command line renders (its config, e.g. nftables' primary NodePorts).
    rendered = subprocess.run([*argv[:3], "render", *argv[4:]], env=env, capture_output=True,
                              text=True, timeout=120, check=True).stdout
    for _ in range(2):
        res = subprocess.run(["ip", "netns", "exec", netns.ns, *argv], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        assert structure(nft(netns, "list", "ruleset")) == structure(rendered)
