"""iptables mode: upstream's chain layout, one iptables-save ruleset per IP family.

Each family is rendered on its own (render/iptables.py) and written by its own
:class:`~kubeproxy.dataplane.iptables.IptablesDataPlane` through ``iptables-restore``
(``ip6tables-restore`` for IPv6), with the backend (legacy or nft) that
iptables-wrapper's rule picks; :class:`IptablesPlane` is the mode's data plane over
those. A packet is traced through its family's ruleset.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kubeproxy.dataplane.base import Keep, Runner, not_installed
from kubeproxy.dataplane.iptables import (
    BACKENDS,
    CANARY_TABLES,
    NOTHING_KEPT,
    OWN_JUMPS,
    Backend,
    IptablesDataPlane,
    KernelWatch,
    Watch,
    binaries,
    choose_backend,
    detect_backend,
    reader,
)
from kubeproxy.dataplane.iptables import (
    ExistingTablesOnly as ExistingTablesOnly,  # moved to the data plane; still found here
)
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.modes.base import (
    IPTABLES_CHAINS,
    Mode,
    Part,
    PlaneCounts,
    PlaneOptions,
    Presentation,
    intact,
)
from kubeproxy.nodeview import NodeView
from kubeproxy.render import iptables
from kubeproxy.render.iptables import KUBE_FIREWALL, KUBE_PROXY_CANARY, TOP_CHAINS
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
    """Both backends unless one is named: rules may be in either."""
    remove_chains(runner, options, NOTHING_KEPT)


def remove_chains(runner: Runner, options: PlaneOptions, keep: Keep) -> Counter[str]:
    """The mode's chains and jumps (its Part), on both backends unless one is named,
    but what ``keep`` names (the IPVS mode's chains of the same names, when it starts).
    On legacy only the tables that exist are read (reading one creates it); a backend
    whose binaries are missing holds nothing. Returns chains and rules removed."""
    backends = BACKENDS if options.iptables_backend == "auto" else (
        choose_backend(runner, options.iptables_backend),)
    removed: Counter[str] = Counter()
    for backend in backends:
        try:
            for family in (4, 6):
                removed += IptablesDataPlane(reader(runner, backend), family,
                                             backend).cleanup(keep)
        except DataPlaneError as err:
            if not not_installed(err):
                raise
            log.debug("cleanup: %s backend: %s", backend, err)
    return removed


# What the mode writes under names the IPVS mode's chains have too: its fixed chains
# (per-service chains have names of their own) and its jumps from builtin chains.
KEEP = Keep(
    chains=frozenset({(t, c) for t in ("filter", "nat") for c in TOP_CHAINS[t]}
                     | {("filter", KUBE_FIREWALL)}
                     | {(t, KUBE_PROXY_CANARY) for t in CANARY_TABLES}),
    rules=OWN_JUMPS)


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
    parts=(Part(IPTABLES_CHAINS, remove_chains),),
    keep=KEEP,
)


def service_rules(runner: Runner) -> list[str]:
    """``iptables -t nat -L KUBE-SERVICES -n`` with the backend the node uses."""
    return [binaries(4, detect_backend(runner))[0], "-t", "nat", "-L", "KUBE-SERVICES", "-n"]


PRESENTATION = Presentation(chain_names=iptables_chain_names, service_rules=service_rules)
