"""The image against the code: every program a data plane runs is installed in it.

Two links, each checked on the files (no image is built here; `make image` builds it):

* code -> table: an AST walk of every module the image runs (all of src/kubeproxy but
  lab/, apiserver/, vm/ and testing/) collects each program name spelled as argv[0] of
  a list literal given to a Runner's ``run``, to ``check()`` or to subprocess, assigned
  to ``argv``, or returned by a mode's ``service_rules``; plus every name
  ``dataplane.iptables.binaries()`` builds and every library loaded with ctypes. Each
  must be a row of ``dataplane/programs.py``.
* table -> Dockerfile: each row's Debian package is in the ``apt-get install`` of
  deploy/Dockerfile's final stage (the builder stage's packages do not count).

A data plane that starts calling a binary the image lacks fails the first; a package
dropped from the Dockerfile fails the second. The last tests feed both checks a
violation of each kind, so neither can pass by seeing nothing.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

from kubeproxy.dataplane.iptables import BACKENDS, binaries
from kubeproxy.dataplane.programs import LIBRARIES, PROGRAMS
from kubeproxy.modes import ebpf as mode_ebpf

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "kubeproxy"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NEVER_IN_IMAGE = ("lab", "apiserver", "vm", "testing")  # never run in the image
RUNNERS = {"run", "check", "Popen", "check_output", "check_call", "call"}


def image_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py")
                  if p.relative_to(PKG).parts[0] not in NEVER_IN_IMAGE)


def _program(node: ast.expr | None) -> str | None:
    """argv[0] of a list or tuple literal, when it is a string literal."""
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def programs_in(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(program, line) for every literal argv[0] in ``tree``."""
    for node in ast.walk(tree):
        argvs: list[ast.expr | None] = []
        if isinstance(node, ast.Call) and _callee(node) in RUNNERS:
            argvs = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "argv" for t in node.targets):
            argvs = [node.value]
        elif isinstance(node, ast.FunctionDef) and node.name == "service_rules":
            argvs = [r.value for r in ast.walk(node) if isinstance(r, ast.Return)]
        elif isinstance(node, ast.keyword) and node.arg == "service_rules" \
                and isinstance(node.value, ast.Lambda):
            argvs = [node.value.body]
        for argv in argvs:
            if (program := _program(argv)) is not None:
                yield program, getattr(argv, "lineno", 0)


def libraries_in(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(library, line) for every ``ctypes.CDLL("name")`` (CDLL(None) is libc itself)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) == "CDLL" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value, node.lineno


@cache
def found_in_code(walk: str) -> dict[str, list[str]]:
    """name -> where it is used, over every module the image runs."""
    finder = programs_in if walk == "programs" else libraries_in
    out: dict[str, list[str]] = {}
    for path in image_modules():
        for name, line in finder(ast.parse(path.read_text())):
            out.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def built_names() -> set[str]:
    """Every program dataplane.iptables.binaries() can name."""
    return {name for family in (4, 6) for backend in BACKENDS
            for name in binaries(family, backend)}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or (not raw.strip() and not pending):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each its instructions from its FROM on."""
    out: list[list[tuple[str, str]]] = []
    for instruction in _instructions(text):
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def apt_installed(stage: list[tuple[str, str]]) -> set[str]:
    """The packages the stage's RUN lines name after ``apt-get install``."""
    packages: set[str] = set()
    for word, args in stage:
        if word != "RUN":
            continue
        tokens = shlex.split(args)
        for i, token in enumerate(tokens[:-1]):
            if token == "apt-get" and tokens[i + 1] == "install":
                for package in tokens[i + 2:]:
                    if package in {"&&", "||", ";"}:
                        break
                    if not package.startswith("-"):
                        packages.add(package)
    return packages


FINAL = stages(DOCKERFILE.read_text())[-1]


def test_every_program_the_proxy_runs_is_in_the_table() -> None:
    found = found_in_code("programs")
    missing = {name: where for name, where in found.items() if name not in PROGRAMS}
    assert missing == {}, "add a row to dataplane/programs.py (and the package to the image)"
    # the walk sees the calls it is meant to see
    assert {"nft", "conntrack", "ipset", "ip", "sysctl", "modprobe"} <= set(found)


def test_every_name_binaries_builds_is_in_the_table() -> None:
    assert sorted(built_names() - set(PROGRAMS)) == []


def test_every_library_loaded_is_in_the_table() -> None:
    found = found_in_code("libraries")
    assert "libbpf.so.1" in found
    assert sorted(set(found) - set(LIBRARIES)) == []


def test_every_row_is_still_used() -> None:
    """A row no code runs any more is a package the image carries for nothing."""
    used = set(found_in_code("programs")) | built_names()
    assert sorted(set(PROGRAMS) - used) == []
    assert sorted(set(LIBRARIES) - set(found_in_code("libraries"))) == []


def test_final_stage_installs_every_package() -> None:
    installed = apt_installed(FINAL)
    needed = {*PROGRAMS.values(), *LIBRARIES.values(), "python3"}
    assert sorted(needed - installed) == []


def test_final_stage_has_no_compiler_and_runs_kube_proxy() -> None:
    installed = apt_installed(FINAL)
    assert not installed & {"clang", "llvm", "gcc", "libbpf-dev", "python3-pip",
                            "python3-venv"}
    runs = " ".join(args for word, args in FINAL if word == "RUN")
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert "ln -s /opt/kubeproxy/bin/kube-proxy /usr/local/bin/kube-proxy" in runs
    assert "/usr/local/bin/kube-proxy --version" in runs  # the build fails without it
    assert ("COPY", "--from=builder /opt/kubeproxy /opt/kubeproxy") in FINAL


def test_builder_compiles_sock_lb_as_the_makefile_does() -> None:
    """Same clang flags as the Makefile's BPF_CFLAGS (make's $(shell ...) is $(...))."""
    (flags,) = re.findall(r"^BPF_CFLAGS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    builder = stages(DOCKERFILE.read_text())[0]
    runs = " ".join(" ".join(args.split()) for word, args in builder if word == "RUN")
    assert f"clang {flags.replace('$(shell ', '$(')} -c" in runs
    # the project as a wheel (not editable) into the virtualenv the final stage copies
    assert "pip wheel -q --no-deps --no-build-isolation -w /tmp/wheel /src" in runs
    assert "--python /opt/kubeproxy/bin/python install --no-deps /tmp/wheel/*.whl" in runs
    assert ("ENV", "PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1") in builder
    assert {"clang", "libbpf-dev"} <= apt_installed(builder)


def test_every_stage_is_debian_bookworm_slim() -> None:
    froms = [args.split()[0] for stage in stages(DOCKERFILE.read_text())
             for word, args in stage if word == "FROM"]
    assert froms == ["docker.io/library/debian:bookworm-slim"] * 2


def test_image_name_is_the_daemonsets() -> None:
    """`make image` tags what deploy/kube-proxy.yaml runs, at the project's version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = [c["image"] for doc in yaml.safe_load_all((ROOT / "deploy" / "kube-proxy.yaml")
                                                       .read_text())
              if doc and doc["kind"] == "DaemonSet"
              for c in doc["spec"]["template"]["spec"]["containers"]]
    assert images == [f"kubeproxy:{version}"]


def test_bpf_object_is_package_data() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["kubeproxy"]
    assert "bpf/*.o" in package_data
    assert mode_ebpf.OBJECT == PKG / "bpf" / "sock_lb.o"  # this checkout: editable install


# --- the checks see what they forbid -------------------------------------------------

VIOLATIONS = '''
runner.run(["bpftool", "prog", "show"])
check(self.runner, ["tc", "qdisc", "show"], "stdin")
subprocess.run(("ethtool", "-k", "eth0"), check=False)
argv = ["ebtables-save"]
def service_rules(runner):
    return ["arptables", "-L"]
PRESENTATION = Presentation(service_rules=lambda runner: ["bridge", "fdb"])
lib = ctypes.CDLL("libxdp.so.1")
not_argv = ["not-a-program", "x"]
'''


def test_the_walk_finds_every_spelling_of_a_command() -> None:
    tree = ast.parse(VIOLATIONS)
    found = {name for name, _ in programs_in(tree)}
    assert found == {"bpftool", "tc", "ethtool", "ebtables-save", "arptables", "bridge"}
    assert not found <= set(PROGRAMS)  # the first test would fail on them
    assert {name for name, _ in libraries_in(tree)} == {"libxdp.so.1"}


@pytest.mark.parametrize(("dropped", "text"), [
    ("ipset", "FROM docker.io/library/debian:bookworm-slim\n"
              "RUN apt-get update \\\n && apt-get install -y --no-install-recommends \\\n"
              "      python3 iptables nftables conntrack iproute2 procps kmod coreutils \\\n"
              "      libbpf1 \\\n && rm -rf /var/lib/apt/lists/*\n"),
    ("every package: only the builder installs them",
     "FROM docker.io/library/debian:bookworm-slim AS builder\n"
     "RUN apt-get install -y python3 iptables nftables ipset conntrack iproute2 procps \\\n"
     "    kmod coreutils libbpf1\n"
     "FROM docker.io/library/debian:bookworm-slim\n"
     "# RUN apt-get install -y ipset\n"
     "COPY --from=builder /opt/kubeproxy /opt/kubeproxy\n"),
])
def test_the_dockerfile_check_sees_a_missing_package(dropped: str, text: str) -> None:
    installed = apt_installed(stages(text)[-1])
    needed = {*PROGRAMS.values(), *LIBRARIES.values(), "python3"}
    assert needed - installed  # test_final_stage_installs_every_package would fail
    if dropped == "ipset":
        assert needed - installed == {"ipset"}
