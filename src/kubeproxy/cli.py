"""The `kubeproxy` command: render, trace, apply, cleanup, lab.

A thin edge: parse flags (upstream kube-proxy's names), read manifests, call the pure
core, print. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubeproxy import modes
from kubeproxy.config import (
    ConfigError,
    ProxyConfig,
    load_config_file,
    parse_cidr_list,
    parse_detect_local_mode,
    parse_lb_algorithm,
)
from kubeproxy.k8s import ManifestError, decode_objects, load_manifests
from kubeproxy.model import Cluster
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.pipeline import node_views


def _add_proxy_flags(p: argparse.ArgumentParser, *, files: bool = True) -> None:
    """Flags shared by every command that computes a node's rules."""
    if files:
        p.add_argument("-f", "--filename", dest="files", action="append", required=True,
                       type=Path, metavar="FILE",
                       help="Services, EndpointSlices and Nodes (YAML or JSON); repeatable")
    p.add_argument("--config", type=Path, help="a KubeProxyConfiguration file")
    p.add_argument("--hostname-override", help="the node whose rules to compute")
    p.add_argument("--mode", "--proxy-mode", dest="mode", choices=modes.NAMES)
    p.add_argument("--cluster-cidr", help="pod CIDR(s) of the cluster, comma-separated")
    p.add_argument("--masquerade-all", action="store_const", const=True,
                   help="masquerade all traffic sent to cluster IPs")
    p.add_argument("--nodeport-addresses",
                   help="CIDRs (comma-separated) or 'primary' where NodePorts are open")
    p.add_argument("--detect-local-mode",
                   help="ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix")
    p.add_argument("--pod-bridge-interface", help="bridge for detect-local-mode BridgeInterface")
    p.add_argument("--pod-interface-name-prefix",
                   help="interface prefix for detect-local-mode InterfaceNamePrefix")
    p.add_argument("--lb-algorithm", help="random (upstream) or round-robin")
    p.add_argument("--iptables-backend", choices=["auto", "legacy", "nft"], default="auto",
                   help="which iptables binaries to use (auto: as iptables-wrapper decides)")


def build_config(args: argparse.Namespace) -> ProxyConfig:
    """The config file first, then flags given on the command line on top (upstream order)."""
    kw: dict[str, Any] = load_config_file(args.config) if args.config else {}
    if args.hostname_override:
        kw["hostname"] = args.hostname_override
    if args.mode:
        kw["mode"] = args.mode
    if args.cluster_cidr is not None:
        kw["cluster_cidrs"] = parse_cidr_list(args.cluster_cidr, "--cluster-cidr")
    if args.masquerade_all:
        kw["masquerade_all"] = True
    if args.nodeport_addresses is not None:
        kw["nodeport_addresses"] = tuple(
            a.strip() for a in args.nodeport_addresses.split(",") if a.strip())
    if args.detect_local_mode:
        kw["detect_local_mode"] = parse_detect_local_mode(args.detect_local_mode)
    if args.pod_bridge_interface:
        kw["bridge_interface"] = args.pod_bridge_interface
    if args.pod_interface_name_prefix:
        kw["interface_name_prefix"] = args.pod_interface_name_prefix
    if args.lb_algorithm:
        kw["lb_algorithm"] = parse_lb_algorithm(args.lb_algorithm)
    if not kw.get("hostname"):
        kw["hostname"] = os.uname().nodename.lower()
    return ProxyConfig(**kw)


def load_cluster(files: Sequence[Path]) -> Cluster:
    """Read and decode manifests; report each invalid object on stderr and go on."""
    cluster = decode_objects(load_manifests(files))
    for err in cluster.errors:
        print(f"warning: skipping {err}", file=sys.stderr)
    return cluster


def cmd_render(args: argparse.Namespace) -> int:
    config = build_config(args)
    cluster = load_cluster(args.files)
    mode = modes.get(config.mode)
    sys.stdout.write(mode.text(mode.render(node_views(cluster, config)), config.hostname))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from kubeproxy.trace.result import Packet

    config = build_config(args)
    cluster = load_cluster(args.files)
    try:
        src = ipaddress.ip_address(args.src)
        dst = ipaddress.ip_address(args.dst)
    except ValueError as err:
        raise ConfigError(f"--src/--dst: {err}") from None
    if src.version != dst.version:
        raise ConfigError("--src and --dst must be of the same IP family")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not in 1-65535")
    node = cluster.node(config.hostname)
    local = frozenset(ip for ip in (node.addresses if node else ()) if ip.version == dst.version)
    if node is None:
        print(f"warning: no Node {config.hostname!r} in the input: the node has no addresses",
              file=sys.stderr)
    packet = Packet(src=src, dst=dst, port=args.port, proto=args.proto,
                    in_interface=args.in_interface)
    mode = modes.get(config.mode)
    result = mode.trace(mode.render(node_views(cluster, config)), packet, local)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.to_text())
    return 0


def _plane_options(args: argparse.Namespace) -> PlaneOptions:
    return PlaneOptions(iptables_backend=args.iptables_backend)


def cmd_apply(args: argparse.Namespace) -> int:
    """Render this node's rules and apply them to the kernel (a one-shot full sync)."""
    from kubeproxy.dataplane.base import SubprocessRunner

    config = build_config(args)
    cluster = load_cluster(args.files)
    mode = modes.get(config.mode)
    plane = mode.data_plane(SubprocessRunner(), _plane_options(args))
    plane.sync(mode.render(node_views(cluster, config)))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove what any mode may have written (as upstream's --cleanup does)."""
    from kubeproxy.dataplane.base import SubprocessRunner

    runner = SubprocessRunner()
    for mode in modes.every():
        mode.cleanup(runner, _plane_options(args))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run as this node's proxy until SIGTERM (upstream's kube-proxy); or clean up and exit."""
    from dataclasses import replace

    from kubeproxy import daemon
    from kubeproxy.config import parse_duration, with_overrides

    if args.cleanup:
        return cmd_cleanup(args)
    kw: dict[str, Any] = {}
    if args.healthz_bind_address is not None:
        kw["healthz_bind_address"] = args.healthz_bind_address
    if args.metrics_bind_address is not None:
        kw["metrics_bind_address"] = args.metrics_bind_address
    if args.iptables_sync_period:
        kw["sync_period"] = parse_duration(args.iptables_sync_period, "--iptables-sync-period")
    if args.iptables_min_sync_period:
        kw["min_sync_period"] = parse_duration(args.iptables_min_sync_period,
                                               "--iptables-min-sync-period")
    config = with_overrides(build_config(args), **kw)
    kubeconfig = args.kubeconfig or (Path(config.kubeconfig) if config.kubeconfig else None)
    options = daemon.DaemonOptions(kubeconfig=kubeconfig, master=args.master,
                                   iptables_backend=args.iptables_backend)
    if args.watch_stall_timeout:
        stall = parse_duration(args.watch_stall_timeout, "--watch-stall-timeout")
        if stall <= 0:
            raise ConfigError("--watch-stall-timeout must be > 0")
        options = replace(options, watch_stall_timeout=stall)
    return daemon.run(config, options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubeproxy", description="Kubernetes' kube-proxy, rebuilt in Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="print the rules a node would get")
    _add_proxy_flags(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("trace", help="follow a packet through the rendered rules")
    _add_proxy_flags(p)
    p.add_argument("--src", required=True, help="source IP")
    p.add_argument("--dst", required=True, help="destination IP")
    p.add_argument("--port", required=True, type=int, help="destination port")
    p.add_argument("--proto", default="tcp", choices=["tcp", "udp", "sctp"])
    p.add_argument("--in-interface", default="eth0",
                   help="interface the packet arrives on (for interface-based detect-local)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("apply", help="render and apply this node's rules (needs root)")
    _add_proxy_flags(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("cleanup", help="remove every rule kubeproxy wrote (needs root)")
    p.add_argument("--iptables-backend", choices=["auto", "legacy", "nft"], default="auto")
    p.add_argument("--mode", "--proxy-mode", dest="mode", choices=modes.NAMES)
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("run", help="run as this node's proxy daemon, like kube-proxy "
                                   "(needs root)")
    _add_proxy_flags(p, files=False)
    p.add_argument("--kubeconfig", type=Path, help="kubeconfig: API server and credentials")
    p.add_argument("--master", help="API server URL (overrides the kubeconfig's server)")
    p.add_argument("--healthz-bind-address", metavar="IP:PORT",
                   help="/healthz and /livez (default 0.0.0.0:10256; empty: off)")
    p.add_argument("--metrics-bind-address", metavar="IP:PORT",
                   help="/metrics and /proxyMode (default 127.0.0.1:10249; empty: off)")
    p.add_argument("--iptables-sync-period", metavar="DURATION",
                   help="how often rules are fully resynced (default 30s)")
    p.add_argument("--iptables-min-sync-period", metavar="DURATION",
                   help="minimum time between syncs (default 1s)")
    p.add_argument("--watch-stall-timeout", metavar="DURATION",
                   help="re-open a watch that brings no event and no bookmark for this long "
                        "(default 2m; not an upstream flag)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove every rule kubeproxy wrote, then exit")
    p.set_defaults(func=cmd_run)

    try:
        from kubeproxy.lab.cli import add_lab_parser
    except ImportError:  # the lab is optional for the core commands
        pass
    else:
        add_lab_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kubeproxy.dataplane.base import DataPlaneError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
