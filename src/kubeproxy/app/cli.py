"""The `kubeproxy` command: render, trace, apply, cleanup, lab.

A thin edge: parse flags (upstream kube-proxy's names), read manifests, call the pure
core, print. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from kubeproxy import modes
from kubeproxy.config import flags
from kubeproxy.config.types import ProxyConfig, cluster_with_bind_address
from kubeproxy.errors import ConfigError, ManifestError
from kubeproxy.k8s import decode_objects, load_manifests
from kubeproxy.model import Cluster
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.nodeview import node_views
from kubeproxy.sources.client import ClientOptions


def _add_proxy_flags(p: argparse.ArgumentParser, *, files: bool = True) -> None:
    """kube-proxy's command line (flags.py's table), plus -f for the offline commands."""
    if files:
        p.add_argument("-f", "--filename", dest="files", action="append", required=True,
                       type=Path, metavar="FILE",
                       help="Services, EndpointSlices and Nodes (YAML or JSON); repeatable")
    flags.add_flags(p)


def _add_bpf_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bpf-dir", metavar="DIR", default="",
                   help="ebpf mode: the private bpffs for its pins (default "
                        "/run/kubeproxy/bpf)")


def load_cluster(files: Sequence[Path]) -> Cluster:
    """Read and decode manifests; report each invalid object on stderr and go on."""
    cluster = decode_objects(load_manifests(files))
    for err in cluster.errors:
        print(f"warning: skipping {err}", file=sys.stderr)
    return cluster


def cmd_render(args: argparse.Namespace) -> int:
    config = flags.build_config(args)
    cluster = cluster_with_bind_address(load_cluster(args.files), config)
    mode = modes.for_config(config)
    sys.stdout.write(mode.text(mode.render(node_views(cluster, config)), config.hostname))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from kubeproxy.trace.result import Packet

    config = flags.build_config(args)
    cluster = cluster_with_bind_address(load_cluster(args.files), config)
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
    mode = modes.for_config(config)
    result = mode.trace(mode.render(node_views(cluster, config)), packet, local)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.to_text())
    return 0


def _plane_options(args: argparse.Namespace, config: ProxyConfig | None = None
                   ) -> PlaneOptions:
    return PlaneOptions(iptables_backend=args.iptables_backend,
                        cgroup_path=config.cgroup_path if config else "",
                        bpf_dir=args.bpf_dir,
                        allow_root_cgroup=getattr(args, "allow_root_cgroup", False))


def cmd_apply(args: argparse.Namespace) -> int:
    """Render this node's rules and apply them to the kernel (a one-shot full sync)."""
    from kubeproxy.dataplane.base import SubprocessRunner

    config = flags.build_config(args)
    cluster = cluster_with_bind_address(load_cluster(args.files), config)
    mode = modes.for_config(config)
    plane = mode.data_plane(SubprocessRunner(), _plane_options(args, config))
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
    """Run as this node's proxy until SIGTERM (upstream's kube-proxy); or clean up, write
    the configuration, or tune the node, and exit."""
    if args.version is not None:
        return _print_version(args.version)
    from kubeproxy.app import daemon, tuning  # after --version: it need not load them
    from kubeproxy.config import v1alpha1 as kpconfig
    eff = flags.effective(args)
    _setup_logs(eff.fields, args)
    log = logging.getLogger("kubeproxy.cli")
    for note in eff.notes:
        log.warning("%s", note)
    if args.write_config_to:
        Path(args.write_config_to).write_text(
            yaml.safe_dump(kpconfig.nested(eff.fields), sort_keys=True))
        log.info("wrote configuration to %s", args.write_config_to)
        return 0
    config = flags.proxy_config_of(args, eff)
    problem = tuning.privilege_problem()
    if problem is not None:
        raise PrivilegeError(problem)
    if args.cleanup:
        return cmd_cleanup(args)
    for problem in tuning.tune(_tuning_settings(eff.fields)):
        log.warning("node tuning: %s", problem)  # as upstream: logged, not fatal
    if args.init_only:
        return 0
    kubeconfig = eff.fields["clientConnection.kubeconfig"]
    options = daemon.DaemonOptions(
        kubeconfig=Path(str(kubeconfig)) if kubeconfig else None, master=args.master,
        iptables_backend=args.iptables_backend, bpf_dir=args.bpf_dir,
        allow_root_cgroup=bool(args.allow_root_cgroup),
        configz=kpconfig.configz(eff.fields),
        client=_client_options(eff.fields))
    if args.watch_stall_timeout is not None:
        if args.watch_stall_timeout <= 0:
            raise ConfigError("--watch-stall-timeout must be > 0")
        options = replace(options, watch_stall_timeout=args.watch_stall_timeout)
    return daemon.run(config, options)


class PrivilegeError(ConfigError):
    """Not allowed to program the kernel (exit 1, not a usage error)."""


def _setup_logs(fields: Mapping[str, object], args: argparse.Namespace) -> None:
    from kubeproxy.app import logs

    vmodule = fields["logging.vmodule"]
    try:
        logs.setup(logs.LogConfig(
            format=str(fields["logging.format"]), verbosity=int(str(fields["logging.verbosity"])),
            vmodule=logs.parse_vmodule(vmodule) if isinstance(vmodule, str) else tuple(
                (str(m["filePattern"]), int(m["verbosity"]))
                for m in (vmodule if isinstance(vmodule, list) else ())),
            split_stream=bool(args.log_text_split_stream or args.log_json_split_stream)))
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"logging: {err}") from err


def _tuning_settings(fields: Mapping[str, object]) -> Any:
    from kubeproxy.app import tuning
    from kubeproxy.config.types import parse_duration

    def seconds(name: str) -> float:
        return parse_duration(str(fields[name]), name)

    return tuning.Settings(
        max_per_core=int(str(fields["conntrack.maxPerCore"])),
        min=int(str(fields["conntrack.min"])),
        tcp_established_timeout=seconds("conntrack.tcpEstablishedTimeout"),
        tcp_close_wait_timeout=seconds("conntrack.tcpCloseWaitTimeout"),
        tcp_be_liberal=bool(fields["conntrack.tcpBeLiberal"]),
        udp_timeout=seconds("conntrack.udpTimeout"),
        udp_stream_timeout=seconds("conntrack.udpStreamTimeout"),
        oom_score_adj=int(str(fields["oomScoreAdj"])))


def _print_version(how: str) -> int:
    from kubeproxy import __version__

    if how == "raw":
        print(json.dumps({"gitVersion": f"v{__version__}", "platform": sys.platform,
                          "pythonVersion": sys.version.split()[0]}))
    elif flags.parse_bool(how):
        print(f"kubeproxy v{__version__} (kube-proxy's command line)")
    else:
        return -1
    return 0


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
    _add_bpf_flags(p)
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("run", help="run as this node's proxy daemon, like kube-proxy "
                                   "(needs root); the same command line as `kube-proxy`")
    _add_proxy_flags(p, files=False)
    p.set_defaults(func=cmd_run)

    try:
        from kubeproxy.lab.cli import add_lab_parser
    except ImportError:  # the lab is optional for the core commands
        pass
    else:
        add_lab_parser(sub)
    return parser


def _client_options(fields: Mapping[str, object]) -> ClientOptions:
    """clientConnection's qps, burst and contentType for the API client."""
    try:
        return ClientOptions(qps=float(str(fields["clientConnection.qps"])),
                             burst=int(str(fields["clientConnection.burst"])),
                             content_type=str(fields["clientConnection.contentType"]))
    except ValueError as err:
        raise ConfigError(f"clientConnection: {err}") from err


def kube_proxy_main(argv: Sequence[str] | None = None) -> int:
    """The `kube-proxy` command: upstream's command line, `kubeproxy run` by another name."""
    parser = argparse.ArgumentParser(
        prog="kube-proxy", description="The Kubernetes network proxy runs on each node "
        "(kubeproxy: kube-proxy rebuilt in Python; the same as `kubeproxy run`).")
    flags.add_flags(parser)
    parser.set_defaults(func=cmd_run)
    return main(argv, parser)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
         ) -> int:
    from kubeproxy.errors import DataPlaneError

    args = (parser or build_parser()).parse_args(argv)
    try:
        code: int = args.func(args)
    except PrivilegeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataPlaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
