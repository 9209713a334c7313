"""`python -m kubeproxy.apiserver`: run the lab API server until SIGTERM.

    python -m kubeproxy.apiserver --listen 127.0.0.1:6443 \
        [--netns NAME:IP:PORT ...] [--history N] [--state FILE] --kubeconfig-out FILE

The kubeconfig is written (atomically) only once every listener is up, so its appearance
means "ready". SIGTERM or SIGINT stops the server cleanly; the exit status is 0 then.
With ``--state FILE`` the objects survive a restart: loaded from FILE if it exists,
FILE rewritten after every change (see server.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from kubeproxy.apiserver.netns import NetnsError
from kubeproxy.apiserver.server import ApiServer, NetnsListener, ServerConfig


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def _netns(text: str) -> NetnsListener:
    try:
        return NetnsListener.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    if not first.isdigit() or not last.isdigit():
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST, got {text!r}")
    return int(first), int(last)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubeproxy.apiserver",
                                description="In-memory Kubernetes API server for the lab.")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 6443),
                   help="root-namespace listener, a loopback IP:PORT (default 127.0.0.1:6443)")
    p.add_argument("--netns", type=_netns, action="append", default=[],
                   help="also listen inside network namespace NAME on IP:PORT (repeatable)")
    p.add_argument("--history", type=int, default=1000,
                   help="changes kept for watches; older resourceVersions get 410 Gone")
    p.add_argument("--service-cidr", default="10.96.0.0/16")
    p.add_argument("--node-port-range", type=_range, default=(30000, 32767))
    p.add_argument("--bookmark-interval", type=float, default=60.0,
                   help="seconds between BOOKMARK events on watches that allow them")
    p.add_argument("--state", default=None,
                   help="keep the objects in this file: restored from it at start if it "
                        "exists, rewritten after every change")
    p.add_argument("--kubeconfig-out", required=True, help="where to write the kubeconfig")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = ServerConfig(host=args.listen[0], port=args.listen[1],
                              netns=tuple(args.netns), history=args.history,
                              service_cidr=args.service_cidr,
                              node_port_range=args.node_port_range,
                              bookmark_interval=args.bookmark_interval,
                              state_file=args.state)
        server = ApiServer(config).start()
    except (ValueError, NetnsError, OSError) as exc:
        print(f"kubeproxy.apiserver: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.write_kubeconfig(args.kubeconfig_out)
        where = ", ".join([server.url] + [f"{n.netns}:{n.host}:{n.port}" for n in config.netns])
        logging.getLogger("kubeproxy.apiserver").info("serving on %s; kubeconfig %s", where,
                                                      args.kubeconfig_out)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
