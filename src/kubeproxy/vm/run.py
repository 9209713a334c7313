"""The host side of ``tools/vmrun``: settings, the command script, qemu, the verdict.

Theory of operation. ``run`` makes a run directory (shared with the guest at
``/run/vmrun``) holding ``command.sh`` (``command_script``: enter the caller's working
directory, exec argv with the allowlisted ``guest_env``), starts qemu (``qemu_argv``)
in its own session with ``PR_SET_PDEATHSIG``, and while it runs copies what the guest
appends to ``stdout`` and ``stderr`` in the run directory to its own stdout and
stderr. When qemu exits, the ``status`` file the guest wrote gives the exit code
(``exit_code``); no status means the guest failed (``EXIT_GUEST_FAILED``, with the end
of the kernel console). The time limit and SIGINT / SIGTERM / SIGHUP kill qemu by PID;
the run directory is removed afterwards, and directories of runs whose vmrun was
SIGKILLed are removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, NoReturn

from kubeproxy.errors import VmError
from kubeproxy.vm.image import Guest, ensure_guest, tool

EXIT_USAGE = 2  # a bad command line or VMRUN_* setting
EXIT_TIMEOUT = 124  # VMRUN_TIMEOUT passed and qemu was killed (as timeout(1))
EXIT_GUEST_FAILED = 125  # no guest, or it stopped without running the command (as docker run)
# The command itself: 126 cannot be executed, 127 not found, 128+N killed by signal N.

DEFAULT_TIMEOUT = 900.0

# Environment passed into the guest: these names, names with these prefixes, and the
# names listed in VMRUN_ENV (space separated). Anything else stays on the host.
ENV_NAMES = frozenset(
    {
        "PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONHASHSEED",
        "PYTHONWARNINGS", "PYTHONFAULTHANDLER", "VIRTUAL_ENV", "CI", "TERM", "LANG",
        "LANGUAGE", "TZ", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "PYTEST_ADDOPTS",
    }
)  # fmt: skip
ENV_PREFIXES = ("LC_", "KUBEPROXY_")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_TIME_SCALE = "20"  # KUBEPROXY_TIME_SCALE in the guest (lab/processes.py)


class UsageError(VmError):
    """A bad command line or VMRUN_* setting."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one run depends on, read from the environment once."""

    project: Path  # shared read-write, at the same path in the guest
    cache: Path
    timeout: float
    memory_mib: int = 2048
    cpus: int = 2
    accel: str = "tcg"
    keep: bool = False  # keep the run directory (console log) after the run
    debug: bool = False  # kernel messages to the console log, console log to stderr

    @classmethod
    def from_env(cls, env: Mapping[str, str], project: Path) -> Settings:
        def number(name: str, default: float) -> float:
            raw = env.get(name, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise UsageError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise UsageError(f"{name}={raw!r} must be positive")
            return value

        xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(
            project=Path(env.get("VMRUN_SHARE") or project).resolve(),
            cache=Path(env.get("VMRUN_CACHE") or Path(xdg) / "kubeproxy-vm"),
            timeout=number("VMRUN_TIMEOUT", DEFAULT_TIMEOUT),
            memory_mib=int(number("VMRUN_MEMORY", 2048)),
            cpus=int(number("VMRUN_CPUS", 2)),
            accel=env.get("VMRUN_ACCEL") or "tcg",
            keep=env.get("VMRUN_KEEP", "") not in ("", "0"),
            debug=env.get("VMRUN_DEBUG", "") not in ("", "0"),
        )


# ---------------------------------------------------------------- pure helpers


def guest_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of the caller's environment the command sees in the guest."""
    extra = set(environ.get("VMRUN_ENV", "").split())
    env = {
        k: v
        for k, v in environ.items()
        if k in ENV_NAMES or k in extra or k.startswith(ENV_PREFIXES)
    }
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(HOME="/root", USER="root", LOGNAME="root", VMRUN_GUEST="1")
    # The emulated CPU is 20-50x slower: programs that wait for their own processes
    # (the lab) scale their waits by this, unless the caller chose a factor.
    env.setdefault("KUBEPROXY_TIME_SCALE", GUEST_TIME_SCALE)
    return env


def command_script(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    """The script stage 2 runs: enter ``cwd``, exec ``argv`` with exactly ``env``.

    The command is started by the host's ``/usr/bin/env``, not by busybox's shell, which
    would run its own applets (``ip``, ``ls``...) instead of the host's programs.
    """
    if not argv or "=" in argv[0]:
        raise UsageError(f"cannot run {list(argv[:1])}: env(1) would take it for a variable")
    bad = sorted(k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
    if bad:
        raise UsageError(f"environment variable names {bad} cannot be passed")
    error = shlex.quote(f"error {EXIT_GUEST_FAILED} cannot enter {cwd} in the guest")
    assignments = [shlex.quote(f"{k}={v}") for k, v in sorted(env.items())]
    return (
        f"cd -- {shlex.quote(cwd)} || {{ echo {error} > /run/vmrun/status; exit; }}\n"
        f"exec /usr/bin/env -i -- {' '.join(assignments)} {shlex.join(argv)}\n"
    )


def qemu_option(**fields: str) -> str:
    """``key=value,...`` for a qemu option (``key`` alone for ""); commas in values doubled."""
    return ",".join(f"{k}={v.replace(',', ',,')}" if v else k for k, v in fields.items())


def kernel_cmdline(debug: bool) -> str:
    quiet = "loglevel=7" if debug else "quiet loglevel=3"
    return f"console=ttyS0 {quiet} panic=-1 mitigations=off random.trust_cpu=on"


def qemu_argv(settings: Settings, guest: Guest, rundir: Path) -> list[str]:
    """The qemu command line: no network, no display, four 9p shares, console to a file."""

    def share(tag: str, path: Path, readonly: bool) -> list[str]:
        fields = {"local": "", "path": str(path), "mount_tag": tag, "security_model": "none"}
        if readonly:
            fields["readonly"] = "on"
        return ["-virtfs", qemu_option(**fields, multidevs="remap")]

    return [
        "qemu-system-x86_64",
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", "q35", "-accel", settings.accel, "-cpu", "max",
        "-smp", str(settings.cpus), "-m", f"{settings.memory_mib}M",
        "-display", "none", "-monitor", "none", "-nic", "none",
        "-serial", "file:" + str(rundir / "console.log"),
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", kernel_cmdline(settings.debug),
        *share("hostroot", Path("/"), readonly=True),
        *share("modules", guest.modules, readonly=True),
        *share("vmrun", rundir, readonly=False),
        *share("project", settings.project, readonly=False),
    ]  # fmt: skip


def exit_code(status_text: str) -> tuple[int, str]:
    """The guest's status file -> (vmrun's exit code, message or "" for a plain exit)."""
    kind, _, value = status_text.strip().partition(" ")
    if kind == "exit" and value.isdigit():
        return int(value), ""
    code, _, message = value.partition(" ")
    if kind == "error" and code.isdigit():
        return int(code), message
    return EXIT_GUEST_FAILED, f"unreadable status from the guest: {status_text!r}"


# Console lines that say why a guest died; console_summary shows them even when they
# scrolled out of the tail (a panic's backtrace is long).
_CAUSE = re.compile(r"Kernel panic|vmrun-init:|BUG:|Oops|Out of memory|qemu-system|error", re.I)


def console_summary(console: str, tail: int = 20) -> list[str]:
    """The lines of a dead guest's console (and qemu's log) worth showing: causes, then the tail."""
    lines = console.splitlines()
    causes = [line for line in lines[:-tail] if _CAUSE.search(line)]
    return [*causes[:10], *(["..."] if causes else []), *lines[-tail:]]


# ---------------------------------------------------------------- running (I/O)


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> NoReturn:
    raise _Interrupted(signum)


def _die_with_parent() -> None:
    """In qemu's process before exec: have it SIGKILLed when vmrun dies, however it dies."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # vmrun died before prctl took effect
        os._exit(1)


class _Tail:
    """Copies what the guest appends to a file in the run directory to a host stream."""

    def __init__(self, path: Path, out: IO[bytes]) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 -- closed by close()
        self.out = out

    def pump(self) -> None:
        while chunk := self.file.read(1 << 20):
            self.out.write(chunk)
        self.out.flush()

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _run_directory(settings: Settings) -> Iterator[Path]:
    """A fresh directory under ``runs/`` of the cache, removed afterwards (unless kept).

    Each holds its owner's PID; directories whose owner is gone (vmrun was SIGKILLed)
    are removed by the next run.
    """
    runs = settings.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.glob("run-*"):
        with contextlib.suppress(OSError, ValueError):
            owner = int((old / "owner").read_text())
            if not Path(f"/proc/{owner}").exists():
                shutil.rmtree(old, ignore_errors=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    (rundir / "owner").write_text(f"{os.getpid()}\n")
    try:
        yield rundir
    finally:
        if settings.keep or settings.debug:
            (rundir / "owner").unlink()
            _say(f"run directory kept: {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)


def _prepare(rundir: Path, settings: Settings, argv: Sequence[str]) -> None:
    script = command_script(argv, guest_env(os.environ), os.getcwd())
    (rundir / "command.sh").write_bytes(script.encode("utf-8", "surrogateescape"))
    (rundir / "project").write_text(f"{settings.project}\n")
    for name in ("stdout", "stderr", "console.log"):
        (rundir / name).touch()


def _supervise(qemu: subprocess.Popen[bytes], tails: Sequence[_Tail], deadline: float) -> bool:
    """Forward output until qemu exits (True) or the deadline passes (False)."""
    while qemu.poll() is None:
        for tail in tails:
            tail.pump()
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    for tail in tails:
        tail.pump()
    return True


def run(argv: Sequence[str], settings: Settings) -> int:
    """Run ``argv`` in a fresh guest; the exit code for vmrun."""
    if not settings.project.is_dir() or "\n" in str(settings.project):
        raise UsageError(f"cannot share {str(settings.project)!r}: not a directory")
    qemu_binary = tool("qemu-system-x86_64")
    guest = ensure_guest(settings.cache)
    with _run_directory(settings) as rundir:
        _prepare(rundir, settings, argv)
        tails = [
            _Tail(rundir / "stdout", sys.stdout.buffer),
            _Tail(rundir / "stderr", sys.stderr.buffer),
        ]
        with open(rundir / "qemu.log", "wb") as log:
            qemu = subprocess.Popen(
                [qemu_binary, *qemu_argv(settings, guest, rundir)[1:]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            finished = _supervise(qemu, tails, time.monotonic() + settings.timeout)
        finally:
            if qemu.poll() is None:
                qemu.kill()  # by PID; a throwaway guest needs no clean shutdown
            qemu.wait()
            for tail in tails:
                tail.close()
        return _verdict(rundir, settings, finished)


def _verdict(rundir: Path, settings: Settings, finished: bool) -> int:
    console = (rundir / "console.log").read_text(errors="replace")
    if settings.debug:
        sys.stderr.write(console)
    if not finished:
        _say(f"timed out after {settings.timeout:g} s (VMRUN_TIMEOUT); the guest was killed")
        return EXIT_TIMEOUT
    try:
        status = (rundir / "status").read_text()
    except FileNotFoundError:
        qemu_log = (rundir / "qemu.log").read_text(errors="replace")
        _say("the guest stopped without an exit status for the command; its console:")
        sys.stderr.write("".join(f"  {line}\n" for line in console_summary(console + qemu_log)))
        return EXIT_GUEST_FAILED
    code, message = exit_code(status)
    if message:
        _say(message)
    return code


def _say(message: str) -> None:
    sys.stderr.write(f"vmrun: {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- command line

USAGE = """\
usage: tools/vmrun [--] CMD [ARGS...]   run CMD as root in a throwaway QEMU guest
       tools/vmrun --build [--rebuild]  only build (or rebuild) the cached guest image
exit status: CMD's; 124 timed out; 125 the guest failed; 2 bad usage
environment: VMRUN_TIMEOUT (seconds, default 900), VMRUN_ENV (more variable names to
pass in), VMRUN_CACHE, VMRUN_SHARE (the writable directory, default: this checkout),
VMRUN_MEMORY (MiB), VMRUN_CPUS, VMRUN_KEEP=1 (keep the run directory),
VMRUN_DEBUG=1 (kernel messages on stderr). See docs/vm.md.
"""


def _main(args: list[str], project: Path) -> int:
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else EXIT_USAGE
    settings = Settings.from_env(os.environ, project)
    if args[0] == "--build":
        if args[1:] not in ([], ["--rebuild"]):
            raise UsageError(f"unexpected arguments after --build: {args[1:]}")
        guest = ensure_guest(settings.cache, rebuild=args[1:] == ["--rebuild"])
        _say(f"guest image ready: kernel {guest.version} in {guest.kernel.parent}")
        return 0
    if args[0] == "--":
        args = args[1:]
    elif args[0].startswith("-"):
        raise UsageError(f"unknown option {args[0]} (put -- before a command starting with -)")
    if not args:
        raise UsageError("no command given")
    return run(args, settings)


def main(argv: Sequence[str] | None = None, project: Path | None = None) -> int:
    """tools/vmrun; ``project`` is the directory shared read-write (the checkout)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    try:
        return _main(args, project or Path.cwd())
    except VmError as err:
        _say(str(err))
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_GUEST_FAILED
    except _Interrupted as stop:
        _say(f"stopped by {signal.Signals(stop.signum).name}; the guest was killed")
        return 128 + stop.signum
    except BrokenPipeError:  # our reader went away; the guest was killed on the way out
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
