"""/metrics: upstream's families (names, types, help, labels, buckets), each one moved by
what records it, and the text read back by a strict parser of the 0.0.4 text format."""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.conntrack import Frontend, Reason, StaleFlow
from kubeproxy.dataplane.nftables import SyncStats as NftStats
from kubeproxy.errors import DataPlaneError
from kubeproxy.health.metrics import FAMILIES, PROGRAMMING_BUCKETS, SYNC_BUCKETS, Metrics
from kubeproxy.k8s import decode_objects
from kubeproxy.model import (
    Family,
    NamespacedName,
    ServicePortName,
    parse_cidr,
)
from kubeproxy.modes import nftables as nft_mode
from kubeproxy.modes.base import PlaneCounts
from kubeproxy.nodeview import NodeView, build_node_view, no_local_endpoints
from kubeproxy.sync import SyncReport, SyncResult
from kubeproxy.tracker import Changes
from tests.builders import endpoint, endpoint_slice, node, render, service

# --- a strict parser of the Prometheus text format, version 0.0.4 -----------------------

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


@dataclass
class Parsed:
    type: str = ""
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _unescape(text: str, quote: bool) -> str:
    pairs = {"\\\\": "\\", "\\n": "\n", **({'\\"': '"'} if quote else {})}
    return re.sub(r"\\.", lambda m: pairs[m.group(0)], text)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    rest = text
    while rest:
        m = LABEL.match(rest)
        assert m, f"bad label set at {rest!r}"
        assert m.group(1) not in out, f"label {m.group(1)} twice"
        out[m.group(1)] = _unescape(m.group(2), quote=True)
        rest = rest[m.end():]
        assert rest == "" or rest.startswith(","), f"bad label separator at {rest!r}"
        rest = rest[1:]
    return out


def _family_of(name: str, families: dict[str, Parsed]) -> str:
    if name in families:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in families:
            return base
    raise AssertionError(f"sample {name} has no # TYPE line before it")


def parse_exposition(text: str) -> dict[str, Parsed]:
    """Every family, in order; raises AssertionError at the first violation."""
    assert text.endswith("\n"), "the last line ends with a newline"
    families: dict[str, Parsed] = {}
    current = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, *rest = line.split(" ", 3)
            assert NAME.fullmatch(name), f"bad metric name {name!r}"
            fam = families.setdefault(name, Parsed())
            assert current in (None, name) or not fam.samples, f"{name} declared late"
            if keyword == "HELP":
                assert fam.help is None, f"second HELP for {name}"
                fam.help = _unescape(rest[0] if rest else "", quote=False)
            else:
                assert not fam.type and not fam.samples, f"TYPE of {name} twice or late"
                assert rest and rest[0] in TYPES, f"bad TYPE line {line!r}"
                fam.type = rest[0]
            current = name
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)(?: (-?\d+))?", line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.group(1), _labels(m.group(2) or ""), m.group(3)
        assert NAME.fullmatch(name), f"bad metric name {name!r}"
        base = _family_of(name, families)
        assert base == current, f"samples of {base} are not together"
        fam = families[base]
        assert name == base or name.removeprefix(base) in SUFFIXES.get(fam.type, ()), name
        number = float(value)  # Go's ParseFloat spellings: NaN, +Inf, 1e+06 ...
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"series {key} twice"
        seen.add(key)
        if fam.type == "counter":
            assert number >= 0 and not math.isnan(number), line
        fam.samples.append((name, labels, number))
    for name, fam in families.items():
        assert fam.type, f"{name} has no TYPE"
        if fam.type == "histogram":
            _check_histogram(name, fam)
    return families


def _check_histogram(name: str, fam: Parsed) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for sample, labels, value in fam.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if sample.endswith("_bucket"):
            series.setdefault(key, []).append((float(labels["le"]), value))
        elif sample.endswith("_count"):
            counts[key] = value
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}{key}: le order"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{name}{key}: buckets are not cumulative"
        assert counts[key] == values[-1], f"{name}{key}: _count != +Inf bucket"


def test_the_parser_rejects_what_prometheus_would() -> None:
    good = '# HELP a x\n# TYPE a counter\na{l="q\\"\\\\\\n"} 1\n'
    assert parse_exposition(good)["a"].samples == [("a", {"l": 'q"\\\n'}, 1.0)]
    for bad in ['a 1\n', '# TYPE a counter\na{l="\\x"} 1\n', '# TYPE a counter\na -1\n',
                '# TYPE a gauge\n# TYPE a gauge\n', '# TYPE a gauge\na 1\na 2\n',
                '# TYPE a gauge\na{l="1"} 1', '# TYPE a histogram\na_bucket{le="1"} 2\n'
                'a_bucket{le="+Inf"} 1\na_count 1\n']:
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# --- fixtures ------------------------------------------------------------------------


def config(**kw: Any) -> ProxyConfig:
    return ProxyConfig(hostname="node1", cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"),), **kw)


DUAL: dict[str, Any] = {"cluster_ip": ["172.30.0.41", "fd00:30::41"],
                        "ipFamilyPolicy": "PreferDualStack"}


def cluster_objects() -> list[dict[str, Any]]:
    """svc1: internalTrafficPolicy Local, its only endpoint on node2 (both families);
    svc2: an ordinary ClusterIP service."""
    remote = [endpoint("10.180.1.1", node="node2")]
    return [node(ips=["192.168.0.2", "fd00::2"]),
            service("svc1", internalTrafficPolicy="Local", **DUAL),
            endpoint_slice("svc1", remote),
            endpoint_slice("svc1", [endpoint("fd00:10::1", node="node2")], name="svc1-6",
                           family="IPv6"),
            service("svc2", cluster_ip="172.30.0.42"),
            endpoint_slice("svc2", [endpoint("10.180.0.1")])]


def views(*families: Family) -> dict[Family, NodeView]:
    cluster = decode_objects(cluster_objects())
    return {f: build_node_view(cluster, config(), f) for f in families}


def result(*, full: bool = True, ok: bool = True, duration: float = 0.003,
           services: int = 0, endpoints: int = 0, triggers: tuple[float, ...] = (),
           families: Sequence[Family] = (4,)) -> SyncResult:
    changes = Changes(frozenset({NamespacedName("ns1", "a")}), False, services, endpoints,
                      triggers)
    written = views(*families)
    report = SyncReport(views=written, no_local={
        f: no_local_endpoints(v.services) for f, v in written.items()}) if ok else None
    return SyncResult(10.0, duration, full, changes, 1, report, None if ok else "boom")


def series(m: Metrics, name: str, **labels: str) -> float | None:
    """One series' value in the parsed /metrics text (None: not served)."""
    for fam in parse_exposition(m.render()).values():
        for sample, got, value in fam.samples:
            if sample == name and got == labels:
                return value
    return None


# --- every upstream family, as upstream declares it ----------------------------------

V4 = {"ip_family": "IPv4"}
# (name, type, help, labels): upstream's pkg/proxy/metrics (Kubernetes 1.33+).
UPSTREAM: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("sync_proxy_rules_duration_seconds", "histogram", "SyncProxyRules latency in seconds",
     ("ip_family",)),
    ("sync_full_proxy_rules_duration_seconds", "histogram",
     "SyncProxyRules latency in seconds for full resyncs", ("ip_family",)),
    ("sync_partial_proxy_rules_duration_seconds", "histogram",
     "SyncProxyRules latency in seconds for partial resyncs", ("ip_family",)),
    ("network_programming_duration_seconds", "histogram",
     "In Cluster Network Programming Latency in seconds", ("ip_family",)),
    ("sync_proxy_rules_last_timestamp_seconds", "gauge",
     "The last time proxy rules were successfully synced", ("ip_family",)),
    ("sync_proxy_rules_last_queued_timestamp_seconds", "gauge",
     "The last time a sync of proxy rules was queued", ("ip_family",)),
    ("sync_proxy_rules_endpoint_changes_pending", "gauge",
     "Pending proxy rules Endpoint changes", ()),
    ("sync_proxy_rules_endpoint_changes_total", "counter",
     "Cumulative proxy rules Endpoint changes", ()),
    ("sync_proxy_rules_service_changes_pending", "gauge", "Pending proxy rules Service changes",
     ()),
    ("sync_proxy_rules_service_changes_total", "counter",
     "Cumulative proxy rules Service changes", ()),
    ("sync_proxy_rules_iptables_restore_failures_total", "counter",
     "Cumulative proxy iptables restore failures", ("ip_family",)),
    ("sync_proxy_rules_iptables_partial_restore_failures_total", "counter",
     "Cumulative proxy iptables partial restore failures", ("ip_family",)),
    ("sync_proxy_rules_iptables_total", "gauge",
     "Total number of iptables rules owned by kube-proxy", ("ip_family", "table")),
    ("sync_proxy_rules_iptables_last", "gauge",
     "Number of iptables rules written by kube-proxy in last sync", ("ip_family", "table")),
    ("sync_proxy_rules_nftables_sync_failures_total", "counter",
     "Cumulative proxy nftables sync failures", ("ip_family",)),
    ("sync_proxy_rules_nftables_cleanup_failures_total", "counter",
     "Cumulative proxy nftables cleanup failures", ("ip_family",)),
    ("sync_proxy_rules_no_local_endpoints_total", "gauge",
     "Number of services with a Local traffic policy and no endpoints",
     ("ip_family", "traffic_policy")),
    ("proxy_healthz_total", "counter", "Cumulative proxy healthz HTTP status", ("code",)),
    ("proxy_livez_total", "counter", "Cumulative proxy livez HTTP status", ("code",)),
    ("conntrack_reconciler_sync_duration_seconds", "histogram",
     "ReconcileConntrackFlowsLatency latency in seconds", ("ip_family",)),
    ("conntrack_reconciler_deleted_entries_total", "counter",
     "Cumulative conntrack flows deleted by conntrack reconciler", ("ip_family",)),
]


@pytest.mark.parametrize(("name", "kind", "help_text", "labels"), UPSTREAM,
                         ids=[u[0] for u in UPSTREAM])
def test_upstream_family(name: str, kind: str, help_text: str, labels: tuple[str, ...]
                         ) -> None:
    declared = {f.name: f for f in FAMILIES}[name]
    assert (declared.kind, declared.help, declared.labels) == (kind, help_text, labels)
    served = parse_exposition(Metrics("iptables").render())[f"kubeproxy_{name}"]
    assert (served.type, served.help) == (kind, f"[ALPHA] {help_text}")


def test_upstream_buckets() -> None:
    assert SYNC_BUCKETS[0] == 0.001 and len(SYNC_BUCKETS) == 15
    assert all(math.isclose(b / a, 2) for a, b in itertools.pairwise(SYNC_BUCKETS))
    want = (0.25, 0.5, *range(1, 60), *range(60, 116, 5), *range(120, 301, 30))
    assert want == PROGRAMMING_BUCKETS
    assert len(PROGRAMMING_BUCKETS) == 2 + 59 + 12 + 7
    m = Metrics("iptables")
    m.record_sync(result(triggers=(9.0,)), 10.0)
    m.record_conntrack(4, 0.002, 1)
    fams = parse_exposition(m.render())
    for name, bounds in [("sync_proxy_rules_duration_seconds", SYNC_BUCKETS),
                         ("conntrack_reconciler_sync_duration_seconds", SYNC_BUCKETS),
                         ("network_programming_duration_seconds", PROGRAMMING_BUCKETS)]:
        les = [s[1]["le"] for s in fams[f"kubeproxy_{name}"].samples if "le" in s[1]]
        assert [float(x) for x in les] == [*bounds, math.inf], name
    # client_golang's spelling of the bounds: 1 (not 1.0), 0.001, 16.384.
    les = [s[1]["le"] for s in fams["kubeproxy_network_programming_duration_seconds"].samples
           if "le" in s[1]]
    assert les[:4] == ["0.25", "0.5", "1", "2"] and les[-1] == "+Inf"


def test_only_ours_besides_upstream() -> None:
    ours = {f.name for f in FAMILIES} - {u[0] for u in UPSTREAM}
    assert ours == {"sync_proxy_rules_flush_detected_total",
                    "sync_proxy_rules_ebpf_sync_failures_total"}


# --- each metric moves where its event happens ---------------------------------------


@dataclass(frozen=True)
class Move:
    name: str  # what happens
    mode: str
    act: Callable[[Metrics], None]
    series: str  # the sample name
    labels: dict[str, str]
    want: float


def syncs(*results: SyncResult) -> Callable[[Metrics], None]:
    def act(m: Metrics) -> None:
        for i, r in enumerate(results):
            m.record_sync(r, 100.0 + i)
    return act


def each(*acts: Callable[[Metrics], None]) -> Callable[[Metrics], None]:
    def act(m: Metrics) -> None:
        for one in acts:
            one(m)
    return act


P = "kubeproxy_"
MOVES = [
    Move("a full sync is timed", "iptables", syncs(result()),
         P + "sync_proxy_rules_duration_seconds_count", V4, 1),
    Move("a full sync lands in the full histogram", "iptables", syncs(result(duration=0.5)),
         P + "sync_full_proxy_rules_duration_seconds_bucket", {**V4, "le": "0.512"}, 1),
    Move("a partial sync lands in the partial histogram", "nftables",
         syncs(result(full=False, duration=0.5)),
         P + "sync_partial_proxy_rules_duration_seconds_count", V4, 1),
    Move("the partial sync is not below its bound", "iptables",
         syncs(result(full=False, duration=0.5)),
         P + "sync_partial_proxy_rules_duration_seconds_bucket", {**V4, "le": "0.256"}, 0),
    Move("each family a sync wrote is timed", "iptables", syncs(result(families=(4, 6))),
         P + "sync_proxy_rules_duration_seconds_count", {"ip_family": "IPv6"}, 1),
    Move("programming latency from the trigger time", "iptables",
         syncs(result(triggers=(99.0,))),
         P + "network_programming_duration_seconds_sum", V4, 1),
    Move("the last successful sync", "iptables", syncs(result(), result(ok=False)),
         P + "sync_proxy_rules_last_timestamp_seconds", V4, 100),
    Move("the last queued change", "iptables", lambda m: m.set_queued(123.5),
         P + "sync_proxy_rules_last_queued_timestamp_seconds", V4, 123.5),
    Move("service changes add up", "iptables",
         syncs(result(services=2), result(ok=False, services=1)),
         P + "sync_proxy_rules_service_changes_total", {}, 3),
    Move("endpoint changes add up", "iptables", syncs(result(endpoints=3), result(endpoints=1)),
         P + "sync_proxy_rules_endpoint_changes_total", {}, 4),
    Move("pending service changes", "iptables", lambda m: m.set_pending(4, 5),
         P + "sync_proxy_rules_service_changes_pending", {}, 4),
    Move("pending endpoint changes", "iptables", lambda m: m.set_pending(4, 5),
         P + "sync_proxy_rules_endpoint_changes_pending", {}, 5),
    Move("an iptables restore fails", "iptables", syncs(result(ok=False)),
         P + "sync_proxy_rules_iptables_restore_failures_total", V4, 1),
    Move("a partial iptables restore fails", "iptables",
         syncs(result(full=False, ok=False), result(ok=False)),
         P + "sync_proxy_rules_iptables_partial_restore_failures_total", V4, 1),
    Move("a partial restore failure is a restore failure too", "iptables",
         syncs(result(full=False, ok=False)),
         P + "sync_proxy_rules_iptables_restore_failures_total", V4, 1),
    Move("ipvs failures are iptables-restore's", "ipvs", syncs(result(ok=False)),
         P + "sync_proxy_rules_iptables_restore_failures_total", V4, 1),
    Move("an nftables sync fails", "nftables", syncs(result(ok=False)),
         P + "sync_proxy_rules_nftables_sync_failures_total", V4, 1),
    Move("an ebpf sync fails", "ebpf", syncs(result(ok=False)),
         P + "sync_proxy_rules_ebpf_sync_failures_total", V4, 1),
    Move("a failure after a dual-stack sync counts per family", "nftables",
         syncs(result(families=(4, 6)), result(ok=False)),
         P + "sync_proxy_rules_nftables_sync_failures_total", {"ip_family": "IPv6"}, 1),
    Move("iptables rules owned", "iptables",
         lambda m: m.record_plane(PlaneCounts(rules={(4, "nat"): (12, 5)})),
         P + "sync_proxy_rules_iptables_total", {**V4, "table": "nat"}, 12),
    Move("iptables rules written last", "iptables",
         lambda m: m.record_plane(PlaneCounts(rules={(6, "filter"): (7, 7)})),
         P + "sync_proxy_rules_iptables_last", {"ip_family": "IPv6", "table": "filter"}, 7),
    Move("an nftables cleanup fails", "nftables",
         lambda m: m.record_plane(PlaneCounts(cleanup_failures=(4,))),
         P + "sync_proxy_rules_nftables_cleanup_failures_total", V4, 1),
    Move("internal Local policy without local endpoints", "iptables", syncs(result()),
         P + "sync_proxy_rules_no_local_endpoints_total",
         {**V4, "traffic_policy": "internal"}, 1),
    Move("... per family", "iptables", syncs(result(families=(4, 6))),
         P + "sync_proxy_rules_no_local_endpoints_total",
         {"ip_family": "IPv6", "traffic_policy": "internal"}, 1),
    Move("external Local policy: none here", "iptables", syncs(result()),
         P + "sync_proxy_rules_no_local_endpoints_total",
         {**V4, "traffic_policy": "external"}, 0),
    Move("a healthz answer", "iptables",
         each(*(partial(Metrics.record_probe, name="proxy_healthz_total", code=c)
                for c in (200, 200, 503))),
         P + "proxy_healthz_total", {"code": "200"}, 2),
    Move("a livez answer", "iptables", lambda m: m.record_probe("proxy_livez_total", 503),
         P + "proxy_livez_total", {"code": "503"}, 1),
    Move("conntrack reconciling is timed", "iptables",
         lambda m: m.record_conntrack(6, 0.02, 0),
         P + "conntrack_reconciler_sync_duration_seconds_bucket",
         {"ip_family": "IPv6", "le": "0.032"}, 1),
    Move("conntrack entries deleted", "iptables",
         each(partial(Metrics.record_conntrack, family=4, seconds=0.01, deleted=3),
              partial(Metrics.record_conntrack, family=4, seconds=0.01, deleted=2)),
         P + "conntrack_reconciler_deleted_entries_total", V4, 5),
    Move("rules changed from outside", "nftables", lambda m: m.record_flush(),
         P + "sync_proxy_rules_flush_detected_total", {}, 1),
]


@pytest.mark.parametrize("case", MOVES, ids=[c.name for c in MOVES])
def test_metric_moves(case: Move) -> None:
    m = Metrics(case.mode)
    before = series(m, case.series, **case.labels)
    case.act(m)
    assert series(m, case.series, **case.labels) == case.want
    assert before in (None, 0.0)  # it was the act that moved it


def test_every_family_is_moved_by_a_case() -> None:
    moved = {c.series.removeprefix(P).removesuffix("_count").removesuffix("_bucket")
             .removesuffix("_sum") for c in MOVES if c.want}
    assert moved == {f.name for f in FAMILIES}


def test_move_names_are_unique() -> None:
    assert len({c.name for c in MOVES}) == len(MOVES)


# --- from the data planes and the daemon's conntrack cleanup -------------------------


def test_plane_counts_are_read_after_syncs_that_wrote() -> None:
    reads: list[int] = []

    def plane() -> PlaneCounts:
        reads.append(1)
        return PlaneCounts(cleanup_failures=(4,))

    m = Metrics("nftables", plane=plane)
    skipped = SyncResult(10.0, 0.0, False, Changes(), 1)  # the changes cancelled out
    for r in (result(), skipped, result(ok=False)):
        m.record_sync(r, 1.0)
    assert len(reads) == 1  # a skipped or failed sync wrote nothing to count again
    assert series(m, P + "sync_proxy_rules_nftables_cleanup_failures_total", **V4) == 1


def test_iptables_fake_plane_reports_its_rules() -> None:
    mode = modes.get("iptables")
    cfg = config(mode="iptables")
    cluster = decode_objects(cluster_objects())
    plane = mode.fake()
    plane.sync(render(cluster, cfg))
    counts = plane.counts()
    assert set(counts.rules) == {(4, "filter"), (4, "nat"), (6, "filter"), (6, "nat")}
    nat_total, nat_written = counts.rules[(4, "nat")]
    assert nat_total == nat_written > 0  # a first (full) sync writes every rule
    svc1 = frozenset({NamespacedName("ns1", "svc1")})
    plane.sync(render(cluster, cfg), svc1)  # partial, nothing changed: nothing written
    total, written = plane.counts().rules[(4, "nat")]
    assert total == nat_total and written == 0
    m = Metrics("iptables", plane=plane.counts)
    m.record_sync(result(), 1.0)
    assert series(m, P + "sync_proxy_rules_iptables_last", ip_family="IPv4",
                  table="nat") == written


class StaleCleanupFails:
    """NftablesDataPlane's sync, answering what a failed stale-chain deletion reports."""

    def sync(self, ruleset: object, changed: object = None) -> NftStats:
        return NftStats(cleanup_failed=("ip6",))


def test_nftables_plane_reports_cleanup_failures() -> None:
    plane = nft_mode.NftablesPlane(StaleCleanupFails(), lambda: "")  # type: ignore[arg-type]
    assert plane.counts() == PlaneCounts()  # nothing synced yet
    plane.sync(None)  # type: ignore[arg-type]
    assert plane.counts().cleanup_failures == (6,)


def flows(*families: Family) -> list[StaleFlow]:
    address = {4: ipaddress.ip_address("172.30.0.41"), 6: ipaddress.ip_address("fd00:30::41")}
    name = ServicePortName(NamespacedName("ns1", "svc1"), "p80", "UDP")
    return [StaleFlow(f, Frontend(80, address[f]), None, name, Reason.FRONTEND_GONE)
            for f in families]


def test_conntrack_reconciler_per_family() -> None:
    now = [0.0]
    calls: list[list[int]] = []

    def delete(some: Sequence[StaleFlow]) -> int:
        calls.append([f.family for f in some])
        now[0] += 0.25
        if some[0].family == 6:
            raise DataPlaneError("conntrack -D failed")
        return 2 * len(some)

    m = Metrics("iptables", clock=lambda: now[0])
    with pytest.raises(DataPlaneError, match="conntrack -D failed"):
        m.reconcile_conntrack(delete, flows(6, 4, 4))
    assert calls == [[4, 4], [6]]  # every family tried, one delete per family
    assert series(m, P + "conntrack_reconciler_deleted_entries_total", **V4) == 4
    assert series(m, P + "conntrack_reconciler_sync_duration_seconds_sum",
                  ip_family="IPv6") == 0.25


# --- the store is strict, the exposition complete ------------------------------------


@pytest.mark.parametrize(("act", "error"), [
    (lambda m: m.inc("no_such_metric"), KeyError),
    (lambda m: m.inc("proxy_healthz_total"), ValueError),  # no code label
    (lambda m: m.inc("sync_proxy_rules_flush_detected_total", ip_family="IPv4"), ValueError),
    (lambda m: m.inc("sync_proxy_rules_flush_detected_total", -1), ValueError),
    (lambda m: m.set("sync_proxy_rules_flush_detected_total", 3), ValueError),
    (lambda m: m.observe("sync_proxy_rules_service_changes_pending", 1), ValueError),
], ids=["unknown", "missing label", "extra label", "counter down", "set counter",
        "observe gauge"])
def test_store_rejects(act: Callable[[Metrics], object], error: type[Exception]) -> None:
    with pytest.raises(error):
        act(Metrics("iptables"))


def test_label_values_are_escaped() -> None:
    m = Metrics("iptables")
    m.inc("proxy_healthz_total", code='5"0\\3\n')
    assert series(m, P + "proxy_healthz_total", code='5"0\\3\n') == 1


def test_process_and_build_info() -> None:
    fams = parse_exposition(Metrics("nftables").render())
    for name, kind in [("process_cpu_seconds_total", "counter"),
                       ("process_resident_memory_bytes", "gauge"),
                       ("process_virtual_memory_bytes", "gauge"),
                       ("process_start_time_seconds", "gauge"),
                       ("process_open_fds", "gauge"), ("process_max_fds", "gauge")]:
        assert fams[name].type == kind and fams[name].samples[0][2] > 0, name
    (_, labels, value), = fams["kubernetes_build_info"].samples
    assert value == 1 and set(labels) == {
        "build_date", "compiler", "git_commit", "git_tree_state", "git_version",
        "go_version", "major", "minor", "platform"}
    assert labels["git_version"].startswith("v") and "/" in labels["platform"]
    assert not any(n.endswith("_created") for f in fams.values() for n, _, _ in f.samples)
