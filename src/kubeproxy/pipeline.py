"""Pure glue for the commands and tests: cluster + config -> node views -> rulesets.

No I/O here: writing rules is a mode's data plane (modes/), driven by proxier.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.model import Cluster, Family, Service
from kubeproxy.nodeview import NodeView, build_node_view
from kubeproxy.render import iptables
from kubeproxy.util.gcpause import paused_gc

if TYPE_CHECKING:
    from kubeproxy.render.nftables import NftRuleset


def families_in_use(cluster: Cluster, config: ProxyConfig) -> list[Family]:
    """IPv4 always; IPv6 when any service, node address or cluster CIDR is IPv6."""
    return families_of(cluster.services, cluster, config)


def families_of(services: Iterable[Service], cluster: Cluster, config: ProxyConfig
                ) -> list[Family]:
    """:func:`families_in_use` looking only at ``services`` among the cluster's."""
    v6 = (any(ip.version == 6 for s in services for ip in s.cluster_ips)
          or any(ip.version == 6 for n in cluster.nodes for ip in n.addresses)
          or any(c.version == 6 for c in config.cluster_cidrs))
    return [4, 6] if v6 else [4]


def node_views(cluster: Cluster, config: ProxyConfig) -> list[NodeView]:
    """This node's view of every IP family in use."""
    return [build_node_view(cluster, config, f) for f in families_in_use(cluster, config)]


def render(cluster: Cluster, config: ProxyConfig) -> Any:
    """The ruleset of ``config.mode`` for this node."""
    with paused_gc():
        return modes.for_config(config).render(node_views(cluster, config))


def render_iptables(cluster: Cluster, config: ProxyConfig) -> dict[Family, iptables.Ruleset]:
    with paused_gc():
        return {view.family: iptables.render(view) for view in node_views(cluster, config)}


def render_nftables_ruleset(cluster: Cluster, config: ProxyConfig) -> NftRuleset:
    """Both families' node views in one nftables ruleset (tables ip/ip6 kube-proxy)."""
    from kubeproxy.render import nftables

    with paused_gc():
        return nftables.render(node_views(cluster, config))


def render_nftables(cluster: Cluster, config: ProxyConfig) -> str:
    """The `nft -f` script for this node."""
    return render_nftables_ruleset(cluster, config).script()
