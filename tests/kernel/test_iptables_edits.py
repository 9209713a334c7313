"""Syncs write what differs; the kernel ends with the render.

A partial sync turns KUBE-SERVICES (and the other top-level chains) into the new
render with ``-D`` and positional ``-I`` lines instead of rewriting the chain
(dataplane/iptables.py ``edit``). Hypothesis draws a cluster and sequences of changes
to one to three of its services (appearing and going, endpoints coming and going,
types and policies changing); after each partial sync, what ``iptables-save`` reads
back must equal the render, order included, on both backends. A fixed sequence checks
that single changes are sent as edits. Full syncs compare with what the kernel holds
and write the difference: nothing after a restart, the damaged chains after damage
from outside.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import NetnsRunner, Result
from kubeproxy.dataplane.iptables import Backend, IptablesDataPlane
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.nodeview import build_node_view
from kubeproxy.render.iptables import Ruleset, render
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, service
from tests.kernel.conftest import scratch_namespace

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]
CONFIG = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
SERVICES = 12


@dataclass(frozen=True)
class Spec:
    """One service's state in a step: None for absent."""

    endpoints: int
    type: str
    local: bool


specs = st.one_of(st.none(), st.builds(Spec, st.integers(0, 3),
                                       st.sampled_from(["ClusterIP", "NodePort"]),
                                       st.booleans()))


def objects(state: tuple[Spec | None, ...]) -> list[Obj]:
    objs: list[Obj] = [node()]
    for i, spec in enumerate(state):
        if spec is None:
            continue
        name = f"svc{i}"
        extra: dict[str, Any] = ({"externalTrafficPolicy": "Local" if spec.local
                                  else "Cluster"} if spec.type == "NodePort" else {})
        objs.append(service(name, cluster_ip=f"172.30.0.{i + 1}", type=spec.type,
                            ports=[("p80", 80, "TCP", 30000 + i if spec.type != "ClusterIP"
                                    else 0)], **extra))
        objs.append(endpoint_slice(name, [endpoint(f"10.180.{i}.{k + 1}",
                                                   node=NODE if k % 2 else "node2")
                                          for k in range(spec.endpoints)]))
    return objs


def rules(state: tuple[Spec | None, ...]) -> Ruleset:
    cluster = decode_objects(objects(state))
    assert not cluster.errors
    return render(build_node_view(cluster, CONFIG, 4))


class Recording:
    """A namespace's runner that keeps the restore payloads it ran."""

    def __init__(self, ns: str) -> None:
        self.inner = NetnsRunner(ns)
        self.payloads: list[str] = []

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Result:
        if stdin is not None:
            self.payloads.append(stdin)
        return self.inner.run(argv, stdin)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with scratch_namespace() as name:
        yield name


def readback(runner: Recording, backend: Backend) -> dict[str, list[str]]:
    res = runner.inner.run([f"iptables-{backend}-save"])
    assert res.returncode == 0, res.stderr
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in res.stdout.splitlines():
        if line.startswith("*"):
            current = out.setdefault(line[1:], [])
        elif line.startswith((":", "-A")):
            current.append(line)
    return out


changes = st.lists(st.tuples(st.integers(0, SERVICES - 1), specs), min_size=1, max_size=3)


@settings(max_examples=15, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(first=st.tuples(*[specs] * SERVICES), steps=st.lists(changes, min_size=1, max_size=6),
       backend=st.sampled_from(["legacy", "nft"]))
def test_partial_syncs_read_back_as_rendered(netns: str, first: tuple[Spec | None, ...],
                                             steps: list[list[tuple[int, Spec | None]]],
                                             backend: Backend) -> None:
    runner = Recording(netns)
    plane = IptablesDataPlane(runner, 4, backend)
    plane.cleanup()
    plane.sync(rules(first))
    state = list(first)
    for step in steps:
        for i, spec in step:
            state[i] = spec
        ruleset = rules(tuple(state))
        plane.sync(ruleset, {NamespacedName("ns1", f"svc{i}") for i, _ in step})
        got = readback(runner, backend)
        for table in ("filter", "nat"):
            want = [line for line in ruleset.save_text(tables=(table,)).splitlines()
                    if line.startswith((":", "-A"))]
            assert got[table] == want, f"{table} after {state}"
    plane.cleanup()


def test_single_changes_are_edits(netns: str) -> None:
    """One service added, then its endpoints gone, then deleted: each partial sync edits
    nat's KUBE-SERVICES without declaring (flushing) it, and the kernel holds the render
    (filter's KUBE-SERVICES, one REJECT rule or none, is small enough to rewrite)."""
    full: tuple[Spec | None, ...] = tuple(Spec(2, "ClusterIP", False)
                                          for _ in range(SERVICES))
    states = [(*full[:-1], None), full, (*full[:-1], Spec(0, "ClusterIP", False)),
              (*full[:-1], None)]
    for backend in ("legacy", "nft"):
        edited = 0
        runner = Recording(netns)
        plane = IptablesDataPlane(runner, 4, backend)
        plane.cleanup()
        plane.sync(rules(states[0]))
        for state in states[1:]:
            ruleset = rules(state)
            runner.payloads.clear()
            plane.sync(ruleset, {NamespacedName("ns1", f"svc{SERVICES - 1}")})
            (payload,) = runner.payloads
            nat = payload[payload.find("*nat"):] if "*nat" in payload else ""
            assert ":KUBE-SERVICES " not in nat, payload
            edited += "\n-I KUBE-SERVICES " in nat or "\n-D KUBE-SERVICES " in nat
            got = readback(runner, backend)
            for table in ("filter", "nat"):
                want = [line for line in ruleset.save_text(tables=(table,)).splitlines()
                        if line.startswith((":", "-A"))]
                assert got[table] == want
        # Added (-I) and endpoints gone (-D); deleting a service without endpoints
        # leaves nat as it is (only filter's REJECT goes).
        assert edited == 2
        plane.cleanup()


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_full_syncs_write_what_differs_from_the_kernel(netns: str, backend: Backend) -> None:
    """A restarted proxy with its rules intact writes nothing to filter and nat; after
    damage from outside, a full sync writes the damaged chains and the kernel holds the
    render again."""
    runner = Recording(netns)
    ruleset = rules(tuple(Spec(2, "NodePort", i % 2 == 0) for i in range(SERVICES)))
    IptablesDataPlane(runner, 4, backend).sync(ruleset)
    runner.payloads.clear()
    IptablesDataPlane(runner, 4, backend).sync(ruleset)  # a restart
    (payload,) = runner.payloads
    assert "*nat" not in payload and "*filter" not in payload, payload
    ipt = ["ip", "netns", "exec", netns, f"iptables-{backend}", "-w"]
    for damage in (["-t", "nat", "-F", "KUBE-SERVICES"], ["-t", "nat", "-F"],
                   ["-t", "filter", "-F"], ["-t", "nat", "-D", "KUBE-MARK-MASQ", "1"]):
        subprocess.run([*ipt, *damage], check=True)
        runner.payloads.clear()
        IptablesDataPlane(runner, 4, backend).sync(ruleset)
        (payload,) = runner.payloads
        got = readback(runner, backend)
        for table in ("filter", "nat"):
            want = [line for line in ruleset.save_text(tables=(table,)).splitlines()
                    if line.startswith((":", "-A"))]
            assert got[table] == want, f"{table} after {damage}"
        if damage[-1] == "KUBE-SERVICES":  # only it is written, not the other 100 chains
            nat = payload[payload.index("*nat"):]
            assert [line for line in nat.splitlines() if line.startswith(":")] == [
                ":KUBE-SERVICES - [0:0]"], payload
    IptablesDataPlane(runner, 4, backend).cleanup()
