"""IPVS mode's kernel tests, in one throwaway guest whose kernel has IPVS (docs/ipvs.md).

This machine's kernel has no ip_vs module, so every kernel test of IPVS mode skips here
(``Mode.kernel_support`` says why). This test runs them inside one guest boot
(``tools/vmrun .venv/bin/pytest ...``) and passes when they passed there: the data plane's
own tests (tests/kernel/test_ipvs_dataplane.py) and the lab's real-packet tests for
``ipvs`` (``-k ipvs`` collects only IPVS mode's parameter of the mode-parametrized
modules, so "nothing skipped" means every one of them ran):

========================  ====================================================================
module                    what it proves for IPVS mode
========================  ====================================================================
test_lab_services         ClusterIP spread, NodePort / external IP / LB IP from outside,
                          hairpin, UDP, no endpoints refused (pod, node, UDP), source ranges,
                          session affinity, eTP=Local falling back to the cluster endpoints,
                          unused ports of a ClusterIP refused
test_lab_nodes            cross-node spread; eTP=Local keeps the client address; iTP=Local
test_lab_changes          readiness and termination followed; rr spreads n requests exactly
                          n/k
test_flush                a flushed KUBE-SERVICES and a deleted kube-ipvs0 are restored
test_mode_switch          ipvs -> iptables -> ipvs: each start removes what the other mode left
                          (virtual servers, kube-ipvs0, ipsets; KUBE-SVC-/SEP-/...), the
                          Service answers from the endpoint the new mode was given
========================  ====================================================================

It skips, saying why, where no guest can run.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.vm.guest import run_in_guest

pytestmark = pytest.mark.vm
# TCG on a busy 2-core machine: the lab tests alone took ~30 min (each lab up ~5 min),
# the data-plane tests ~15 min more; boot included.
TIMEOUT = 4200.0
FILES = [
    "tests/kernel/test_ipvs_dataplane.py",
    "tests/kernel/test_lab_services.py",
    "tests/kernel/test_lab_nodes.py",
    "tests/kernel/test_lab_changes.py",
    "tests/kernel/test_flush.py",
    "tests/kernel/test_mode_switch.py",
]
# Tests each file must have run for ipvs (at least): a -k that matches nothing, or a
# file that stopped parametrizing by mode, must not pass as "nothing skipped".
AT_LEAST = 42  # 13 data-plane tests, 28 lab tests (2026-12-01), 1 mode switch


def test_ipvs_kernel_and_lab_tests_pass_in_the_guest(tag: str) -> None:
    started = time.monotonic()
    done = run_in_guest(
        [".venv/bin/pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "ipvs", *FILES],
        timeout=TIMEOUT, tag=tag)
    out = done.stdout.decode(errors="replace")
    print(f"guest run: {time.monotonic() - started:.0f} s; {out.strip().splitlines()[-1:]}")
    assert done.returncode == 0, out[-6000:] + done.stderr.decode(errors="replace")[-3000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= AT_LEAST, out[-3000:]
    assert "skipped" not in out and "deselected" in out, out[-3000:]
