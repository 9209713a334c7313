"""ebpf mode's settings and lifecycle without a kernel: flags and config file -> the
data plane's options, flush detection over the fake, the lab's cgroup wrapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.app.cli import _plane_options, build_parser
from kubeproxy.config.flags import build_config
from kubeproxy.lab import cgroups
from kubeproxy.modes import ebpf as mode_ebpf
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.render import ebpf as r
from tests.unit.test_ebpf_render import BASIC, views

# (id, argv after `kubeproxy apply -f x`, the data plane's options)
FLAGS = [
    ("defaults", [], PlaneOptions()),
    ("cgroup-and-bpffs", ["--cgroup-path", "/cg/node", "--bpf-dir", "/run/x"],
     PlaneOptions(cgroup_path="/cg/node", bpf_dir="/run/x")),
    ("root-allowed", ["--allow-root-cgroup"], PlaneOptions(allow_root_cgroup=True)),
]


@pytest.mark.parametrize(("argv", "want"), [f[1:] for f in FLAGS], ids=[f[0] for f in FLAGS])
def test_flags_reach_the_plane_options(argv: list[str], want: PlaneOptions) -> None:
    args = build_parser().parse_args(["apply", "-f", "x", "--hostname-override", "n", *argv])
    assert _plane_options(args, build_config(args)) == want


def test_the_config_file_names_the_cgroup(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                    "kind: KubeProxyConfiguration\ncgroupPath: /cg/a\n")
    args = build_parser().parse_args(["apply", "-f", "x", "--config", str(path)])
    assert build_config(args).cgroup_path == "/cg/a"
    flag = build_parser().parse_args(["apply", "-f", "x", "--config", str(path),
                                      "--cgroup-path", "/cg/b"])
    assert build_config(flag).cgroup_path == "/cg/b"  # the flag wins


def test_plane_options_become_ebpf_options() -> None:
    got = mode_ebpf.EbpfOptions.of(PlaneOptions(cgroup_path="/cg/n", bpf_dir="/run/b"))
    assert got == mode_ebpf.EbpfOptions(Path("/cg/n"), Path("/run/b"), False)
    assert mode_ebpf.EbpfOptions.of(PlaneOptions()) == mode_ebpf.EbpfOptions()


def _detach(name: str) -> Callable[[Any], None]:
    return lambda plane: plane.plane.maps.attached.discard(name)


# (id, damage done to a synced fake, is it seen)
DAMAGES: list[tuple[str, Callable[[Any], None], bool]] = [
    ("program-detached", _detach("kp_connect4"), True),
    ("all-detached", lambda plane: plane.plane.maps.attached.clear(), True),
    ("nothing", lambda plane: None, False),
]


@pytest.mark.parametrize(("damage", "seen"), [d[1:] for d in DAMAGES],
                         ids=[d[0] for d in DAMAGES])
def test_detached_programs_are_seen_and_reattached(damage: Callable[[Any], None],
                                                   seen: bool) -> None:
    plane = mode_ebpf.fake()
    ruleset = mode_ebpf.MODE.render(views(BASIC))
    assert plane.intact()
    plane.sync(ruleset)
    before = plane.rules()
    assert f"attached: {' '.join(sorted(r.PROGRAMS))}" in before
    damage(plane)
    assert plane.intact() is not seen
    plane.sync(ruleset)
    assert plane.intact() and plane.rules() == before
    plane.cleanup()
    assert "attached: (none)" in plane.rules() and "172.30.0.41" not in plane.rules()


def test_lab_processes_enter_their_cgroup() -> None:
    argv = ["ip", "netns", "exec", "kpl-x-n1", "true"]
    assert cgroups.in_cgroup(argv, None) == argv
    wrapped = cgroups.in_cgroup(argv, Path("/cg/kpl-x/node-1"))
    assert wrapped[:2] == ["sh", "-c"] and wrapped[3:] == ["/cg/kpl-x/node-1/cgroup.procs",
                                                           *argv]


def test_a_lab_without_cgroups_gives_its_proxies_no_flags(tmp_path: Path) -> None:
    assert cgroups.proxy_flags(tmp_path, "node-1") == []
    assert cgroups.plane_options(tmp_path, "node-1") == PlaneOptions()
