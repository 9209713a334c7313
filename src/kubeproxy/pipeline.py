"""Glue for the commands: cluster + config -> per-family rulesets. Pure."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kubeproxy.config import ProxyConfig
from kubeproxy.dataplane.base import Runner
from kubeproxy.model import Cluster, Family
from kubeproxy.nodeview import build_node_view
from kubeproxy.render import iptables

if TYPE_CHECKING:
    from kubeproxy.render.nftables import NftRuleset


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a ruleset is built.

    A render allocates ~10 objects per endpoint and no reference cycles; with the
    collector running, each generation-0 threshold crossing rescans the ever-growing
    young objects, which doubled the time of a 10,000-service render (bench/render.py).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def families_in_use(cluster: Cluster, config: ProxyConfig) -> list[Family]:
    """IPv4 always; IPv6 when any service, node address or cluster CIDR is IPv6."""
    v6 = (any(ip.version == 6 for s in cluster.services for ip in s.cluster_ips)
          or any(ip.version == 6 for n in cluster.nodes for ip in n.addresses)
          or any(c.version == 6 for c in config.cluster_cidrs))
    return [4, 6] if v6 else [4]


def render_iptables(cluster: Cluster, config: ProxyConfig) -> dict[Family, iptables.Ruleset]:
    with paused_gc():
        return {fam: iptables.render(build_node_view(cluster, config, fam))
                for fam in families_in_use(cluster, config)}


def render_nftables_ruleset(cluster: Cluster, config: ProxyConfig) -> NftRuleset:
    """Both families' node views in one nftables ruleset (tables ip/ip6 kube-proxy)."""
    from kubeproxy.render import nftables

    with paused_gc():
        return nftables.render([build_node_view(cluster, config, fam)
                                for fam in families_in_use(cluster, config)])


def render_nftables(cluster: Cluster, config: ProxyConfig) -> str:
    """The `nft -f` script for this node."""
    return render_nftables_ruleset(cluster, config).script()


def apply_nftables(cluster: Cluster, config: ProxyConfig, runner: Runner) -> None:
    from kubeproxy.dataplane.nftables import NftablesDataPlane

    NftablesDataPlane(runner).sync(render_nftables_ruleset(cluster, config))


def cleanup_nftables(runner: Runner) -> None:
    from kubeproxy.dataplane.nftables import NftablesDataPlane

    NftablesDataPlane(runner).cleanup()
