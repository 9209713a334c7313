"""The proxy's configuration as the core reads it: one frozen, validated object.

Upstream keeps its configuration types apart from how they are read (pkg/proxy/apis/
config); so do we. :class:`ProxyConfig` is what every layer below the commands gets:
the node, the mode (:data:`MODES`, upstream's ProxyMode names; modes/ registers a data
plane under each), and every setting that decides rules. It validates when built, so a
bad value fails once, naming the setting. How flags and a KubeProxyConfiguration file
make one (upstream's precedence and defaults) is v1alpha1.py and flags.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum

from kubeproxy.errors import ConfigError, FieldError
from kubeproxy.model import Cluster, IPAddress, IPNetwork, Node, parse_cidr


class DetectLocalMode(Enum):
    CLUSTER_CIDR = "ClusterCIDR"
    NODE_CIDR = "NodeCIDR"
    BRIDGE_INTERFACE = "BridgeInterface"
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"


class LBAlgorithm(Enum):
    RANDOM = "random"
    ROUND_ROBIN = "round-robin"


PRIMARY = "primary"

# The proxy modes (upstream's ProxyMode constants), as --proxy-mode and the file's `mode`
# spell them; modes/ registers one data plane under each.
IPTABLES = "iptables"  # upstream's chain layout, iptables-restore
NFTABLES = "nftables"  # upstream's table layout, netlink batches
EBPF = "ebpf"  # socket load balancing + nftables for north-south traffic
IPVS = "ipvs"  # IPVS virtual servers + ipsets, iptables around them
MODES: tuple[str, ...] = (IPTABLES, NFTABLES, EBPF, IPVS)

# nodePortAddresses when the configuration gives none, per mode (upstream's
# platformApplyDefaults): () = every local address; nftables: the Node's primary IPs.
NODEPORT_DEFAULTS: dict[str, tuple[str, ...]] = {NFTABLES: (PRIMARY,)}
# The IPVS schedulers upstream accepts (validateIPVSSchedulerMethod); rr is the default.
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")


@dataclass(frozen=True)
class IpvsConfig:
    """The ipvs mode's settings: the file's ``ipvs:`` section, the ``--ipvs-*`` flags."""

    scheduler: str = "rr"  # one of IPVS_SCHEDULERS
    strict_arp: bool = False  # arp_ignore=1, arp_announce=2 (for MetalLB-style LBs)
    exclude_cidrs: tuple[IPNetwork, ...] = ()  # virtual servers a sync or cleanup leaves
    # IPVS connection timeouts in seconds, set when non-zero (0: the kernel's stay).
    tcp_timeout: float = 0.0
    tcpfin_timeout: float = 0.0
    udp_timeout: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in IPVS_SCHEDULERS:
            raise ConfigError(f"ipvs.scheduler: {self.scheduler!r} is not one of "
                              f"{', '.join(IPVS_SCHEDULERS)}")
        for name in ("tcp_timeout", "tcpfin_timeout", "udp_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ipvs.{_IPVS_WIRE[name]}: must be >= 0")

    def excluded(self, ip: IPAddress) -> bool:
        """Whether a virtual server on ``ip`` is someone else's (excludeCIDRs)."""
        return any(ip.version == net.version and ip in net for net in self.exclude_cidrs)


_IPVS_WIRE = {"tcp_timeout": "tcpTimeout", "tcpfin_timeout": "tcpFinTimeout",
              "udp_timeout": "udpTimeout"}


def ipvs_config(fields: Mapping[str, object]) -> IpvsConfig:
    """The ``ipvs.*`` fields of a defaulted KubeProxyConfiguration (v1alpha1.py, wire form)
    -> IpvsConfig; an empty scheduler is rr, as upstream defaults it."""
    def seconds(name: str) -> float:
        value = fields.get(f"ipvs.{name}")
        return parse_duration(str(value), f"ipvs.{name}") if value else 0.0

    excludes = fields.get("ipvs.excludeCIDRs") or []
    assert isinstance(excludes, list)
    return IpvsConfig(
        scheduler=str(fields.get("ipvs.scheduler") or "rr"),
        strict_arp=bool(fields.get("ipvs.strictARP")),
        exclude_cidrs=parse_cidr_list(",".join(str(c) for c in excludes), "ipvs.excludeCIDRs"),
        tcp_timeout=seconds("tcpTimeout"), tcpfin_timeout=seconds("tcpFinTimeout"),
        udp_timeout=seconds("udpTimeout"))


@dataclass(frozen=True)
class ProxyConfig:
    hostname: str = ""
    mode: str = "iptables"
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    # () = every local address; ("primary",) = the node's primary IPs; else CIDRs as text.
    nodeport_addresses: tuple[str, ...] = ()
    detect_local_mode: DetectLocalMode = DetectLocalMode.CLUSTER_CIDR
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    lb_algorithm: LBAlgorithm = LBAlgorithm.RANDOM
    localhost_nodeports: bool = True
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    kubeconfig: str = ""  # clientConnection.kubeconfig (`kubeproxy run`); --kubeconfig wins
    # The cgroup whose processes the ebpf mode load balances (--cgroup-path; the file's
    # `cgroupPath`, ours: upstream has no such setting). "" = the cgroup2 root.
    cgroup_path: str = ""
    ipvs: IpvsConfig = IpvsConfig()  # the ipvs mode's own settings
    # bindAddress when it is not 0.0.0.0 / :: (upstream's detectNodeIPs): this node's
    # primary IP, ahead of the Node's own addresses. Nothing binds a socket to it.
    bind_address: IPAddress | None = None
    # configSyncPeriod: how often the informers re-deliver every object they hold
    # (upstream's informer resync); 0 = never.
    config_sync_period: float = 15 * 60.0

    def __post_init__(self) -> None:
        if self.config_sync_period < 0:
            raise ConfigError("configSyncPeriod: must be >= 0")
        if self.mode not in MODES:
            raise ConfigError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= self.masquerade_bit <= 31:
            raise ConfigError(f"iptables.masqueradeBit: {self.masquerade_bit} is not in 0-31")
        for value in self.nodeport_addresses:
            if value != PRIMARY:
                try:
                    parse_cidr(value, "nodePortAddresses")
                except FieldError as err:
                    raise ConfigError(str(err)) from None
        if PRIMARY in self.nodeport_addresses and len(self.nodeport_addresses) > 1:
            raise ConfigError("nodePortAddresses: 'primary' cannot be combined with CIDRs")
        if self.detect_local_mode is DetectLocalMode.BRIDGE_INTERFACE:
            _check_iface(self.bridge_interface, "detectLocal.bridgeInterface")
        if self.detect_local_mode is DetectLocalMode.INTERFACE_NAME_PREFIX:
            _check_iface(self.interface_name_prefix, "detectLocal.interfaceNamePrefix")

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit

    def nodeport_cidrs(self) -> tuple[IPNetwork, ...]:
        return tuple(parse_cidr(v, "nodePortAddresses") for v in self.nodeport_addresses
                     if v != PRIMARY)


def primary_ip_override(text: str) -> IPAddress | None:
    """``bindAddress`` -> the primary-IP override; None for 0.0.0.0 / :: (no override).
    Upstream's validation: it must be an IP address (``ParseIPSloppy``: leading zeros
    in IPv4 octets are read as decimal)."""
    value = text.strip()
    try:
        ip: IPAddress = ipaddress.ip_address(value)
    except ValueError:
        try:  # ParseIPSloppy: 010.001.002.003 is 10.1.2.3
            octets = [int(o, 10) for o in value.split(".")]
            if len(octets) != 4 or not all(0 <= o <= 255 for o in octets):
                raise ValueError(value)
            ip = ipaddress.IPv4Address(".".join(map(str, octets)))
        except ValueError:
            raise ConfigError(f"bindAddress: {text!r} is not a valid textual "
                              f"representation of an IP address") from None
    return None if ip.is_unspecified else ip


def with_bind_address(node: Node, bind: IPAddress | None) -> Node:
    """The Node as this proxy sees it: ``bind`` (bindAddress) first, so it is the
    primary IP of its family (upstream's detectNodeIPs: bindAddress, when not
    unspecified, overrides the Node's first IP of that family; the other family keeps
    the Node's). The node view takes a family's first address as its primary IP
    (nodePortAddresses ``primary``) and matches loadBalancerSourceRanges against the
    node's IPs."""
    if bind is None or node.addresses[:1] == (bind,):
        return node
    return replace(node, addresses=(bind, *(ip for ip in node.addresses if ip != bind)))


def cluster_with_bind_address(cluster: Cluster, config: ProxyConfig) -> Cluster:
    """Every Node of a cluster read from files, as :func:`with_bind_address` (only
    this node's matters; the others are left as they are)."""
    if config.bind_address is None:
        return cluster
    nodes = tuple(with_bind_address(n, config.bind_address) if n.name == config.hostname
                  else n for n in cluster.nodes)
    return replace(cluster, nodes=nodes)


def _check_iface(name: str, setting: str) -> None:
    if not name or len(name) > 15 or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{setting}: {name!r} is not an interface name")


def parse_cidr_list(text: str, setting: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(parse_cidr(part, setting) for part in text.split(",") if part.strip())
    except FieldError as err:
        raise ConfigError(str(err)) from None


def parse_detect_local_mode(value: str) -> DetectLocalMode:
    try:
        return DetectLocalMode(value)
    except ValueError:
        names = ", ".join(m.value for m in DetectLocalMode)
        raise ConfigError(f"detectLocalMode: {value!r} is not one of {names}") from None


def parse_lb_algorithm(value: str) -> LBAlgorithm:
    try:
        return LBAlgorithm(value)
    except ValueError:
        raise ConfigError(f"lb-algorithm: {value!r} is not random or round-robin") from None


def parse_duration(text: str, setting: str) -> float:
    """Go duration strings: "30s", "1m", "1m30s", "500ms", "0"."""
    if text.strip() == "0":
        return 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ConfigError(f"{setting}: {text!r} is not a duration")
    return sum(float(n) * units[u] for n, u in parts)
