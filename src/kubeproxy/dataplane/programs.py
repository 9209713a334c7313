"""What the proxy runs on a node, and the Debian package each piece comes from.

The proxy's image (deploy/Dockerfile) must carry all of it: a data plane that calls a
binary the image lacks fails only on a real node, at its first sync. So the programs
live in one literal table here, and tests/unit/test_image.py holds both ends to it:
every program name the proxy's modules pass to a Runner, ``check()`` or subprocess
(an AST walk of everything but lab/, apiserver/, vm/ and testing/, which never run in
the image), every name ``dataplane.iptables.binaries()`` builds, and every library
loaded with ctypes is a row; and every row's package is installed by the Dockerfile's
final stage. Nothing imports this module: it is the image's contract, not code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# argv[0] -> Debian package (bookworm). Rows are grouped by who runs them.
PROGRAMS: Final[Mapping[str, str]] = {
    # iptables mode (and the ipvs mode's small iptables layout): binaries(family,
    # backend) names one of both backends, both families; the node's backend is
    # detected as upstream's iptables-wrapper does, so the image needs both.
    "iptables-legacy": "iptables",
    "iptables-legacy-save": "iptables",
    "iptables-legacy-restore": "iptables",
    "ip6tables-legacy": "iptables",
    "ip6tables-legacy-save": "iptables",
    "ip6tables-legacy-restore": "iptables",
    "iptables-nft": "iptables",
    "iptables-nft-save": "iptables",
    "iptables-nft-restore": "iptables",
    "ip6tables-nft": "iptables",
    "ip6tables-nft-save": "iptables",
    "ip6tables-nft-restore": "iptables",
    # nftables and ebpf modes write over netlink; `nft list` reads a table back.
    "nft": "nftables",
    # stale UDP conntrack entries, deleted after a sync (dataplane/conntrack.py)
    "conntrack": "conntrack",
    # ipvs mode: its ipsets
    "ipset": "ipset",
    # ipvs mode: the kube-ipvs0 dummy link and its addresses; NetnsRunner's `ip netns exec`
    "ip": "iproute2",
    # route_localnet for localhost NodePorts (iptables), the ipvs mode's conntrack sysctls
    "sysctl": "procps",
    # ipvs mode: load ip_vs when /proc/net/ip_vs is missing
    "modprobe": "kmod",
    # /proc reads through the Runner (legacy table listing, IPVS presence, netns inode)
    "cat": "coreutils",
    "test": "coreutils",
    "stat": "coreutils",
}

# Shared libraries loaded with ctypes.CDLL(name) -> Debian package.
LIBRARIES: Final[Mapping[str, str]] = {
    "libbpf.so.1": "libbpf1",  # ebpf mode: loads and attaches bpf/sock_lb.o (bpf_sys.py)
}
