"""ipvs mode: upstream's IPVS proxier: kube-ipvs0, IPVS virtual servers, ipsets.

Both families' node views render into one :class:`~kubeproxy.render.ipvs.IpvsRuleset`
(render/ipvs.py); :class:`~kubeproxy.dataplane.ipvs.IpvsDataPlane` writes it (virtual
servers over generic netlink with pyroute2, ipsets with ``ipset restore``, addresses
with ``ip``, the small iptables part with ``iptables-restore`` on the backend
iptables-wrapper's rule picks). A packet is traced through netfilter, the ipsets and
the IPVS lookup (trace/ipvs.py). How the mode differs from upstream's: docs/ipvs.md.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

from kubeproxy.dataplane.base import DataPlaneError, Runner
from kubeproxy.dataplane.iptables import KernelWatch
from kubeproxy.dataplane.ipvs import IpvsDataPlane, NetlinkIpvs, has_ipvs
from kubeproxy.dataplane.netlink import find_netns
from kubeproxy.model import IPAddress, NamespacedName
from kubeproxy.modes.base import Mode, PlaneOptions
from kubeproxy.modes.iptables import BACKENDS, choose_backend
from kubeproxy.nodeview import NodeView
from kubeproxy.render import ipvs
from kubeproxy.render.ipvs import IpvsRuleset
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


class DataPlane:
    def __init__(self, plane: IpvsDataPlane, backends: Sequence[str] = BACKENDS) -> None:
        self.plane = plane
        self.runner = plane.runner  # for tests that break the rules from outside
        self._backends = backends

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
        try:
            found = self.plane.damage()
        except DataPlaneError as err:
            found = f"ipvs: cannot check the rules: {err}"
        if found is not None:
            log.warning("ipvs: %s (changed from outside)", found)
        return found is None


def data_plane(runner: Runner, options: PlaneOptions) -> DataPlane:
    kernel = NetlinkIpvs(find_netns(runner))
    return DataPlane(IpvsDataPlane(runner, kernel, choose_backend(runner, options),
                                   KernelWatch(runner)))


def fake() -> DataPlane:
    from kubeproxy.testing.ipvs import FakeIpvs, FakeNode

    node = FakeNode()
    return DataPlane(IpvsDataPlane(node, FakeIpvs(), "nft", node.iptables))


def cleanup(runner: Runner, options: PlaneOptions) -> None:
    """IPVS (when the kernel has it), kube-ipvs0, our ipsets, our chains on both backends
    unless one is named."""
    backends = BACKENDS if options.iptables_backend == "auto" else (
        choose_backend(runner, options),)
    kernel = NetlinkIpvs(find_netns(runner)) if has_ipvs(runner) else _NoIpvs()
    IpvsDataPlane(runner, kernel, backends[0]).cleanup(backends)


class _NoIpvs(NetlinkIpvs):
    """The kernel has no IPVS: nothing of it to remove."""

    def flush(self) -> None:
        raise DataPlaneError("the kernel has no IPVS (/proc/net/ip_vs is missing)")


def kernel_support(runner: Runner) -> str | None:
    if not has_ipvs(runner):
        return "the kernel has no IPVS (no /proc/net/ip_vs: ip_vs module not loaded)"
    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 is not installed"
    return None


MODE: Mode[IpvsRuleset] = Mode(
    name="ipvs",
    render=render,
    renderer=lambda: render,  # the ruleset is sets and servers: rendering is cheap
    text=text,
    trace=trace,
    trace_rules=trace_rules,
    data_plane=data_plane,
    fake=fake,
    cleanup=cleanup,
    chain_names=ipvs_chain_names,
    sync_failures_metric="sync_proxy_rules_iptables_restore_failures_total",
    kernel_support=kernel_support,
)
