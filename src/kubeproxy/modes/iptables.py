"""iptables mode: upstream's chain layout, one iptables-save ruleset per IP family.

Each family is rendered on its own (render/iptables.py) and written by its own
:class:`~kubeproxy.dataplane.iptables.IptablesDataPlane` through ``iptables-restore``
(``ip6tables-restore`` for IPv6), with the backend (legacy or nft) that
iptables-wrapper's rule picks; :class:`IptablesPlane` is the mode's data plane over
those. A packet is traced through its family's ruleset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kubeproxy.dataplane.base import Result, Runner
from kubeproxy.dataplane.iptables import (
    BACKENDS,
    Backend,
    IptablesDataPlane,
    KernelWatch,
    Watch,
    binaries,
    choose_backend,
    detect_backend,
)
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.modes.base import Mode, PlaneCounts, PlaneOptions, Presentation, intact
from kubeproxy.nodeview import NodeView
from kubeproxy.render import iptables
from kubeproxy.render.names import iptables_chain_names
from kubeproxy.trace.iptables import trace_iptables
from kubeproxy.trace.result import Packet, TraceResult

log = logging.getLogger("kubeproxy.modes.iptables")


@dataclass(frozen=True)
class Rulesets:
    """One iptables ruleset per IP family in use."""

    families: Mapping[Family, iptables.Ruleset]


def render(views: Sequence[NodeView]) -> Rulesets:
    return Rulesets({view.family: iptables.render(view) for view in views})


def renderer() -> Callable[[Sequence[NodeView]], Rulesets]:
    """render, remembering each family's service-port rules between calls."""
    memos = {4: iptables.Renderer(), 6: iptables.Renderer()}
    return lambda views: Rulesets({view.family: memos[view.family](view) for view in views})


def text(rulesets: Rulesets, node: str) -> str:
    out: list[str] = []
    for family, ruleset in sorted(rulesets.families.items()):
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        out.append(f"# IPv{family} rules for node {node} ({tool} format)\n")
        out.append(ruleset.save_text())
    return "".join(out)


def trace(rulesets: Rulesets, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    family: Family = 4 if packet.dst.version == 4 else 6
    ruleset = rulesets.families.get(family)
    if ruleset is None:  # no rules of ours in this family: nothing touches the packet
        return TraceResult("ACCEPT", (), False, (), (
            f"packet {packet.describe()}",
            f"no IPv{family} rules were rendered: the packet is not touched"))
    return trace_iptables(ruleset.save_text(), packet, local)


IPV6_MARK = "# kubeproxy: IPv6 rules follow\n"  # between the families in rules()


def trace_rules(text: str, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    """Through the packet's family's part of ``DataPlane.rules()``."""
    v4, _, v6 = text.partition(IPV6_MARK)
    return trace_iptables(v4 if packet.dst.version == 4 else v6, packet, local)


class IptablesPlane:
    """The mode's data plane: one IptablesDataPlane per family; a family once written
    stays written."""

    def __init__(self, runner: Runner, backend: Backend, watch: Watch | None = None
                 ) -> None:
        self.runner = runner
        self.backend = backend
        self.watch = watch  # the cheap change detector of intact()
        self.planes: dict[Family, IptablesDataPlane] = {}
        # family -> table -> (rules owned, rules written by the last sync): metrics.
        self.rule_counts: dict[Family, dict[str, tuple[int, int]]] = {}

    def sync(self, rulesets: Rulesets, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        for family, ruleset in sorted(rulesets.families.items()):
            plane = self.planes.get(family)
            if plane is None:
                plane = self.planes[family] = IptablesDataPlane(
                    self.runner, family, self.backend, self.watch)
            stats = plane.sync(ruleset, changed)
            self.rule_counts[family] = {
                t: (ruleset.rule_count(t), stats.rules_by_table.get(t, 0))
                for t in ("filter", "nat")}

    def intact(self) -> bool:
        """Each family's canary chains, top-level chains and jumps, read only when the
        watch's fingerprint moved (dataplane/iptables.py)."""
        return intact(self._damage, "iptables: cannot check the rules", log)

    def _damage(self) -> str | None:
        """The first family's damage, IPv4 first."""
        for _, plane in sorted(self.planes.items()):
            if (found := plane.damage()) is not None:
                return found
        return None

    def counts(self) -> PlaneCounts:
        """(family, table) -> (rules owned, rules the last sync wrote), filter and nat."""
        return PlaneCounts(rules={(f, t): n for f, tables in self.rule_counts.items()
                                  for t, n in tables.items()})

    def cleanup(self) -> None:
        for family in (4, 6):
            IptablesDataPlane(self.runner, family, self.backend).cleanup()
        self.planes.clear()

    def rules(self) -> str:
        """iptables-save of filter and nat: IPv4, then IPv6 if this plane wrote it."""
        text = IptablesDataPlane(self.runner, 4, self.backend).save()
        if 6 in self.planes:
            text += IPV6_MARK + IptablesDataPlane(self.runner, 6, self.backend).save()
        return text


def data_plane(runner: Runner, options: PlaneOptions) -> IptablesPlane:
    return IptablesPlane(runner, choose_backend(runner, options.iptables_backend),
                         KernelWatch(runner))


def fake() -> IptablesPlane:
    from kubeproxy.testing.iptables import FakeIptables

    kernel = FakeIptables()
    return IptablesPlane(kernel, "nft", kernel)


def cleanup(runner: Runner, options: PlaneOptions) -> None:
    """Both backends unless one is named: rules may be in either. On legacy, only the
    tables that exist are read: ``iptables-legacy-save -t nat`` would *create* an empty
    nat table, and iptables-nft then warns about legacy tables for ever after."""
    backends = BACKENDS if options.iptables_backend == "auto" else (
        choose_backend(runner, options.iptables_backend),)
    for backend in backends:
        try:
            IptablesPlane(ExistingTablesOnly(runner) if backend == "legacy" else runner,
                          backend).cleanup()
        except DataPlaneError as err:
            if "not installed" not in str(err):
                raise
            log.info("cleanup: %s backend: %s", backend, err)


# The per-family list of the legacy tables that exist (reading it creates none).
LEGACY_TABLE_LISTS = {"iptables-legacy-save": "/proc/net/ip_tables_names",
                      "ip6tables-legacy-save": "/proc/net/ip6_tables_names"}


class ExistingTablesOnly:
    """A Runner that answers ``iptables-legacy-save -t TABLE`` for a table the kernel
    does not have with "no such table" instead of running it (which would create it)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        listing = LEGACY_TABLE_LISTS.get(argv[0]) if argv else None
        if listing is not None and "-t" in argv:
            table = argv[list(argv).index("-t") + 1]
            names = self.runner.run(["cat", listing])
            if names.returncode != 0 or table not in names.stdout.split():
                return Result(1, "", f"table {table!r} does not exist")
        return self.runner.run(argv, stdin)


MODE: Mode[Rulesets] = Mode(
    name="iptables",
    render=render,
    renderer=renderer,
    text=text,
    trace=trace,
    trace_rules=trace_rules,
    data_plane=data_plane,
    fake=fake,
    cleanup=cleanup,
    sync_failures_metric="sync_proxy_rules_iptables_restore_failures_total",
    partial_failures_metric="sync_proxy_rules_iptables_partial_restore_failures_total",
)


def service_rules(runner: Runner) -> list[str]:
    """``iptables -t nat -L KUBE-SERVICES -n`` with the backend the node uses."""
    return [binaries(4, detect_backend(runner))[0], "-t", "nat", "-L", "KUBE-SERVICES", "-n"]


PRESENTATION = Presentation(chain_names=iptables_chain_names, service_rules=service_rules)
