"""Lab objects -> a complete plan of namespaces, links, addresses and routes. Pure.

The lab network::

    kpl-<lab>-external  203.0.113.2, 203.0.113.130 (the upstream tests' client and
          |             blocked client); routes Service external/LB IPs to one node
    [kpl-<lab>-net: bridge br0]  192.168.0.0/24, no address of its own
          |                |
    kpl-<lab>-node-A   kpl-<lab>-node-B     192.168.0.2, .3, ... ; ip_forward=1;
      cbr0 10.244.1.1    cbr0 10.244.2.1    routes to each other's pod CIDRs
       |      |            |
     pods (one namespace each, eth0 = 10.244.N.x, default route via cbr0)

A node's default route is "dev eth0" on the lab network: every address outside the node
is on-link there, and the lab network has no link to anything else, so nothing leaves
the lab. Allocation (mirrors the API server and scheduler, deterministically): Pods
without ``spec.nodeName`` go round-robin over the Nodes; Pod IPs come from the node's
podCIDR (``status.podIP`` is kept when it fits); Services get a ClusterIP from the service
CIDR, nodePorts from 30000-32767 and, for LoadBalancers without an ingress IP, an IP from
the lab's LB pool (like MetalLB would).
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from kubeproxy.lab.controller import selects
from kubeproxy.lab.errors import LabManifestError
from kubeproxy.lab.manifest import LabObjects, Node, Pod, Service, parse_service
from kubeproxy.util.jsontypes import JSON

LAB_NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
NS_PREFIX = "kpl-"
LAB_CIDR = ipaddress.IPv4Network("192.168.0.0/24")
EXTERNAL_CLIENTS = ("203.0.113.2", "203.0.113.130")
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
LB_POOL = ipaddress.IPv4Network("192.168.100.0/24")
NODE_PORT_RANGE = range(30000, 32768)
DEFAULT_NODE = "node-1"
BRIDGE = "cbr0"
SWITCH_BRIDGE = "br0"
IFNAMSIZ = 15


@dataclass(frozen=True)
class Options:
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    service_cidr: str = DEFAULT_SERVICE_CIDR
    # The node the external namespace sends Service external/LB IPs to (default: first).
    external_node: str | None = None


@dataclass(frozen=True)
class NodePlan:
    name: str
    ns: str
    lab_ip: str
    pod_cidr: str
    gateway: str  # cbr0's address, the pods' default gateway
    switch_port: str  # the veth end in the switch namespace
    zone: str | None

    @property
    def bridge_mac(self) -> str:
        """cbr0's MAC address, set explicitly and derived from its address (as kubenet
        does: 0a:58 and the four bytes). A bridge left to choose takes the lowest MAC of
        its ports and changes it when that Pod goes away; the other Pods' cached
        neighbour entry for their gateway then points nowhere, and their packets are
        flooded to the bridge's ports instead of reaching the node until it expires."""
        return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(self.gateway).packed)


@dataclass(frozen=True)
class PodPlan:
    key: str  # namespace/name
    name: str
    namespace: str
    node: str
    ns: str
    ip: str
    prefixlen: int
    gateway: str
    host_if: str  # the veth end in the node namespace, enslaved to cbr0
    listen: tuple[str, ...]  # "8080/tcp", "8080/udp", ...


@dataclass(frozen=True)
class ExternalPlan:
    ns: str
    clients: tuple[str, ...]
    switch_port: str
    via: str  # the node lab IP that external and LB IPs are routed to
    routes: tuple[str, ...]  # destinations (x.x.x.x/32) routed via ``via``


@dataclass(frozen=True)
class Plan:
    lab: str
    switch_ns: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    external: ExternalPlan
    objects: LabObjects  # resolved: Pods have nodeName + podIP, Services their IPs
    cluster_cidr: str
    service_cidr: str

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def namespaces(self) -> list[str]:
        return [self.switch_ns, self.external.ns, *(n.ns for n in self.nodes)] + [
            p.ns for p in self.pods
        ]


# ---------------------------------------------------------------- names


def check_lab_name(lab: str) -> str:
    if not LAB_NAME_RE.match(lab):
        raise LabManifestError(f"lab name {lab!r} must be 1-8 characters of [a-z0-9]")
    return lab


def ns_prefix(lab: str) -> str:
    return f"{NS_PREFIX}{check_lab_name(lab)}-"


def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^a-z0-9.-]", "-", text.lower()).strip(".")
    if len(s) > limit or s != text.lower():
        return f"{s[: limit - 7]}-{_digest(text, 6)}"
    return s


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def switch_ns(lab: str) -> str:
    return f"{ns_prefix(lab)}net"


def external_ns(lab: str) -> str:
    return f"{ns_prefix(lab)}external"


def node_ns(lab: str, node: str) -> str:
    return f"{ns_prefix(lab)}node-{_slug(node)}"


def pod_ns(lab: str, namespace: str, name: str) -> str:
    return f"{ns_prefix(lab)}pod-{_slug(namespace, 30)}.{_slug(name)}"


def ifname(prefix: str, key: str) -> str:
    name = f"{prefix}{_digest(key, IFNAMSIZ - len(prefix))}"
    assert len(name) <= IFNAMSIZ
    return name


# ---------------------------------------------------------------- planning


def plan(lab: str, objects: LabObjects, options: Options = Options()) -> Plan:
    check_lab_name(lab)
    cluster = _network(options.cluster_cidr, "--cluster-cidr")
    service_net = _network(options.service_cidr, "--service-cidr")
    nodes = list(objects.nodes) or [Node(DEFAULT_NODE, None, {}, _default_node_raw())]
    if len(nodes) > 200:
        raise LabManifestError(f"the lab holds at most 200 Nodes, got {len(nodes)}")
    cidrs = _pod_cidrs(nodes, cluster)
    node_plans = tuple(
        NodePlan(
            name=n.name,
            ns=node_ns(lab, n.name),
            lab_ip=str(LAB_CIDR.network_address + 2 + i),
            pod_cidr=str(cidrs[n.name]),
            gateway=str(cidrs[n.name].network_address + 1),
            switch_port=ifname("kn", node_ns(lab, n.name)),
            zone=n.zone,
        )
        for i, n in enumerate(nodes)
    )
    services = _resolve_services(objects.services, service_net)
    pods = _place_pods(objects.pods, nodes, cidrs)
    by_name = {n.name: n for n in node_plans}
    pod_plans = tuple(pod_plan(lab, p, by_name[p.node_name or ""], services) for p in pods)
    _check_unique_ifnames(pod_plans)
    resolved_nodes = tuple(
        replace(n, raw=_node_raw(n, np)) for n, np in zip(nodes, node_plans, strict=True)
    )
    objects = replace(objects, nodes=resolved_nodes, pods=tuple(pods), services=services)
    return Plan(
        lab=lab,
        switch_ns=switch_ns(lab),
        nodes=node_plans,
        pods=pod_plans,
        external=_external_plan(lab, node_plans, services, options.external_node),
        objects=objects,
        cluster_cidr=str(cluster),
        service_cidr=str(service_net),
    )


def _network(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise LabManifestError(f"{what} {text!r} is not an IPv4 CIDR") from exc


def _default_node_raw() -> JSON:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": DEFAULT_NODE}}


def _pod_cidrs(
    nodes: Sequence[Node], cluster: ipaddress.IPv4Network
) -> dict[str, ipaddress.IPv4Network]:
    out: dict[str, ipaddress.IPv4Network] = {}
    taken: list[ipaddress.IPv4Network] = []
    for n in nodes:
        if n.pod_cidr is None:
            continue
        net = ipaddress.IPv4Network(n.pod_cidr)
        if not net.subnet_of(cluster):
            raise LabManifestError(
                f"Node {n.name}: spec.podCIDR {net} is outside the cluster CIDR {cluster} "
                "(pass --cluster-cidr)"
            )
        for other in taken:
            if net.overlaps(other):
                raise LabManifestError(f"Node {n.name}: spec.podCIDR {net} overlaps {other}")
        out[n.name] = net
        taken.append(net)
    free = _free_subnets(cluster, taken)
    for n in nodes:
        if n.name not in out:
            try:
                out[n.name] = next(free)
            except StopIteration:
                raise LabManifestError(
                    f"cluster CIDR {cluster} has no /24 left for Node {n.name}"
                ) from None
    return out


def _free_subnets(
    cluster: ipaddress.IPv4Network, taken: list[ipaddress.IPv4Network]
) -> Iterator[ipaddress.IPv4Network]:
    prefix = max(cluster.prefixlen, 24)
    for i, net in enumerate(cluster.subnets(new_prefix=prefix)):
        # Like upstream's node IPAM in kind/kubeadm, node 1 gets x.x.1.0/24: skip the first.
        if i == 0 and cluster.prefixlen < prefix:
            continue
        if not any(net.overlaps(t) for t in taken):
            yield net


def _place_pods(
    pods: Sequence[Pod], nodes: Sequence[Node], cidrs: dict[str, ipaddress.IPv4Network]
) -> list[Pod]:
    names = [n.name for n in nodes]
    used: set[str] = set()
    for p in pods:
        if p.pod_ip:
            used.add(p.pod_ip)
    out: list[Pod] = []
    unplaced = 0
    for p in pods:
        node = p.node_name
        if node is None:
            node = names[unplaced % len(names)]
            unplaced += 1
        elif node not in cidrs:
            raise LabManifestError(
                f"Pod {p.key}: spec.nodeName {node!r} is not a Node of the lab "
                f"(Nodes: {', '.join(names)})"
            )
        net = cidrs[node]
        ip = p.pod_ip
        if ip is not None:
            addr = ipaddress.IPv4Address(ip)
            if (
                addr not in net
                or addr in (net.network_address, net.network_address + 1)
                or (addr == net.broadcast_address)
            ):
                raise LabManifestError(
                    f"Pod {p.key}: status.podIP {ip} is not a free pod address of Node "
                    f"{node}'s podCIDR {net}"
                )
        else:
            ip = _next_free(net, used, f"Pod {p.key}: Node {node}'s podCIDR {net} is full")
            used.add(ip)
        out.append(replace(p, node_name=node, pod_ip=ip, raw=_pod_raw(p, node, ip)))
    seen: dict[str, str] = {}
    for p in out:
        assert p.pod_ip is not None
        if p.pod_ip in seen:
            raise LabManifestError(
                f"Pod {p.key}: status.podIP {p.pod_ip} is also {seen[p.pod_ip]}'s")
        seen[p.pod_ip] = p.key
    return out


def _next_free(net: ipaddress.IPv4Network, used: set[str], error: str) -> str:
    for addr in list(net.hosts())[1:]:  # .1 is the bridge
        if str(addr) not in used:
            return str(addr)
    raise LabManifestError(error)


def _pod_raw(p: Pod, node: str, ip: str) -> JSON:
    raw = copy.deepcopy(p.raw)
    raw.setdefault("spec", {})["nodeName"] = node
    status = raw.setdefault("status", {})
    status["podIP"] = ip
    status["podIPs"] = [{"ip": ip}]
    status["phase"] = "Running"
    return raw


def _node_raw(n: Node, np: NodePlan) -> JSON:
    raw = copy.deepcopy(n.raw)
    meta = raw.setdefault("metadata", {})
    labels = meta.setdefault("labels", {}) or {}
    meta["labels"] = labels
    labels.setdefault("kubernetes.io/hostname", n.name)
    spec = raw.setdefault("spec", {})
    spec["podCIDR"] = np.pod_cidr
    spec["podCIDRs"] = [np.pod_cidr]
    raw.setdefault("status", {})["addresses"] = [
        {"type": "InternalIP", "address": np.lab_ip},
        {"type": "Hostname", "address": n.name},
    ]
    return raw


def listen_ports(pod: Pod, services: Sequence[Service]) -> tuple[str, ...]:
    """What the Pod's built-in server listens on: "8080/tcp", "8080/udp", ...

    Its declared container ports, and (a real container may listen on a port it does
    not declare) the numeric targetPorts of the Services that select it.
    """
    ports = {cp.port for cp in pod.ports}
    for svc in services:
        if selects(svc, pod):
            ports.update(sp.target_port for sp in svc.ports if isinstance(sp.target_port, int))
    return tuple(f"{port}/{proto}" for port in sorted(ports) for proto in ("tcp", "udp"))


def pod_plan(lab: str, p: Pod, node: NodePlan, services: Sequence[Service]) -> PodPlan:
    """Where a Pod with a node and an IP lives: its namespace, veth and server ports."""
    assert p.node_name == node.name and p.pod_ip is not None
    ns = pod_ns(lab, p.namespace, p.name)
    return PodPlan(
        key=p.key,
        name=p.name,
        namespace=p.namespace,
        node=node.name,
        ns=ns,
        ip=p.pod_ip,
        prefixlen=ipaddress.IPv4Network(node.pod_cidr).prefixlen,
        gateway=node.gateway,
        host_if=ifname("veth", ns),
        listen=listen_ports(p, services),
    )


def free_pod_ip(
    node: NodePlan, used: set[str], requested: str | None = None, after: str | None = None
) -> str | None:
    """A pod address on the node (.1 is the bridge); None when the podCIDR is full.

    The requested one if it is free and usable; else, like CNI's host-local IPAM, the
    next free one after ``after`` (the last one handed out), wrapping around: an address
    is not reused right after its Pod went away, while neighbours may still cache it.
    """
    net = ipaddress.IPv4Network(node.pod_cidr)
    hosts = [str(a) for a in list(net.hosts())[1:]]
    if requested is not None and requested not in used and requested in hosts:
        return requested
    start = hosts.index(after) + 1 if after in hosts else 0
    for addr in hosts[start:] + hosts[:start]:
        if addr not in used:
            return addr
    return None


def _check_unique_ifnames(pods: Sequence[PodPlan]) -> None:
    seen: dict[str, str] = {}
    for p in pods:
        if p.host_if in seen:  # a 44-bit hash collision; rename a Pod to get past it
            raise LabManifestError(
                f"Pod {p.key}: interface name clashes with Pod {seen[p.host_if]}")
        seen[p.host_if] = p.key


# ---------------------------------------------------------------- services


def _resolve_services(
    services: Sequence[Service], service_net: ipaddress.IPv4Network
) -> tuple[Service, ...]:
    used_ips = {s.cluster_ip for s in services if s.cluster_ip and not s.headless}
    used_ports = {p.node_port for s in services for p in s.ports if p.node_port}
    used_lb = {ip for s in services for ip in s.lb_ips}
    hosts = (str(h) for i, h in enumerate(service_net.hosts()) if i >= 9)  # from .10
    free_ports = (p for p in NODE_PORT_RANGE if p not in used_ports)
    free_lb = (str(h) for i, h in enumerate(LB_POOL.hosts()) if i >= 9)
    out: list[Service] = []
    for svc in services:
        raw = copy.deepcopy(svc.raw)
        spec = raw.setdefault("spec", {})
        if svc.type != "ExternalName" and svc.cluster_ip is None:
            ip = next((h for h in hosts if h not in used_ips), None)
            if ip is None:
                raise LabManifestError(f"Service {svc.key}: service CIDR {service_net} is full")
            spec["clusterIP"] = ip
            spec["clusterIPs"] = [ip]
        if svc.type in ("NodePort", "LoadBalancer"):
            for port in spec.get("ports") or []:
                if port.get("nodePort") is None:
                    port["nodePort"] = next(free_ports)
        if svc.type == "LoadBalancer" and not svc.lb_ips:
            lb_ip = next(ip for ip in free_lb if ip not in used_lb)
            raw.setdefault("status", {})["loadBalancer"] = {"ingress": [{"ip": lb_ip}]}
        out.append(parse_service(raw))
    return tuple(out)


def _external_plan(
    lab: str, nodes: Sequence[NodePlan], services: Sequence[Service], via_node: str | None
) -> ExternalPlan:
    via = nodes[0]
    if via_node is not None:
        match = [n for n in nodes if n.name == via_node]
        if not match:
            raise LabManifestError(f"external node {via_node!r} is not a Node of the lab")
        via = match[0]
    dests = sorted(
        {f"{ip}/32" for s in services for ip in (*s.external_ips, *s.lb_ips)},
        key=lambda d: ipaddress.IPv4Network(d),
    )
    ns = external_ns(lab)
    return ExternalPlan(
        ns=ns,
        clients=EXTERNAL_CLIENTS,
        switch_port=ifname("kx", ns),
        via=via.lab_ip,
        routes=tuple(dests),
    )
