"""kube-proxy's command line: one literal table of flags, shared by every command.

Theory of operation
-------------------
:data:`FLAGS` lists upstream kube-proxy's component flags (cmd/kube-proxy/app/
options.go), the logging flags of k8s.io/component-base (``-v``, ``--vmodule``,
``--logging-format`` ...) and this project's own few, one row each: names, value kind,
the KubeProxyConfiguration v1alpha1 field(s) it sets, and - when it does nothing here -
why. :func:`add_flags` turns the table into argparse arguments, for ``kube-proxy`` and
``kubeproxy run`` alike (and ``render``/``trace``/``apply``). Every argument defaults
to None, so :func:`given` can tell the flags written on the command line from the rest
(pflag's ``Changed``), which is what upstream's precedence needs (v1alpha1.py):

* without ``--config``: each given flag sets its field(s) of a defaulted configuration;
* with ``--config``: the file wins; ``--hostname-override`` still applies, every other
  configuration flag given is ignored and logged (upstream ignores them silently).

A flag that is accepted but has no effect here (``effect`` set) is logged once at start
(:func:`no_effect`); docs/flags.md lists them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubeproxy.config import v1alpha1 as kpconfig
from kubeproxy.config.types import ProxyConfig, parse_duration, parse_lb_algorithm
from kubeproxy.config.v1alpha1 import format_duration, parse_feature_gates
from kubeproxy.errors import ConfigError

Kind = Literal["str", "bool", "int", "float", "duration", "list", "gates", "path"]
Group = Literal["upstream", "logging", "ours"]


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the first is the canonical name
    kind: Kind
    help: str
    fields: tuple[str, ...] = ()  # v1alpha1 fields it sets ("" when no --config only)
    effect: str = ""  # "" = honoured; else why it has no effect here (logged once)
    group: Group = "upstream"
    default: Any = None  # only for our own flags; upstream ones default via the config
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.names[-1].lstrip("-").replace("-", "_") if self.names[0] == "-v" \
            else self.names[0].lstrip("-").replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    # --- where the configuration comes from, and one-shot actions ---
    Flag(("--config",), "path", "The path to the configuration file (a "
         "KubeProxyConfiguration v1alpha1). Configuration flags are then ignored, except "
         "--hostname-override and the logging flags."),  # upstream precedence
    Flag(("--write-config-to",), "path",
         "If set, write the configuration (defaults and flags applied) to this file and exit."),
    Flag(("--cleanup",), "bool", "If true cleanup iptables and nftables rules and exit."),
    Flag(("--init-only",), "bool", "If true, perform the initialization steps that need "
         "full root privileges (conntrack sysctls, oom-score-adj), then exit."),
    Flag(("--feature-gates",), "gates", "A set of key=value pairs that describe feature "
         "gates for alpha/experimental features.", ("featureGates",),
         effect="accepted and shown in /configz; no feature gate changes behaviour here"),
    # --- API server access ---
    Flag(("--kubeconfig",), "str", "Path to kubeconfig file with authorization information "
         "(the master location can be overridden by the master flag).",
         ("clientConnection.kubeconfig",)),
    Flag(("--master",), "str",
         "The address of the Kubernetes API server (overrides any value in kubeconfig)"),
    # JSON or protobuf; protobuf is accepted and answered with JSON, logged once by the
    # API client (sources/client.py): the wire format changes nothing the proxy sees.
    Flag(("--kube-api-content-type",), "str", "Content type of requests sent to apiserver.",
         ("clientConnection.contentType",)),
    Flag(("--kube-api-burst",), "int", "Burst to use while talking with kubernetes "
         "apiserver (default 10)", ("clientConnection.burst",)),
    Flag(("--kube-api-qps",), "float", "QPS to use while talking with kubernetes apiserver "
         "(default 5)", ("clientConnection.qps",)),
    # Every period each informer re-delivers every object it holds as an update
    # (upstream's informer resync); 0 (ours) turns it off, upstream refuses 0.
    Flag(("--config-sync-period",), "duration", "How often configuration from the apiserver "
         "is refreshed. Must be greater than 0. (default 15m0s)", ("configSyncPeriod",)),
    # --- the node and the servers ---
    Flag(("--hostname-override",), "str", "If non-empty, will be used as the name of the Node "
         "that kube-proxy is running on. Applies with --config too.", ("hostnameOverride",)),
    # Upstream's detectNodeIPs: not 0.0.0.0 / :: -> this node's primary IP (and so the
    # primary family), ahead of the Node's addresses; no socket is bound to it.
    Flag(("--bind-address",), "str", "Overrides kube-proxy's idea of what its node's primary "
         "IP is. Note that the name is a historical artifact, and kube-proxy does not "
         "actually bind any sockets to this IP. (default 0.0.0.0)", ("bindAddress",),
         metavar="IP"),
    Flag(("--healthz-bind-address",), "str", "The IP address and port for the health check "
         "server to serve on (default 0.0.0.0:10256); empty disables it.",
         ("healthzBindAddress",), metavar="IP:PORT"),
    Flag(("--metrics-bind-address",), "str", "The IP address and port for the metrics server "
         "to serve on (default 127.0.0.1:10249); empty disables it.",
         ("metricsBindAddress",), metavar="IP:PORT"),
    Flag(("--bind-address-hard-fail",), "bool", "If true kube-proxy will treat failure to "
         "bind to a port as fatal and exit", ("bindAddressHardFail",),
         effect="a failure to bind is always fatal here"),
    Flag(("--healthz-port",), "int", "DEPRECATED: use --healthz-bind-address. The port to "
         "bind the health check server. Use 0 to disable."),
    Flag(("--metrics-port",), "int", "DEPRECATED: use --metrics-bind-address. The port to "
         "bind the metrics server. Use 0 to disable."),
    Flag(("--profiling",), "bool", "If true enables profiling via web interface on "
         "/debug/pprof handler.", ("enableProfiling",), effect="no /debug/pprof (Go only)"),
    # Honoured trivially: no metric is hidden here, so every one is shown.
    Flag(("--show-hidden-metrics-for-version",), "str", "The previous version for which you "
         "want to show hidden metrics.", ("showHiddenMetricsForVersion",)),
    # --- the proxy ---
    Flag(("--proxy-mode", "--mode"), "str", "Which proxy mode to use: iptables (default), "
         "nftables, ipvs or ebpf (the modes of kubeproxy.modes).", ("mode",)),
    Flag(("--masquerade-all",), "bool", "SNAT all traffic sent via Service cluster IPs.",
         ("masqueradeAll",)),
    Flag(("--iptables-masquerade-bit",), "int", "The bit of the fwmark space to mark packets "
         "requiring SNAT with (iptables mode; 0-31, default 14).", ("iptables.masqueradeBit",)),
    Flag(("--iptables-localhost-nodeports",), "bool", "If false, NodePorts are not reachable "
         "on localhost (iptables mode, IPv4; default true).", ("iptables.localhostNodePorts",)),
    Flag(("--iptables-sync-period",), "duration", "How often rules are fully re-synced "
         "(default 30s); any mode but ipvs.", ("iptables.syncPeriod", "nftables.syncPeriod")),
    Flag(("--iptables-min-sync-period",), "duration", "The minimum period between rule "
         "syncs (default 1s); any mode but ipvs.",
         ("iptables.minSyncPeriod", "nftables.minSyncPeriod")),
    Flag(("--ipvs-sync-period",), "duration", "ipvs mode: resync period.",
         ("ipvs.syncPeriod",)),
    Flag(("--ipvs-min-sync-period",), "duration", "ipvs mode: minimum period between syncs.",
         ("ipvs.minSyncPeriod",)),
    Flag(("--ipvs-scheduler",), "str", "ipvs mode: the scheduler.", ("ipvs.scheduler",)),
    Flag(("--ipvs-exclude-cidrs",), "list", "ipvs mode: CIDRs cleanup must not touch.",
         ("ipvs.excludeCIDRs",)),
    Flag(("--ipvs-strict-arp",), "bool", "ipvs mode: arp_ignore=1 and arp_announce=2.",
         ("ipvs.strictARP",)),
    Flag(("--ipvs-tcp-timeout",), "duration", "ipvs mode: idle TCP timeout.",
         ("ipvs.tcpTimeout",)),
    Flag(("--ipvs-tcpfin-timeout",), "duration", "ipvs mode: TCP FIN timeout.",
         ("ipvs.tcpFinTimeout",)),
    Flag(("--ipvs-udp-timeout",), "duration", "ipvs mode: UDP timeout.",
         ("ipvs.udpTimeout",)),
    Flag(("--detect-local-mode",), "str", "How local traffic is detected: ClusterCIDR, "
         "NodeCIDR, BridgeInterface or InterfaceNamePrefix.", ("detectLocalMode",)),
    Flag(("--pod-bridge-interface",), "str", "The bridge for --detect-local-mode "
         "BridgeInterface.", ("detectLocal.bridgeInterface",)),
    Flag(("--pod-interface-name-prefix",), "str", "The interface prefix for "
         "--detect-local-mode InterfaceNamePrefix.", ("detectLocal.interfaceNamePrefix",)),
    Flag(("--cluster-cidr",), "str", "The CIDR range(s) of the pods in the cluster, "
         "comma-separated (one per family).", ("clusterCIDR",)),
    Flag(("--nodeport-addresses",), "list", "CIDRs (comma-separated) of node IPs where "
         "NodePorts are open, or 'primary' (default: all; nftables mode: primary).",
         ("nodePortAddresses",)),
    # --- node tuning at start (app/tuning.py) ---
    Flag(("--oom-score-adj",), "int", "The oom-score-adj value for the kube-proxy process, "
         "in [-1000, 1000] (default -999).", ("oomScoreAdj",)),
    Flag(("--conntrack-max-per-core",), "int", "Maximum number of NAT connections to track "
         "per CPU core (default 32768; 0 leaves the limit as-is).", ("conntrack.maxPerCore",)),
    Flag(("--conntrack-min",), "int", "Minimum number of conntrack entries to allocate "
         "(default 131072).", ("conntrack.min",)),
    Flag(("--conntrack-tcp-timeout-established",), "duration", "Idle timeout for established "
         "TCP connections (default 24h0m0s; 0 leaves it as-is).",
         ("conntrack.tcpEstablishedTimeout",)),
    Flag(("--conntrack-tcp-timeout-close-wait",), "duration", "NAT timeout for TCP "
         "connections in the CLOSE_WAIT state (default 1h0m0s).",
         ("conntrack.tcpCloseWaitTimeout",)),
    Flag(("--conntrack-tcp-be-liberal",), "bool", "Enable liberal mode for tracking TCP "
         "packets (nf_conntrack_tcp_be_liberal=1).", ("conntrack.tcpBeLiberal",)),
    Flag(("--conntrack-udp-timeout",), "duration", "Idle timeout for UNREPLIED UDP "
         "connections (0 leaves it as-is).", ("conntrack.udpTimeout",)),
    Flag(("--conntrack-udp-timeout-stream",), "duration", "Idle timeout for ASSURED UDP "
         "connections (0 leaves it as-is).", ("conntrack.udpStreamTimeout",)),
    # --- logging (k8s.io/component-base/logs/api/v1); they win over --config ---
    Flag(("--logging-format",), "str", "Sets the log format: text (klog's, default) or json.",
         ("logging.format",), group="logging"),
    Flag(("-v", "--v"), "int", "number for the log level verbosity", ("logging.verbosity",),
         group="logging", metavar="LEVEL"),
    Flag(("--vmodule",), "str", "comma-separated list of pattern=N settings for file-filtered "
         "logging (only works for text log format)", ("logging.vmodule",), group="logging"),
    Flag(("--log-flush-frequency",), "duration", "Maximum number of seconds between log "
         "flushes (default 5s)", ("logging.flushFrequency",), group="logging",
         effect="log lines are written unbuffered"),
    Flag(("--log-text-split-stream",), "bool", "[Alpha] In text format, write error messages "
         "to stderr and info messages to stdout.", group="logging"),
    Flag(("--log-text-info-buffer-size",), "str", "[Alpha] In text format with split output "
         "streams, the info messages can be buffered.", group="logging",
         effect="log lines are written unbuffered"),
    Flag(("--log-json-split-stream",), "bool", "[Alpha] In JSON format, write error messages "
         "to stderr and info messages to stdout.", group="logging"),
    Flag(("--log-json-info-buffer-size",), "str", "[Alpha] In JSON format with split output "
         "streams, the info messages can be buffered.", group="logging",
         effect="log lines are written unbuffered"),
    # --- ours (not upstream's) ---
    Flag(("--iptables-backend",), "str", "Which iptables binaries to use: auto (as "
         "iptables-wrapper decides), legacy or nft.", group="ours", default="auto"),
    Flag(("--lb-algorithm",), "str", "random (upstream) or round-robin.", group="ours"),
    Flag(("--watch-stall-timeout",), "duration", "Re-open a watch that brings no event and no "
         "bookmark for this long (default 2m).", group="ours"),
    Flag(("--cgroup-path",), "str", "ebpf mode: the cgroup2 directory whose processes are "
         "load balanced (default: the cgroup2 root, refused without --allow-root-cgroup).",
         group="ours", metavar="DIR"),
    Flag(("--allow-root-cgroup",), "bool", "ebpf mode: allow attaching to the cgroup2 root "
         "(every process on the machine is then load balanced).", group="ours",
         default=False),
    Flag(("--bpf-dir",), "str", "ebpf mode: the private bpffs for its pins (default "
         "/run/kubeproxy/bpf).", group="ours", default="", metavar="DIR"),
)
BY_DEST: dict[str, Flag] = {f.dest: f for f in FLAGS}
# Flags that still apply when --config is given (upstream: hostname and logging).
WITH_CONFIG = frozenset({"hostname_override"} | {f.dest for f in FLAGS if f.group == "logging"})

_TRUE = ("1", "t", "true")
_FALSE = ("0", "f", "false")


def parse_bool(text: str) -> bool:
    """pflag's strconv.ParseBool: 1, t, T, true, TRUE, True; 0, f, false ..."""
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_TYPES: dict[Kind, Callable[[str], Any]] = {
    "str": str, "path": str, "int": int, "float": float, "duration": _duration,
    "list": lambda s: [p.strip() for p in s.split(",") if p.strip()],
    "gates": lambda s: s,
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag of the table, by group, each defaulting to None (= not given)."""
    titles = {"upstream": "kube-proxy flags", "logging": "logging flags",
              "ours": "kubeproxy's own flags (not upstream's)"}
    groups = {g: parser.add_argument_group(t) for g, t in titles.items()}
    for flag in FLAGS:
        group = groups[flag.group]
        kw: dict[str, Any] = {"dest": flag.dest, "help": flag.help, "default": flag.default}
        if flag.kind == "bool":
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kw.update(type=_TYPES[flag.kind])
            if flag.metavar:
                kw["metavar"] = flag.metavar
        group.add_argument(*flag.names, **kw)
    parser.add_argument("--version", nargs="?", const="true", default=None,
                        help="Print version information and quit (--version=raw: as JSON)")


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The flags written on the command line: dest -> parsed value."""
    return {dest: getattr(args, dest) for dest, flag in BY_DEST.items()
            if flag.group != "ours" and getattr(args, dest, None) is not None}


def config_fields(explicit: Mapping[str, Any], *, with_config: bool
                  ) -> tuple[dict[str, object], list[str]]:
    """Given flags -> v1alpha1 field values, and the flags ignored because of --config."""
    fields: dict[str, object] = {}
    ignored: list[str] = []
    for dest, value in explicit.items():
        flag = BY_DEST[dest]
        if not flag.fields:
            continue
        if with_config and dest not in WITH_CONFIG:
            ignored.append(flag.names[0])
            continue
        wire: object = value
        if flag.kind == "duration":
            wire = format_duration(float(value))
        elif flag.kind == "gates":
            wire = parse_feature_gates(str(value))
        for name in flag.fields:
            fields[name] = wire
    return fields, ignored


def no_effect(explicit: Mapping[str, Any]) -> list[str]:
    """One line per flag given that has no effect here, saying why."""
    return [f"flag {BY_DEST[d].names[0]} is accepted but has no effect: {BY_DEST[d].effect}"
            for d in explicit if BY_DEST[d].effect]


def deprecated_ports(explicit: Mapping[str, Any], fields: dict[str, object]) -> None:
    """--healthz-port / --metrics-port (no --config): 0 disables, else sets the port."""
    for dest, name, default in (("healthz_port", "healthzBindAddress", "0.0.0.0"),
                                ("metrics_port", "metricsBindAddress", "127.0.0.1")):
        port = explicit.get(dest)
        if port is None:
            continue
        if int(port) == 0:
            fields[name] = ""
            continue
        host = str(fields.get(name) or default)
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 or "]:" in host else host
        fields[name] = f"{host}:{int(port)}"


@dataclass(frozen=True)
class Effective:
    """What the command line and the file make: the full v1alpha1 configuration (wire
    form, for /configz and --write-config-to), ProxyConfig's keyword arguments, and the
    lines to log once at start."""

    fields: Mapping[str, object]
    notes: tuple[str, ...]


def effective(args: argparse.Namespace) -> Effective:
    """Upstream's precedence over this command line (see the module docstring)."""
    import yaml

    explicit = given(args)
    notes: list[str] = []
    file_fields: Mapping[str, object] | None = None
    if args.config:
        try:
            doc = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{args.config}: {err}") from err
        decoded = kpconfig.decode(doc, str(args.config))
        notes += decoded.warnings
        file_fields = decoded.fields
    flag_fields, ignored = config_fields(explicit, with_config=file_fields is not None)
    if file_fields is None:
        deprecated_ports(explicit, flag_fields)
    if ignored:
        notes.append(f"ignoring {', '.join(ignored)}: --config is given, and its file "
                     f"decides these settings (upstream's precedence)")
    notes += no_effect(explicit)
    return Effective(kpconfig.resolve(file_fields, flag_fields), tuple(notes))


def build_config(args: argparse.Namespace) -> ProxyConfig:
    """The effective configuration (:func:`effective`: upstream's precedence) as
    ProxyConfig, with this project's own flags on top."""
    return proxy_config_of(args, effective(args))


def proxy_config_of(args: argparse.Namespace, eff: Effective) -> ProxyConfig:
    """``eff`` (already computed: ``run`` logs its notes first) as ProxyConfig."""
    try:
        kw: dict[str, Any] = kpconfig.proxy_settings(eff.fields)
        if args.lb_algorithm:
            kw["lb_algorithm"] = parse_lb_algorithm(args.lb_algorithm)
        if args.cgroup_path:
            kw["cgroup_path"] = args.cgroup_path
        if not kw.get("hostname"):
            kw["hostname"] = os.uname().nodename.lower()
        return ProxyConfig(**kw)
    except ConfigError as err:  # name the flag when a flag gave the bad value
        culprits = [f.names[0] for d, f in BY_DEST.items()
                    if getattr(args, d, None) is not None
                    and any(str(err).startswith(n) for n in f.fields)]
        if culprits:
            raise ConfigError(f"{err} (from {', '.join(culprits)})") from None
        raise


def proxy_config(argv: Sequence[str]) -> ProxyConfig:
    """The ProxyConfig a ``kube-proxy`` / ``kubeproxy run`` command line gives (the lab
    asks what its node proxies run with)."""
    parser = argparse.ArgumentParser(prog="kube-proxy")
    add_flags(parser)
    return build_config(parser.parse_args(list(argv)))
