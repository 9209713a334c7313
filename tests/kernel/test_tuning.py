"""Node tuning and legacy-table cleanup against the real kernel, inside a network
namespace this test creates (per-namespace conntrack sysctls only; the global
nf_conntrack_max and hashsize are never written here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeproxy.dataplane.base import NetnsRunner
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.modes.iptables import cleanup
from tests.kernel.conftest import scratch_namespace

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_namespace() as name:
        yield name


def in_ns(ns: str, code: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


TUNE = """
from kubeproxy.app import tuning
s = tuning.ProcSysctl()
settings = tuning.Settings(tcp_established_timeout=7777, tcp_close_wait_timeout=555,
                           udp_timeout=17, tcp_be_liberal=True, oom_score_adj=None)
writes, notes = tuning.plan(settings, s, cpus=tuning.cpu_count(),
                            host_netns=tuning.in_host_netns())
assert all("nf_conntrack_max" not in w.key and "hashsize" not in w.key for w in writes)
print(tuning.apply(writes, s), tuning.in_host_netns())
for key in ("established", "close_wait"):
    print(s.read("net/netfilter/nf_conntrack_tcp_timeout_" + key))
print(s.read("net/netfilter/nf_conntrack_udp_timeout"), s.read(tuning.BE_LIBERAL))
"""


def test_conntrack_timeouts_in_a_namespace(netns: str) -> None:
    if not Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established").exists():
        pytest.skip("nf_conntrack is not loaded on this host")
    host = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established").read_text()
    out = in_ns(netns, TUNE).splitlines()
    assert out == ["[] False", "7777", "555", "17 1"]
    # per-namespace: the host's value is untouched
    assert Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"
                ).read_text() == host


def test_cleanup_leaves_no_legacy_tables(netns: str) -> None:
    runner = NetnsRunner(netns)
    if runner.run(["iptables-legacy-save"]).returncode != 0:
        pytest.skip("iptables-legacy is not usable here")
    cleanup(runner, PlaneOptions())
    names = runner.run(["cat", "/proc/net/ip_tables_names"])
    assert names.stdout.split() == [], "cleanup created legacy tables"
