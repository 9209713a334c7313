"""The pure parts of tools/vmrun, without a guest: tables of named cases.

The command script is also run for real by the host's shells (as the guest's busybox
shell would run it), since its quoting is what carries argv and the environment across.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from kubeproxy.errors import VmError
from kubeproxy.vm.image import Guest, load_order, newc_archive, vmlinux
from kubeproxy.vm.run import (
    DEFAULT_PATH,
    EXIT_GUEST_FAILED,
    GUEST_TIME_SCALE,
    Settings,
    UsageError,
    command_script,
    console_summary,
    exit_code,
    guest_env,
    qemu_argv,
    qemu_option,
)

# (name, caller's environment, what the guest sees besides HOME/USER/LOGNAME/VMRUN_GUEST)
P = {"PATH": DEFAULT_PATH}  # what the guest gets when the caller has no PATH
ENV_CASES = [
    ("allowlisted names pass", {"PATH": "/x", "CI": "1", "SECRET": "s"}, {"PATH": "/x", "CI": "1"}),
    ("prefixes", {"LC_ALL": "C", "KUBEPROXY_X": "1"}, {**P, "LC_ALL": "C", "KUBEPROXY_X": "1"}),
    ("VMRUN_ENV adds names", {"VMRUN_ENV": "A B", "A": "1", "C": "3"}, {**P, "A": "1"}),
    ("HOME is the guest's", {"HOME": "/home/u", "PATH": "/p"}, {"PATH": "/p"}),
    ("the caller's time scale", {"KUBEPROXY_TIME_SCALE": "5"},
     {**P, "KUBEPROXY_TIME_SCALE": "5"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("environ", "seen"), [c[1:] for c in ENV_CASES], ids=[c[0] for c in ENV_CASES]
)
def test_guest_env(environ: dict[str, str], seen: dict[str, str]) -> None:
    fixed = {"HOME": "/root", "USER": "root", "LOGNAME": "root", "VMRUN_GUEST": "1",
             "KUBEPROXY_TIME_SCALE": GUEST_TIME_SCALE}
    assert guest_env(environ) == {**fixed, **seen}


SHELLS = [["sh"]] + ([["busybox", "sh"]] if shutil.which("busybox") else [])
TRICKY_ARGS = ["a b", "it's", 'say "hi"', "x\ny", "$HOME", "`id`", "-", "--", "é", ""]


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_command_script_carries_argv_env_and_cwd_exactly(shell: list[str], tmp_path: Path) -> None:
    env = {"PATH": DEFAULT_PATH, "V": "a 'b'\n$c", "EMPTY": ""}
    argv = ["sh", "-c", 'pwd; printf "%s\\0" "$@"; env -0', "sh", *TRICKY_ARGS]
    script = command_script(argv, env, str(tmp_path))
    out = subprocess.run([*shell, "-c", script], capture_output=True, check=True).stdout
    cwd, rest = out.decode().split("\n", 1)
    fields = rest.split("\0")[:-1]
    args, environment = fields[: len(TRICKY_ARGS)], fields[len(TRICKY_ARGS) :]
    assert cwd == str(tmp_path)
    assert args == TRICKY_ARGS
    assert dict(kv.split("=", 1) for kv in environment if not kv.startswith("PWD=")) == env


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["a=b"], {}), ([], {}), (["true"], {"BAD-NAME": "x"}), (["true"], {"1X": "x"})],
    ids=["argv0 with =", "no argv", "dash in a name", "name starts with a digit"],
)
def test_command_script_refuses(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        command_script(argv, env, "/")


# (name, status file, (exit code, message))
STATUS_CASES = [
    ("exit 0", "exit 0\n", (0, "")),
    ("exit 3", "exit 3\n", (3, "")),
    ("killed, as the shell reports it", "exit 137\n", (137, "")),
    ("error from the guest", "error 125 cannot enter /x y\n", (125, "cannot enter /x y")),
    ("garbage", "what\n", (EXIT_GUEST_FAILED, "unreadable status from the guest: 'what\\n'")),
    ("empty", "", (EXIT_GUEST_FAILED, "unreadable status from the guest: ''")),
]


@pytest.mark.parametrize(
    ("text", "result"), [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES]
)
def test_exit_code(text: str, result: tuple[int, str]) -> None:
    assert exit_code(text) == result


def test_console_summary_keeps_the_cause_that_scrolled_away() -> None:
    console = [
        "[1] booting",
        "[2] Kernel panic - not syncing: x",
        *(f"[t] frame {i}" for i in range(30)),
    ]
    summary = console_summary("\n".join(console), tail=5)
    assert summary == ["[2] Kernel panic - not syncing: x", "...", *console[-5:]]
    assert console_summary("a\nb", tail=5) == ["a", "b"]


def test_qemu_option_doubles_commas() -> None:
    assert qemu_option(local="", path="/a,b", readonly="on") == "local,path=/a,,b,readonly=on"


def test_qemu_argv_has_no_network_and_four_shares(tmp_path: Path) -> None:
    settings = Settings(project=Path("/w,x"), cache=tmp_path, timeout=5)
    guest = Guest(Path("/k"), Path("/i"), Path("/m"), "6.1.0")
    argv = qemu_argv(settings, guest, tmp_path / "run")
    shares = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    assert argv[argv.index("-nic") + 1] == "none" and "-nodefaults" in argv
    assert [s.split("mount_tag=")[1].split(",")[0] for s in shares] == [
        "hostroot",
        "modules",
        "vmrun",
        "project",
    ]
    assert ["readonly=on" in s for s in shares] == [True, True, False, False]
    assert "path=/w,,x," in shares[3]


# (name, environment, field -> expected value, or an error)
SETTINGS_CASES = [
    ("defaults", {}, {"timeout": 900.0, "memory_mib": 2048, "cpus": 2, "keep": False}),
    ("overrides", {"VMRUN_TIMEOUT": "1.5", "VMRUN_CPUS": "1", "VMRUN_KEEP": "1"},
     {"timeout": 1.5, "cpus": 1, "keep": True}),
    ("cache", {"VMRUN_CACHE": "/c"}, {"cache": Path("/c")}),
    ("xdg cache", {"XDG_CACHE_HOME": "/x"}, {"cache": Path("/x/kubeproxy-vm")}),
    ("not a number", {"VMRUN_TIMEOUT": "soon"}, UsageError),
    ("not positive", {"VMRUN_MEMORY": "0"}, UsageError),
]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"), [c[1:] for c in SETTINGS_CASES], ids=[c[0] for c in SETTINGS_CASES]
)
def test_settings_from_env(env: dict[str, str], expected: object) -> None:
    if expected is UsageError:
        with pytest.raises(UsageError):
            Settings.from_env(env, Path("/p"))
        return
    assert isinstance(expected, dict)
    settings = Settings.from_env(env, Path("/p"))
    assert {k: getattr(settings, k) for k in expected} == expected


MODULES_DEP = """\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
"""
# (name, wanted, load order as file names)
ORDER_CASES = [
    ("dependencies first, each once", ["9p", "9pnet"],
     ["9pnet.ko", "netfs.ko", "fscache.ko", "9p.ko"]),
    ("a dash in the file name", ["virtio_rng"], ["virtio.ko", "virtio-rng.ko"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("wanted", "order"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
def test_load_order(wanted: list[str], order: list[str]) -> None:
    assert [Path(p).name for p in load_order(MODULES_DEP, wanted)] == order


def test_load_order_names_a_missing_module() -> None:
    with pytest.raises(VmError, match="ip_vs"):
        load_order(MODULES_DEP, ["ip_vs"])


def _read_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, mode, rdev major, data) of each entry, checking magic and alignment."""
    entries: list[tuple[str, int, int, bytes]] = []
    at = 0
    while True:
        assert data[at : at + 6] == b"070701" and at % 4 == 0
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[at + 110 : at + 110 + namesize - 1].decode()
        start = at + 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            assert len(data) == start  # nothing after the trailer
            return entries
        entries.append((name, fields[1], fields[9], data[start : start + size]))
        at = start + size + (-size % 4)


def test_newc_archive_round_trips() -> None:
    entries = [("bin", 0o040755, b""), ("dev/console", 0o020600, b""), ("init", 0o100755, b"#!x\n")]
    entries += [("odd", 0o100644, b"12345")]
    assert _read_newc(newc_archive(entries)) == [
        ("bin", 0o040755, 0, b""), ("dev/console", 0o020600, 5, b""),
        ("init", 0o100755, 0, b"#!x\n"), ("odd", 0o100644, 0, b"12345"),
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_newc_archive_is_read_by_cpio() -> None:
    archive = newc_archive([("a", 0o040755, b""), ("a/b", 0o100644, b"x" * 5)])
    listing = subprocess.run(["cpio", "-it"], input=archive, capture_output=True, check=True)
    assert listing.stdout.split() == [b"a", b"a/b"]


ELF = b"\x7fELF" + bytes(range(256)) * 10


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (b"setup code" + lzma.compress(ELF, format=lzma.FORMAT_XZ) + b"trailer", None),
        (b"no payload here", "no xz-compressed vmlinux"),
        (b"x" + lzma.compress(b"not an elf", format=lzma.FORMAT_XZ), "not an ELF"),
    ],
    ids=["payload found", "no payload", "payload not ELF"],
)
def test_vmlinux(image: bytes, error: str | None) -> None:
    if error is None:
        assert vmlinux(image) == ELF
    else:
        with pytest.raises(VmError, match=error):
            vmlinux(image)
