"""The per-service-port chains a mode writes, by role, named as its renderer names them.

Theory of operation
-------------------
Some readers of the rules want to know *which* chain plays which part for a service
port without reading the rules: the lab's diagram draws "frontend -> external chain ->
service chain -> endpoint chain -> Pod" and labels each box with the chain's real name.
:class:`ChainNames` is that answer, one per :class:`~kubeproxy.nodeview.ServicePortView`:

========== =================== ============================ ===========================
role       iptables            nftables                     written when
========== =================== ============================ ===========================
service    ``KUBE-SVC-HASH``   ``service-HASH-ns/svc/p/n``  the port has cluster endpoints
local      ``KUBE-SVL-HASH``   ``local-HASH-ns/svc/p/n``    the port has local endpoints
external   ``KUBE-EXT-HASH``   ``external-HASH-ns/svc/p/n`` endpoints exist and the port
                                                            has an external frontend
firewall   ``KUBE-FW-HASH``    ``firewall-HASH-ns/svc/p/n`` loadBalancerSourceRanges apply
endpoints  ``KUBE-SEP-HASH``   (none)                       one per endpoint a chain uses
========== =================== ============================ ===========================

The "written when" column is each renderer's own condition (render/iptables.py
``policy_chains``, render/nftables.py ``_ServiceRenderer.port``), read from the same
node-view fields, and the names come from the renderers' own functions
(``ipt_names.service_chain`` / ``endpoint_chain``, ``nft_names.chain_base``); a test
checks both against real rendered output. Our nftables renderer has no per-endpoint
chains: endpoints are elements of shared DNAT maps (see render/nftables.py), so its
``endpoints`` is empty. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kubeproxy.nodeview import ServicePortView
from kubeproxy.render.ipt_names import endpoint_chain, service_chain
from kubeproxy.render.nft_names import chain_base


@dataclass(frozen=True)
class ChainNames:
    """The chains one service port has in one mode's rules (None: not written)."""

    service: str | None  # cluster endpoints
    local: str | None  # node-local endpoints
    external: str | None  # external destinations (NodePort, externalIPs, LB IPs)
    firewall: str | None  # loadBalancerSourceRanges
    # endpoint "ip:port" (EndpointView.target) -> its chain; empty: no per-endpoint chains
    endpoints: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def all(self) -> tuple[str, ...]:
        """Every chain named here, per-service ones first."""
        fixed = (self.firewall, self.external, self.service, self.local)
        return (*(c for c in fixed if c is not None), *self.endpoints.values())


def iptables_chain_names(spv: ServicePortView) -> ChainNames:
    spn, proto = str(spv.name), spv.protocol
    return ChainNames(
        service=service_chain("KUBE-SVC-", spn, proto) if spv.uses_cluster_chain else None,
        local=service_chain("KUBE-SVL-", spn, proto) if spv.uses_local_chain else None,
        external=service_chain("KUBE-EXT-", spn, proto) if spv.uses_external_chain else None,
        firewall=service_chain("KUBE-FW-", spn, proto) if spv.firewall else None,
        endpoints=MappingProxyType({ep.target: endpoint_chain(spn, proto, ep.target)
                                    for ep in spv.all_endpoints}),
    )


def nftables_chain_names(spv: ServicePortView) -> ChainNames:
    base = chain_base(spv.name)
    return ChainNames(
        service=f"service-{base}" if spv.uses_cluster_chain else None,
        local=f"local-{base}" if spv.uses_local_chain else None,
        external=f"external-{base}" if spv.uses_external_chain else None,
        firewall=f"firewall-{base}" if spv.firewall else None,
    )


def ipvs_chain_names(spv: ServicePortView) -> ChainNames:
    """IPVS mode writes no per-service chains: a service port is IPVS virtual servers
    and ipset entries (render/ipvs.py), matched by the fixed chains."""
    del spv
    return ChainNames(service=None, local=None, external=None, firewall=None)
