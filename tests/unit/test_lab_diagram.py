"""The lab diagram: rules text -> graph -> SVG, for both modes."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from kubeproxy.lab import diagram, topology
from kubeproxy.lab.manifest import load_documents, parse_objects

IPTABLES = """\
*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.12/32 -p tcp -m comment --comment "default/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-EXT-B23 -m comment --comment "masquerade traffic for default/np:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-B23 -j KUBE-SVC-B23
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/np:http" -m tcp --dport 30080 -j KUBE-EXT-B23
-A KUBE-SEP-AAA -s 10.244.1.2/32 -m comment --comment "default/np:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-AAA -p tcp -m comment --comment "default/np:http" -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-SEP-BBB -p tcp -m comment --comment "default/np:http" -m tcp -j DNAT --to-destination 10.244.1.99:8080
-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "default/np:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-B23
-A KUBE-SERVICES -d 192.168.99.10/32 -p tcp -m comment --comment "default/np:http external IP" -m tcp --dport 80 -j KUBE-EXT-B23
-A KUBE-SVC-B23 ! -s 10.244.0.0/16 -d 10.96.0.11/32 -p tcp -m comment --comment "default/np:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-B23 -m comment --comment "default/np:http -> 10.244.1.2:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-AAA
-A KUBE-SVC-B23 -m comment --comment "default/np:http -> 10.244.1.99:8080" -j KUBE-SEP-BBB
COMMIT
"""  # noqa: E501

NFTABLES = """\
table ip kube-proxy {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.11 . tcp . 80 : goto service-ULMVA6XW-default/np/tcp/http,
			192.168.99.10 . tcp . 80 : goto external-ULMVA6XW-default/np/tcp/http }
	}
	map service-nodeports {
		type inet_proto . inet_service : verdict
		elements = { tcp . 30080 : goto external-ULMVA6XW-default/np/tcp/http }
	}
	chain external-ULMVA6XW-default/np/tcp/http {
		jump mark-for-masquerade
		goto service-ULMVA6XW-default/np/tcp/http
	}
	chain service-ULMVA6XW-default/np/tcp/http {
		ip daddr 10.96.0.11 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-default/np/tcp/http__10.244.1.2/8080, 1 : goto endpoint-ZZZZZZZZ-default/np/tcp/http__10.244.1.99/8080 }
	}
	chain endpoint-5OJB2KTY-default/np/tcp/http__10.244.1.2/8080 {
		ip saddr 10.244.1.2 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.244.1.2:8080
	}
	chain endpoint-ZZZZZZZZ-default/np/tcp/http__10.244.1.99/8080 {
		meta l4proto tcp dnat to 10.244.1.99:8080
	}
}
"""  # noqa: E501

LAB = "kind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec: {containers: []}\n"


def lab_plan() -> topology.Plan:
    return topology.plan("d", parse_objects(load_documents([("t", LAB)])))


def test_iptables_graph() -> None:
    g = diagram.parse_iptables(IPTABLES, "10.96.0.0/16")
    fronts = {(f.label, f.kind, f.target) for f in g.frontends}
    assert fronts == {
        ("10.96.0.11:80/tcp", "ClusterIP", "KUBE-SVC-B23"),
        ("192.168.99.10:80/tcp", "External", "KUBE-EXT-B23"),
        ("NodePort 30080/tcp", "NodePort", "KUBE-EXT-B23"),
        ("10.96.0.12:80/tcp", "ClusterIP", "REJECT"),
    }
    svc = g.chains["KUBE-SVC-B23"]
    assert svc.edges == [("KUBE-SEP-AAA", "p=0.50"), ("KUBE-SEP-BBB", "")]
    assert svc.masquerade == "masq. if from outside cluster"
    assert g.chains["KUBE-SEP-AAA"].masquerade == "masq. if hairpin"
    assert g.chains["KUBE-SEP-AAA"].dnat == ["10.244.1.2:8080"]
    assert g.chains["KUBE-EXT-B23"].note == "default/np:http"


def test_nftables_graph_matches_iptables_shape() -> None:
    g = diagram.parse_nftables(NFTABLES, "10.96.0.0/16")
    kinds = sorted((f.label, f.kind) for f in g.frontends)
    assert kinds == [
        ("10.96.0.11:80/tcp", "ClusterIP"),
        ("192.168.99.10:80/tcp", "External"),
        ("NodePort 30080/tcp", "NodePort"),
    ]
    svc = g.chains["service-ULMVA6XW-default/np/tcp/http"]
    assert [t for t, _ in svc.edges] == [
        "endpoint-5OJB2KTY-default/np/tcp/http__10.244.1.2/8080",
        "endpoint-ZZZZZZZZ-default/np/tcp/http__10.244.1.99/8080",
    ]
    assert svc.note == "default/np:http"
    ep = g.chains["endpoint-5OJB2KTY-default/np/tcp/http__10.244.1.2/8080"]
    assert ep.dnat == ["10.244.1.2:8080"] and ep.masquerade == "masq. if hairpin"


def test_svg_is_well_formed_and_names_pods() -> None:
    for mode, rules in (("iptables", IPTABLES), ("nftables", NFTABLES)):
        svg = diagram.render(lab_plan(), rules, mode=mode, node="node-1")
        root = ET.fromstring(svg)
        texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert "default/web" in texts  # 10.244.1.2 is the lab's pod
        assert "10.244.1.99" in texts  # not a lab pod: shown as an address
        assert "NodePort 30080/tcp" in texts
        assert any("Service frontends" in t for t in texts)


def test_empty_rules_still_draw() -> None:
    ET.fromstring(diagram.render(lab_plan(), "", mode="iptables", node="node-1"))
