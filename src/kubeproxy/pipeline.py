"""Glue for the commands: cluster + config -> per-family rulesets. Pure."""

from __future__ import annotations

from kubeproxy.config import ProxyConfig
from kubeproxy.model import Cluster, Family
from kubeproxy.nodeview import build_node_view
from kubeproxy.render import iptables


def families_in_use(cluster: Cluster, config: ProxyConfig) -> list[Family]:
    """IPv4 always; IPv6 when any service, node address or cluster CIDR is IPv6."""
    v6 = (any(ip.version == 6 for s in cluster.services for ip in s.cluster_ips)
          or any(ip.version == 6 for n in cluster.nodes for ip in n.addresses)
          or any(c.version == 6 for c in config.cluster_cidrs))
    return [4, 6] if v6 else [4]


def render_iptables(cluster: Cluster, config: ProxyConfig) -> dict[Family, iptables.Ruleset]:
    return {fam: iptables.render(build_node_view(cluster, config, fam))
            for fam in families_in_use(cluster, config)}
