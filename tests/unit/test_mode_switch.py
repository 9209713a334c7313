"""A mode switch leaves nothing of the old mode: the start-up cleanup (modes/leftovers.py).

Three layers, each over strict fakes (no root, no kernel):

* which parts a starting mode removes: every registered part it does not own, each
  once, with its own ``Mode.keep``; a part that fails is logged and the rest go on;
* one fake node that every mode's data plane writes to (one FakeIptables behind the
  IPVS fake node, one FakeNftables for nftables and ebpf, one FakeIpvs, FakeMaps): mode A
  syncs, mode B starts (the cleanup, then its first full sync), and the node must then
  hold exactly what B alone writes into a fresh node; restarting a mode removes nothing;
* a node lacking every backend (no iptables or ipset binary, no IPVS, no nf_tables, no
  bpffs): nothing raised, nothing warned, each absence logged at debug level.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.config.types import IpvsConfig, ProxyConfig
from kubeproxy.dataplane.base import Keep, Result
from kubeproxy.dataplane.ebpf import EbpfDataPlane
from kubeproxy.dataplane.iptables import LOCALNET_COMMENT, IptablesDataPlane
from kubeproxy.dataplane.ipvs import IpvsDataPlane
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.modes import ebpf as mode_ebpf
from kubeproxy.modes import iptables as mode_iptables
from kubeproxy.modes import ipvs as mode_ipvs
from kubeproxy.modes import leftovers
from kubeproxy.modes import nftables as mode_nftables
from kubeproxy.modes.base import (
    BPF_PROGRAMS,
    IPTABLES_CHAINS,
    IPVS_STATE,
    NFTABLES_TABLES,
    DataPlane,
    PlaneOptions,
    Removed,
)
from kubeproxy.proxier import Proxier
from kubeproxy.render import ebpf as render_ebpf
from kubeproxy.testing.ebpf import FakeMaps
from kubeproxy.testing.iptables import FakeIptables
from kubeproxy.testing.ipvs import FakeIpvs, FakeNode
from kubeproxy.testing.nftables import FakeNftables, NoRunner
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, service

PARTS = (IPTABLES_CHAINS, IPVS_STATE, NFTABLES_TABLES, BPF_PROGRAMS)
# What each mode removes when it starts (every part but its own), by part.
REMOVES = {
    "iptables": {IPVS_STATE, NFTABLES_TABLES, BPF_PROGRAMS},
    "nftables": {IPTABLES_CHAINS, IPVS_STATE, BPF_PROGRAMS},
    "ebpf": {IPTABLES_CHAINS, IPVS_STATE},  # the nftables tables are its north-south half
    "ipvs": {IPTABLES_CHAINS, NFTABLES_TABLES, BPF_PROGRAMS},
}
OPTIONS = PlaneOptions(iptables_backend="nft", bpf_dir="/nonexistent/kubeproxy-test-bpf")


def config(mode: str) -> ProxyConfig:
    return ProxyConfig(hostname=NODE, mode=mode,
                       cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))


def cluster_objects() -> list[Obj]:
    """A ClusterIP and a NodePort service with local and remote endpoints: every mode
    writes per-service objects (chains, virtual servers, map entries, ipset entries)."""
    return [node(),
            service("a", cluster_ip="172.30.0.41"),
            endpoint_slice("a", [endpoint("10.180.0.1"), endpoint("10.180.0.2")]),
            service("b", cluster_ip="172.30.0.42", type="NodePort",
                    ports=[("p80", 80, "TCP", 30080)]),
            endpoint_slice("b", [endpoint("10.180.0.7"), endpoint("10.180.1.7", "node2")])]


# --- which parts a start removes --------------------------------------------------------


def test_every_part_has_one_remover_and_known_owners() -> None:
    assert set(leftovers.owners()) == set(PARTS)
    assert leftovers.owners()[NFTABLES_TABLES] == ["nftables", "ebpf"]
    removers = leftovers.removers(config("iptables"), NoRunner(), OPTIONS)
    assert list(removers) == [IPTABLES_CHAINS, NFTABLES_TABLES, BPF_PROGRAMS, IPVS_STATE]
    assert set(REMOVES) == set(modes.NAMES)


@pytest.mark.parametrize("name", modes.NAMES)
def test_a_start_removes_exactly_the_parts_it_does_not_own(name: str) -> None:
    calls: list[tuple[str, Keep]] = []

    def recorder(part: str) -> leftovers.Remover:
        def remove(keep: Keep) -> Removed:
            calls.append((part, keep))
            return {"things": 1}
        return remove

    mode = modes.for_config(config(name))
    done = leftovers.clean(mode, {part: recorder(part) for part in PARTS})
    assert {part for part, _ in calls} == REMOVES[name] == set(done)
    assert len(calls) == len(REMOVES[name])  # each once
    assert all(keep == mode.keep for _, keep in calls)


def test_the_iptables_and_ipvs_modes_keep_each_others_shared_names() -> None:
    ipt, ipvs = modes.get("iptables").keep, modes.get("ipvs").keep
    shared = {("nat", "KUBE-SERVICES"), ("nat", "KUBE-POSTROUTING"), ("nat", "KUBE-MARK-MASQ"),
              ("filter", "KUBE-FORWARD"), ("filter", "KUBE-PROXY-FIREWALL")}
    assert ipt.chains & ipvs.chains == shared
    assert ("nat", '-A PREROUTING -m comment --comment "kubernetes service portals" '
            "-j KUBE-SERVICES") in ipt.rules & ipvs.rules
    assert modes.get("nftables").keep == modes.get("ebpf").keep == Keep()


def test_a_part_that_fails_is_logged_and_the_others_still_go(
        caplog: pytest.LogCaptureFixture) -> None:
    called: list[str] = []

    def fails(keep: Keep) -> Removed:
        raise DataPlaneError("iptables-nft-restore failed (exit 4): Resource busy")

    def works(keep: Keep) -> Removed:
        called.append("nftables")
        return {"tables": 2}

    with caplog.at_level(logging.INFO, logger="kubeproxy.modes.leftovers"):
        done = leftovers.clean(modes.get("ipvs"), {IPTABLES_CHAINS: fails,
                                                   NFTABLES_TABLES: works})
    assert called == ["nftables"] and done == {NFTABLES_TABLES: {"tables": 2}}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["starting in ipvs mode: could not remove the iptables chains the "
                      "iptables mode left: iptables-nft-restore failed (exit 4): Resource "
                      "busy (starting anyway)"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["starting in ipvs mode: removed the nftables tables the nftables or "
                     "ebpf mode left: 2 tables"]


# --- one fake node that every mode writes to --------------------------------------------


@dataclass
class Host:
    """A node's kernel as the package's strict fakes model it, shared by every mode."""

    iptables: FakeIptables = field(default_factory=FakeIptables)
    ipvs: FakeIpvs = field(default_factory=FakeIpvs)
    nft: FakeNftables = field(default_factory=FakeNftables)
    maps: FakeMaps = field(default_factory=FakeMaps)
    node: FakeNode = field(init=False)

    def __post_init__(self) -> None:
        self.node = FakeNode(iptables=self.iptables)

    def plane(self, name: str) -> DataPlane[Any]:
        """Mode ``name``'s data plane on this node, as a newly started proxy has it."""
        return PLANES[name](self)

    def removers(self) -> dict[str, leftovers.Remover]:
        """Each part's removal (the modes' own) over this node's fakes."""
        def unpin(path: Path) -> tuple[int, int]:  # the bpffs: detach, unpin the maps
            links, pinned = len(self.maps.attached), sum(map(bool, self.maps.maps.values()))
            self.maps.attached.clear()
            for entries in self.maps.maps.values():
                entries.clear()
            return links, pinned

        return {
            IPTABLES_CHAINS: lambda keep: mode_iptables.remove_chains(self.node, OPTIONS, keep),
            NFTABLES_TABLES: lambda keep: mode_nftables.remove_tables(
                NoRunner(), OPTIONS, keep, transport=self.nft),
            BPF_PROGRAMS: lambda keep: mode_ebpf.remove_programs(
                self.node, OPTIONS, keep, remove=unpin),
            IPVS_STATE: lambda keep: mode_ipvs.remove_state(
                self.node, OPTIONS, keep, kernel=self.ipvs),
        }

    def state(self) -> dict[str, Any]:
        """Everything the node holds, comparable: iptables rules and user chains (sorted:
        a jump inserted by another mode's sync may stand elsewhere), links and their
        addresses, ipsets, virtual servers, the nftables tables, the bpf maps."""
        ipt = sorted(line for line in self.iptables.snapshot().splitlines()
                     if line.startswith(("-A ", "== ")) or (
                         line.startswith(":") and " - [" in line))
        return {
            "iptables": [line for line in ipt if not line.startswith("== ")],
            "links": {k: sorted(map(str, v)) for k, v in self.node.links.items()},
            "ipsets": {k: sorted(s.entries) for k, s in self.node.sets.items()},
            "ipvs": sorted(map(str, self.ipvs.services_)),
            "reals": {str(k): sorted(map(str, v)) for k, v in self.ipvs.reals.items()},
            "nftables": self.nft.listed(),
            "bpf": {k: sorted(v.items()) for k, v in self.maps.maps.items()},
            "attached": sorted(self.maps.attached),
        }


def _ebpf_plane(host: Host) -> DataPlane[Any]:
    def attach() -> None:
        host.maps.attached = set(render_ebpf.PROGRAMS)

    plane = EbpfDataPlane(host.maps, NftablesDataPlane(NoRunner(), host.nft), attach)
    return mode_ebpf.EbpfPlane(plane, host.maps, host.nft.listed, remove=plane.cleanup,
                               attached=lambda: set(host.maps.attached))


PLANES: dict[str, Callable[[Host], DataPlane[Any]]] = {
    "iptables": lambda h: mode_iptables.IptablesPlane(h.node, "nft", h.iptables),
    "nftables": lambda h: mode_nftables.NftablesPlane(
        NftablesDataPlane(NoRunner(), h.nft), h.nft.listed),
    "ebpf": _ebpf_plane,
    "ipvs": lambda h: mode_ipvs.IpvsPlane(IpvsDataPlane(h.node, h.ipvs, "nft", h.iptables)),
}


def start(host: Host, name: str, clean: bool = True) -> Proxier:
    """Mode ``name``'s proxy starting on ``host``: the cleanup, then its first sync."""
    mode = modes.for_config(config(name))
    if clean:
        leftovers.clean(mode, host.removers())
    proxier = Proxier(mode, config(name), host.plane(name))
    proxier.sync(decode_objects(cluster_objects()), None)
    return proxier


def fresh(name: str) -> dict[str, Any]:
    """What mode ``name`` alone writes into a fresh node."""
    host = Host()
    start(host, name, clean=False)
    return host.state()


def test_the_planes_cover_every_mode() -> None:
    assert set(PLANES) == set(modes.NAMES)
    for name in modes.NAMES:  # each writes something of its own
        assert fresh(name) != Host().state(), name


SWITCHES = [(a, b) for a in modes.NAMES for b in modes.NAMES if a != b]


@pytest.mark.parametrize(("old", "new"), SWITCHES, ids=[f"{a}->{b}" for a, b in SWITCHES])
def test_after_a_switch_the_node_holds_only_the_new_mode(old: str, new: str) -> None:
    host = Host()
    start(host, old)
    proxier = start(host, new)
    assert host.state() == fresh(new)
    assert proxier.plane.intact()
    assert "172.30.0.42" in proxier.plane.rules()


def _parts(name: str) -> set[str]:
    return {part.name for part in modes.get(name).parts}


# Switches to a mode that does not write every part of the old one.
LEAVING = [(a, b) for a, b in SWITCHES if not _parts(a) <= _parts(b)]


@pytest.mark.parametrize(("old", "new"), LEAVING, ids=[f"{a}->{b}" for a, b in LEAVING])
def test_without_the_cleanup_the_old_mode_stays(old: str, new: str) -> None:
    """What the issue measured: the new mode's first sync alone leaves the old mode's
    objects (nftables -> ebpf is not here: the ebpf mode writes the same tables, and its
    first sync takes them over)."""
    host = Host()
    start(host, old)
    start(host, new, clean=False)
    assert host.state() != fresh(new)


@pytest.mark.parametrize("name", modes.NAMES)
def test_a_restart_in_the_same_mode_removes_nothing(name: str) -> None:
    host = Host()
    start(host, name)
    before = host.state()
    done = leftovers.clean(modes.for_config(config(name)), host.removers())
    assert host.state() == before
    assert all(not any(removed.values()) for removed in done.values()), done


def test_iptables_to_ipvs_removes_the_service_chains_the_ipvs_sync_leaves() -> None:
    """The IPVS data plane's full sync rewrites its own chains (KUBE-SERVICES & co) but
    never looks at KUBE-SVC-/SEP-/...: those, and the iptables mode's filter chains with
    their REJECTs, are the cleanup's."""
    host = Host()
    start(host, "iptables")
    stale = [c for c in host.iptables.chains("nat") if c.startswith("KUBE-SVC-")]
    assert stale
    start(host, "ipvs", clean=False)
    assert set(stale) <= set(host.iptables.chains("nat"))
    assert "KUBE-EXTERNAL-SERVICES" in host.iptables.chains("filter")

    host = Host()
    start(host, "iptables")
    done = leftovers.clean(modes.get("ipvs"), host.removers())
    nat = host.iptables.chains("nat")
    assert not [c for c in nat if c.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-NODEPORTS"))]
    # Its shared chains stay (the ipvs sync rewrites them), without jumps into the gone.
    assert {"KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"} <= set(nat)
    assert not [r for r in nat["KUBE-SERVICES"] if "KUBE-SVC-" in r or "KUBE-NODEPORTS" in r]
    assert done[IPTABLES_CHAINS]["chains"] >= len(stale) + 4


def test_ipvs_to_iptables_removes_the_sets_once_no_rule_uses_them() -> None:
    host = Host()
    start(host, "ipvs")
    assert host.node.sets and "kube-ipvs0" in host.node.links and host.ipvs.services_
    done = leftovers.clean(modes.get("iptables"), host.removers())
    assert not host.node.sets and "kube-ipvs0" not in host.node.links
    assert not host.ipvs.services_
    assert "--match-set" not in host.iptables.snapshot()
    removed = done[IPVS_STATE]
    assert removed["ipsets"] > 0
    assert removed["virtual servers"] >= 2 and removed["interfaces"] == 1


def test_virtual_servers_in_exclude_cidrs_stay() -> None:
    host = Host()
    start(host, "ipvs")
    theirs = next(iter(host.ipvs.services_.values()))
    settings = IpvsConfig(exclude_cidrs=(parse_cidr(f"{theirs.ip}/32", "t"),))
    mode_ipvs.remove_state(host.node, OPTIONS, modes.get("iptables").keep, settings,
                           kernel=host.ipvs)
    assert list(host.ipvs.services_.values()) == [theirs]


def test_kubelets_firewall_chain_stays_ours_goes() -> None:
    """KUBE-FIREWALL is upstream's name for kubelet's chain too (kubelets before 1.28
    wrote it, with a rule for marked packets beside the localnet guard we write)."""
    host = Host()
    start(host, "iptables")
    filt = host.iptables.chains("filter")
    assert all(LOCALNET_COMMENT in rule for rule in filt["KUBE-FIREWALL"])
    leftovers.clean(modes.get("nftables"), host.removers())
    assert "KUBE-" not in host.iptables.snapshot()

    host = Host()
    start(host, "iptables")
    kubelet = ("-A KUBE-FIREWALL -m comment --comment \"kubernetes firewall for dropping "
               "marked packets\" -m mark --mark 0x8000/0x8000 -j DROP")
    res = host.iptables.run(["iptables-nft-restore", "--noflush"],
                            f"*filter\n{kubelet}\nCOMMIT\n")
    assert res.returncode == 0, res.stderr
    leftovers.clean(modes.get("nftables"), host.removers())
    filt = host.iptables.chains("filter")
    assert kubelet in filt["KUBE-FIREWALL"]
    assert "-A INPUT -j KUBE-FIREWALL" in filt["INPUT"]
    assert [c for c in {**filt, **host.iptables.chains("nat")} if c.startswith("KUBE-")] \
        == ["KUBE-FIREWALL"]


def test_someone_elses_rules_stay() -> None:
    host = Host()
    start(host, "iptables")
    for argv in (["-t", "nat", "-N", "OTHER"], ["-t", "nat", "-A", "OTHER", "-j", "RETURN"],
                 ["-t", "nat", "-I", "PREROUTING", "1", "-j", "OTHER"],
                 ["-N", "KUBE-KUBELET-CANARY"],
                 ["-A", "INPUT", "-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT"]):
        assert host.iptables.run(["iptables-nft", "-w", *argv]).returncode == 0, argv
    leftovers.clean(modes.get("nftables"), host.removers())
    nat, filt = host.iptables.chains("nat"), host.iptables.chains("filter")
    assert nat["OTHER"] == ["-A OTHER -j RETURN"] and nat["PREROUTING"] == [
        "-A PREROUTING -j OTHER"]
    assert "KUBE-KUBELET-CANARY" in filt
    assert filt["INPUT"] == ["-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]


def test_the_removal_is_one_restore_per_table() -> None:
    host = Host()
    start(host, "iptables")
    before = len(host.iptables.restores())
    leftovers.clean(modes.get("nftables"), host.removers())
    payloads = host.iptables.restores()[before:]
    assert [p.splitlines()[0] for p in payloads] == ["*filter", "*nat", "*mangle"]
    assert not [argv for argv, _ in host.iptables.calls
                if argv[0] == "iptables-nft" and "-D" in argv]


# --- a node lacking every backend -------------------------------------------------------


class BareNode:
    """A Runner for a node with no iptables, ipset or IPVS: the missing binaries raise
    as SubprocessRunner does, everything else answers "no"."""

    def __init__(self) -> None:
        self.calls: list[Sequence[str]] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        self.calls.append(list(argv))
        if argv[0].startswith(("iptables", "ip6tables", "ipset")):
            raise DataPlaneError(f"{argv[0]}: not installed")
        if argv[0] == "stat":
            return Result(0, "1\n", "")  # not PID 1's namespace
        return Result(1, "", f"{argv[0]}: no\n")


@pytest.mark.parametrize("name", modes.NAMES)
def test_missing_backends_are_logged_low_not_raised(
        name: str, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    runner, nft = BareNode(), FakeNftables()
    nft.fail(errno.EPROTONOSUPPORT)  # a kernel without nf_tables
    options = PlaneOptions(iptables_backend="auto", bpf_dir=str(tmp_path / "nobpffs"))
    parts: dict[str, leftovers.Remover] = {
        IPTABLES_CHAINS: lambda keep: mode_iptables.remove_chains(runner, options, keep),
        NFTABLES_TABLES: lambda keep: mode_nftables.remove_tables(runner, options, keep,
                                                                  transport=nft),
        BPF_PROGRAMS: lambda keep: mode_ebpf.remove_programs(runner, options, keep),
        IPVS_STATE: lambda keep: mode_ipvs.remove_state(runner, options, keep),
    }
    with caplog.at_level(logging.DEBUG, logger="kubeproxy"):
        done = leftovers.clean(modes.get(name), parts)
    assert set(done) == REMOVES[name]
    assert all(not any(removed.values()) for removed in done.values()), done
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    debug = "\n".join(r.getMessage() for r in caplog.records)
    for part in REMOVES[name]:
        assert f"no {part} of the" in debug
    if IPTABLES_CHAINS in REMOVES[name] or IPVS_STATE in REMOVES[name]:
        assert "iptables-nft-save: not installed" in debug
    if IPVS_STATE in REMOVES[name]:
        assert "ipset: not installed" in debug and "the kernel has no IPVS" in debug
    if NFTABLES_TABLES in REMOVES[name]:
        assert "no nf_tables" in debug
    # IPVS is never loaded to find it empty; the legacy tables are never created.
    assert ["modprobe", "-q", "ip_vs"] not in runner.calls
    assert not [c for c in runner.calls if c[0].startswith("iptables-legacy")]


def test_the_default_bpf_dir_is_left_alone_outside_the_hosts_namespace() -> None:
    seen: list[Path] = []

    def remove(path: Path) -> tuple[int, int]:
        seen.append(path)
        return 0, 0

    mode_ebpf.remove_programs(BareNode(), PlaneOptions(), Keep(), remove=remove)
    assert seen == []
    mode_ebpf.remove_programs(BareNode(), PlaneOptions(bpf_dir="/run/kp-x"), Keep(),
                              remove=remove)
    assert seen == [Path("/run/kp-x")]


def test_removing_through_iptables_data_plane_counts() -> None:
    fake = FakeIptables()
    host = Host(iptables=fake)
    start(host, "iptables")
    removed = IptablesDataPlane(fake, 4, "nft").cleanup()
    assert removed["chains"] > 10 and removed["rules"] > 5
    assert IptablesDataPlane(fake, 4, "nft").cleanup() == {}
