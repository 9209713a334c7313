"""Small builders for Kubernetes objects (plain dicts, as kubectl would write them).

Defaults follow upstream kube-proxy's test conventions: node "node1" at 192.168.0.2,
pods in 10.0.0.0/8 with endpoints 10.180.x.y, cluster IPs in 172.30.0.0/16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.model import Cluster, Family
from kubeproxy.nodeview import node_views
from kubeproxy.util.gcpause import paused_gc

if TYPE_CHECKING:
    from kubeproxy.render.iptables import Ruleset
    from kubeproxy.render.nftables import NftRuleset

Obj = dict[str, Any]
NODE_IP = "192.168.0.2"
NODE = "node1"


def service(
    name: str,
    ns: str = "ns1",
    *,
    cluster_ip: str | list[str] = "172.30.0.41",
    ports: list[tuple[str, int, str, int]] | None = None,
    type: str = "ClusterIP",
    labels: dict[str, str] | None = None,
    lb_ips: list[str | dict[str, str]] | None = None,
    **spec: Any,
) -> Obj:
    """ports: (name, port, protocol, nodePort); default one TCP port p80 -> 80."""
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    port_list = ports if ports is not None else [("p80", 80, "TCP", 0)]
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {
            "type": type,
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": [
                {"name": n, "port": p, "protocol": proto, **({"nodePort": np} if np else {})}
                for n, p, proto, np in port_list
            ],
            **spec,
        },
    }
    if lb_ips is not None:
        obj["status"] = {"loadBalancer": {"ingress": [
            {"ip": ip} if isinstance(ip, str) else ip for ip in lb_ips]}}
    return obj


def endpoint(
    ip: str,
    node: str | None = NODE,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    zone_hints: list[str] | None = None,
    node_hints: list[str] | None = None,
) -> Obj:
    ep: Obj = {"addresses": [ip], "conditions": {"ready": ready}}
    if serving is not None:
        ep["conditions"]["serving"] = serving
    if terminating is not None:
        ep["conditions"]["terminating"] = terminating
    if node:
        ep["nodeName"] = node
    if zone:
        ep["zone"] = zone
    hints: Obj = {}
    if zone_hints is not None:
        hints["forZones"] = [{"name": z} for z in zone_hints]
    if node_hints is not None:
        hints["forNodes"] = [{"name": n} for n in node_hints]
    if hints:
        ep["hints"] = hints
    return ep


def endpoint_slice(
    service_name: str,
    endpoints: list[Obj],
    ns: str = "ns1",
    *,
    name: str | None = None,
    ports: list[tuple[str, int, str]] | None = None,
    family: str = "IPv4",
    labels: dict[str, str] | None = None,
) -> Obj:
    """ports: (name, port, protocol); default p80 -> 80/TCP."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-abc",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name, **(labels or {})},
        },
        "addressType": family,
        "ports": [{"name": n, "port": p, "protocol": proto}
                  for n, p, proto in (ports if ports is not None else [("p80", 80, "TCP")])],
        "endpoints": endpoints,
    }


def node(
    name: str = NODE,
    ips: list[str] | None = None,
    *,
    zone: str | None = None,
    pod_cidrs: list[str] | None = None,
) -> Obj:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    cidrs = pod_cidrs if pod_cidrs is not None else ["10.180.0.0/24"]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": cidrs[0] if cidrs else "", "podCIDRs": cidrs},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}
                                 for ip in (ips if ips is not None else [NODE_IP])]},
    }


def feature_cluster(endpoints_svc2: int = 2, with_svc3: bool = True) -> list[Obj]:
    """Every kind of frontend, dual-stack, affinity, SCTP, Local policies and a service
    without endpoints: the data plane tests' standard cluster."""
    objs: list[Obj] = [
        node(ips=["192.168.0.2", "fd00::2"]),
        service("svc1", sessionAffinity="ClientIP"),
        endpoint_slice("svc1", [endpoint("10.180.0.1"), endpoint("10.180.1.1", node="n2")]),
        service("svc2", "ns2", cluster_ip=["172.30.0.42", "fd00:30::42"], type="LoadBalancer",
                ports=[("p80", 80, "TCP", 3001), ("dns", 53, "UDP", 3002)],
                lb_ips=["5.6.7.8"], externalIPs=["192.168.99.22"],
                externalTrafficPolicy="Local", healthCheckNodePort=30000,
                loadBalancerSourceRanges=["203.0.113.0/25"]),
        endpoint_slice("svc2", [endpoint(f"10.180.0.{10 + i}") for i in range(endpoints_svc2)],
                       "ns2", ports=[("p80", 8080, "TCP"), ("dns", 5353, "UDP")]),
        endpoint_slice("svc2", [endpoint("fd00:180::10")], "ns2", name="svc2-v6",
                       family="IPv6", ports=[("p80", 8080, "TCP"), ("dns", 5353, "UDP")]),
        service("svc4", "ns4", cluster_ip="172.30.0.44"),  # no endpoints: REJECT
    ]
    if with_svc3:
        objs += [service("svc3", "ns3", cluster_ip="172.30.0.43", internalTrafficPolicy="Local",
                         ports=[("s", 9000, "SCTP", 0)]),
                 endpoint_slice("svc3", [endpoint("10.180.0.3")], "ns3",
                                ports=[("s", 9000, "SCTP")])]
    return objs


# Rendering a cluster for one node, as the commands and the daemon do it (node views of
# every family in use -> the mode's renderer), for tests that look at one mode's output.

def render(cluster: Cluster, config: ProxyConfig) -> Any:
    """The ruleset of ``config.mode`` for this node."""
    with paused_gc():
        return modes.for_config(config).render(node_views(cluster, config))


def render_iptables(cluster: Cluster, config: ProxyConfig) -> dict[Family, Ruleset]:
    from kubeproxy.render import iptables

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
