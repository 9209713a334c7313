"""tools/vmrun end to end: each test boots a throwaway QEMU guest (about 6 s each here).

What a caller relies on: the command's exit status comes back (also for a signal), its
stdout and stderr arrive separately and byte for byte, the checkout is writable from the
guest and the caller's working directory is kept, the guest has its own kernel's modules
(IPVS) and may create namespaces, a time limit or a crash gives a distinct status with a
``vmrun:`` message, and no qemu outlives a run, even when vmrun is killed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guest import (
    CHECKOUT,
    EXIT_GUEST_FAILED,
    EXIT_TIMEOUT,
    TAG_VARIABLE,
    VMRUN,
    live_processes,
    run_in_guest,
)

pytestmark = pytest.mark.vm

# (name, argv, exit status vmrun must return); status 0 is checked by every other test
EXIT_CASES = [
    ("exit 3", ["sh", "-c", "exit 3"], 3),
    ("killed by SIGKILL", ["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
    ("no such command", ["kpt-no-such-command"], 127),
]


@pytest.mark.parametrize(
    ("argv", "status"), [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES]
)
def test_exit_status_is_the_commands(tag: str, argv: list[str], status: int) -> None:
    assert run_in_guest(argv, timeout=300, tag=tag).returncode == status


# Two different byte streams, with every byte value and no final newline, written in
# alternating chunks so that mixing them up would show.
OUT = bytes(range(256)) * 4096 + b"end of stdout"  # 1 MiB + 13 bytes
ERR = bytes(reversed(range(256))) * 1024 + b"\r\n\0end of stderr"
WRITER = """
import sys
out, err = sys.stdout.buffer, sys.stderr.buffer
o, e = bytes(range(256)) * 4096 + b"end of stdout", bytes(reversed(range(256))) * 1024
e += b"\\r\\n\\0end of stderr"
for i in range(0, max(len(o), len(e)), 65536):
    out.write(o[i:i + 65536]); out.flush(); err.write(e[i:i + 65536]); err.flush()
"""


def test_stdout_and_stderr_arrive_apart_and_byte_exact(tag: str) -> None:
    proc = run_in_guest([sys.executable, "-c", WRITER], timeout=300, tag=tag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout) == len(OUT) and proc.stdout == OUT
    assert len(proc.stderr) == len(ERR) and proc.stderr == ERR


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory in the checkout (the guest's writable share), removed afterwards."""
    path = CHECKOUT / f".vmrun-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_checkout_is_writable_cwd_kept_environment_allowlisted(tag: str, scratch: Path) -> None:
    env = {"CI": "true", "KUBEPROXY_X": "a b\nc", "VMRUN_ENV": "KPT_EXTRA", "KPT_EXTRA": "1"}
    env["KPT_SECRET"] = "stays on the host"
    script = "pwd; id -u; echo written in the guest > made-here.txt; env -0 > env.bin"
    proc = run_in_guest(["sh", "-c", script], timeout=300, env=env, cwd=scratch, tag=tag)
    assert (proc.returncode, proc.stdout) == (0, f"{scratch}\n0\n".encode()), proc.stderr
    assert (scratch / "made-here.txt").read_text() == "written in the guest\n"
    environ = (scratch / "env.bin").read_bytes().decode().split("\0")
    seen = dict(item.split("=", 1) for item in environ if item)
    assert {k: seen.get(k) for k in ("CI", "KUBEPROXY_X", "KPT_EXTRA", "KPT_SECRET")} == {
        "CI": "true", "KUBEPROXY_X": "a b\nc", "KPT_EXTRA": "1", "KPT_SECRET": None,
    }  # fmt: skip
    assert seen["PATH"] == os.environ["PATH"] and seen["VMRUN_GUEST"] == "1"


def test_guest_loads_ipvs_and_makes_namespaces(tag: str) -> None:
    script = """set -e
    modprobe ip_vs && modprobe ip_vs_rr && modprobe ip_vs_wrr && modprobe ip_vs_sh
    cat /proc/net/ip_vs
    ip netns add kpt-vm
    ip link add kpt-a type veth peer name kpt-b netns kpt-vm
    ip link set kpt-a up && ip -n kpt-vm link set kpt-b up
    ip -n kpt-vm -br link show kpt-b >&2
    """
    proc = run_in_guest(["sh", "-c", script], timeout=300, tag=tag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"IP Virtual Server version"), proc.stdout
    assert proc.stderr.startswith(b"kpt-b@"), proc.stderr


def test_timeout_kills_the_guest_with_its_own_status(tag: str) -> None:
    proc = run_in_guest(["sleep", "600"], timeout=10, tag=tag)
    assert proc.returncode == EXIT_TIMEOUT
    assert b"vmrun: timed out after 10 s" in proc.stderr


def test_guest_crash_has_its_own_status_and_shows_the_console(tag: str) -> None:
    proc = run_in_guest(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=300, tag=tag)
    assert proc.returncode == EXIT_GUEST_FAILED
    assert b"vmrun: the guest stopped without an exit status" in proc.stderr
    assert b"Kernel panic" in proc.stderr


def _qemu_child(vmrun: subprocess.Popen[bytes], deadline: float) -> int:
    """The PID of vmrun's qemu, once it runs."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except (OSError, NotADirectoryError):
                continue
            name, rest = stat.split(" (", 1)[1].rsplit(") ", 1)
            if rest.split()[1] == str(vmrun.pid) and name.startswith("qemu-system"):
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError("vmrun started no qemu")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_vmrun_kills_qemu(tag: str, signum: int) -> None:
    env = {**os.environ, TAG_VARIABLE: tag, "VMRUN_TIMEOUT": "300"}
    with subprocess.Popen(
        [sys.executable, str(VMRUN), "sleep", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    ) as vmrun:  # fmt: skip
        try:
            qemu = _qemu_child(vmrun, time.monotonic() + 60)
            vmrun.send_signal(signum)
            _, stderr = vmrun.communicate(timeout=60)
        finally:
            if vmrun.poll() is None:
                vmrun.kill()
    assert vmrun.returncode == (-signum if signum == signal.SIGKILL else 128 + signum)
    if signum != signal.SIGKILL:
        assert f"vmrun: stopped by {signal.Signals(signum).name}".encode() in stderr
    deadline = time.monotonic() + 10
    while not _gone(qemu) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(qemu), f"qemu {qemu} outlived vmrun"
    assert live_processes(tag) == []
