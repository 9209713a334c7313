"""The nftables tracer on hand-written scripts (nftables' own semantics) and on rendered
ones (the cases the packet-flow table does not cover)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeproxy.app.cli import main
from kubeproxy.config.types import ProxyConfig
from kubeproxy.errors import TraceError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from kubeproxy.nodeview import build_node_view
from kubeproxy.render import nftables
from kubeproxy.trace.nftables import trace_nftables
from kubeproxy.trace.result import Packet, TraceLimitError, TraceResult
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service

LOCAL = frozenset({ipaddress.ip_address(NODE_IP)})


def packet(src: str, dst: str, port: int = 80, proto: str = "tcp",
           iif: str = "eth0") -> Packet:
    return Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port,
                  proto=proto, in_interface=iif)  # type: ignore[arg-type]


def table(*chains: str, sets: str = "") -> str:
    return "table ip kube-proxy {\n" + sets + "\n".join(chains) + "\n}\n"


PRE = "\tchain pre {\n\t\ttype nat hook prerouting priority -100; policy accept;\n"
FWD = "\tchain fwd {\n\t\ttype filter hook forward priority 0; policy accept;\n"
POST = ("\tchain post {\n\t\ttype nat hook postrouting priority 100; policy accept;\n"
        "\t\tmeta mark & 0x00004000 == 0x00004000 masquerade fully-random\n\t}")


def trace(script: str, pkt: Packet | None = None) -> TraceResult:
    return trace_nftables(script, pkt or packet("203.0.113.2", "172.30.0.1"), LOCAL)


def test_jump_returns_and_goto_returns_to_the_callers_caller() -> None:
    script = table(
        PRE + "\t\tjump a\n\t\tdnat to 10.0.0.9:80\n\t}",
        "\tchain a {\n\t\tgoto b\n\t\tdnat to 10.0.0.1:80\n\t}",
        "\tchain b {\n\t\treturn\n\t}")
    got = trace(script)
    assert (got.verdict, got.endpoints) == ("DNAT", ("10.0.0.9:80",))
    assert got.path == ("a", "b")


def test_vmap_miss_goes_on_and_hit_applies_the_verdict() -> None:
    sets = ("\tmap m {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n"
            "\t\telements = { 172.30.0.1 . tcp . 80 : goto hit }\n\t}\n")
    script = table(PRE + "\t\tip daddr . meta l4proto . th dport vmap @m\n"
                   "\t\tdnat to 10.0.0.9:80\n\t}",
                   "\tchain hit {\n\t\tdnat to 10.0.0.1:80\n\t}", sets=sets)
    assert trace(script).endpoints == ("10.0.0.1:80",)
    assert trace(script, packet("203.0.113.2", "172.30.0.1", 81)).endpoints == ("10.0.0.9:80",)


def test_numgen_takes_every_value() -> None:
    sets = ("\tmap e {\n\t\ttypeof numgen random mod 1 . numgen random mod 1 : "
            "ip daddr . th dport\n\t\telements = { 7 . 0 : 10.0.0.1 . 80, 7 . 1 : 10.0.0.2 . 81,"
            " 7 . 2 : 10.0.0.3 . 82 }\n\t}\n")
    script = table(PRE + "\t\tmeta l4proto tcp dnat ip to numgen random mod 1 offset 7 . "
                   "numgen inc mod 2 offset 1 map @e\n\t}", sets=sets)
    assert trace(script).endpoints == ("10.0.0.2:81", "10.0.0.3:82")


def test_cascade_and_dynamic_sets_fork() -> None:
    sets = ("\tset aff {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n"
            "\t\ttimeout 3h\n\t}\n")
    script = table(PRE + "\t\tip saddr @aff dnat to 10.0.0.5:80\n"
                   "\t\tnumgen random mod 2 0 dnat to 10.0.0.1:80\n\t\tdnat to 10.0.0.2:80\n\t}",
                   sets=sets)
    assert trace(script).endpoints == ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.5:80")


def test_drop_reject_and_the_most_permissive_branch() -> None:
    script = table(FWD + "\t\tnumgen random mod 2 0 drop\n\t\treject\n\t}")
    got = trace(script)
    assert got.verdict == "REJECT"
    assert any("most permissive" in line for line in got.explanation)


def test_marks_and_masquerade() -> None:
    script = table(PRE + "\t\tmeta mark set meta mark | 0x00004000\n"
                   "\t\tdnat to 10.0.0.1:80\n\t}", POST)
    got = trace(script)
    assert (got.verdict, got.masquerade) == ("DNAT", True)


def test_locally_delivered_packets_skip_postrouting() -> None:
    script = table(PRE + "\t\tmeta mark set meta mark | 0x00004000\n\t}", POST)
    got = trace(script, packet("203.0.113.2", NODE_IP))
    assert (got.verdict, got.masquerade) == ("ACCEPT", False)


INPUT_LO = ("\tchain in {\n\t\ttype filter hook input priority -110; policy accept;\n"
            "\t\tiifname \"lo\" reject\n\t}")


@pytest.mark.parametrize(("src", "verdict"), [
    (NODE_IP, "REJECT"),  # sent to itself: back in on lo
    ("203.0.113.2", "ACCEPT"),  # arriving on eth0
])
def test_a_packet_the_node_sends_itself_comes_back_in_on_lo(src: str, verdict: str) -> None:
    got = trace(table(INPUT_LO), packet(src, NODE_IP, 22))
    assert got.verdict == verdict


def test_coming_back_in_on_lo_skips_nat() -> None:
    """NAT is decided once per connection: nat prerouting does not see the loop back."""
    script = table(PRE + "\t\tdnat to 10.0.0.9:80\n\t}")
    assert trace(script, packet(NODE_IP, NODE_IP, 22)).verdict == "ACCEPT"
    assert trace(script, packet("203.0.113.2", NODE_IP, 22)).endpoints == ("10.0.0.9:80",)


def test_a_packet_the_node_sends_has_no_input_interface() -> None:
    script = table("\tchain out {\n\t\ttype filter hook output priority -110; "
                   "policy accept;\n\t\tiifname != \"\" drop\n\t}")
    assert trace(script, packet(NODE_IP, "203.0.113.2")).verdict == "ACCEPT"


@pytest.mark.parametrize(("script", "match"), [
    ("table ip kube-proxy {\n\tchain x {\n\t\tip ttl 1 drop\n\t}\n}\n", "cannot read"),
    (table(PRE + "\t\tjump nowhere\n\t}"), "missing chain"),
    (table(PRE + "\t\tip daddr @nothing drop\n\t}"), "missing set"),
])
def test_errors(script: str, match: str) -> None:
    with pytest.raises(TraceError, match=match):
        trace(script)


def test_a_family_without_a_table_is_not_touched() -> None:
    got = trace("table ip6 kube-proxy {\n}\n")
    assert (got.verdict, got.endpoints, got.path) == ("ACCEPT", (), ())


def test_jump_loops_hit_the_depth_limit() -> None:
    script = table(PRE + "\t\tjump a\n\t}", "\tchain a {\n\t\tjump b\n\t}",
                   "\tchain b {\n\t\tjump a\n\t}")
    with pytest.raises(TraceLimitError):
        trace(script)


# -- rendered rulesets ---------------------------------------------------------------------

NP: dict[str, Any] = {"type": "NodePort", "ports": [("p80", 80, "TCP", 3001)]}


def rendered(objs: list[Obj]) -> str:
    config = ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),))
    return nftables.render([build_node_view(decode_objects(objs), config, 4)]).script()


def test_node_to_its_own_nodeport_without_endpoints_is_rejected_on_the_way_in() -> None:
    """Sent by the node to itself: nat-output finds no endpoint, and the packet, looping
    back on lo, meets nodeport-endpoints-check in filter-input."""
    script = rendered([node(), service("svc1", **NP), endpoint_slice("svc1", [])])
    got = trace_nftables(script, packet(NODE_IP, NODE_IP, 3001), LOCAL)
    assert got.verdict == "REJECT"
    assert any("comes back in on lo" in line for line in got.explanation)


def test_path_and_explanation_name_the_chains() -> None:
    script = rendered([node(), service("svc1", **NP),
                       endpoint_slice("svc1", [endpoint("10.180.0.1")])])
    got = trace_nftables(script, packet("203.0.113.2", NODE_IP, 3001), LOCAL)
    assert got.verdict == "DNAT" and got.masquerade
    assert got.path[:2] == ("firewall-check", "services")
    assert any(c.startswith("external-") for c in got.path)
    assert any("DNAT to 10.180.0.1:80" in line for line in got.explanation)


def test_hairpin_is_masqueraded_only_back_to_itself() -> None:
    script = rendered([node(), service("svc1"), endpoint_slice("svc1", [
        endpoint("10.180.0.1"), endpoint("10.180.0.2")])])
    got = trace_nftables(script, packet("10.180.0.1", "172.30.0.41"), LOCAL)
    assert got.endpoints == ("10.180.0.1:80", "10.180.0.2:80") and got.masquerade
    got = trace_nftables(script, packet("10.180.0.3", "172.30.0.41"), LOCAL)
    assert not got.masquerade


def test_cli_trace_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objs: list[dict[str, Any]] = [node(), service("svc1"),
                                  endpoint_slice("svc1", [endpoint("10.180.0.1")])]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump_all(objs))
    code = main(["trace", "-f", str(manifest), "--mode", "nftables", "--hostname-override",
                 NODE, "--cluster-cidr", "10.0.0.0/8", "--src", "10.180.0.9",
                 "--dst", "172.30.0.41", "--port", "80", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "DNAT" and out["endpoints"] == ["10.180.0.1:80"]
