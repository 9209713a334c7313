"""Issue 11's "done when": the lab real-packet suites, their proxies from deploy/.

Each case runs the mode-parametrized real-packet modules (``SUITES``) for the modes a
DaemonSet can serve here (``-k "iptables or nftables"``) in a pytest of its own, with
``KUBEPROXY_TEST_PROXIES`` set (tests/kernel/conftest.py): every lab comes up with
``--no-proxy`` and gets the unmodified deploy/ manifests (``deploy``), or deploy/ with
kubeadm's own ConfigMap (``kubeadm``), through real kubectl. The inner run must pass
with every selected test run: nothing skipped, nothing failed, the same tests as the
suites hold for these modes.

Measured on the shared 2-core machine: 81-117 s per run (54 tests), about what the same
modules take with the lab's own proxies (111 s then).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kubeproxy import modes
from kubeproxy.dataplane.base import SubprocessRunner
from tests.kernel.conftest import (
    PROXIES_ENV,
    ROOT,
    image_skip_reason,
    kubectl_skip_reason,
    proxy_source,
)

pytestmark = pytest.mark.kernel

SUITES = [f"tests/kernel/test_lab_{m}.py" for m in ("services", "nodes", "changes", "nodeports",
                                                    "faults")] + ["tests/kernel/test_flush.py"]
MODES = ("iptables", "nftables")  # what a DaemonSet serves here (conftest: not socket LB)
# Stops and starts the lab's own proxy processes around changes: not a DaemonSet's.
OWN_PROXIES = "test_proxy_restart_converges_with_no_stale_rules"
SELECT = f"({' or '.join(MODES)}) and not {OWN_PROXIES}"
TIMEOUT = 1800  # seconds, per run: far above the measured ~2 minutes


@pytest.fixture(autouse=True)
def needs() -> None:
    reason = kubectl_skip_reason()
    if reason:
        pytest.skip(reason)
    for mode in MODES:
        reason = modes.get(mode).kernel_support(SubprocessRunner())
        if reason:
            pytest.skip(f"{mode} mode: {reason}")
    if proxy_source() != "lab":
        pytest.skip(f"{PROXIES_ENV} is set: this test sets it for the suites it runs")


def pytest_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
            "-k", SELECT, *args, *SUITES]  # fmt: skip
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)  # fmt: skip


def collected() -> set[str]:
    """The test ids the suites select for these modes (collection only)."""
    done = pytest_run(dict(os.environ), "--collect-only")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = {line for line in done.stdout.splitlines() if "::" in line}
    assert ids, done.stdout[-3000:]
    return ids


@pytest.mark.parametrize("source", ["deploy", "kubeadm", "image"])
def test_real_packet_suites_pass_with_proxies_from_deploy(tmp_path: Path, source: str) -> None:
    if source == "image" and (reason := image_skip_reason()):
        pytest.skip(reason)
    want = collected()
    report = tmp_path / "junit.xml"
    env = {**os.environ, PROXIES_ENV: source}
    done = pytest_run(env, f"--junitxml={report}")
    output = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    cases = ET.parse(report).getroot().iter("testcase")
    ran, skipped, failed = set(), [], []
    for case in cases:
        path = case.get("classname", "").replace(".", "/")
        ran.add(f"{path}.py::{case.get('name')}")
        if case.find("skipped") is not None:
            skipped.append(case.get("name"))
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name"))
    assert (skipped, failed) == ([], []), output
    assert ran == want, (sorted(want - ran), sorted(ran - want))
