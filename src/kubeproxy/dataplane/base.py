"""The seam between the pure core and the kernel: running commands.

Every data plane talks to the kernel only through a :class:`Runner`; the real one
executes binaries, the fake one (in tests) checks and records what would run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kubeproxy.errors import DataPlaneError

__all__ = ["DataPlaneError", "Keep", "NetnsRunner", "Result", "Runner", "SubprocessRunner",
           "check", "not_installed"]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Keep:
    """What a cleanup of one mode's iptables chains leaves in place because the mode now
    starting writes it under the same name (the iptables and ipvs modes share
    KUBE-SERVICES, KUBE-POSTROUTING & co): each chain of ``chains`` (table, chain) stays,
    without the rules that lead into what the cleanup removes; each rule of ``rules``
    (table, its iptables-save line) is a jump from a builtin chain the starting mode
    writes too, and stays. Empty: remove everything (``--cleanup``, nftables starting)."""

    chains: frozenset[tuple[str, str]] = frozenset()
    rules: frozenset[tuple[str, str]] = frozenset()


class Runner(Protocol):
    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result: ...


class SubprocessRunner:
    """Runs commands for real, in the network namespace this process is in."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        try:
            done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except FileNotFoundError as err:
            raise DataPlaneError(f"{argv[0]}: not installed") from err
        except subprocess.TimeoutExpired as err:
            raise DataPlaneError(f"{' '.join(argv)}: timed out after {self.timeout}s") from err
        return Result(done.returncode, done.stdout, done.stderr)


class NetnsRunner:
    """Runs commands inside one named network namespace (``ip netns exec NS``)."""

    def __init__(self, ns: str, timeout: float = 120.0) -> None:
        self.ns = ns
        self.inner = SubprocessRunner(timeout=timeout)

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        return self.inner.run(["ip", "netns", "exec", self.ns, *argv], stdin)


def not_installed(err: DataPlaneError) -> bool:
    """Whether ``err`` says a command's binary is missing (SubprocessRunner's words)."""
    return str(err).endswith(": not installed")


def check(runner: Runner, argv: Sequence[str], stdin: str | None = None) -> str:
    """Run and return stdout; raise DataPlaneError naming the command on failure."""
    res = runner.run(argv, stdin)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise DataPlaneError(f"{' '.join(argv)} failed (exit {res.returncode}): "
                             + " | ".join(detail[-5:]))
    return res.stdout
