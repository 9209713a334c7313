"""The one adapter over iproute2: network namespaces, links, addresses, routes, sysctls.

Every command either names a lab namespace (``ip -n kpl-...``, ``ip netns exec kpl-...``)
or manages lab namespaces themselves (``ip netns add/del/pids kpl-...``). The guard
``lab_namespace`` refuses any other name, so nothing here can touch the machine's root namespace
or another tool's namespaces. Commands go through a ``Execute`` so tests can record them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

from kubeproxy.lab.errors import CommandError

LAB_NS_PREFIX = "kpl-"


class Execute(Protocol):
    def __call__(self, argv: Sequence[str], *, input: str | None = None) -> str:
        """Run argv; return stdout; raise CommandError on a non-zero exit."""


def run(argv: Sequence[str], *, input: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise CommandError(list(argv), proc.returncode, proc.stderr)
    return proc.stdout


def lab_namespace(ns: str) -> str:
    """ns itself if it is a lab namespace; ValueError otherwise."""
    if not ns.startswith(LAB_NS_PREFIX) or "/" in ns or len(ns) <= len(LAB_NS_PREFIX):
        raise ValueError(f"refusing to touch namespace {ns!r}: not a lab namespace")
    return ns


class Netns:
    """iproute2, restricted to lab namespaces."""

    def __init__(self, runner: Execute = run) -> None:
        self._run = runner

    # -- namespaces

    def list_namespaces(self, prefix: str = LAB_NS_PREFIX) -> list[str]:
        """Names of existing namespaces that start with prefix (a lab prefix)."""
        lab_namespace(prefix + "x")
        out = self._run(["ip", "netns", "list"])
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return sorted(n for n in names if n.startswith(prefix))

    def add(self, ns: str) -> None:
        self._run(["ip", "netns", "add", lab_namespace(ns)])
        self._run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def delete(self, ns: str) -> None:
        self._run(["ip", "netns", "delete", lab_namespace(ns)])

    def pids(self, ns: str) -> list[int]:
        out = self._run(["ip", "netns", "pids", lab_namespace(ns)])
        return [int(x) for x in out.split() if x.isdigit()]

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs argv inside ns (for callers that manage the process)."""
        return ["ip", "netns", "exec", lab_namespace(ns), *argv]

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self._run(self.exec_argv(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))

    # -- links

    def add_bridge(self, ns: str, name: str, address: str | None = None) -> None:
        """A bridge, up; with ``address`` its MAC address is fixed (it does not follow
        its ports')."""
        self._ip(ns, "link", "add", name, *(("address", address) if address else ()),
                 "type", "bridge")
        self.up(ns, name)

    def add_veth(self, ns: str, name: str, peer_ns: str, peer_name: str) -> None:
        """A veth pair: name in ns, peer_name in peer_ns (created there directly)."""
        self._ip(
            ns, "link", "add", name, "type", "veth", "peer", "name", peer_name,
            "netns", lab_namespace(peer_ns),
        )  # fmt: skip

    def set_master(self, ns: str, dev: str, bridge: str) -> None:
        self._ip(ns, "link", "set", dev, "master", bridge)

    def set_hairpin(self, ns: str, dev: str) -> None:
        """Let the bridge send a frame back out of the port it came in on."""
        self._ip(ns, "link", "set", dev, "type", "bridge_slave", "hairpin", "on")

    def up(self, ns: str, dev: str) -> None:
        self._ip(ns, "link", "set", dev, "up")

    def add_address(self, ns: str, dev: str, cidr: str) -> None:
        self._ip(ns, "addr", "add", cidr, "dev", dev)

    def add_route(
        self,
        ns: str,
        dst: str,
        *,
        via: str | None = None,
        dev: str | None = None,
        src: str | None = None,
    ) -> None:
        argv = ["route", "add", dst]
        if via:
            argv += ["via", via]
        if dev:
            argv += ["dev", dev]
        if src:
            argv += ["src", src]
        self._ip(ns, *argv)

    def del_route(self, ns: str, dst: str) -> None:
        self._ip(ns, "route", "del", dst)

    def flush_neighbor(self, ns: str, ip: str, dev: str) -> None:
        self._ip(ns, "neigh", "flush", "to", ip, "dev", dev)

    def routes(self, ns: str) -> list[str]:
        """``ip -4 route show`` lines of ns."""
        return [line for line in self._ip(ns, "-4", "route", "show").splitlines() if line]

    def exists(self, ns: str) -> bool:
        return lab_namespace(ns) in self.list_namespaces(ns)

    def _ip(self, ns: str, *argv: str) -> str:
        return self._run(["ip", "-n", lab_namespace(ns), *argv])
