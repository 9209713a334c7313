"""The mode registry: every mode plugs in the same way, and nothing else asks which.

Each registered mode's data plane runs here over the package's strict fake kernel
(``Mode.fake``): a sequence of partial syncs must leave the fake kernel holding exactly
what one full sync of the final cluster writes into a fresh one. Every mode's plane
answers ``intact()`` (through ``modes.base.intact``) and ``counts()``, every mode has a
``Presentation`` for the lab, and no mode module imports another.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import Result
from kubeproxy.dataplane.nft_ops import AddTable, DeleteTable, FlushChain
from kubeproxy.errors import ConfigError, DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.modes.base import PlaneCounts, Presentation, intact
from kubeproxy.proxier import Proxier
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, service

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
A, B = NamespacedName("ns1", "a"), NamespacedName("ns1", "b")


def svc_a(*ips: str) -> list[Obj]:
    return [service("a", cluster_ip="172.30.0.41"),
            endpoint_slice("a", [endpoint(ip) for ip in ips])]


def svc_b() -> list[Obj]:
    return [service("b", cluster_ip="172.30.0.42", type="NodePort",
                    ports=[("p80", 80, "TCP", 30080)]),
            endpoint_slice("b", [endpoint("10.180.0.7"), endpoint("10.180.1.7", "node2")])]


# (what changed, the cluster after the change); each step is one partial sync.
STEPS: list[tuple[frozenset[NamespacedName], list[Obj]]] = [
    (frozenset({B}), [node(), *svc_a("10.180.0.1", "10.180.0.2"), *svc_b()]),
    (frozenset({A}), [node(), *svc_a("10.180.0.1", "10.180.0.3", "10.180.0.4"), *svc_b()]),
    (frozenset({B}), [node(), *svc_a("10.180.0.1", "10.180.0.3", "10.180.0.4")]),
    (frozenset({A}), [node(), service("a", cluster_ip="172.30.0.41")]),
    (frozenset({A, B}), [node(), *svc_a("10.180.0.9"), *svc_b()]),
]


def config(mode: str) -> ProxyConfig:
    return ProxyConfig(**{**CONFIG.__dict__, "mode": mode})


def test_every_name_resolves_to_its_mode() -> None:
    assert tuple(modes.REGISTRY) == modes.NAMES
    for name in modes.NAMES:
        assert modes.get(name).name == name
    assert [m.name for m in modes.every()] == list(modes.NAMES)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(modes.UnknownModeError, match=r"'ipvsx'.*iptables"):
        modes.get("ipvsx")
    with pytest.raises(modes.UnknownModeError, match=r"'ipvsx'.*iptables"):
        modes.presentation("ipvsx")
    with pytest.raises(ConfigError, match="mode"):
        ProxyConfig(mode="ipvsx")


@pytest.mark.parametrize("name", modes.NAMES)
def test_partial_syncs_equal_one_full_sync(name: str) -> None:
    mode = modes.get(name)
    incremental = Proxier(mode, config(name), mode.fake())
    incremental.sync(decode_objects([node(), *svc_a("10.180.0.1", "10.180.0.2")]), None)
    assert "10.180.0.2" in incremental.plane.rules()
    for changed, objs in STEPS:
        cluster = decode_objects(objs)
        assert not cluster.errors
        incremental.sync(cluster, changed)
        scratch = Proxier(mode, config(name), mode.fake())
        scratch.sync(cluster, None)
        assert incremental.plane.rules() == scratch.plane.rules(), changed


@pytest.mark.parametrize("name", modes.NAMES)
def test_report_carries_the_views_written(name: str) -> None:
    mode = modes.get(name)
    proxier = Proxier(mode, config(name), mode.fake())
    v6 = [node(ips=["192.168.0.2", "fd00::2"]), *svc_a("10.180.0.1"),
          service("six", cluster_ip="fd00:30::6"),
          endpoint_slice("six", [endpoint("fd00:180::6")], family="IPv6")]
    report = proxier.sync(decode_objects(v6), None)
    assert sorted(report.views) == [4, 6]
    assert [s.name.service.name for s in report.views[6].services] == ["six"]
    # A family once in use stays rendered (emptied, not orphaned).
    report = proxier.sync(decode_objects([node(), *svc_a("10.180.0.1")]), None)
    assert sorted(report.views) == [4, 6] and report.views[6].services == ()
    assert "fd00:180::6" not in proxier.plane.rules()


@pytest.mark.parametrize("name", modes.NAMES)
def test_cleanup_empties_the_fake_kernel(name: str) -> None:
    mode = modes.get(name)
    proxier = Proxier(mode, config(name), mode.fake())
    proxier.sync(decode_objects(STEPS[0][1]), None)
    assert "10.180.0.7" in proxier.plane.rules()
    proxier.plane.cleanup()
    assert "10.180.0.7" not in proxier.plane.rules()
    assert "172.30.0.41" not in proxier.plane.rules()


# --- nothing outside the registry branches on the mode -------------------------------

_NAME = "|".join(modes.NAMES)
# An `if`, `elif` or conditional expression comparing with a mode's name.
MODE_BRANCH = re.compile(
    rf"""\b(el)?if\b.*((==|!=)\s*["']({_NAME})["']|["']({_NAME})["']\s*(==|!=))""")


def _branches(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if MODE_BRANCH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    return found


def test_no_mode_branches_outside_the_registry() -> None:
    sources = [p for p in (ROOT / "src" / "kubeproxy").rglob("*.py")
               if "modes" not in p.relative_to(ROOT / "src" / "kubeproxy").parts]
    tests = list((ROOT / "tests").rglob("*.py"))
    assert _branches(sources + tests) == []


def test_the_branch_detector_sees_a_branch() -> None:
    assert MODE_BRANCH.search('if config.mode == "' + modes.NAMES[-1] + '":')
    assert MODE_BRANCH.search("elif '" + modes.NAMES[0] + "' != mode:")
    assert MODE_BRANCH.search('x = a if mode != "' + modes.NAMES[0] + '" else b')
    assert not MODE_BRANCH.search("choices=modes.NAMES")
    assert not MODE_BRANCH.search('assert answer == "' + modes.NAMES[0] + '"')


# --- flush detection: intact() over the strict fakes ------------------------------------

Damage = Callable[[Any], object]  # breaks a mode's fake kernel "from outside"


def _iptables(*args: str) -> Damage:
    """An operator's iptables command against the fake kernel (the fake's backend)."""
    def run(plane: Any) -> object:
        res = plane.runner.run(["iptables-nft", "-w", *args])
        assert res.returncode == 0, res.stderr
        return res
    return run


def _ip(*args: str) -> Damage:
    """An operator's `ip` command against the fake node."""
    def run(plane: Any) -> object:
        res = plane.runner.run(["ip", *args])
        assert res.returncode == 0, res.stderr
        return res
    return run


def _nft(*ops: Any) -> Damage:
    """A transaction someone else commits to the fake nf_tables, as `nft` would."""
    def run(plane: Any) -> object:
        plane.plane.transport.commit(list(ops))
        return None
    return run


@dataclass(frozen=True)
class FlushCase:
    name: str
    mode: str
    damage: Damage
    breaks: bool = True  # False: someone else's change, ours is intact


FLUSHES = [
    FlushCase("-t nat -F KUBE-SERVICES", "iptables",
              _iptables("-t", "nat", "-F", "KUBE-SERVICES")),
    FlushCase("-t nat -F (builtin jumps too)", "iptables", _iptables("-t", "nat", "-F")),
    FlushCase("-t nat -F; -t nat -X", "iptables", lambda p: (
        _iptables("-t", "nat", "-F")(p), _iptables("-t", "nat", "-X")(p))),
    FlushCase("-t mangle -X KUBE-PROXY-CANARY", "iptables",
              _iptables("-t", "mangle", "-X", "KUBE-PROXY-CANARY")),
    FlushCase("-t nat -D PREROUTING (our jump)", "iptables",
              _iptables("-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
                        "kubernetes service portals", "-j", "KUBE-SERVICES")),
    FlushCase("someone else's nat chain", "iptables", lambda p: (
        _iptables("-t", "nat", "-N", "OTHER")(p),
        _iptables("-t", "nat", "-A", "PREROUTING", "-j", "OTHER")(p)), breaks=False),
    FlushCase("flush chain ip kube-proxy services", "nftables",
              _nft(FlushChain("ip", "services"))),
    FlushCase("flush chain ip kube-proxy nat-prerouting", "nftables",
              _nft(FlushChain("ip", "nat-prerouting"))),
    FlushCase("delete table ip kube-proxy", "nftables", _nft(DeleteTable("ip"))),
    FlushCase("someone else's transaction", "nftables", _nft(AddTable("ip6")),
              breaks=False),
    FlushCase("delete table ip kube-proxy (ebpf's nftables part)", "ebpf",
              lambda p: p.plane.nft.transport.commit([DeleteTable("ip")])),
    FlushCase("program detached", "ebpf",
              lambda p: p.plane.maps.attached.discard("kp_connect4")),
    FlushCase("-t nat -F KUBE-SERVICES (ipvs's iptables part)", "ipvs",
              _iptables("-t", "nat", "-F", "KUBE-SERVICES")),
    FlushCase("ip link del kube-ipvs0", "ipvs", _ip("link", "del", "kube-ipvs0")),
    FlushCase("ipvsadm -C (every virtual server)", "ipvs",
              lambda p: p.plane.kernel.flush()),
    FlushCase("someone else's nat chain (ipvs)", "ipvs", lambda p: (
        _iptables("-t", "nat", "-N", "OTHER")(p),
        _iptables("-t", "nat", "-A", "PREROUTING", "-j", "OTHER")(p)), breaks=False),
]


@pytest.mark.parametrize("case", FLUSHES, ids=lambda c: f"{c.mode}: {c.name}")
def test_intact_sees_flushes_and_a_full_sync_restores(case: FlushCase) -> None:
    """sync -> intact -> damaged from outside -> not intact -> full sync -> intact,
    holding what a fresh kernel holds."""
    mode = modes.get(case.mode)
    cluster = decode_objects(STEPS[0][1])
    proxier = Proxier(mode, config(case.mode), mode.fake())
    assert proxier.plane.intact(), "nothing written yet"
    proxier.sync(cluster, None)
    assert proxier.plane.intact() and proxier.plane.intact()
    before = proxier.plane.rules()
    case.damage(proxier.plane)
    assert proxier.plane.intact() is not case.breaks
    if not case.breaks:
        return
    proxier.sync(cluster, None)
    assert proxier.plane.intact()
    scratch = Proxier(mode, config(case.mode), mode.fake())
    scratch.sync(cluster, None)
    assert proxier.plane.rules() == scratch.plane.rules() == before


def test_every_mode_has_flush_cases() -> None:
    assert {c.mode for c in FLUSHES if c.breaks} == set(modes.NAMES)


# --- what a data plane reports, what the lab shows ------------------------------------

# (family, table) rule counts a mode's plane reports after one full IPv4 sync; the
# others report none (only iptables has upstream's per-table rule gauges).
COUNTED: dict[str, set[tuple[int, str]]] = {"iptables": {(4, "filter"), (4, "nat")}}


@pytest.mark.parametrize("name", modes.NAMES)
def test_every_data_plane_answers_counts(name: str) -> None:
    """What the daemon hands the metrics (``Metrics(plane=plane.counts)``)."""
    mode = modes.get(name)
    proxier = Proxier(mode, config(name), mode.fake())
    assert proxier.plane.counts() == PlaneCounts(), "nothing synced yet"
    proxier.sync(decode_objects(STEPS[0][1]), None)
    counts = proxier.plane.counts()
    assert set(counts.rules) == COUNTED.get(name, set())
    owned, written = counts.rules.get((4, "nat"), (0, 0))
    assert owned == written  # a first sync writes every rule it owns
    assert counts.cleanup_failures == ()


class Refusing:
    """A node whose every command fails (no tables to detect a backend from)."""

    def __init__(self) -> None:
        self.ran: list[Sequence[str]] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        self.ran.append(argv)
        return Result(1, "", "refused")


@pytest.mark.parametrize("name", modes.NAMES)
def test_every_mode_has_a_presentation(name: str) -> None:
    """The lab's diagram draws each service port as chains or as virtual servers, its
    status names the load balancing, the demo lists the dispatch rules if the mode has
    a listing: all from ``modes.presentation``, for every registered mode."""
    shown = modes.presentation(name)
    assert isinstance(shown, Presentation)
    mode = modes.get(name)
    report = Proxier(mode, config(name), mode.fake()).sync(decode_objects(STEPS[0][1]), None)
    view = report.views[4]
    assert view.services
    for spv in view.services:
        chains = shown.chain_names(spv).all()
        if shown.virtual_servers is None:
            assert chains, spv.name
        else:
            assert chains == () and shown.virtual_servers(view, spv), spv.name
    assert shown.load_balancing("random")
    if shown.service_rules is not None:
        argv = list(shown.service_rules(Refusing()))
        assert argv and all(isinstance(arg, str) and arg for arg in argv)


# --- intact(): the one answer every mode's DataPlane.intact() gives -------------------


def _unreadable() -> str | None:
    raise DataPlaneError("nft: permission denied")


INTACT = [
    # (case, damage, intact?, the warning logged)
    ("nothing changed", lambda: None, True, None),
    ("a chain flushed", lambda: "chain services holds 0 rules", False,
     "chain services holds 0 rules (changed from outside)"),
    ("cannot look", _unreadable, False,
     "nftables: cannot check the tables: nft: permission denied (changed from outside)"),
]


@pytest.mark.parametrize(("case", "damage", "ok", "warning"), INTACT,
                         ids=[c[0] for c in INTACT])
def test_intact_answers_and_logs_what_it_found(
        case: str, damage: Callable[[], str | None], ok: bool, warning: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("kubeproxy.modes.test")
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert intact(damage, "nftables: cannot check the tables", log) is ok
    assert [r.getMessage() for r in caplog.records] == ([warning] if warning else [])


# --- no mode module imports another ------------------------------------------------------


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    out: set[str] = set()
    for stmt in ast.walk(ast.parse(path.read_text())):
        if isinstance(stmt, ast.Import):
            out |= {alias.name for alias in stmt.names}
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            out |= {stmt.module, *(f"{stmt.module}.{a.name}" for a in stmt.names)}
    return out


def test_no_mode_module_imports_another() -> None:
    """What two modes share lives in modes/base.py or dataplane/, never in a mode."""
    src = ROOT / "src"
    found = {}
    for name, module in modes.REGISTRY.items():
        path = src / Path(*module.split(".")).with_suffix(".py")
        others = set(modes.REGISTRY.values()) - {module}
        found[name] = sorted(_imported(path) & others)
    assert found == {name: [] for name in modes.NAMES}
