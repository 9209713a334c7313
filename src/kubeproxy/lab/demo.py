"""``make demo``: watch kube-proxy work on real kernels, in network namespaces, in a minute.

Brings up examples/seed.yaml as lab ``demo`` (one node, three pods app=my-app, the
ClusterIP Service my-service:80 -> 8080 and its NodePort 30080 variant) with its API
server, agent and the node's proxy daemon, probes the ClusterIP from a pod and the
NodePort from outside the cluster, prints which pod answered how often, shows what
kubectl sees (when kubectl is installed) and the node's ``iptables -t nat -L
KUBE-SERVICES -n`` (the mode's listing of its Service dispatch,
``Presentation.service_rules``), writes the diagram to ``out/seed.svg`` and takes
everything down again, also on failure. Needs root. Like the rest of the lab, it asks
the mode registry (``modes.presentation``), never a mode's own modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kubeproxy import modes
from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.errors import LabError
from kubeproxy.lab import diagram
from kubeproxy.lab.manifest import load_documents
from kubeproxy.lab.nodeviews import node_views
from kubeproxy.lab.probe import format_table
from kubeproxy.lab.runtime import Lab, UpOptions, read_files

LAB = "demo"
REQUESTS = 100


def seed_file() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base / "examples" / "seed.yaml"
        if candidate.exists():
            return candidate
    raise LabError("examples/seed.yaml not found (run `make demo` from the repository)")


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _kubectl(lab: Lab) -> None:
    """The same lab as kubectl sees it, through the lab's API server (if kubectl is here)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    argv = [kubectl, "--kubeconfig", str(lab.kubeconfig), "get", "pods,endpointslices", "-o",
            "wide"]  # fmt: skip
    banner(f"kubectl --kubeconfig $(kubeproxy lab kubeconfig --name {LAB}) get "
           "pods,endpointslices -o wide")  # fmt: skip
    sys.stdout.flush()
    subprocess.run(argv, check=False, timeout=60)


def main() -> int:
    if os.geteuid() != 0:
        print(
            "make demo needs root, like kube-proxy itself: it creates network namespaces "
            "(nothing changes in the machine's own network)",
            file=sys.stderr,
        )
        return 1
    started = time.monotonic()
    lab = Lab(LAB)
    try:
        lab.down()  # a demo left over from an interrupted run
        seed = seed_file()
        banner(
            f"lab up -f {seed.relative_to(Path.cwd()) if seed.is_relative_to(Path.cwd()) else seed}"
        )
        lab.up(load_documents(read_files([str(seed)])), UpOptions(mode="iptables"))
        from kubeproxy.lab.cli import status_text

        print(status_text(lab))
        banner(f"{REQUESTS} requests to the ClusterIP my-service:80 from pod my-app-1")
        result = lab.probe("my-app-1", "my-service", 80, n=REQUESTS)
        print(format_table(result, "my-app-1 -> my-service (10.96.0.10):80"))
        print(
            "  (my-app-1 reaching itself is hairpin traffic: masqueraded to the node's "
            "cbr0 address)"
        )
        banner(f"{REQUESTS} requests to NodePort 30080 of node-1 from outside the cluster")
        result = lab.probe("external", "node-1", 30080, n=REQUESTS)
        print(format_table(result, "external 203.0.113.2 -> node-1 192.168.0.2:30080"))
        print("  (externalTrafficPolicy Cluster: the source is masqueraded)")
        _kubectl(lab)
        state = lab.state()
        shown = modes.presentation(state.mode)
        node_ns = lab.plan(state).nodes[0].ns
        if shown.service_rules is not None:  # the mode's own listing of its dispatch
            argv = list(shown.service_rules(NetnsRunner(node_ns)))
            banner(f"ip netns exec {node_ns} {' '.join(argv)}")
            sys.stdout.flush()
            subprocess.run(lab.net.exec_argv(node_ns, argv), check=False)
        out = Path("out") / "seed.svg"
        out.parent.mkdir(exist_ok=True)
        plan = lab.plan(state)
        names = shown.chain_names
        out.write_text(diagram.render(plan, node_views(lab, "node-1"), names, node="node-1",
                                      mode=state.mode))
        banner(f"wrote {out}: clients -> Service frontends -> chains -> pods")
    except LabError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        gone = lab.down()
        print(
            f"\nlab down: {len(gone)} namespaces removed, nothing left behind "
            f"({time.monotonic() - started:.1f} s in all)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
