"""The IPVS kernel tests, in one throwaway guest whose kernel has IPVS (docs/ipvs.md).

This machine's kernel has no ip_vs module, so tests/kernel/test_ipvs_*.py skip here; this
test runs them all inside one guest boot (``tools/vmrun .venv/bin/pytest ...``) and
passes when they passed there. It skips, saying why, where no guest can run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.guest import CHECKOUT, run_in_guest

pytestmark = pytest.mark.vm
TIMEOUT = 3600.0  # TCG: the suite takes ~15 min on a busy 2-core machine


def test_ipvs_kernel_suite_passes_in_the_guest(tag: str) -> None:
    files = sorted(str(p.relative_to(CHECKOUT))
                   for p in Path(CHECKOUT, "tests", "kernel").glob("test_ipvs_*.py"))
    assert files, "no IPVS kernel tests found"
    done = run_in_guest([".venv/bin/pytest", "-q", "-p", "no:cacheprovider", "-rs", *files],
                        timeout=TIMEOUT, tag=tag)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out[-6000:] + done.stderr.decode(errors="replace")[-3000:]
    assert " passed" in out and "skipped" not in out, out[-3000:]
