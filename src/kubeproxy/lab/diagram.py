"""The flow the seed asks people to draw, from the live rules of a lab node, as SVG.

    clients -> Service frontends -> the node's chains -> Pods

Rules are read from the node (``iptables-save`` or ``nft list table ip kube-proxy``) and
parsed into one small graph: frontends (a ClusterIP, external or LB IP and port, or a
NodePort) point at chains; chains point at chains, at a DNAT destination, or at a
REJECT/DROP verdict. Chains are placed in columns by role (firewall, external, service,
endpoint), so both modes draw the same picture. Pure: text in, SVG text out.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections import deque
from dataclasses import dataclass, field
from html import escape

from kubeproxy.lab.topology import Plan

# Chain role by name prefix -> column (both modes). Rows are tried in order.
CHAIN_COLUMNS = (
    ("KUBE-FW-", 0, "firewall"),
    ("firewall-", 0, "firewall"),
    ("KUBE-EXT-", 1, "external"),
    ("KUBE-XLB-", 1, "external"),
    ("external-", 1, "external"),
    ("KUBE-SVC-", 2, "service"),
    ("KUBE-SVL-", 2, "service"),
    ("service-", 2, "service"),
    ("local-", 2, "service"),
    ("KUBE-SEP-", 3, "endpoint"),
    ("endpoint-", 3, "endpoint"),
)
MASQ_CHAINS = frozenset({"KUBE-MARK-MASQ", "mark-for-masquerade"})
VERDICTS = frozenset({"REJECT", "DROP", "reject", "drop", "KUBE-MARK-DROP"})
KIND_COLORS = {
    "ClusterIP": "#dbeafe",
    "NodePort": "#dcfce7",
    "External": "#ffedd5",
    "client": "#f3f4f6",
    "firewall": "#fee2e2",
    "external": "#fef9c3",
    "service": "#e0e7ff",
    "endpoint": "#ede9fe",
    "pod": "#d1fae5",
    "verdict": "#fecaca",
}


@dataclass
class Frontend:
    label: str  # "10.96.0.10:80/tcp" or "NodePort 30080/tcp"
    kind: str  # ClusterIP, NodePort, External
    note: str  # service name / comment
    target: str  # chain or verdict


@dataclass
class Chain:
    name: str
    note: str = ""
    masquerade: str = ""  # when it marks for masquerade, in words
    edges: list[tuple[str, str]] = field(default_factory=list)  # (target, label)
    dnat: list[str] = field(default_factory=list)  # ip:port


@dataclass
class Graph:
    frontends: list[Frontend] = field(default_factory=list)
    chains: dict[str, Chain] = field(default_factory=dict)


# ---------------------------------------------------------------- parsing


def parse_iptables(save: str, service_cidr: str) -> Graph:
    """iptables-save text (nat and filter tables) -> graph."""
    graph = Graph()
    table = ""
    svc_net = ipaddress.ip_network(service_cidr)
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A "):
            continue
        args = shlex.split(line)
        chain, opts = args[1], _options(args[2:])
        target = opts.get("-j", "")
        comment = opts.get("--comment", "")
        if table == "nat" and chain == "KUBE-SERVICES" and "-d" in opts and target:
            ip = opts["-d"].split("/")[0]
            kind = "ClusterIP" if _in(ip, svc_net) else "External"
            label = f"{ip}:{opts.get('--dport', '*')}/{opts.get('-p', 'all')}"
            graph.frontends.append(Frontend(label, kind, _service_of(comment), target))
        elif table == "nat" and chain == "KUBE-NODEPORTS" and target:
            label = f"NodePort {opts.get('--dport', '*')}/{opts.get('-p', 'all')}"
            graph.frontends.append(Frontend(label, "NodePort", _service_of(comment), target))
        elif table == "filter" and target in VERDICTS and "--dport" in opts:
            if chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS"):
                dst = opts.get("-d", "").split("/")[0]
                if dst:
                    kind = "ClusterIP" if _in(dst, svc_net) else "External"
                    label = f"{dst}:{opts['--dport']}/{opts.get('-p', 'all')}"
                else:
                    kind, label = "NodePort", f"NodePort {opts['--dport']}/{opts.get('-p', 'all')}"
                graph.frontends.append(Frontend(label, kind, _service_of(comment), target))
        elif table == "nat" and _column(chain) is not None:
            node = graph.chains.setdefault(chain, Chain(chain))
            node.note = node.note or _service_of(comment)
            if target in MASQ_CHAINS:
                node.masquerade = _masq_reason(line)
            elif target == "DNAT":
                node.dnat.append(opts.get("--to-destination", "?"))
            elif target and target != "RETURN":
                prob = opts.get("--probability")
                node.edges.append((target, f"p={float(prob):.2f}" if prob else ""))
    return graph


def _options(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        if args[i].startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out.setdefault(args[i], args[i + 1])
            i += 2
        else:
            i += 1
    return out


_NFT_CHAIN = re.compile(r"^\s*chain (\S+) \{")
_NFT_JUMP = re.compile(r"\b(?:goto|jump) ([^\s,}]+)")
_NFT_DNAT = re.compile(r"\bdnat (?:ip )?to ([0-9.]+(?::[0-9]+)?)")
_NFT_IP_ELEM = re.compile(
    r"([0-9.]+) \. (tcp|udp|sctp) \. ([0-9]+) : (?:goto|jump) ([^\s,}]+|drop|reject)"
)
_NFT_PORT_ELEM = re.compile(r"(tcp|udp|sctp) \. ([0-9]+) : (?:goto|jump) ([^\s,}]+)")


def parse_nftables(text: str, service_cidr: str) -> Graph:
    """``nft list table ip kube-proxy`` text -> graph."""
    graph = Graph()
    svc_net = ipaddress.ip_network(service_cidr)
    block, name = "", ""
    for line in text.splitlines():
        stripped = line.strip()
        m = _NFT_CHAIN.match(line)
        if m:
            block, name = "chain", m.group(1)
            if _column(name) is not None:
                graph.chains[name] = Chain(name, note=_nft_service(name))
            continue
        if stripped.startswith("map "):
            block, name = "map", stripped.split()[1]
            continue
        if block == "map" and name in ("service-ips", "no-endpoint-services"):
            for ip, proto, port, target in _NFT_IP_ELEM.findall(line):
                kind = "ClusterIP" if _in(ip, svc_net) else "External"
                graph.frontends.append(
                    Frontend(f"{ip}:{port}/{proto}", kind, _nft_service(target), target)
                )
        elif block == "map" and name in ("service-nodeports", "no-endpoint-nodeports"):
            for proto, port, target in _NFT_PORT_ELEM.findall(line):
                graph.frontends.append(
                    Frontend(f"NodePort {port}/{proto}", "NodePort", _nft_service(target), target)
                )
        elif block == "chain" and name in graph.chains:
            chain = graph.chains[name]
            for target in _NFT_JUMP.findall(line):
                if target in MASQ_CHAINS:
                    chain.masquerade = _masq_reason(line)
                elif (target, "") not in chain.edges:
                    chain.edges.append((target, ""))
            chain.dnat += _NFT_DNAT.findall(line)
            if re.search(r"\b(drop|reject)\b", stripped) and not chain.edges:
                chain.edges.append(("drop" if "drop" in stripped else "reject", ""))
    return graph


def _masq_reason(rule: str) -> str:
    if "! -s " in rule or "saddr !=" in rule:
        return "masq. if from outside cluster"
    if " -s " in rule or "saddr " in rule:
        return "masq. if hairpin"
    return "masquerade"


def _nft_service(chain: str) -> str:
    # service-ULMVA6XW-ns1/svc1/tcp/p80 -> ns1/svc1 p80
    parts = chain.split("-", 2)
    if len(parts) < 3:
        return ""
    spec = parts[2].split("__")[0].split("/")
    return f"{spec[0]}/{spec[1]}:{spec[3]}" if len(spec) >= 4 else parts[2]


def _service_of(comment: str) -> str:
    """The "ns/name:port" a kube-proxy rule comment is about, if any."""
    for word in comment.split():
        if "/" in word and not word[0].isdigit():
            return word
    return ""


def _in(ip: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(ip) in net
    except ValueError:
        return False


def _column(chain: str) -> int | None:
    for prefix, column, _ in CHAIN_COLUMNS:
        if chain.startswith(prefix):
            return column
    return None


def _role(chain: str) -> str:
    for prefix, _, role in CHAIN_COLUMNS:
        if chain.startswith(prefix):
            return role
    return "verdict"


# ---------------------------------------------------------------- drawing

BOX_W, BOX_H, COL_GAP, ROW_GAP, TOP = 230, 50, 70, 12, 70


@dataclass
class _Box:
    key: str
    lines: list[str]
    color: str
    column: int
    x: float = 0
    y: float = 0


def render(plan: Plan, rules: str, *, mode: str, node: str) -> str:
    parse = parse_nftables if mode == "nftables" else parse_iptables
    return draw(parse(rules, plan.service_cidr), plan, node=node, mode=mode)


def draw(graph: Graph, plan: Plan, *, node: str, mode: str) -> str:
    pods_by_ip = {p.ip: p for p in plan.pods}
    boxes: dict[str, _Box] = {}
    edges: list[tuple[str, str, str]] = []

    def box(key: str, lines: list[str], color: str, column: int) -> str:
        boxes.setdefault(key, _Box(key, lines, color, column))
        return key

    pods_client = box("client:pods", ["Pods", plan.cluster_cidr], KIND_COLORS["client"], 0)
    ext_client = box(
        "client:external",
        ["external client", ", ".join(plan.external.clients)],
        KIND_COLORS["client"],
        0,
    )
    reachable: deque[str] = deque()
    for fe in graph.frontends:
        key = box(f"fe:{fe.label}", [fe.label, fe.note], KIND_COLORS[fe.kind], 1)
        edges.append((pods_client if fe.kind == "ClusterIP" else ext_client, key, ""))
        edges.append((key, fe.target, ""))
        reachable.append(fe.target)
    seen: set[str] = set()
    while reachable:
        name = reachable.popleft()
        if name in seen:
            continue
        seen.add(name)
        chain = graph.chains.get(name)
        if chain is None:
            box(name, [name], KIND_COLORS["verdict"], 6)
            continue
        column = 2 + (_column(name) or 0)
        lines = [_short(name), chain.note] + ([chain.masquerade] if chain.masquerade else [])
        box(name, lines, KIND_COLORS[_role(name)], column)
        for target, label in chain.edges:
            edges.append((name, target, label))
            reachable.append(target)
        for dest in chain.dnat:
            ip = dest.split(":")[0]
            pod = pods_by_ip.get(ip)
            lines = [pod.key, f"{ip} on {pod.node}"] if pod else [ip, "(not a lab pod)"]
            port = dest.partition(":")[2]
            label = f"DNAT :{port}" if port else "DNAT"
            edges.append((name, box(f"pod:{ip}", lines, KIND_COLORS["pod"], 7), label))
    return _svg(boxes, edges, title=f"lab {plan.lab}: node {node} ({mode} mode)")


def _short(chain: str) -> str:
    return chain if len(chain) <= 34 else chain[:31] + "..."


def _svg(boxes: dict[str, _Box], edges: list[tuple[str, str, str]], *, title: str) -> str:
    columns = sorted({b.column for b in boxes.values()})
    x_of = {c: 20 + i * (BOX_W + COL_GAP) for i, c in enumerate(columns)}
    heights: dict[int, float] = {}
    for b in boxes.values():
        b.x = x_of[b.column]
        b.y = TOP + heights.get(b.column, 0)
        heights[b.column] = heights.get(b.column, 0) + BOX_H + ROW_GAP
    width = 40 + len(columns) * (BOX_W + COL_GAP) - COL_GAP
    height = TOP + max(heights.values(), default=0) + 20
    headers = {0: "clients", 1: "Service frontends", 6: "verdicts", 7: "Pods (DNAT)"}
    headers.update({2 + c: f"{role} chains" for _, c, role in CHAIN_COLUMNS})
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
    for src, dst, label in edges:
        if src not in boxes or dst not in boxes:
            continue
        a, b = boxes[src], boxes[dst]
        x1, y1 = a.x + BOX_W, a.y + BOX_H / 2
        x2, y2 = b.x, b.y + BOX_H / 2
        if b.column <= a.column:  # same column (e.g. a fallback chain): loop around
            x2, y2 = b.x + BOX_W, b.y + BOX_H / 2
        mid = (x1 + x2) / 2 if b.column > a.column else x1 + 40
        out.append(
            f'<path d="M {x1:.0f} {y1:.0f} C {mid:.0f} {y1:.0f}, {mid:.0f} {y2:.0f}, '
            f'{x2:.0f} {y2:.0f}" fill="none" stroke="#555" marker-end="url(#arrow)"/>'
        )
        if label:
            out.append(
                f'<text x="{x2 - 6:.0f}" y="{y2 - 4:.0f}" font-size="9" fill="#333" '
                f'text-anchor="end">'
                f"{escape(label)}</text>"
            )
    for b in boxes.values():
        out.append(
            f'<rect x="{b.x}" y="{b.y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="{b.color}" stroke="#333"/>'
        )
        for i, text in enumerate(b.lines[:3]):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(
                f'<text x="{b.x + 8}" y="{b.y + 16 + i * 14}"{weight}>{escape(text[:36])}</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"
