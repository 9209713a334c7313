"""``kubeproxy lab ...``: the lab's command line.

``add_lab_parser`` hangs the ``lab`` command under the main CLI; every sub-command sets
``func`` (Namespace -> exit code) and takes ``--name`` (default ``lab``), so several labs
can exist side by side. ``python -m kubeproxy.lab.cli`` runs the same commands alone.
Errors of the lab (``LabError``) are printed as one message and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubeproxy import modes
from kubeproxy.errors import LabError
from kubeproxy.lab import diagram, layout
from kubeproxy.lab.layout import DEFAULT_CLUSTER_CIDR, DEFAULT_SERVICE_CIDR
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.nodeviews import node_views
from kubeproxy.lab.probe import format_table
from kubeproxy.lab.runtime import LB_ALGORITHMS, MODES, Lab, UpOptions, read_files

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Callable[[argparse.Namespace], int], root: bool = True) -> Handler:
    def run(args: argparse.Namespace) -> int:
        if root and os.geteuid() != 0:
            print("kubeproxy lab: needs root (it creates network namespaces)", file=sys.stderr)
            return 1
        try:
            return handler(args)
        except LabError as exc:
            print(f"kubeproxy lab: {exc}", file=sys.stderr)
            return 1

    return run


# ---------------------------------------------------------------- handlers


def cmd_up(args: argparse.Namespace) -> int:
    documents = load_documents(read_files([f for group in args.file for f in group]))
    lab = Lab(args.name)
    options = UpOptions(
        mode=args.mode,
        lb_algorithm=args.lb_algorithm,
        cluster_cidr=args.cluster_cidr,
        service_cidr=args.service_cidr,
        external_node=args.external_node,
        proxies=not args.no_proxy,
        images=not args.no_images,
    )
    started = time.monotonic()
    lab.up(documents, options)
    for note in parse_objects(documents).notes:
        print(f"note: {note}")
    print(f"lab {args.name!r} is up ({time.monotonic() - started:.1f} s)\n")
    print(status_text(lab))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(status_text(Lab(args.name)))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LabError("lab exec: give a command after --")
    return Lab(args.name).exec(args.target, command)


def cmd_probe(args: argparse.Namespace) -> int:
    lab = Lab(args.name)
    result = lab.probe(
        args.source,
        args.to,
        args.port,
        proto=args.proto,
        n=args.n,
        timeout=args.timeout,
        source_ip=args.source_ip,
    )
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        target = f"{args.source} -> {args.to} ({lab.address_of(args.to)}):{args.port}/{args.proto}"
        print(format_table(result, target))
    return 0


def cmd_pod_ready(args: argparse.Namespace) -> int:
    Lab(args.name).set_pod_ready(args.pod, args.ready == "true")
    print(f"pod {args.pod}: ready={args.ready}")
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    print(Lab(args.name).kubeconfig)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    started = time.monotonic()
    Lab(args.name).settle()
    print(
        f"lab {args.name!r}: every node's rules hold what the API holds "
        f"({time.monotonic() - started:.1f} s)"
    )
    return 0


def cmd_pod_delete(args: argparse.Namespace) -> int:
    lab = Lab(args.name)
    deadline = lab.delete_pod(args.pod, args.grace, wait=args.wait)
    if args.wait or args.grace <= 0:
        print(f"pod {args.pod} deleted")
    else:
        left = max(0.0, deadline - time.time())
        print(f"pod {args.pod} is terminating; it goes away in {left:.0f} s")
    return 0


def cmd_diagram(args: argparse.Namespace) -> int:
    lab = Lab(args.name)
    state = lab.state()
    plan = lab.plan(state)
    node = args.node or plan.nodes[0].name
    names = modes.presentation(state.mode).chain_names
    svg = diagram.render(plan, node_views(lab, node), names, node=node, mode=state.mode)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(svg)
    print(f"wrote {args.output}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    print(Lab(args.name).node_rules(args.node), end="")
    return 0


def cmd_restart_apiserver(args: argparse.Namespace) -> int:
    started = time.monotonic()
    state = Lab(args.name).restart_apiserver()
    print(
        f"lab {args.name!r}: API server restarted on 127.0.0.1:{state.api_port} with the "
        f"same objects; the agent and every node caught up "
        f"({time.monotonic() - started:.1f} s)"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    gone = Lab(args.name).down()
    print(f"lab {args.name!r} is down ({len(gone)} namespaces removed)")
    return 0


# ---------------------------------------------------------------- status


def status_text(lab: Lab) -> str:
    state = lab.state()
    plan = lab.plan(state)
    balancing = modes.presentation(state.mode).load_balancing(state.lb_algorithm)
    rows: list[str] = [
        f"lab {lab.name!r}: mode {state.mode}, load balancing {balancing}, "
        f"cluster CIDR {state.cluster_cidr}, service CIDR {state.service_cidr}",
        f"API server: kubectl --kubeconfig {lab.store.kubeconfig} "
        f"(127.0.0.1:{state.api_port}; inside each node namespace 127.0.0.1:6443)",
    ]
    if not lab.proxies():
        rows.append("proxies: none of the lab's own (started with --no-proxy); "
                    "a DaemonSet brings them: kubectl apply -f deploy/")  # fmt: skip
    rows.append("")
    rows += _table(
        ["NODE", "LAB IP", "POD CIDR", "ZONE", "NAMESPACE"],
        [[n.name, n.lab_ip, n.pod_cidr, n.zone or "-", n.ns] for n in plan.nodes],
    )
    rows += ["", *_table(["POD", "NODE", "IP", "READY", "STATE", "PORTS"], _pod_rows(lab, plan))]
    svc_rows = []
    for s in plan.objects.services:
        ports = ",".join(
            f"{sp.port}{':' + str(sp.node_port) if sp.node_port else ''}->"
            f"{sp.target_port}/{sp.protocol}"
            for sp in s.ports
        )
        ext = ",".join((*s.external_ips, *s.lb_ips)) or "-"
        svc_rows.append([s.key, s.type, s.cluster_ip or "-", ports or "-", ext])
    rows += ["", *_table(["SERVICE", "TYPE", "CLUSTER-IP", "PORTS", "EXTERNAL"], svc_rows)]
    rows += [
        "",
        *_table(
            ["ENDPOINTSLICE", "PORTS", "ENDPOINTS (R=ready S=serving T=terminating)"],
            [_slice_row(sl) for sl in lab.slices()],
        ),
    ]
    outside = plan.external
    rows += [
        "",
        f"external client {outside.ns}: {', '.join(outside.clients)}; "
        f"Service external/LB IPs routed to {outside.via}",
    ]
    return "\n".join(rows)


def _pod_rows(lab: Lab, plan: layout.Plan) -> list[list[str]]:
    listen = {p.key: p.listen for p in plan.pods}
    now = time.time()
    rows = []
    for p in sorted(lab.pods(), key=lambda p: p.key):
        life = p.phase.lower()
        if p.deletion_at is not None:
            life = f"terminating ({max(0.0, p.deletion_at - now):.0f}s)"
        ports = ",".join(sorted({x.split("/")[0] for x in listen.get(p.key, ())})) or "-"
        rows.append([p.key, p.node or "-", p.ip or "-", str(p.ready).lower(), life, ports])
    return rows


def _slice_row(sl: dict[str, Any]) -> list[str]:
    meta = sl["metadata"]
    eps = []
    for ep in sl.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        flags = "".join(
            c[0].upper() if cond.get(c) else "-" for c in ("ready", "serving", "terminating")
        )
        eps.append(f"{ep['addresses'][0]}({flags})")
    ports = ",".join(str(p.get("port")) for p in sl.get("ports") or [])
    return [f"{meta.get('namespace', 'default')}/{meta['name']}", ports or "-", " ".join(eps)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


# ---------------------------------------------------------------- parser


Command = Callable[..., argparse.ArgumentParser]


def add_lab_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="a mini cluster in network namespaces (needs root)",
        description="Run kube-proxy's rules on real kernels: nodes and pods are network "
        "namespaces on this machine, driven through the lab's own Kubernetes API (kubectl "
        "works). Nothing changes in the root namespace; only the lab's API server listens "
        "there, on 127.0.0.1.",
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Handler, help_text: str, root: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--name", default="lab", help="lab name, [a-z0-9]{1,8} (default: lab)")
        p.set_defaults(func=_guarded(handler, root))
        return p

    _life_commands(command)
    _use_commands(command)
    _change_commands(command)


def _life_commands(command: Command) -> None:
    up = command(
        "up",
        cmd_up,
        "create the lab from Kubernetes YAML: namespaces, its API "
        "server, agent and one proxy per node",
    )
    up.add_argument("-f", "--file", action="append", nargs="+", required=True, metavar="FILE")
    up.add_argument("--mode", choices=MODES, default="iptables")
    up.add_argument("--lb-algorithm", choices=LB_ALGORITHMS, default="random")
    up.add_argument("--cluster-cidr", default=DEFAULT_CLUSTER_CIDR)
    up.add_argument("--service-cidr", default=DEFAULT_SERVICE_CIDR)
    up.add_argument(
        "--external-node", help="node that Service external/LB IPs are routed to (default: first)"
    )
    up.add_argument(
        "--no-proxy",
        action="store_true",
        help="start no proxy on the nodes: run kube-proxy as a DaemonSet (kubectl apply -f "
        "deploy/), as a cluster does",
    )
    up.add_argument(
        "--no-images",
        action="store_true",
        help="run DaemonSet Pods from this checkout even when their image is in local "
        "podman storage (make image)",
    )
    command("status", cmd_status, "show nodes, pods, services and endpoint slices")
    command(
        "kubeconfig",
        cmd_kubeconfig,
        "print the path of the lab's kubeconfig (for kubectl)",
        root=False,
    )
    command(
        "wait",
        cmd_wait,
        "wait until every node's rules hold what the API holds (after kubectl changes)",
    )
    command(
        "restart-apiserver",
        cmd_restart_apiserver,
        "stop the lab's API server and start it again (same port, same objects)",
    )
    command("down", cmd_down, "remove the lab and everything it started")


def _use_commands(command: Command) -> None:
    ex = command("exec", cmd_exec, "run a command in a pod, node, 'external' or 'net'")
    ex.add_argument("target")
    ex.add_argument("command", nargs=argparse.REMAINDER)

    pr = command("probe", cmd_probe, "send n requests and count which pods answered")
    pr.add_argument("--from", dest="source", required=True, help="POD, NODE or external")
    pr.add_argument("--to", required=True, help="IP, NODE, SERVICE[.NAMESPACE] or POD")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    pr.add_argument("-n", type=int, default=100)
    pr.add_argument("--timeout", type=float, default=1.0, help="seconds per request")
    pr.add_argument("--source-ip", help="bind this source address (e.g. 203.0.113.130)")
    pr.add_argument("--json", action="store_true")

    dg = command("diagram", cmd_diagram, "draw clients -> frontends -> chains -> pods as SVG")
    dg.add_argument("-o", "--output", default="lab.svg")
    dg.add_argument("--node", help="whose rules to draw (default: first node)")

    rules = command("rules", cmd_rules, "print a node's live rules")
    rules.add_argument("--node", help="default: first node")


def _change_commands(command: Command) -> None:
    ready = command("pod-ready", cmd_pod_ready, "set a pod's Ready condition")
    ready.add_argument("pod")
    ready.add_argument("ready", choices=["true", "false"])

    delete = command("pod-delete", cmd_pod_delete, "delete a pod (terminating during --grace)")
    delete.add_argument("pod")
    delete.add_argument("--grace", type=float, default=30.0, help="seconds (default 30)")
    delete.add_argument("--wait", action="store_true", help="return once the pod is gone")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeproxy.lab.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_lab_parser(subparsers)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
