"""kube-proxy's metrics: upstream's families, recorded where things happen, served as text.

Theory of operation
-------------------
:data:`FAMILIES` is the literal table of every metric ``/metrics`` serves: upstream's
pkg/proxy/metrics (names, types, help texts, labels and buckets as upstream declares
them, the ``ip_family`` label where upstream has it), plus two of ours. The daemon's main
thread records into a :class:`Metrics` (a plain store behind one lock: counters, gauges
and histograms keyed by label values, strict about names and labels), the HTTP thread
renders a consistent snapshot of it. What records what: the daemon each sync result
(:meth:`Metrics.record_sync`), queued and pending changes, flushes found, and the
conntrack cleanup (:meth:`Metrics.reconcile_conntrack` runs it per family); the health
server each probe; the data plane, after each successful sync, what only it knows
(``Mode.plane_counts``: iptables rule counts, nftables cleanup failures).

The exposition is prometheus-client's (``generate_latest``, text format 0.0.4: escaping,
``# HELP``/``# TYPE``, the process collector's ``process_*`` families that client_golang
also serves). Our store hands it finished families from a collector at scrape time, so
the library holds no state of ours and no ``_created`` series appear (upstream has
none). The choice was measured (docs/flags.md, "Metrics"): importing prometheus-client
after the daemon's own imports costs 15-30 ms of a ~300 ms start and 1.2 MiB of RSS, and
``kube-proxy --version`` does not import it.

One sync here writes every IP family at once (upstream runs one proxier per family), so
a sync's duration, result and programming latency are recorded under each family it
wrote; the first sync's failure, before any family was written, counts under IPv4.
Families are registered for every mode (upstream registers the iptables-, ipvs- and
nftables-only ones per mode); a family a mode never moves stays empty or at zero.
"""

from __future__ import annotations

import math
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from kubeproxy import __version__, modes
from kubeproxy.conntrack import StaleFlow
from kubeproxy.dataplane.base import DataPlaneError
from kubeproxy.model import Family
from kubeproxy.modes.base import PlaneCounts
from kubeproxy.sync import SyncResult

Kind = Literal["counter", "gauge", "histogram"]
IP = ("ip_family",)
IP_FAMILY: dict[Family, str] = {4: "IPv4", 6: "IPv6"}

# Upstream's buckets: ExponentialBuckets(0.001, 2, 15) = 1 ms .. 16.384 s for syncs and
# conntrack reconciling; network programming: 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5,
# 2..5 min by 30 s (MergeBuckets of four LinearBuckets).
SYNC_BUCKETS = tuple(0.001 * 2 ** i for i in range(15))
PROGRAMMING_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))


@dataclass(frozen=True)
class MetricFamily:
    name: str  # without the kubeproxy_ prefix
    kind: Kind
    help: str  # upstream's text; served as "[ALPHA] <help>", as client_golang does
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only

    @property
    def full(self) -> str:
        return f"kubeproxy_{self.name}"


FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily("sync_proxy_rules_duration_seconds", "histogram",
                 "SyncProxyRules latency in seconds", IP, SYNC_BUCKETS),
    MetricFamily("sync_full_proxy_rules_duration_seconds", "histogram",
                 "SyncProxyRules latency in seconds for full resyncs", IP, SYNC_BUCKETS),
    MetricFamily("sync_partial_proxy_rules_duration_seconds", "histogram",
                 "SyncProxyRules latency in seconds for partial resyncs", IP, SYNC_BUCKETS),
    MetricFamily("network_programming_duration_seconds", "histogram",
                 "In Cluster Network Programming Latency in seconds", IP,
                 PROGRAMMING_BUCKETS),
    MetricFamily("sync_proxy_rules_last_timestamp_seconds", "gauge",
                 "The last time proxy rules were successfully synced", IP),
    MetricFamily("sync_proxy_rules_last_queued_timestamp_seconds", "gauge",
                 "The last time a sync of proxy rules was queued", IP),
    MetricFamily("sync_proxy_rules_endpoint_changes_pending", "gauge",
                 "Pending proxy rules Endpoint changes"),
    MetricFamily("sync_proxy_rules_endpoint_changes_total", "counter",
                 "Cumulative proxy rules Endpoint changes"),
    MetricFamily("sync_proxy_rules_service_changes_pending", "gauge",
                 "Pending proxy rules Service changes"),
    MetricFamily("sync_proxy_rules_service_changes_total", "counter",
                 "Cumulative proxy rules Service changes"),
    MetricFamily("sync_proxy_rules_iptables_restore_failures_total", "counter",
                 "Cumulative proxy iptables restore failures", IP),
    MetricFamily("sync_proxy_rules_iptables_partial_restore_failures_total", "counter",
                 "Cumulative proxy iptables partial restore failures", IP),
    MetricFamily("sync_proxy_rules_iptables_total", "gauge",
                 "Total number of iptables rules owned by kube-proxy", (*IP, "table")),
    MetricFamily("sync_proxy_rules_iptables_last", "gauge",
                 "Number of iptables rules written by kube-proxy in last sync",
                 (*IP, "table")),
    MetricFamily("sync_proxy_rules_nftables_sync_failures_total", "counter",
                 "Cumulative proxy nftables sync failures", IP),
    MetricFamily("sync_proxy_rules_nftables_cleanup_failures_total", "counter",
                 "Cumulative proxy nftables cleanup failures", IP),
    MetricFamily("sync_proxy_rules_no_local_endpoints_total", "gauge",
                 "Number of services with a Local traffic policy and no endpoints",
                 (*IP, "traffic_policy")),
    MetricFamily("proxy_healthz_total", "counter", "Cumulative proxy healthz HTTP status",
                 ("code",)),
    MetricFamily("proxy_livez_total", "counter", "Cumulative proxy livez HTTP status",
                 ("code",)),
    MetricFamily("conntrack_reconciler_sync_duration_seconds", "histogram",
                 "ReconcileConntrackFlowsLatency latency in seconds", IP, SYNC_BUCKETS),
    MetricFamily("conntrack_reconciler_deleted_entries_total", "counter",
                 "Cumulative conntrack flows deleted by conntrack reconciler", IP),
    # Ours, not upstream's: the ebpf mode's failed syncs (Mode.sync_failures_metric).
    MetricFamily("sync_proxy_rules_ebpf_sync_failures_total", "counter",
                 "Cumulative proxy ebpf sync failures", IP),
    # Ours, not upstream's (upstream only logs): rules found changed or removed from
    # outside (a flushed chain, a deleted table) by the data plane's intact() check; each
    # one triggers a full sync.
    MetricFamily("sync_proxy_rules_flush_detected_total", "counter",
                 "Cumulative times the proxy's rules were found changed or removed from "
                 "outside"),
)
BY_NAME = {f.name: f for f in FAMILIES}
# Upstream's kubernetes_build_info labels (component-base/metrics/version.go).
BUILD_INFO_LABELS = ("build_date", "compiler", "git_commit", "git_tree_state", "git_version",
                     "go_version", "major", "minor", "platform")


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            total += n
            out.append((go_float(bound), float(total)))
        out.append(("+Inf", float(self.count)))
        return out


def go_float(value: float) -> str:
    """A bucket bound as client_golang writes ``le`` (strconv 'g', shortest): 1, 0.25."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e21 else repr(value)


Key = tuple[str, ...]


class Metrics:
    """kube-proxy's metrics; written by the main thread, read by /metrics."""

    def __init__(self, mode: str, *, plane: Callable[[], PlaneCounts] | None = None,
                 clock: Callable[[], float] = time.monotonic, process: bool = True) -> None:
        """``plane``: what the data plane says after a sync (``Mode.plane_counts`` of
        the daemon's plane); ``process``: serve the process_* families."""
        self.mode = mode
        self._plane = plane
        self._clock = clock
        the_mode = modes.get(mode)
        self._failures = BY_NAME[the_mode.sync_failures_metric.removeprefix("kubeproxy_")]
        self._partial = (None if the_mode.partial_failures_metric is None else
                         BY_NAME[the_mode.partial_failures_metric.removeprefix("kubeproxy_")])
        self._lock = threading.Lock()
        self._values: dict[str, dict[Key, float]] = {
            f.name: {} for f in FAMILIES if f.kind != "histogram"}
        self._hists: dict[str, dict[Key, _Histogram]] = {
            f.name: {} for f in FAMILIES if f.kind == "histogram"}
        for f in FAMILIES:  # unlabelled families are served from the start, at 0
            if not f.labels and f.kind != "histogram":
                self._values[f.name][()] = 0.0
        self._families: tuple[Family, ...] = (4,)  # those the last successful sync wrote
        self.configz = b"{}"  # the effective KubeProxyConfiguration, as JSON (/configz)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=self.registry)

    # --- the store: strict about names and labels -------------------------------------

    def _key(self, name: str, labels: Mapping[str, str]) -> tuple[MetricFamily, Key]:
        family = BY_NAME.get(name)
        if family is None:
            raise KeyError(f"no metric family {name!r}")
        if set(labels) != set(family.labels):
            raise ValueError(f"{family.full}: labels {sorted(labels)}, want "
                             f"{sorted(family.labels)}")
        return family, tuple(str(labels[n]) for n in family.labels)

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        family, key = self._key(name, labels)
        if family.kind != "counter" or by < 0:
            raise ValueError(f"{family.full}: a {family.kind} cannot be increased by {by}")
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + by

    def set(self, name: str, value: float, **labels: str) -> None:
        family, key = self._key(name, labels)
        if family.kind != "gauge":
            raise ValueError(f"{family.full}: a {family.kind} cannot be set")
        with self._lock:
            self._values[name][key] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        family, key = self._key(name, labels)
        if family.kind != "histogram":
            raise ValueError(f"{family.full}: a {family.kind} takes no observations")
        with self._lock:
            series = self._hists[name]
            hist = series.get(key)
            if hist is None:
                hist = series[key] = _Histogram(family.buckets)
            hist.observe(value)

    # --- what the daemon records --------------------------------------------------------

    def record_probe(self, name: str, code: int) -> None:
        """An answer of /healthz (``proxy_healthz_total``) or /livez."""
        self.inc(name, code=str(code))

    def set_queued(self, wall: float) -> None:
        """The wall time a sync was last queued (a change arrived)."""
        for family in self._families:
            self.set("sync_proxy_rules_last_queued_timestamp_seconds", wall,
                     ip_family=IP_FAMILY[family])

    def set_pending(self, services: int, endpoints: int) -> None:
        self.set("sync_proxy_rules_service_changes_pending", services)
        self.set("sync_proxy_rules_endpoint_changes_pending", endpoints)

    def record_flush(self) -> None:
        """The data plane found its rules changed from outside (a full sync follows)."""
        self.inc("sync_proxy_rules_flush_detected_total")

    def record_sync(self, result: SyncResult, wall_now: float) -> None:
        self.inc("sync_proxy_rules_service_changes_total", result.changes.service_changes)
        self.inc("sync_proxy_rules_endpoint_changes_total", result.changes.endpoint_changes)
        if result.report is not None and result.report.views:
            self._families = tuple(sorted(result.report.views))
        ips = [IP_FAMILY[f] for f in self._families]
        if not result.ok:
            for ip in ips:
                self.inc(self._failures.name, ip_family=ip)
                if self._partial is not None and not result.full:
                    self.inc(self._partial.name, ip_family=ip)
            return
        for ip in ips:
            self.set("sync_proxy_rules_last_timestamp_seconds", wall_now, ip_family=ip)
            self.inc(self._failures.name, 0, ip_family=ip)  # served at 0 from now on
        if result.skipped:
            return  # nothing written: the data plane's counts are the last sync's
        if self._plane is not None:
            self.record_plane(self._plane())
        kind = "full" if result.full else "partial"
        for ip in ips:
            self.observe("sync_proxy_rules_duration_seconds", result.duration, ip_family=ip)
            self.observe(f"sync_{kind}_proxy_rules_duration_seconds", result.duration,
                         ip_family=ip)
            for trigger in result.changes.trigger_times:
                self.observe("network_programming_duration_seconds",
                             max(0.0, wall_now - trigger), ip_family=ip)
        if result.report is not None:
            for family, (internal, external) in result.report.no_local.items():
                for policy, n in (("internal", internal), ("external", external)):
                    self.set("sync_proxy_rules_no_local_endpoints_total", n,
                             ip_family=IP_FAMILY[family], traffic_policy=policy)

    def record_plane(self, counts: PlaneCounts) -> None:
        """What the data plane said about its last sync: rule counts, cleanup failures."""
        for (family, table), (total, written) in sorted(counts.rules.items()):
            self.record_rules(family, table, total, written)
        for family in counts.cleanup_failures:
            self.record_cleanup_failure(family)

    def reconcile_conntrack(self, delete: Callable[[Sequence[StaleFlow]], int],
                            flows: Iterable[StaleFlow]) -> int:
        """Run ``delete`` (the conntrack cleaner) over each family's stale flows in
        turn, timing each as upstream's conntrack reconciler; the entries deleted. A
        failure (DataPlaneError) is raised after every family was tried."""
        by_family: dict[Family, list[StaleFlow]] = {}
        for flow in flows:
            by_family.setdefault(flow.family, []).append(flow)
        deleted, errors = 0, []
        for family, some in sorted(by_family.items()):
            start, n = self._clock(), 0
            try:
                n = delete(some)
            except DataPlaneError as err:
                errors.append(err)
            self.record_conntrack(family, self._clock() - start, n)
            deleted += n
        if errors:
            raise DataPlaneError("; ".join(map(str, errors))) from errors[0]
        return deleted

    def record_conntrack(self, family: Family, seconds: float, deleted: int) -> None:
        """One family's stale-UDP-flow cleanup after a sync (upstream's conntrack
        reconciler): how long it took and how many flows it deleted."""
        ip = IP_FAMILY[family]
        self.observe("conntrack_reconciler_sync_duration_seconds", seconds, ip_family=ip)
        self.inc("conntrack_reconciler_deleted_entries_total", deleted, ip_family=ip)

    def record_rules(self, family: Family, table: str, total: int, written: int) -> None:
        """iptables: the rules of ``table`` kube-proxy owns, and those the last sync wrote."""
        ip = IP_FAMILY[family]
        self.set("sync_proxy_rules_iptables_total", total, ip_family=ip, table=table)
        self.set("sync_proxy_rules_iptables_last", written, ip_family=ip, table=table)

    def record_cleanup_failure(self, family: Family) -> None:
        """nftables: deleting stale chains failed (they stay until the next sync)."""
        self.inc("sync_proxy_rules_nftables_cleanup_failures_total",
                 ip_family=IP_FAMILY[family])

    # --- exposition -------------------------------------------------------------------

    def snapshot(self) -> list[Metric]:
        """Every family with its series, from one consistent state."""
        with self._lock:
            values = {n: dict(s) for n, s in self._values.items()}
            hists = {n: {k: (h.cumulative(), h.sum) for k, h in s.items()}
                     for n, s in self._hists.items()}
        out: list[Metric] = []
        for f in FAMILIES:
            help_text = f"[ALPHA] {f.help}"
            if f.kind == "histogram":
                hist = HistogramMetricFamily(f.full, help_text, labels=f.labels)
                for key, (buckets, total) in sorted(hists[f.name].items()):
                    hist.add_metric(list(key), buckets, total)
                out.append(hist)
                continue
            metric: CounterMetricFamily | GaugeMetricFamily = (
                CounterMetricFamily(f.full, help_text, labels=f.labels)
                if f.kind == "counter" else GaugeMetricFamily(f.full, help_text,
                                                              labels=f.labels))
            for key, value in sorted(values[f.name].items()):
                metric.add_metric(list(key), value)
            out.append(metric)
        out.append(build_info())
        return out

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def answer(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry)


class _Collector:
    """Hands our snapshot to prometheus-client at scrape time (no state of its own)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.snapshot()

    def describe(self) -> Iterable[Metric]:
        return ()  # nothing to check for clashes: the families are ours alone


def build_info() -> GaugeMetricFamily:
    """kubernetes_build_info with upstream's labels; the runtime is CPython, so
    ``compiler`` says so and ``go_version`` carries the Python version."""
    major, minor, *_ = __version__.split(".")
    family = GaugeMetricFamily(
        "kubernetes_build_info", "[ALPHA] A metric with a constant '1' value labeled by "
        "major, minor, git version, git commit, git tree state, build date, Go version, "
        "and compiler from which Kubernetes was built, and platform on which it is "
        "running.", labels=BUILD_INFO_LABELS)
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                          platform.machine())
    family.add_metric(["1970-01-01T00:00:00Z", "cpython", "", "", f"v{__version__}",
                       platform.python_version(), major, minor,
                       f"{sys.platform}/{machine}"], 1)
    return family
