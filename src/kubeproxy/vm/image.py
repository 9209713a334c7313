"""The guest image: kernel, module tree and initramfs, built once from Debian packages.

Theory of operation. ``ensure_guest`` returns the cached image, building it first under
a file lock: ``apt-get download`` of the kernel package that ``linux-image-amd64``
depends on (Debian 12: the 6.1 series) and of ``busybox-static``; ``dpkg-deb -x``;
``depmod`` over the module tree, which the guest later mounts at ``/lib/modules``; the
ELF kernel taken out of the xz-compressed bzImage (qemu boots it through its PVH entry
point, which under emulation saves about five seconds per boot). The build happens in a
temporary directory renamed into place, so a reader never sees half an image.

The initramfs (busybox, ``STAGE1``, ``STAGE2`` and the few modules stage 1 needs, in
load order from ``modules.dep``) is written as a newc cpio archive by ``newc_archive``.
Its file name carries a hash of the stage scripts, so a change to them takes effect on
the next run without fetching anything again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kubeproxy.errors import VmError

KERNEL_META_PACKAGE = "linux-image-amd64"  # Debian 12: the 6.1 series
BUSYBOX_PACKAGE = "busybox-static"
# What stage 1 loads before it can mount anything (their dependencies come from modules.dep).
STAGE1_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

# Stage 1, /init of the initramfs: modules, mounts, then PID 1 becomes STAGE2 in the
# host's userspace. The project's path comes from a file in the run directory.
STAGE1 = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "vmrun-init: $*"; echo o > /proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m" || fail "insmod $m"; done < /modules.load
p9() { mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3" "$1" "$2" || fail "9p $1"; }
mkdir -p /lower /rw /newroot
p9 hostroot /lower ro,cache=loose
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "overlay"
R=/newroot
for d in proc sys dev run tmp lib/modules; do mkdir -p "$R/$d"; done
mount --move /proc $R/proc && mount --move /sys $R/sys && mount --move /dev $R/dev
mount -t tmpfs -o mode=0755 tmpfs $R/run && mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mkdir -p $R/dev/pts $R/dev/shm $R/run/vmrun $R/run/vmrun-init
mount -t devpts devpts $R/dev/pts && mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount -t bpf bpf $R/sys/fs/bpf 2>/dev/null
p9 modules $R/lib/modules ro,cache=loose
p9 vmrun $R/run/vmrun cache=none
read -r project < $R/run/vmrun/project || fail "no project in the run directory"
mkdir -p "$R$project" && p9 project "$R$project" cache=loose
hostname kubeproxy-vm && ip link set lo up
cp /bin/busybox /stage2 $R/run/vmrun-init/
exec switch_root $R /run/vmrun-init/busybox sh /run/vmrun-init/stage2
"""

# Modules stage 2 loads before the command, as on a host prepared for kubeproxy's lab:
# br_netfilter (its bridges' net.bridge.* sysctls; the lab does not load modules itself).
# Everything else (veth, dummy, ip_vs, nf_conntrack ...) the kernel loads on first use.
GUEST_MODULES = ("br_netfilter",)

# Stage 2, PID 1 in the host's userspace: load GUEST_MODULES, run the command script
# (run.command_script), record its status unless the script recorded an error itself,
# power off.
STAGE2 = r"""B=/run/vmrun-init/busybox
/sbin/modprobe -a -q """ + " ".join(GUEST_MODULES) + r"""
$B sh /run/vmrun/command.sh </dev/null >/run/vmrun/stdout 2>/run/vmrun/stderr
rc=$?
[ -e /run/vmrun/status ] || echo "exit $rc" > /run/vmrun/status
$B sync
echo o > /proc/sysrq-trigger
exec $B sleep 60
"""


@dataclasses.dataclass(frozen=True)
class Guest:
    """A built guest image: kernel, initramfs and the module tree shared at /lib/modules."""

    kernel: Path
    initrd: Path
    modules: Path
    version: str


# ---------------------------------------------------------------- pure helpers


def load_order(modules_dep: str, wanted: Sequence[str]) -> list[str]:
    """Module paths (relative to the module tree) in the order insmod must load them."""
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko").replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in deps.get(path, ()):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in wanted:
        if name not in by_name:
            raise VmError(f"module {name} is not in the guest kernel's modules.dep")
        visit(by_name[name])
    return order


def vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside Debian's xz-compressed bzImage."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise VmError("the kernel image holds no xz-compressed vmlinux")
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError as err:
        raise VmError(f"the kernel image's xz payload is damaged: {err}") from err
    if not elf.startswith(b"\x7fELF"):
        raise VmError("the kernel image's xz payload is not an ELF vmlinux")
    return elf


def newc_archive(entries: Sequence[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs format; entries are (name, mode, data).

    Owned by root, mtime 0; ``dev/console`` is the character device 5:1.
    """
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        raw = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """busybox, the stage scripts and ``modules`` ((file name, bytes) in load order)."""
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")
    ]
    entries += [("dev/console", 0o020600, b""), ("bin/busybox", 0o100755, busybox)]
    entries += [("init", 0o100755, STAGE1.encode()), ("stage2", 0o100644, STAGE2.encode())]
    entries += [(f"lib/modules/{name}", 0o100644, data) for name, data in modules]
    load = "".join(f"{name}\n" for name, _ in modules)
    entries += [("modules.load", 0o100644, load.encode())]
    return gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)


# ---------------------------------------------------------------- building (I/O)


def tool(name: str) -> str:
    """A host tool's path (also from the sbin directories a non-root PATH lacks)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise VmError(f"{name} is not installed (run `make vm` as root)")
    return found


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VmError(f"`{' '.join(argv)}` failed: {' / '.join(detail)}")
    return proc.stdout


def _kernel_package() -> str:
    """The versioned kernel image package that linux-image-amd64 depends on."""
    for attempt in range(2):
        proc = subprocess.run(
            [tool("apt-cache"), "show", "--no-all-versions", KERNEL_META_PACKAGE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        found = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*)", proc.stdout, re.M)
        if found:
            return found.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _run([tool("apt-get"), "update", "-q"])
    raise VmError(f"apt knows no {KERNEL_META_PACKAGE} (run `apt-get update` as root)")


def _download(packages: Sequence[str], into: Path) -> dict[str, Path]:
    _run([tool("apt-get"), "download", "-q", *packages], cwd=into)
    debs = {p: sorted(into.glob(f"{p}_*.deb")) for p in packages}
    missing = [p for p, found in debs.items() if not found]
    if missing:
        raise VmError(f"apt-get download left no .deb for {missing}")
    return {p: found[0] for p, found in debs.items()}


def _build(into: Path) -> None:
    """Fetch, unpack and assemble a guest image in the (new, empty) directory ``into``."""
    kernel_package = _kernel_package()
    debs = _download([kernel_package, BUSYBOX_PACKAGE], into)
    root = into / "root"
    _run([tool("dpkg-deb"), "-x", str(debs[kernel_package]), str(root)])
    _run([tool("dpkg-deb"), "-x", str(debs[BUSYBOX_PACKAGE]), str(into / "busybox")])
    (version,) = [p.name for p in (root / "lib/modules").iterdir()]
    _run([tool("depmod"), "-b", str(root), version])
    (into / "vmlinux").write_bytes(vmlinux((root / "boot" / f"vmlinuz-{version}").read_bytes()))
    (into / "busybox/bin/busybox").rename(into / "busybox.bin")
    for leftover in [*debs.values(), into / "busybox", root / "boot", root / "usr"]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    info = {"kernel": version, "package": kernel_package, "built": time.time()}
    (into / "guest.json").write_text(json.dumps(info, indent=1) + "\n")
    into.chmod(0o755)


def _initramfs_file(image: Path, version: str) -> Path:
    """The image's initramfs for these stage scripts, written on first use."""
    stages = hashlib.sha256(f"{STAGE1}{STAGE2}{STAGE1_MODULES}".encode()).hexdigest()[:12]
    path = image / f"initrd-{stages}.img"
    if path.exists():
        return path
    tree = image / "root/lib/modules" / version
    order = load_order((tree / "modules.dep").read_text(), STAGE1_MODULES)
    modules = [(Path(m).name, (tree / m).read_bytes()) for m in order]
    data = initramfs((image / "busybox.bin").read_bytes(), modules)
    # Concurrent first runs write the same bytes; the rename makes each write atomic.
    with tempfile.NamedTemporaryFile(dir=image, prefix="initrd-", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.rename(tmp.name, path)
    return path


def _load_guest(path: Path) -> Guest | None:
    try:
        version = json.loads((path / "guest.json").read_text())["kernel"]
    except (OSError, ValueError, KeyError):
        return None
    initrd = _initramfs_file(path, version)
    return Guest(path / "vmlinux", initrd, path / "root/lib/modules", version)


def ensure_guest(cache: Path, rebuild: bool = False) -> Guest:
    """The cached guest image, built first if needed (once, under a lock).

    ``rebuild`` fetches the current kernel package again; guests running from the old
    image at that moment lose their module tree.
    """
    final = cache / "guest"
    guest = None if rebuild else _load_guest(final)
    if guest is not None:
        return guest
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        guest = None if rebuild else _load_guest(final)  # built while we waited
        if guest is not None:
            return guest
        _remove_builds(cache)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            _build(work)
            if final.exists():  # --rebuild: move the old image aside first
                final.rename(Path(tempfile.mkdtemp(prefix="build-old-", dir=cache)) / "guest")
            work.rename(final)
        finally:
            _remove_builds(cache)
    guest = _load_guest(final)
    if guest is None:
        raise VmError(f"the guest image built in {final} cannot be read back")
    return guest


def _remove_builds(cache: Path) -> None:
    """Builds that did not finish (and images replaced by --rebuild); under the lock."""
    for stale in cache.glob("build-*"):
        shutil.rmtree(stale, ignore_errors=True)
