"""The lab's command line and its state store (no root needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kubeproxy.lab import layout
from kubeproxy.lab.cli import add_lab_parser
from kubeproxy.lab.errors import LabStateError
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.state import LabState, LabStore, Processes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubeproxy")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["lab", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "-f", "a.yaml", "b.yaml", "--mode", "nftables", "--lb-algorithm", "round-robin"],
        ["status"],
        ["exec", "web-1", "--", "ip", "addr"],
        ["probe", "--from", "external", "--to", "node-1", "--port", "30080", "--json"],
        ["pod-ready", "web-1", "false"],
        ["pod-delete", "web-1", "--grace", "5"],
        ["diagram", "-o", "x.svg"],
        ["kubeconfig"],
        ["wait"],
        ["down"],
    ],
)
def test_every_command_has_a_handler_and_a_name(argv: list[str]) -> None:
    args = parse(argv[0], "--name", "x1", *argv[1:])
    assert callable(args.func) and args.name == "x1"


def test_defaults() -> None:
    up = parse("up", "-f", "a.yaml", "-f", "b.yaml")
    assert up.file == [["a.yaml"], ["b.yaml"]]
    assert (up.mode, up.lb_algorithm, up.name) == ("iptables", "random", "lab")
    probe = parse("probe", "--from", "p", "--to", "svc.ns", "--port", "80")
    assert (probe.proto, probe.n, probe.timeout, probe.json) == ("tcp", 100, 1.0, False)
    ex = parse("exec", "node-1", "--", "iptables-save")
    assert ex.command in (["--", "iptables-save"], ["iptables-save"])


def test_no_proxy_is_remembered_by_up_only() -> None:
    assert parse("up", "-f", "a.yaml").no_proxy is False
    assert parse("up", "-f", "a.yaml", "--no-proxy").no_proxy is True
    with pytest.raises(SystemExit):
        parse("status", "--no-proxy")


def test_bad_values_are_usage_errors() -> None:
    with pytest.raises(SystemExit):
        parse("up", "-f", "a.yaml", "--mode", "userspace")
    with pytest.raises(SystemExit):
        parse("pod-ready", "web-1", "maybe")


def test_store_round_trip(tmp_path: Path) -> None:
    store = LabStore("s1", tmp_path)
    plan = layout.plan(
        "s1", parse_objects(load_documents([("t", "kind: Node\nmetadata: {name: node-1}\n")]))
    )
    with pytest.raises(LabStateError, match="not up"):
        store.load()
    state = LabState(
        name="s1",
        mode="iptables",
        lb_algorithm="random",
        cluster_cidr="10.244.0.0/16",
        service_cidr="10.96.0.0/16",
        external_node=None,
        switch_ns=plan.switch_ns,
        nodes=plan.nodes,
        external=plan.external,
        api_port=40123,
        processes=Processes(apiserver=10, agent=11, proxies={"node-1": 12}),
    )
    with store.lock():
        store.prepare()
        store.save(state)
    assert store.load() == state
    store.remove()
    store.remove_lock()
    assert not tmp_path.exists()
