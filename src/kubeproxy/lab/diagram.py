"""The flow the seed asks people to draw, for one lab node, as SVG.

    clients -> Service frontends -> the node's chains -> Pods

Theory of operation
-------------------
The picture is drawn from the node's :class:`~kubeproxy.nodeview.NodeView`, the very
decisions the node's proxy renders into rules, never from re-reading rule text:

* frontends come from each :class:`~kubeproxy.nodeview.ServicePortView` (its ClusterIP,
  NodePort, external IPs and load-balancer IPs);
* edges follow the view's routes: ``internal`` for ClusterIP traffic, ``external`` for
  the rest (``CLUSTER`` -> the service chain, ``LOCAL`` -> the local chain, ``DROP`` /
  ``REJECT`` -> a verdict box), the firewall when source ranges apply, the endpoints
  each policy chain selects, and endpoint -> Pod (``plan.pods`` by IP);
* chain boxes carry the names the mode's renderer writes, given by ``names`` (the
  mode's ``Presentation.chain_names``, render/names.py), so the labels are the names
  ``iptables -t nat -L`` or ``nft list table`` shows, and a chain the mode does not
  write (nftables has no per-endpoint chains) is not drawn.

A mode that balances in per-frontend virtual servers instead of chains (IPVS:
``Presentation.virtual_servers``) is drawn as frontend -> (the source-range firewall
chain) -> virtual server -> its real servers' Pods, from the renderer's own virtual
servers; one without real servers leads to REJECT (IPVS refuses), and under a
``Local`` policy without local endpoints it holds the cluster endpoints (IPVS's
fallback, docs/ipvs.md).

Chains are placed in columns by role (firewall, external, service, endpoint), so every
chain mode draws the same picture. The SVG says what it draws: every box is a ``<g>`` with an
``id`` and ``data-`` attributes (kind, role, chain, service, ip), every edge a ``<path>``
with ``data-from`` / ``data-to``, so :func:`boxes_of` and :func:`edges_of` read the
graph back (the tests check reachability on the drawn graph). Pure: views in, SVG out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import NamedTuple

from kubeproxy import modes
from kubeproxy.lab.layout import Plan, PodPlan
from kubeproxy.modes.base import VirtualServers
from kubeproxy.nodeview import EndpointView, NodeView, Route, ServicePortView
from kubeproxy.render.names import ChainNames

# Columns, left to right: (column, header). Only the columns in use are drawn.
COLUMNS: tuple[tuple[int, str], ...] = (
    (0, "clients"),
    (1, "Service frontends"),
    (2, "firewall chains"),  # loadBalancerSourceRanges
    (3, "external chains"),  # NodePort / external IP / LB traffic
    (4, "service chains"),  # cluster (and node-local) endpoints
    (5, "IPVS virtual servers"),  # modes without chains: one per frontend
    (6, "endpoint chains"),  # hairpin + DNAT, one per endpoint (iptables)
    (7, "verdicts"),
    (8, "Pods (DNAT)"),
)
# Chain role -> column.
ROLE_COLUMNS = {"firewall": 2, "external": 3, "service": 4, "local": 4, "endpoint": 6}
VIRTUAL_COLUMN, VERDICT_COLUMN, POD_COLUMN = 5, 7, 8
COLORS = {
    "ClusterIP": "#dbeafe",
    "NodePort": "#dcfce7",
    "External": "#ffedd5",
    "LoadBalancer": "#ffedd5",
    "client": "#f3f4f6",
    "firewall": "#fee2e2",
    "external": "#fef9c3",
    "service": "#e0e7ff",
    "local": "#c7d2fe",
    "endpoint": "#ede9fe",
    "pod": "#d1fae5",
    "virtual-server": "#e0e7ff",
    "verdict": "#fecaca",
}
PODS_CLIENT = "client:pods"
EXTERNAL_CLIENT = "client:external"
LOCAL_SOURCE = "local-source"  # edge taken only by pods and the node itself
NamesOf = Callable[[ServicePortView], ChainNames]
VirtualOf = Callable[[NodeView, ServicePortView], Sequence[VirtualServers]]


class Edge(NamedTuple):
    src: str  # box ids
    dst: str
    label: str = ""
    traffic: str = ""  # "" for all traffic, LOCAL_SOURCE for pod/node traffic only


class Box(NamedTuple):
    """A box as drawn: its id, ``data-`` attributes (without the prefix), text lines and
    title (a chain's full name)."""

    id: str
    data: Mapping[str, str]
    lines: tuple[str, ...]
    title: str = ""


# ---------------------------------------------------------------- the graph


@dataclass
class _Box:
    key: str
    lines: list[str]
    color: str
    column: int
    data: dict[str, str]
    title: str = ""
    x: float = 0
    y: float = 0


@dataclass
class _Graph:
    pods_by_ip: Mapping[str, PodPlan]
    boxes: dict[str, _Box] = field(default_factory=dict)
    edges: dict[Edge, None] = field(default_factory=dict)  # ordered, each once

    def box(self, key: str, lines: list[str], color: str, column: int, **data: str) -> str:
        self.boxes.setdefault(key, _Box(key, lines, color, column, data))
        return key

    def edge(self, src: str, dst: str, label: str = "", traffic: str = "") -> None:
        self.edges.setdefault(Edge(src, dst, label, traffic), None)

    def chain(self, name: str, role: str, spv: ServicePortView, note: str = "") -> str:
        key = f"chain:{name}"
        if key not in self.boxes:
            lines = [*_name_lines(name), note or str(spv.name)]
            self.box(key, lines[:3], COLORS[role], ROLE_COLUMNS[role], kind="chain",
                     role=role, chain=name, service=str(spv.name))
            self.boxes[key].title = name
        return key

    def verdict(self, route: Route) -> str:
        word = "REJECT" if route is Route.REJECT else "DROP"
        why = "no endpoints" if route is Route.REJECT else "no local endpoints / refused"
        return self.box(f"verdict:{word}", [word, why], COLORS["verdict"], VERDICT_COLUMN,
                        kind="verdict", verdict=word)

    def pod(self, ep: EndpointView) -> str:
        pod = self.pods_by_ip.get(ep.addr)
        lines = [pod.key, f"{ep.addr} on {pod.node}"] if pod else [ep.addr, "(not a lab pod)"]
        data = {"pod": pod.key} if pod else {}
        return self.box(f"pod:{ep.addr}", lines, COLORS["pod"], POD_COLUMN, kind="pod",
                        ip=ep.addr, **data)


def render(plan: Plan, views: Sequence[NodeView], names: NamesOf, *, node: str,
           mode: str) -> str:
    """The SVG of ``node``'s flow: its views, chains named by ``names`` (the mode's), or
    the mode's virtual servers when it balances in those (``virtual_servers`` of
    ``modes.presentation(mode)``)."""
    virtual = modes.presentation(mode).virtual_servers
    g = _Graph({p.ip: p for p in plan.pods})
    g.box(PODS_CLIENT, ["Pods", plan.cluster_cidr], COLORS["client"], 0, kind="client")
    g.box(EXTERNAL_CLIENT, ["external client", ", ".join(plan.external.clients)],
          COLORS["client"], 0, kind="client")
    for view in views:
        for spv in view.services:
            if virtual is not None:
                _virtual_servers(g, spv, virtual(view, spv))
            else:
                _service_port(g, view, spv, names(spv))
    return _svg(g, title=f"lab {plan.lab}: node {node} ({mode} mode)")


def _addr(ip: object, port: int, proto: str) -> str:
    text = str(ip)
    return f"[{text}]:{port}/{proto}" if ":" in text else f"{text}:{port}/{proto}"


def _service_port(g: _Graph, view: NodeView, spv: ServicePortView, cn: ChainNames) -> None:
    svc, proto = str(spv.name), spv.protocol

    def frontend(label: str, kind: str, what: str) -> str:
        return g.box(f"fe:{label}", [label, svc, what], COLORS[kind], 1, kind="frontend",
                     frontend=kind, service=svc)

    def policy(route: Route) -> str:
        """Where a route leads: the service or local chain, or a verdict."""
        if route is Route.CLUSTER and cn.service:
            return g.chain(cn.service, "service", spv, _masq_note(view, spv, Route.CLUSTER))
        if route is Route.LOCAL and cn.local:
            return g.chain(cn.local, "local", spv, _masq_note(view, spv, Route.LOCAL))
        if route in (Route.CLUSTER, Route.LOCAL):
            raise ValueError(f"{svc}: route {route.value} but no {route.value} chain named")
        return g.verdict(route)

    # ClusterIP traffic.
    fe = frontend(_addr(spv.cluster_ip, spv.port, proto), "ClusterIP", "ClusterIP")
    g.edge(PODS_CLIENT, fe)
    g.edge(fe, policy(spv.internal))
    # External traffic: NodePort, external IPs, load-balancer IPs.
    external: list[tuple[str, str, str, bool]] = []
    if spv.node_port:
        external.append((f"NodePort {spv.node_port}/{proto}", "NodePort", "NodePort", False))
    external += [(_addr(ip, spv.port, proto), "External", "external IP", False)
                 for ip in spv.external_ips]
    external += [(_addr(ip, spv.port, proto), "LoadBalancer", "load-balancer IP", True)
                 for ip in spv.load_balancer_ips]
    ext = g.chain(cn.external, "external", spv, _external_note(spv)) if cn.external else None
    fw = g.chain(cn.firewall, "firewall", spv, "allow source ranges") if cn.firewall else None
    for label, kind, what, is_lb in external:
        fe = frontend(label, kind, what)
        g.edge(EXTERNAL_CLIENT, fe)
        first = fw if is_lb and fw else ext
        if first:
            g.edge(fe, first)
        if spv.external in (Route.DROP, Route.REJECT):
            g.edge(fe, g.verdict(spv.external))
    if fw:
        ranges = ", ".join(str(r) for r in spv.source_ranges)
        if ext:
            g.edge(fw, ext, f"from {ranges}")
        g.edge(fw, g.verdict(Route.DROP), "other sources")
    if ext:
        if spv.external_policy_local and cn.service:
            # Pods and the node itself bypass the Local policy (upstream's short-circuit).
            g.edge(ext, policy(Route.CLUSTER), "pods, node", LOCAL_SOURCE)
        if spv.external in (Route.CLUSTER, Route.LOCAL):
            g.edge(ext, policy(spv.external))
    _endpoints(g, spv, cn)


def _virtual_servers(g: _Graph, spv: ServicePortView, servers: Sequence[VirtualServers]
                     ) -> None:
    """Frontends -> (the source-range firewall) -> their virtual server -> its real
    servers' Pods, or REJECT when it has none (IPVS answers ICMP port unreachable)."""
    svc, proto = str(spv.name), spv.protocol
    endpoints = {ep.target: ep for ep in spv.all_endpoints}
    by_kind = {vs.frontend: vs for vs in servers}
    labels = [(_addr(spv.cluster_ip, spv.port, proto), "ClusterIP", "ClusterIP")]
    if spv.node_port:
        labels.append((f"NodePort {spv.node_port}/{proto}", "NodePort", "NodePort"))
    labels += [(_addr(ip, spv.port, proto), "External", "external IP")
               for ip in spv.external_ips]
    labels += [(_addr(ip, spv.port, proto), "LoadBalancer", "load-balancer IP")
               for ip in spv.load_balancer_ips]
    for label, kind, what in labels:
        fe = g.box(f"fe:{label}", [label, svc, what], COLORS[kind], 1, kind="frontend",
                   frontend=kind, service=svc)
        g.edge(PODS_CLIENT if kind == "ClusterIP" else EXTERNAL_CLIENT, fe)
        vs = by_kind.get(kind)
        if vs is None:  # no virtual server for this frontend (e.g. no node addresses)
            continue
        key = _virtual_box(g, svc, vs)
        if vs.firewall:
            fw = g.chain(vs.firewall, "firewall", spv, "allow source ranges")
            ranges = ", ".join(str(r) for r in spv.source_ranges)
            g.edge(fe, fw)
            g.edge(fw, key, f"from {ranges}")
            g.edge(fw, g.verdict(Route.DROP), "other sources")
        else:
            g.edge(fe, key)
        for target in vs.reals:
            ep = endpoints[target]
            share = f"1/{len(vs.reals)}" + ("" if ep.ready else " (terminating)")
            g.edge(key, g.pod(ep), f"{share} {vs.scheduler} NAT :{ep.port}")
        if not vs.reals:
            g.edge(key, g.verdict(Route.REJECT), "no real servers")


def _virtual_box(g: _Graph, svc: str, vs: VirtualServers) -> str:
    first = vs.addresses[0] + (f" +{len(vs.addresses) - 1}" if len(vs.addresses) > 1 else "")
    lines = [first, f"{vs.scheduler}, {len(vs.reals)} real servers", svc]
    return g.box(f"vs:{svc}:{vs.frontend}", lines, COLORS["virtual-server"], VIRTUAL_COLUMN,
                 kind="virtual-server", frontend=vs.frontend, service=svc,
                 addresses=" ".join(vs.addresses))


def _endpoints(g: _Graph, spv: ServicePortView, cn: ChainNames) -> None:
    """Policy chain -> the endpoints it selects (through their chains, if any) -> Pods."""
    for name, role, eps in ((cn.service, "service", spv.cluster_endpoints),
                            (cn.local, "local", spv.local_endpoints)):
        if name is None:
            continue
        chain = g.chain(name, role, spv)
        for ep in eps:
            share = f"1/{len(eps)}" + ("" if ep.ready else " (terminating)")
            sep = cn.endpoints.get(ep.target)
            if sep is None:  # no per-endpoint chain: the policy chain DNATs
                g.edge(chain, g.pod(ep), f"{share} DNAT :{ep.port}")
                continue
            sep_key = g.chain(sep, "endpoint", spv, "masq. if hairpin")
            g.edge(chain, sep_key, share)
            g.edge(sep_key, g.pod(ep), f"DNAT :{ep.port}")


def _masq_note(view: NodeView, spv: ServicePortView, route: Route) -> str:
    """What the chain ClusterIP traffic enters marks for masquerade."""
    if spv.internal is not route:
        return str(spv.name)
    if view.masquerade_all:
        return "masquerade all"
    if view.local_detector.implemented:
        return "masq. if from outside cluster"
    return str(spv.name)


def _external_note(spv: ServicePortView) -> str:
    return "masq. node's own traffic" if spv.external_policy_local else "masquerade"


def _name_lines(name: str) -> list[str]:
    """A chain name in at most two lines: nftables' long names split after the hash."""
    if len(name) <= LINE_CHARS:
        return [name]
    prefix, _, rest = name.partition("-")
    digest, _, rest = rest.partition("-")
    head = f"{prefix}-{digest}-"
    if rest and len(head) <= LINE_CHARS:
        return [head, _cut(rest)]
    return [_cut(name)]


def _cut(text: str) -> str:
    return text if len(text) <= LINE_CHARS else text[: LINE_CHARS - 3] + "..."


# ---------------------------------------------------------------- drawing

BOX_W, BOX_H, COL_GAP, ROW_GAP, TOP, LINE_CHARS = 230, 50, 70, 12, 70, 34


def _svg(g: _Graph, *, title: str) -> str:
    boxes = g.boxes
    columns = sorted({b.column for b in boxes.values()})
    x_of = {c: 20 + i * (BOX_W + COL_GAP) for i, c in enumerate(columns)}
    heights: dict[int, float] = {}
    for b in boxes.values():
        b.x = x_of[b.column]
        b.y = TOP + heights.get(b.column, 0)
        heights[b.column] = heights.get(b.column, 0) + BOX_H + ROW_GAP
    width = 40 + len(columns) * (BOX_W + COL_GAP) - COL_GAP
    height = TOP + max(heights.values(), default=0) + 20
    headers = dict(COLUMNS)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="11">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#555"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        f'<text x="20" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for column, x in x_of.items():
        out.append(
            f'<text x="{x}" y="{TOP - 12}" font-weight="bold">{escape(headers[column])}</text>'
        )
    for edge in g.edges:
        out += _edge_svg(boxes[edge.src], boxes[edge.dst], edge)
    for b in boxes.values():
        out += _box_svg(b)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _attr(value: str) -> str:
    return escape(value, quote=True)


def _edge_svg(a: _Box, b: _Box, edge: Edge) -> list[str]:
    x1, y1 = a.x + BOX_W, a.y + BOX_H / 2
    x2, y2 = b.x, b.y + BOX_H / 2
    if b.column <= a.column:  # same column (e.g. a short-circuit): loop around
        x2, y2 = b.x + BOX_W, b.y + BOX_H / 2
    mid = (x1 + x2) / 2 if b.column > a.column else x1 + 40
    dash = ' stroke-dasharray="4 3"' if edge.traffic else ""
    traffic = f' data-traffic="{_attr(edge.traffic)}"' if edge.traffic else ""
    out = [
        f'<path class="edge" data-from="{_attr(edge.src)}" data-to="{_attr(edge.dst)}"'
        f'{traffic} d="M {x1:.0f} {y1:.0f} C {mid:.0f} {y1:.0f}, {mid:.0f} {y2:.0f}, '
        f'{x2:.0f} {y2:.0f}" fill="none" stroke="#555"{dash} marker-end="url(#arrow)"/>'
    ]
    if edge.label:
        out.append(
            f'<text x="{x2 - 6:.0f}" y="{y2 - 4:.0f}" font-size="9" fill="#333" '
            f'text-anchor="end">{escape(edge.label)}</text>'
        )
    return out


def _box_svg(b: _Box) -> list[str]:
    data = "".join(f' data-{k}="{_attr(v)}"' for k, v in sorted(b.data.items()))
    out = [f'<g class="box" id="{_attr(b.key)}"{data}>']
    if b.title:
        out.append(f"<title>{escape(b.title)}</title>")
    out.append(
        f'<rect x="{b.x}" y="{b.y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
        f'fill="{b.color}" stroke="#333"/>'
    )
    for i, text in enumerate(b.lines[:3]):
        weight = ' font-weight="bold"' if i == 0 else ""
        out.append(
            f'<text x="{b.x + 8}" y="{b.y + 16 + i * 14}"{weight}>'
            f"{escape(_cut(text))}</text>"
        )
    out.append("</g>")
    return out


# ---------------------------------------------------------------- reading it back

_NS = "{http://www.w3.org/2000/svg}"


def boxes_of(svg: str) -> dict[str, Box]:
    """The boxes of a drawn diagram, by id."""
    out: dict[str, Box] = {}
    for g in ET.fromstring(svg).iter(f"{_NS}g"):
        if g.get("class") != "box":
            continue
        data = {k[len("data-"):]: v for k, v in g.attrib.items() if k.startswith("data-")}
        lines = tuple(t.text or "" for t in g.iter(f"{_NS}text"))
        title = g.find(f"{_NS}title")
        key = g.get("id", "")
        out[key] = Box(key, data, lines, "" if title is None else title.text or "")
    return out


def edges_of(svg: str) -> list[Edge]:
    """The edges of a drawn diagram (labels are not read back)."""
    return [
        Edge(p.get("data-from", ""), p.get("data-to", ""), "", p.get("data-traffic", ""))
        for p in ET.fromstring(svg).iter(f"{_NS}path")
        if p.get("class") == "edge"
    ]


def reachable(edges: Iterable[Edge], start: str, *, skip: Iterable[str] = ()) -> set[str]:
    """Box ids reachable from ``start``, not following edges whose traffic is in skip."""
    skipped = set(skip)
    out: dict[str, list[str]] = {}
    for e in edges:
        if e.traffic not in skipped:
            out.setdefault(e.src, []).append(e.dst)
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in out.get(todo.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
