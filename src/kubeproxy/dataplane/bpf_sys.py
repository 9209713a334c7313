"""The kernel edge of the ebpf mode: the bpf() syscall, libbpf, bpffs and cgroup2 mounts.

Theory of operation
-------------------
Nothing here knows about Services. It does five things, all through ctypes (no bcc, no
kernel headers, no helper binaries):

* **maps**: :class:`PinnedMaps` opens pinned maps (``BPF_OBJ_GET``) and reads, writes,
  deletes and dumps elements with the ``bpf()`` syscall;
* **load and attach**: :func:`load_and_attach` opens the compiled object with the system
  ``libbpf.so.1``, with ``pin_root_path`` set so maps already pinned there are *reused*
  (a restarted proxy keeps the maps and their contents), loads it, and for each program
  either updates the pinned link to the new program (``bpf_link_update``: the hook stays
  attached throughout) or attaches it to the cgroup and pins the new link;
* **bpffs**: :func:`ensure_bpffs` mounts a private bpf filesystem on the proxy's own
  directory (never /sys/fs/bpf), :func:`remove_bpffs` unmounts and removes it;
* **cgroups**: :func:`cgroup2_root` reads the cgroup2 mount from the mount table (this
  machine has it at a hybrid ``/sys/fs/cgroup/unified``), :func:`check_cgroup` refuses
  anything but a cgroup2 directory, and the root cgroup unless the operator allowed it;
* errors are :class:`~kubeproxy.dataplane.base.DataPlaneError` naming the call and errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from kubeproxy.errors import DataPlaneError

SYS_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD, BPF_LINK_DETACH = 4, 7, 15, 34
BPF_FS_MAGIC = 0xCAFE4A11
MAPS_DIR, LINKS_DIR = "maps", "links"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32), ("path_fd", ctypes.c_int32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _CgroupLinkInfo(ctypes.Structure):
    """struct bpf_link_info, as far as a cgroup link fills it."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 44)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def obj_get(path: Path) -> int:
    """An fd for the object pinned at ``path``."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))
    except OSError as err:
        raise DataPlaneError(f"bpf(BPF_OBJ_GET, {path}): {err.strerror}") from err


def link_attached(pin: Path) -> bool:
    """Whether the cgroup link pinned at ``pin`` is there and still attached to a cgroup
    (a detached link, or one whose cgroup was removed, reports cgroup id 0)."""
    try:
        fd = obj_get(pin)
    except DataPlaneError:
        return False
    try:
        info = _CgroupLinkInfo()
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                               info=ctypes.addressof(info)))
    except OSError as err:
        raise DataPlaneError(f"bpf(BPF_OBJ_GET_INFO_BY_FD, {pin}): {err.strerror}") from err
    finally:
        os.close(fd)
    return int(info.cgroup_id) != 0


class PinnedMaps:
    """The maps pinned in ``<bpffs>/maps``, opened on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fds: dict[str, int] = {}

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            self._fds[name] = obj_get(self.directory / name)
        return self._fds[name]

    def update(self, name: str, key: bytes, value: bytes) -> None:
        self._elem(BPF_MAP_UPDATE_ELEM, name, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, name: str, key: bytes) -> None:
        try:
            self._elem(BPF_MAP_DELETE_ELEM, name, key, None)
        except DataPlaneError as err:
            if not isinstance(err.__cause__, OSError) or err.__cause__.errno != errno.ENOENT:
                raise

    def lookup(self, name: str, key: bytes, value_size: int) -> bytes | None:
        buf = ctypes.create_string_buffer(value_size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, name, key, buf)
        except DataPlaneError as err:
            if isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOENT:
                return None
            raise
        return buf.raw

    def keys(self, name: str, key_size: int) -> Iterator[bytes]:
        fd, cur = self._fd(name), None
        nxt = ctypes.create_string_buffer(key_size)
        while True:
            attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(cur) if cur else 0,
                                value=ctypes.addressof(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    return
                raise DataPlaneError(f"bpf(BPF_MAP_GET_NEXT_KEY, {name}): {err.strerror}"
                                     ) from err
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, key_size)

    def dump(self, name: str, key_size: int, value_size: int) -> dict[bytes, bytes]:
        out = {}
        for key in list(self.keys(name, key_size)):
            value = self.lookup(name, key, value_size)
            if value is not None:
                out[key] = value
        return out

    def _elem(self, cmd: int, name: str, key: bytes,
              value: ctypes.Array[ctypes.c_char] | None) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        attr = _MapElemAttr(map_fd=self._fd(name), key=ctypes.addressof(kbuf),
                            value=ctypes.addressof(value) if value is not None else 0)
        try:
            _bpf(cmd, attr)
        except OSError as err:
            raise DataPlaneError(f"bpf(cmd {cmd}, map {name}): {err.strerror}") from err

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- libbpf -------------------------------------------------------------------------


class _OpenOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p),
                ("relaxed_maps", ctypes.c_bool), ("pin_root_path", ctypes.c_char_p),
                ("_removed", ctypes.c_uint32), ("kconfig", ctypes.c_char_p),
                ("btf_custom_path", ctypes.c_char_p), ("kernel_log_buf", ctypes.c_char_p),
                ("kernel_log_size", ctypes.c_size_t), ("kernel_log_level", ctypes.c_uint32)]


def _libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as err:
        raise DataPlaneError("libbpf.so.1 not found (Debian package libbpf1)") from err
    vp = ctypes.c_void_p
    for name, res, args in (
        ("bpf_object__open_file", vp, [ctypes.c_char_p, ctypes.POINTER(_OpenOpts)]),
        ("bpf_object__load", ctypes.c_int, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__next_program", vp, [vp, vp]),
        ("bpf_program__name", ctypes.c_char_p, [vp]),
        ("bpf_program__fd", ctypes.c_int, [vp]),
        ("bpf_program__attach_cgroup", vp, [vp, ctypes.c_int]),
        ("bpf_link__pin", ctypes.c_int, [vp, ctypes.c_char_p]),
        ("bpf_link__disconnect", None, [vp]),
        ("bpf_link__destroy", ctypes.c_int, [vp]),
        ("bpf_link_update", ctypes.c_int, [ctypes.c_int, ctypes.c_int, vp]),
        ("libbpf_get_error", ctypes.c_long, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def load_and_attach(obj_path: Path, bpffs: Path, cgroup: Path) -> list[str]:
    """Load ``obj_path`` reusing maps pinned under ``bpffs``; make every program live on
    ``cgroup`` through a pinned link. Returns the programs' names."""
    if not obj_path.is_file():
        raise DataPlaneError(f"{obj_path}: BPF object not built (run `make`)")
    lib = _libbpf()
    (bpffs / MAPS_DIR).mkdir(exist_ok=True)
    (bpffs / LINKS_DIR).mkdir(exist_ok=True)
    opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts),
                     pin_root_path=os.fsencode(bpffs / MAPS_DIR))
    obj = lib.bpf_object__open_file(os.fsencode(obj_path), ctypes.byref(opts))
    if not obj or lib.libbpf_get_error(obj):
        raise DataPlaneError(f"libbpf: cannot open {obj_path}")
    names: list[str] = []
    try:
        if (ret := lib.bpf_object__load(obj)) != 0:
            raise DataPlaneError(f"libbpf: loading {obj_path} failed: {os.strerror(-ret)}")
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            prog = lib.bpf_object__next_program(obj, None)
            while prog:
                names.append(_attach(lib, prog, cg_fd, bpffs / LINKS_DIR))
                prog = lib.bpf_object__next_program(obj, prog)
        finally:
            os.close(cg_fd)
    finally:
        lib.bpf_object__close(obj)  # pinned maps and links outlive the object
    return names


def _attach(lib: ctypes.CDLL, prog: int, cg_fd: int, links: Path) -> str:
    name = str(lib.bpf_program__name(prog).decode())
    pin = links / name
    if pin.exists() and not link_attached(pin):  # detached from outside: attach anew
        pin.unlink()
    if pin.exists():  # a running proxy's link: swap its program in place
        link_fd = obj_get(pin)
        try:
            if (ret := lib.bpf_link_update(link_fd, lib.bpf_program__fd(prog), None)) != 0:
                raise DataPlaneError(f"bpf_link_update {pin}: {os.strerror(-ret)}")
        finally:
            os.close(link_fd)
        return name
    link = lib.bpf_program__attach_cgroup(prog, cg_fd)
    if not link or lib.libbpf_get_error(link):
        raise DataPlaneError(f"libbpf: attaching {name} failed: "
                             f"{os.strerror(ctypes.get_errno() or errno.EINVAL)}")
    try:
        if (ret := lib.bpf_link__pin(link, os.fsencode(pin))) != 0:
            raise DataPlaneError(f"libbpf: pinning {pin} failed: {os.strerror(-ret)}")
        lib.bpf_link__disconnect(link)
    finally:
        lib.bpf_link__destroy(link)  # closes our fd; the pin keeps the link attached
    return name


# --- mounts ---------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount this process sees."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def is_bpffs(path: Path) -> bool:
    return (str(path), "bpf") in _mounts()


def ensure_bpffs(path: Path) -> None:
    """Mount a private bpffs on ``path`` (created) unless one is there."""
    if is_bpffs(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DataPlaneError(f"mount -t bpf {path}: {os.strerror(err)}")


class _LinkAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 3)]


def detach_links(links: Path) -> list[str]:
    """Detach every link pinned in ``links`` from its cgroup (BPF_LINK_DETACH) and unpin
    it; the pin alone would keep the programs attached. Returns the links' names."""
    done = []
    for pin in sorted(links.iterdir()) if links.is_dir() else []:
        detach_link(pin)
        pin.unlink()
        done.append(pin.name)
    return done


def detach_link(pin: Path) -> None:
    """Detach the link pinned at ``pin`` from its cgroup (the pin stays, defunct)."""
    fd = obj_get(pin)
    try:
        _bpf(BPF_LINK_DETACH, _LinkAttr(link_fd=fd))
    except OSError as err:
        raise DataPlaneError(f"bpf(BPF_LINK_DETACH, {pin}): {err.strerror}") from err
    finally:
        os.close(fd)


def remove_bpffs(path: Path) -> tuple[int, int]:
    """Detach our links, unpin everything, unmount the bpffs on ``path``, remove it.
    Returns (links detached and unpinned, other pins removed: the maps), (0, 0) when no
    bpffs is mounted there."""
    if not is_bpffs(path):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        return 0, 0
    links = len(detach_links(path / LINKS_DIR))
    pins = 0
    for sub in (path / LINKS_DIR, path / MAPS_DIR):
        for pin in sub.iterdir() if sub.is_dir() else []:
            pin.unlink()
            pins += 1
        if sub.is_dir():
            sub.rmdir()
    if _libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        raise DataPlaneError(f"umount {path}: {os.strerror(err)}")
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    return links, pins


def cgroup2_root() -> Path:
    """Where cgroup2 is mounted (``/sys/fs/cgroup``, or ``.../unified`` on hybrid hosts)."""
    for point, fstype in _mounts():
        if fstype == "cgroup2":
            return Path(point)
    raise DataPlaneError("no cgroup2 mount in /proc/self/mounts")


def fs_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on (its longest mount point's), if any."""
    best: tuple[int, str] | None = None
    for point, fstype in _mounts():
        mount = Path(point)
        if (mount == path or mount in path.parents) and (
                best is None or len(mount.parts) >= best[0]):
            best = (len(mount.parts), fstype)
    return best[1] if best else None


def is_root_cgroup(path: Path) -> bool:
    """Whether the cgroup2 directory ``path`` is a hierarchy's root: the kernel gives
    every cgroup but the root a ``cgroup.events`` file (whatever mount shows it, so a
    bind mount of the root is recognised too)."""
    return not (path / "cgroup.events").exists()


def check_cgroup(path: Path, allow_root: bool) -> Path:
    """``path`` resolved, if it is a cgroup2 directory we may attach to. It may be seen
    through any cgroup2 mount (``ip netns exec`` remounts /sys, hiding the system's: the
    lab bind-mounts each node's cgroup where the node's proxy can see it)."""
    resolved = path.resolve()
    if fs_type(resolved) != "cgroup2" or not (resolved / "cgroup.procs").is_file():
        raise DataPlaneError(f"--cgroup-path {path}: not a cgroup2 directory")
    if is_root_cgroup(resolved) and not allow_root:
        raise DataPlaneError(
            f"--cgroup-path {path} is the root cgroup: refusing to attach there without "
            "--allow-root-cgroup (every process on the machine would be load balanced)")
    return resolved
