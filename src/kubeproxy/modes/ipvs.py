"""ipvs mode: upstream's IPVS proxier: kube-ipvs0, IPVS virtual servers, ipsets.

Both families' node views render into one :class:`~kubeproxy.render.ipvs.IpvsRuleset`
(render/ipvs.py); :class:`~kubeproxy.dataplane.ipvs.IpvsDataPlane` writes it (virtual
servers over generic netlink with pyroute2, ipsets with ``ipset restore``, addresses
with ``ip``, the small iptables part with ``iptables-restore`` on the backend
iptables-wrapper's rule picks). A packet is traced through netfilter, the ipsets and
the IPVS lookup (trace/ipvs.py). How the mode differs from upstream's: docs/ipvs.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence

from kubeproxy.config.types import IpvsConfig
from kubeproxy.dataplane.base import Keep, Runner
from kubeproxy.dataplane.iptables import BACKENDS, NOTHING_KEPT, KernelWatch, choose_backend
from kubeproxy.dataplane.ipvs import IpvsDataPlane, IpvsKernel, has_ipvs
from kubeproxy.dataplane.ipvs_netlink import KernelService, NetlinkIpvs
from kubeproxy.dataplane.netlink import find_netns
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.modes.base import (
    IPVS_STATE,
    Mode,
    Part,
    PlaneCounts,
    PlaneOptions,
    Presentation,
    Removed,
    VirtualServers,
    intact,
)
from kubeproxy.nodeview import NodeView, ServicePortView
from kubeproxy.render import ipvs
from kubeproxy.render.ipvs import IpvsRuleset
from kubeproxy.render.ipvs_tables import CHAINS, JUMPS, jump_rule
from kubeproxy.render.names import ipvs_chain_names
from kubeproxy.trace.ipvs import trace_ipvs, trace_text
from kubeproxy.trace.result import Packet, TraceResult

log = logging.getLogger("kubeproxy.modes.ipvs")


def render(views: Sequence[NodeView]) -> IpvsRuleset:
    return ipvs.render(views)


def text(ruleset: IpvsRuleset, node: str) -> str:
    return f"# IPVS state for node {node}\n" + ipvs.text(ruleset)


def trace(ruleset: IpvsRuleset, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    return trace_ipvs(ruleset, packet, local)


def trace_rules(rules: str, packet: Packet, local: frozenset[IPAddress]) -> TraceResult:
    """``DataPlane.rules()`` prints the state in ``text``'s format."""
    return trace_text(rules, packet, local)


class IpvsPlane:
    """The mode's data plane: IpvsDataPlane (virtual servers, ipsets, kube-ipvs0 and
    the iptables part) as the DataPlane protocol asks for it."""

    def __init__(self, plane: IpvsDataPlane) -> None:
        self.plane = plane
        self.runner = plane.runner  # for tests that break the rules from outside

    def sync(self, ruleset: IpvsRuleset, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        self.plane.sync(ruleset, changed)

    def cleanup(self) -> None:
        self.plane.cleanup((self.plane.backend,))

    def rules(self) -> str:
        return self.plane.rules()

    def intact(self) -> bool:
        """kube-ipvs0, the virtual-server count, then the iptables part (its fingerprint,
        our chains only when it moved)."""
        return intact(self._damage, "ipvs: cannot check the rules", log)

    def _damage(self) -> str | None:
        found = self.plane.damage()
        return None if found is None else f"ipvs: {found}"

    def counts(self) -> PlaneCounts:
        return PlaneCounts()  # nothing beyond success or failure


DEFAULTS = IpvsConfig()  # rr, no strict ARP, nothing excluded, the kernel's timeouts


def data_plane(runner: Runner, options: PlaneOptions,
               settings: IpvsConfig = DEFAULTS) -> IpvsPlane:
    has_ipvs(runner)  # loads ip_vs when it can, as upstream's proxier does at start
    kernel = NetlinkIpvs(find_netns(runner))
    return IpvsPlane(IpvsDataPlane(runner, kernel,
                                   choose_backend(runner, options.iptables_backend),
                                   KernelWatch(runner), settings))


def fake(settings: IpvsConfig = DEFAULTS) -> IpvsPlane:
    from kubeproxy.testing.ipvs import FakeIpvs, FakeNode

    node = FakeNode()
    return IpvsPlane(IpvsDataPlane(node, FakeIpvs(), "nft", node.iptables, settings))


def cleanup(runner: Runner, options: PlaneOptions, settings: IpvsConfig = DEFAULTS) -> None:
    """IPVS (when the kernel has it; not the virtual servers in excludeCIDRs),
    kube-ipvs0, our ipsets, our chains on both backends unless one is named."""
    remove_state(runner, options, NOTHING_KEPT, settings)


def remove_state(runner: Runner, options: PlaneOptions, keep: Keep,
                 settings: IpvsConfig = DEFAULTS, kernel: IpvsKernel | None = None
                 ) -> Removed:
    """The mode's Part: the virtual servers not in excludeCIDRs (over ``kernel``,
    default: netlink in the runner's namespace, if IPVS is loaded there: it is never
    loaded to find nothing), kube-ipvs0, the ipsets, the chains and jumps on both
    iptables backends unless one is named, but what ``keep`` names (the iptables
    mode's chains of the same names, when it starts). Returns what went, by kind."""
    backends = BACKENDS if options.iptables_backend == "auto" else (
        choose_backend(runner, options.iptables_backend),)
    if kernel is None:
        loaded = runner.run(["test", "-e", "/proc/net/ip_vs"]).returncode == 0
        kernel = NetlinkIpvs(find_netns(runner)) if loaded else _NoIpvs()
    return IpvsDataPlane(runner, kernel, backends[0], settings=settings).cleanup(
        backends, keep)


# What the mode writes under names the iptables mode's chains have too: its chains and
# its jumps from builtin chains.
KEEP = Keep(chains=frozenset((t, c) for t, chains in CHAINS.items() for c in chains),
            rules=frozenset((j[0], jump_rule(j)) for j in JUMPS))


def configure(settings: IpvsConfig) -> Mode[IpvsRuleset]:
    """The mode with the ``ipvs:`` settings (ProxyConfig.ipvs) applied: the scheduler
    to the renderer, strictARP, excludeCIDRs and the timeouts to the data plane (and
    excludeCIDRs to cleanup). What the lab shows with them: :func:`presentation`."""
    return dataclasses.replace(
        MODE, render=lambda views: ipvs.render(views, settings.scheduler),
        renderer=lambda: ipvs.Renderer(settings.scheduler),
        data_plane=lambda runner, options: data_plane(runner, options, settings),
        fake=lambda: fake(settings),
        cleanup=lambda runner, options: cleanup(runner, options, settings),
        parts=(Part(IPVS_STATE, lambda runner, options, keep: remove_state(
            runner, options, keep, settings)),))


def load_balancing(scheduler: str) -> str:
    """What picks a real server: the IPVS scheduler (--lb-algorithm plays no part)."""
    return f"IPVS scheduler {scheduler}"


class _NoIpvs(NetlinkIpvs):
    """The kernel has no IPVS: nothing of it to remove."""

    def flush(self) -> None:
        raise DataPlaneError("the kernel has no IPVS (/proc/net/ip_vs is missing)")

    def services(self) -> list[KernelService]:  # cleanup with excludeCIDRs asks first
        raise DataPlaneError("the kernel has no IPVS (/proc/net/ip_vs is missing)")


# VirtualServer.role (render/ipvs.py) -> the frontend kind the lab's diagram draws.
FRONTENDS = {"cluster IP": "ClusterIP", "node port": "NodePort",
             "external IP": "External", "load balancer IP": "LoadBalancer"}


def virtual_servers(view: NodeView, spv: ServicePortView) -> list[VirtualServers]:
    """``spv``'s virtual servers as the renderer writes them, grouped by frontend kind
    (a NodePort has one per node address, all with the same real servers)."""
    rendered = ipvs.render_family(dataclasses.replace(view, services=(spv,)))
    grouped: dict[str, list[ipvs.VirtualServer]] = {}
    for vs in rendered.services:
        grouped.setdefault(FRONTENDS[vs.role], []).append(vs)
    out = []
    for kind, servers in grouped.items():
        firewall = ("KUBE-SOURCE-RANGES-FIREWALL"
                    if kind == "LoadBalancer" and spv.source_ranges else None)
        out.append(VirtualServers(
            kind, tuple(f"{ipvs.host(vs.ip, vs.port)}/{vs.proto}" for vs in servers),
            servers[0].scheduler, tuple(r.target for r in servers[0].reals), firewall))
    return out


def kernel_support(runner: Runner) -> str | None:
    if not has_ipvs(runner):
        return "the kernel has no IPVS (no /proc/net/ip_vs: ip_vs module not loaded)"
    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 is not installed"
    return None


MODE: Mode[IpvsRuleset] = Mode(
    name="ipvs",
    render=render,
    renderer=ipvs.Renderer,  # memoized per port view: a partial sync renders the change
    text=text,
    trace=trace,
    trace_rules=trace_rules,
    data_plane=data_plane,
    fake=fake,
    cleanup=cleanup,
    sync_failures_metric="sync_proxy_rules_iptables_restore_failures_total",
    kernel_support=kernel_support,
    configure=lambda config: configure(config.ipvs),
    parts=(Part(IPVS_STATE, remove_state),),
    keep=KEEP,
)


def presentation(settings: IpvsConfig = DEFAULTS) -> Presentation:
    """What the lab shows of the mode with the ``ipvs:`` settings: virtual servers, no
    chains, and the scheduler (not --lb-algorithm) picking the real server."""
    return Presentation(chain_names=ipvs_chain_names, virtual_servers=virtual_servers,
                        load_balancing=lambda algorithm: load_balancing(settings.scheduler))


PRESENTATION = presentation()
