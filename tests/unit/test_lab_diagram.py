"""The lab diagram, drawn from real node views of lab clusters, read back as a graph.

Each case is a small lab cluster (the seed and a few policies), planned and given its
EndpointSlices exactly as a running lab would (layout.plan, objects.api_objects, the
endpoint controller), turned into the node's views by the same code `lab diagram` uses
(nodeviews.views_of), drawn in every mode, and then checked on the SVG itself: which
Pods (or verdicts) each frontend reaches along the drawn edges, and that every chain
label is a chain the mode's renderer really writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from kubeproxy import modes
from kubeproxy.config.types import LBAlgorithm
from kubeproxy.lab import controller, diagram, layout, nodeviews, objects
from kubeproxy.lab.controller import PodStatus
from kubeproxy.lab.manifest import load_documents, parse_objects
from kubeproxy.lab.state import LabState
from kubeproxy.nodeview import NodeView, Route
from kubeproxy.util.jsontypes import JSON

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed.yaml"


def nodes(*names: str) -> str:
    return "".join(f"---\nkind: Node\nmetadata: {{name: {n}}}\n" for n in names)


def pod(name: str, node: str, app: str = "web") -> str:
    return (f"---\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\n"
            f"spec: {{nodeName: {node}, containers: []}}\n")


def service(name: str, spec: str, app: str = "web") -> str:
    return (f"---\nkind: Service\nmetadata: {{name: {name}}}\n"
            f"spec: {{selector: {{app: {app}}}, ports: [{{name: http, port: 80, "
            f"targetPort: 8080}}], {spec}}}\n")


WEB_PODS = pod("web-1", "node-1") + pod("web-2", "node-2") + pod("web-3", "node-2")
ALL = frozenset({"default/web-1", "default/web-2", "default/web-3"})
ON_NODE_1 = frozenset({"default/web-1"})


@dataclass(frozen=True)
class Case:
    name: str
    manifest: str
    node: str = "node-1"
    not_ready: frozenset[str] = frozenset()  # Pod keys whose kubelet says not Ready
    # (service name, frontend kind) -> what external (or pod) traffic reaches: Pod keys,
    # "REJECT" or "DROP". Every frontend of the cluster must be listed.
    reaches: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    # mode -> the frontends whose answer differs there (docs/ipvs.md says why).
    differs: Mapping[str, Mapping[tuple[str, str], frozenset[str]]] = field(
        default_factory=dict)

    def reaches_in(self, mode: str) -> Mapping[tuple[str, str], frozenset[str]]:
        return {**self.reaches, **self.differs.get(mode, {})}


CASES = (
    Case("seed", SEED.read_text(), reaches={
        ("my-service", "ClusterIP"): frozenset(
            {"default/my-app-1", "default/my-app-2", "default/my-app-3"}),
        ("my-service-nodeport", "ClusterIP"): frozenset(
            {"default/my-app-1", "default/my-app-2", "default/my-app-3"}),
        ("my-service-nodeport", "NodePort"): frozenset(
            {"default/my-app-1", "default/my-app-2", "default/my-app-3"}),
    }),
    Case("not ready pod is not drawn",
         nodes("node-1", "node-2") + WEB_PODS + service("web", "type: ClusterIP"),
         not_ready=frozenset({"default/web-3"}),
         reaches={("web", "ClusterIP"): frozenset({"default/web-1", "default/web-2"})}),
    Case("eTP=Local, node with a local endpoint",
         nodes("node-1", "node-2") + WEB_PODS
         + service("web", "type: NodePort, externalTrafficPolicy: Local"),
         reaches={("web", "ClusterIP"): ALL, ("web", "NodePort"): ON_NODE_1}),
    Case("eTP=Local, node without local endpoints drops",
         nodes("node-1", "node-2", "node-3") + WEB_PODS
         + service("web", "type: NodePort, externalTrafficPolicy: Local"),
         node="node-3",
         reaches={("web", "ClusterIP"): ALL, ("web", "NodePort"): frozenset({"DROP"})},
         # IPVS falls back to the cluster endpoints (upstream PR 97081).
         differs={"ipvs": {("web", "NodePort"): ALL}}),
    Case("iTP=Local",
         nodes("node-1", "node-2") + WEB_PODS
         + service("web", "type: ClusterIP, internalTrafficPolicy: Local"),
         reaches={("web", "ClusterIP"): ON_NODE_1}),
    Case("no endpoints rejects",
         nodes("node-1") + pod("web-1", "node-1")
         + service("web", "type: NodePort, externalIPs: [192.168.99.10]")
         + service("nothing", "type: NodePort", app="none"),
         reaches={("web", "ClusterIP"): ON_NODE_1, ("web", "NodePort"): ON_NODE_1,
                  ("web", "External"): ON_NODE_1,
                  ("nothing", "ClusterIP"): frozenset({"REJECT"}),
                  ("nothing", "NodePort"): frozenset({"REJECT"})}),
    Case("source ranges: firewall, then the pods",
         nodes("node-1", "node-2") + WEB_PODS
         + service("web", "type: LoadBalancer, loadBalancerSourceRanges: [203.0.113.0/24]"),
         reaches={("web", "ClusterIP"): ALL, ("web", "NodePort"): ALL,
                  ("web", "LoadBalancer"): ALL | {"DROP"}}),
    Case("external IPs",
         nodes("node-1", "node-2") + WEB_PODS
         + service("web", "type: ClusterIP, externalIPs: [192.168.99.10, 192.168.99.11]"),
         reaches={("web", "ClusterIP"): ALL, ("web", "External"): ALL}),
)


def lab_cluster(case: Case) -> tuple[layout.Plan, list[JSON]]:
    """The plan, and what the lab's API server would hold for it (Services with their
    LoadBalancer status, Nodes, the endpoint controller's slices)."""
    docs = load_documents([(case.name, case.manifest)])
    plan = layout.plan("d", parse_objects(docs))
    bodies, statuses = objects.api_objects(plan, docs)
    lb_status = {(objects.namespace_of(s), s["metadata"]["name"]): s["status"]
                 for s in statuses}
    out: list[JSON] = []
    for body in bodies:
        key = (objects.namespace_of(body), (body.get("metadata") or {}).get("name"))
        if body["kind"] == "Service" and key in lb_status:
            body = {**body, "status": lb_status[key]}
        out.append(body)
    status = {key: PodStatus(ready=False) for key in case.not_ready}
    o = plan.objects
    out += controller.endpoint_slices(o.services, o.pods, o.nodes, status)
    return plan, out


def lab_state(plan: layout.Plan, mode: str) -> LabState:
    return LabState(name=plan.lab, mode=mode, lb_algorithm="random",
                    cluster_cidr=plan.cluster_cidr, service_cidr=plan.service_cidr,
                    external_node=None, switch_ns=plan.switch_ns, nodes=plan.nodes,
                    external=plan.external)


def lab_views(case: Case, mode: str) -> tuple[layout.Plan, list[NodeView]]:
    plan, objs = lab_cluster(case)
    config = nodeviews.proxy_config(lab_state(plan, mode), case.node)
    return plan, nodeviews.views_of(objs, config)


def draw(case: Case, mode: str) -> tuple[str, list[NodeView]]:
    plan, views = lab_views(case, mode)
    names = modes.presentation(mode).chain_names
    return diagram.render(plan, views, names, node=case.node, mode=mode), views


def terminals(svg: str, start: str, *, external: bool) -> set[str]:
    """Pod keys (or IPs) and verdicts reachable from a box; external traffic does not
    take the edges only pods and the node take."""
    boxes, edges = diagram.boxes_of(svg), diagram.edges_of(svg)
    skip = (diagram.LOCAL_SOURCE,) if external else ()
    out = set()
    for key in diagram.reachable(edges, start, skip=skip):
        data = boxes[key].data
        if data["kind"] == "pod":
            out.add(data.get("pod", data["ip"]))
        elif data["kind"] == "verdict":
            out.add(data["verdict"])
    return out


MODES = modes.NAMES
CASE_IDS = [c.name for c in CASES]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_frontends_reach_what_the_policy_says(case: Case, mode: str) -> None:
    svg, _ = draw(case, mode)
    boxes = diagram.boxes_of(svg)
    found: dict[tuple[str, str], set[str]] = {}
    for key, box in boxes.items():
        if box.data["kind"] != "frontend":
            continue
        svc = box.data["service"].split("/")[1].split(":")[0]
        kind = box.data["frontend"]
        got = terminals(svg, key, external=kind != "ClusterIP")
        # Several frontends of one kind (two external IPs) must agree.
        assert found.setdefault((svc, kind), got) == got, key
    assert found == case.reaches_in(mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_ready_endpoint_is_reachable_from_its_frontends(case: Case, mode: str) -> None:
    """Whatever the case: each frontend reaches every endpoint its route's chain holds,
    and clients reach their frontends."""
    svg, views = draw(case, mode)
    boxes, edges = diagram.boxes_of(svg), diagram.edges_of(svg)
    from_pods = diagram.reachable(edges, diagram.PODS_CLIENT)
    from_outside = diagram.reachable(edges, diagram.EXTERNAL_CLIENT,
                                     skip=(diagram.LOCAL_SOURCE,))
    for view in views:
        for spv in view.services:
            svc = str(spv.name)
            fronts = {k: b.data["frontend"] for k, b in boxes.items()
                      if b.data.get("service") == svc and b.data["kind"] == "frontend"}
            assert sorted(fronts.values()).count("ClusterIP") == 1
            for key, kind in fronts.items():
                route = spv.internal if kind == "ClusterIP" else spv.external
                eps = {Route.CLUSTER: spv.cluster_endpoints,
                       Route.LOCAL: spv.local_endpoints}.get(route, ())
                assert eps or route in (Route.DROP, Route.REJECT)
                reached = diagram.reachable(edges, key, skip=(diagram.LOCAL_SOURCE,))
                for ep in eps:
                    assert ep.ready and f"pod:{ep.addr}" in reached, (key, ep)
                assert key in (from_pods if kind == "ClusterIP" else from_outside)


@pytest.mark.parametrize("mode", MODES)
def test_service_without_endpoints_reaches_reject_and_no_pod(mode: str) -> None:
    case = next(c for c in CASES if c.name == "no endpoints rejects")
    svg, _ = draw(case, mode)
    boxes, edges = diagram.boxes_of(svg), diagram.edges_of(svg)
    starts = [k for k, b in boxes.items() if b.data.get("service") == "default/nothing:http"
              and b.data["kind"] == "frontend"]
    assert len(starts) == 2  # ClusterIP and NodePort
    for start in starts:
        reached = {boxes[k].data["kind"] for k in diagram.reachable(edges, start)}
        assert "verdict:REJECT" in diagram.reachable(edges, start)
        assert "pod" not in reached and "chain" not in reached


# How each mode's text output (`kubeproxy render`) declares a chain.
CHAIN_DECLARATION = {
    "iptables": re.compile(r"^:(\S+) ", re.M),  # iptables-save: ":KUBE-SVC-X - [0:0]"
    "nftables": re.compile(r"^\tchain (\S+) \{", re.M),  # nft -f: "chain service-X {"
}
CHAIN_DECLARATION["ebpf"] = CHAIN_DECLARATION["nftables"]  # maps, then its nftables part
CHAIN_DECLARATION["ipvs"] = CHAIN_DECLARATION["iptables"]  # its iptables-save part
# A virtual server in ipvsadm-save -n spelling: "-A -t 10.96.0.10:80 -s rr".
VIRTUAL_SERVER = re.compile(r"^-A (-t|-u|--sctp-service) (\S+) ", re.M)
VS_PROTO = {"-t": "tcp", "-u": "udp", "--sctp-service": "sctp"}
# Per-endpoint chains each mode writes per service port and endpoint (the seed has
# two ports of three endpoints each).
CHAINS_PER_ENDPOINT = {"iptables": 1, "nftables": 0, "ebpf": 0, "ipvs": 0}


def rendered_chains(mode: str, views: list[NodeView], node: str) -> set[str]:
    """Chain names in the mode's real output (iptables-save / nft -f text)."""
    m = modes.get(mode)
    return set(CHAIN_DECLARATION[mode].findall(m.text(m.render(views), node)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chain_labels_are_the_renderers_names(case: Case, mode: str) -> None:
    svg, views = draw(case, mode)
    real = rendered_chains(mode, views, case.node)
    boxes = diagram.boxes_of(svg).values()
    chains = [b for b in boxes if b.data["kind"] == "chain"]
    virtual = [b for b in boxes if b.data["kind"] == "virtual-server"]
    assert chains or virtual
    m = modes.get(mode)
    servers = {f"{addr}/{VS_PROTO[opt]}" for opt, addr in VIRTUAL_SERVER.findall(
        m.text(m.render(views), case.node))}
    for box in virtual:  # each address drawn is a virtual server the renderer writes
        assert set(box.data["addresses"].split()) <= servers, box
    for box in chains:
        name = box.data["chain"]
        assert name in real
        assert box.id == f"chain:{name}"
        assert box.title == name
        # The label: the name on one line, or split after its hash over two (cut with
        # "..." only when even that does not fit).
        shown = box.lines[0] if box.lines[0] == name else "".join(box.lines[:2])
        assert shown == name or (shown.endswith("...")
                                 and name.startswith(shown.removesuffix("..."))), box.lines


@pytest.mark.parametrize("mode", MODES)
def test_diagram_draws_the_chains_the_mode_writes(mode: str) -> None:
    """Seed: the drawn chain set is exactly the per-service chains rendered."""
    case = CASES[0]
    svg, views = draw(case, mode)
    drawn = {b.data["chain"] for b in diagram.boxes_of(svg).values()
             if b.data["kind"] == "chain"}
    names = modes.presentation(mode).chain_names
    assert drawn == {c for view in views for spv in view.services for c in names(spv).all()}
    roles = sorted(b.data["role"] for b in diagram.boxes_of(svg).values()
                   if b.data["kind"] == "chain")
    virtual = sorted(b.data["frontend"] for b in diagram.boxes_of(svg).values()
                     if b.data["kind"] == "virtual-server")
    per_endpoint = ["endpoint"] * (6 * CHAINS_PER_ENDPOINT[mode])  # 2 ports x 3 pods
    if modes.presentation(mode).virtual_servers is None:
        assert roles == sorted(["service", "service", "external", *per_endpoint])
        assert virtual == []
    else:  # no chains: a virtual server per ClusterIP, one for the NodePort
        assert (roles, virtual) == ([], ["ClusterIP", "ClusterIP", "NodePort"])


def test_proxy_config_is_the_lab_proxies_command_line() -> None:
    """What `kubeproxy run` makes of the flags the lab starts it with (runtime.proxy_flags)."""
    plan, _ = lab_cluster(CASES[0])
    state = replace(lab_state(plan, "nftables"), lb_algorithm="round-robin")
    config = nodeviews.proxy_config(state, "node-1")
    assert (config.hostname, config.mode, config.lb_algorithm) == (
        "node-1", "nftables", LBAlgorithm.ROUND_ROBIN)
    assert [str(c) for c in config.cluster_cidrs] == [state.cluster_cidr]


def test_svg_names_lab_pods_and_other_addresses() -> None:
    """A slice the lab did not compute may point anywhere: drawn as an address."""
    manifest = nodes("node-1") + pod("web-1", "node-1") + (
        "---\nkind: Service\nmetadata: {name: ext}\n"
        "spec: {ports: [{name: http, port: 80}]}\n"
        "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\n"
        "metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}\n"
        "addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n"
        "endpoints: [{addresses: [10.99.0.7], conditions: {ready: true}}]\n"
    )
    case = Case("user slice", manifest)
    for mode in MODES:
        svg, _ = draw(case, mode)
        boxes = diagram.boxes_of(svg)
        assert boxes["pod:10.99.0.7"].lines == ("10.99.0.7", "(not a lab pod)")
        start = next(k for k, b in boxes.items() if b.data.get("service") == "default/ext:http")
        assert terminals(svg, start, external=False) == {"10.99.0.7"}
