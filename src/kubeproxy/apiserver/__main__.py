"""`python -m kubeproxy.apiserver`: run the lab API server until SIGTERM.

    python -m kubeproxy.apiserver --listen 127.0.0.1:6443 \
        [--netns NAME:IP:PORT ...] [--history N] [--state FILE] --kubeconfig-out FILE \
        [--tls-cert-file F --tls-private-key-file F --client-ca-file F] \
        [--service-account-signing-key-file F [--service-account-issuer URL]] \
        [--kubeconfig-client-cert F --kubeconfig-client-key F]

The TLS flags make every listener speak TLS; the signing key turns on authentication
(client certificates, service-account tokens) and RBAC. Flag names are kube-apiserver's.

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

from kubeproxy.apiserver.auth import DEFAULT_ISSUER, AuthConfig
from kubeproxy.apiserver.netns import NetnsError
from kubeproxy.apiserver.server import (
    ApiServer,
    KubeconfigUser,
    NetnsListener,
    ServerConfig,
    TlsFiles,
)


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
    p.add_argument("--tls-cert-file", help="serving certificate (PEM); with the key: TLS")
    p.add_argument("--tls-private-key-file", help="serving key (PEM)")
    p.add_argument("--client-ca-file", help="CA of client certificates (and of the "
                   "kubeconfig written)")
    p.add_argument("--service-account-signing-key-file",
                   help="HS256 key of service-account tokens; turns on authentication and RBAC")
    p.add_argument("--service-account-issuer", default=DEFAULT_ISSUER)
    p.add_argument("--kubeconfig-client-cert", help="client certificate the kubeconfig carries")
    p.add_argument("--kubeconfig-client-key", help="its key")
    p.add_argument("--pod-log-dir", help="where pods/log reads <namespace>_<pod>.log")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    tls = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if any(tls) and not all(tls):
        p.error("--tls-cert-file, --tls-private-key-file and --client-ca-file go together")
    if args.service_account_signing_key_file and not all(tls):
        p.error("authentication needs TLS (--tls-cert-file ...)")
    return args


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def security(args: argparse.Namespace
             ) -> tuple[TlsFiles | None, AuthConfig | None, KubeconfigUser | None]:
    """What the TLS and auth flags set (OSError, ValueError if a file is bad)."""
    tls = auth = user = None
    if args.tls_cert_file:
        tls = TlsFiles(args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if args.service_account_signing_key_file:
        with open(args.service_account_signing_key_file, "rb") as f:
            key = f.read().strip()
        issuer = args.service_account_issuer
        auth = AuthConfig(key, issuer=issuer, audiences=(issuer,))
    if args.kubeconfig_client_cert:
        user = KubeconfigUser(_read(args.kubeconfig_client_cert),
                              _read(args.kubeconfig_client_key))
    return tls, auth, user


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        tls, auth, user = security(args)
        config = ServerConfig(host=args.listen[0], port=args.listen[1],
                              netns=tuple(args.netns), history=args.history,
                              service_cidr=args.service_cidr,
                              node_port_range=args.node_port_range,
                              bookmark_interval=args.bookmark_interval,
                              state_file=args.state, tls=tls, auth=auth,
                              kubeconfig_user=user, pod_log_dir=args.pod_log_dir)
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
