"""Helpers for tests that run commands in a throwaway QEMU guest (tools/vmrun).

``skip_reason()`` says why no guest can run here (or None); ``require_guest()`` skips
the calling test with that reason and otherwise builds the guest image once (a failed
build fails the test rather than skipping it). ``run_in_guest(argv, timeout)`` runs
argv as root in a fresh guest, with this checkout writable at its own path and the
caller's working directory, and returns the CompletedProcess (stdout and stderr as
bytes, returncode as tools/vmrun exits: the command's status, EXIT_TIMEOUT,
EXIT_GUEST_FAILED).

Every run carries ``TAG_VARIABLE`` in its environment (which qemu inherits), so that
``live_processes(tag)`` finds anything a run left behind, by PID.
"""

from __future__ import annotations

import functools
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from kubeproxy.vm.run import EXIT_GUEST_FAILED, EXIT_TIMEOUT

CHECKOUT = Path(__file__).resolve().parents[2]
VMRUN = CHECKOUT / "tools" / "vmrun"
TAG_VARIABLE = "KUBEPROXY_VMTEST_TAG"  # in the environment of vmrun and qemu (host side)
BUILD_TIMEOUT = 900.0  # first use: download and unpack the kernel package
GRACE = 60.0  # how long past VMRUN_TIMEOUT before the test gives up on vmrun itself

__all__ = [
    "CHECKOUT", "EXIT_GUEST_FAILED", "EXIT_TIMEOUT", "VMRUN", "live_processes",
    "new_tag", "require_guest", "run_in_guest", "skip_reason",
]  # fmt: skip


@functools.cache
def skip_reason() -> str | None:
    """Why a guest cannot run on this machine, or None."""
    if os.environ.get("VMRUN_GUEST"):
        return "already inside a tools/vmrun guest (no nested guests)"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "the QEMU guest boots this x86_64 Linux host's own userspace"
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (`make vm` as root installs what the guest needs)"
    return None


@functools.cache
def _built() -> None:
    proc = subprocess.run(
        [sys.executable, str(VMRUN), "--build"],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"tools/vmrun --build failed:\n{proc.stderr}", pytrace=False)


def require_guest() -> None:
    """Skip the calling test where no guest can run; build the guest image once."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    _built()


def new_tag() -> str:
    return "kpt-" + secrets.token_hex(6)


def run_in_guest(
    argv: Sequence[str],
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    tag: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as root in a fresh guest (VMRUN_TIMEOUT=timeout); bytes out."""
    full_env = {**os.environ, **(env or {}), "VMRUN_TIMEOUT": f"{timeout:g}"}
    full_env[TAG_VARIABLE] = tag or new_tag()
    with subprocess.Popen(
        [sys.executable, str(VMRUN), *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=full_env, cwd=cwd or CHECKOUT,
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout + GRACE)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # vmrun kills its qemu and exits
            proc.communicate(timeout=GRACE)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def live_processes(tag: str) -> list[int]:
    """PIDs of running (not zombie) processes whose environment holds ``tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if needle in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found
