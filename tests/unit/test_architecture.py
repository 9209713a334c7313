"""The layers docs/architecture.md draws, checked against the code's own imports.

Every ``import`` and ``from ... import`` of ``src/kubeproxy`` counts, wherever it stands
(inside a function, under ``TYPE_CHECKING``), plus the registry's modules that
``modes.get`` imports by name: a lazy or type-only import still ties two modules
together for a reader. The rules:

* no import circle anywhere in the package;
* a mode-specific module (render, dataplane, trace, testing: one data plane's) is
  imported only by modes/ and by those four packages, so a new mode plugs in through
  the registry alone;
* the core (the modules at the package root) imports nothing from the commands, the
  health servers, the lab, its API server or the test guest;
* the package root holds the core and nothing else, so its listing shows the layers;
* every exception class is under the one error root, and no two share a name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import kubeproxy
from kubeproxy.errors import KubeProxyError

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "kubeproxy"

# The core, flat at the package root as upstream's pkg/proxy (errors.py: the error root).
CORE = {"model", "topology", "nodeview", "tracker", "sync", "proxier", "conntrack", "errors"}
ROOT_FILES = {"__init__", "__main__", *CORE}
# What the core may not import: the layers above it and beside it.
ABOVE_CORE = ("app", "health", "lab", "apiserver", "vm")
# Packages holding one module per data plane, and the few modules in them every mode
# (and the layers above) share: chain names by role, the Runner, conntrack cleanup,
# trace results, and the kernel's bpf()/bpffs/cgroup2 plumbing (no Services in it: the
# lab mounts each node's bpffs and cgroup with it).
PER_MODE = ("render", "dataplane", "trace", "testing")
SHARED = {"render.names", "dataplane.base", "dataplane.conntrack", "trace.result",
          "dataplane.bpf_sys"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _target(name: str) -> str | None:
    """The module of ours that importing ``name`` loads, or None if not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of ours in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (t := _target(alias.name)) is not None:
                    yield t, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # a name may be a submodule
                if (t := _target(f"{base}.{alias.name}")) is not None:
                    yield t, node.lineno
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value in MODULES and module == "kubeproxy.modes"):
            yield node.value, node.lineno  # the registry: modes.get imports these


GRAPH = {m: {t for t, _ in _imports(m) if t != m} for m in MODULES}


def _layer(module: str) -> str:
    """``kubeproxy.render.nftables`` -> ``render``; a root module is its own name."""
    return module.split(".")[1] if module.count(".") else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert _cycles(GRAPH) == []


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _mode_specific(module: str) -> bool:
    layer = _layer(module)
    return (layer in PER_MODE and module != f"kubeproxy.{layer}"
            and module.removeprefix("kubeproxy.") not in SHARED)


def test_mode_specific_modules_only_behind_the_registry() -> None:
    allowed = {"modes", *PER_MODE}
    wrong = [f"{m} imports {t}" for m in sorted(MODULES) for t, _ in _imports(m)
             if _mode_specific(t) and _layer(m) not in allowed]
    assert wrong == []


def test_the_core_imports_no_layer_above_it() -> None:
    wrong = [f"{m}:{line} imports {t}" for m in sorted(MODULES) if _layer(m) in CORE
             for t, line in _imports(m) if _layer(t) in ABOVE_CORE]
    assert wrong == []


def test_the_package_root_holds_the_core_only() -> None:
    files = {p.stem for p in PKG.glob("*.py")}
    assert files == ROOT_FILES


def test_the_rules_see_what_they_forbid() -> None:
    """The helpers behind the rules classify real modules as the rules mean them."""
    assert _layer("kubeproxy.nodeview") in CORE
    assert _mode_specific("kubeproxy.render.nftables")
    assert _mode_specific("kubeproxy.testing.iptables")
    assert not _mode_specific("kubeproxy.dataplane.base")
    assert "kubeproxy.modes.iptables" in GRAPH["kubeproxy.modes"]  # the registry's edges
    assert "kubeproxy.model" in GRAPH["kubeproxy.nodeview"]
    assert "kubeproxy.config.types" in GRAPH["kubeproxy.nodeview"]


def _exception_classes() -> Iterator[type[BaseException]]:
    for info in pkgutil.walk_packages(kubeproxy.__path__, "kubeproxy."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                yield cls


EXCEPTIONS = sorted(_exception_classes(), key=lambda c: (c.__module__, c.__qualname__))


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_error_is_under_the_root(cls: type[BaseException]) -> None:
    """Private control-flow signals (``_Name``) and a strict fake's AssertionErrors (a
    test's failure, not the program's error) are the two exceptions to the rule."""
    if cls.__name__.startswith("_") or issubclass(cls, AssertionError):
        return
    assert issubclass(cls, KubeProxyError)


def test_no_two_errors_share_a_name() -> None:
    names = [c.__qualname__ for c in EXCEPTIONS]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    assert len(EXCEPTIONS) > 20  # the walk found the package's errors
