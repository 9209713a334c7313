"""The lab's life cycle through its command line: up, use, down; failures clean up.

These run ``python -m kubeproxy.lab.cli`` as a user would run ``kubeproxy lab``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubeproxy.lab import diagram
from kubeproxy.lab.errors import CommandError
from kubeproxy.lab.manifest import load_documents
from kubeproxy.lab.processes import python_env
from kubeproxy.lab.runtime import Lab, UpOptions
from tests.kernel.conftest import mode_tag, session_lab, skip_reason

pytestmark = pytest.mark.kernel

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed.yaml"


def lab_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubeproxy.lab.cli", "lab", *argv],
        env=python_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def two_cli_labs(mode: str) -> Iterator[tuple[str, str]]:
    names = (session_lab(f"ktcli{mode_tag(mode)}"), session_lab(f"ktcl2{mode_tag(mode)}"))
    try:
        for name in names:
            done = lab_cli("up", "-f", str(SEED), "--mode", mode, "--name", name)
            assert done.returncode == 0, done.stderr
        yield names
    finally:
        for name in names:
            lab_cli("down", "--name", name)


def test_cli_round_trip_and_labs_side_by_side(
    two_cli_labs: tuple[str, str], tmp_path: Path
) -> None:
    first, second = two_cli_labs
    status = lab_cli("status", "--name", first)
    assert status.returncode == 0 and "default/my-app-3" in status.stdout
    for name in two_cli_labs:
        probe = lab_cli(
            "probe", "--name", name, "--from", "external", "--to", "node-1",
            "--port", "30080", "-n", "30", "--json",
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        result = json.loads(probe.stdout)
        assert list(result) == ["sent", "ok", "failed", "backends", "client_addresses"]
        assert (result["sent"], result["ok"]) == (30, 30)
        assert set(result["backends"]) <= {"my-app-1", "my-app-2", "my-app-3"}
    shown = lab_cli("exec", "--name", first, "node-1", "--", "ip", "-4", "-o", "addr")
    assert shown.returncode == 0 and "192.168.0.2/24" in shown.stdout
    svg = tmp_path / "lab.svg"
    drawn = lab_cli("diagram", "--name", first, "-o", str(svg))
    assert drawn.returncode == 0, drawn.stderr
    _assert_diagram_reaches_seed_pods(Lab(first), svg.read_text())
    # Taking one lab down leaves the other working.
    assert lab_cli("down", "--name", first).returncode == 0
    assert lab_cli("status", "--name", first).returncode == 1
    still = lab_cli("probe", "--name", second, "--from", "my-app-1", "--to", "my-service",
                    "--port", "80", "-n", "10", "--json")  # fmt: skip
    assert json.loads(still.stdout)["ok"] == 10


def _assert_diagram_reaches_seed_pods(lab: Lab, svg: str) -> None:
    """Every ready endpoint the lab's API holds for the seed's Services is a Pod the
    drawn graph reaches from the Service's frontends (pods -> ClusterIP, outside ->
    NodePort)."""
    boxes, edges = diagram.boxes_of(svg), diagram.edges_of(svg)
    for service, kind in (("my-service", "ClusterIP"), ("my-service-nodeport", "NodePort")):
        ips = {addr for s in lab.slices()
               if s["metadata"]["labels"].get("kubernetes.io/service-name") == service
               for ep in s.get("endpoints") or [] if (ep.get("conditions") or {}).get("ready")
               for addr in ep["addresses"]}
        assert len(ips) == 3, ips  # the seed's three pods
        client = diagram.PODS_CLIENT if kind == "ClusterIP" else diagram.EXTERNAL_CLIENT
        fronts = [k for k, b in boxes.items() if b.data.get("frontend") == kind
                  and b.data.get("service") == f"default/{service}:http"]
        assert len(fronts) == 1, fronts
        assert fronts[0] in diagram.reachable(edges, client)
        reached = diagram.reachable(edges, fronts[0], skip=(diagram.LOCAL_SOURCE,))
        drawn_pods = {boxes[k].data["ip"]: boxes[k].data.get("pod") for k in reached
                      if boxes[k].data["kind"] == "pod"}
        assert set(drawn_pods) == ips, (service, drawn_pods)
        assert all(drawn_pods.values()), drawn_pods  # each is a lab Pod


def test_cli_errors_are_one_line_and_exit_1() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    missing = lab_cli("status", "--name", session_lab("ktnone"))
    assert missing.returncode == 1 and "is not up" in missing.stderr
    bad = lab_cli("up", "-f", "/nonexistent.yaml", "--name", session_lab("ktnone"))
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_failed_up_leaves_nothing(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up fails after the API server, the agent and the proxies started: all are stopped."""

    def broken_settle(self: Lab, state: object) -> None:
        raise CommandError(["settle"], 1, "simulated failure")

    monkeypatch.setattr(Lab, "_settle", broken_settle)
    lab = Lab(session_lab(f"ktbad{mode_tag(mode)}"))
    with pytest.raises(CommandError, match="simulated"):
        lab.up(load_documents([("seed", SEED.read_text())]), UpOptions(mode=mode))
    assert lab.net.list_namespaces(lab.prefix) == []
    assert not lab.store.exists() and not lab.store.dir.exists()
    assert not _processes_mentioning(str(lab.store.dir))


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found
