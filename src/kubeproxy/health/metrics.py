"""kube-proxy's metrics: upstream's families as prometheus-client objects, served as text.

Theory of operation
-------------------
:data:`FAMILIES` is the literal table of every metric ``/metrics`` serves: upstream's
pkg/proxy/metrics (names, types, help texts, labels and buckets as upstream declares
them, the ``ip_family`` label where upstream has it), plus two of ours. Each
:class:`Metrics` builds one prometheus-client Counter, Gauge or Histogram per row in a
private ``CollectorRegistry`` (never the global one; one per Metrics, so tests and
daemons do not share), and ``kubernetes_build_info`` as a Gauge fixed at 1. What records
what: the daemon each sync result (:meth:`Metrics.record_sync`), queued and pending
changes, flushes found, and the conntrack cleanup (:meth:`Metrics.reconcile_conntrack`
runs it per family); the health server each probe; the data plane, after each
successful sync, what only it knows (``DataPlane.counts()``: iptables rule counts,
nftables cleanup failures). :meth:`Metrics.inc`, :meth:`~Metrics.set` and
:meth:`~Metrics.observe` are strict: an unknown family, a wrong label set or the wrong
kind of update is an error, not a new series.

Threads: the daemon's main thread records, the HTTP threads scrape. prometheus-client
locks each value on its own, so a scrape could see a histogram's ``_sum`` without its
bucket; every update here and the collection of our families take one lock of ours
instead, so a scrape is a consistent snapshot. The ``process_*`` families (the process
collector, as client_golang serves them) are read outside it.

The exposition is prometheus-client's ``generate_latest`` (text format 0.0.4: escaping,
``# HELP``/``# TYPE``) with ``disable_created_metrics()``: no ``_created`` series
(upstream has none). Two things are put into client_golang's shape at scrape time:
series are sorted by label values, and bucket bounds are written ``le="1"``, not
prometheus-client's ``le="1.0"`` (so queries and recording rules written against
upstream's ``le`` values match). Importing prometheus-client after the daemon's own
imports costs 15-30 ms of a ~300 ms start and 1.2 MiB of RSS (docs/flags.md,
"Metrics"); ``kube-proxy --version`` does not import it.

One sync here writes every IP family at once (upstream runs one proxier per family), so
a sync's duration, result and programming latency are recorded under each family it
wrote; the first sync's failure, before any family was written, counts under IPv4.
Families are registered for every mode (upstream registers the iptables-, ipvs- and
nftables-only ones per mode); a family a mode never moves stays empty or at zero.
"""

from __future__ import annotations

import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Sample

from kubeproxy import __version__, modes
from kubeproxy.conntrack import StaleFlow
from kubeproxy.errors import DataPlaneError
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
BUILD_INFO_HELP = ("[ALPHA] A metric with a constant '1' value labeled by major, minor, git "
                   "version, git commit, git tree state, build date, Go version, and compiler "
                   "from which Kubernetes was built, and platform on which it is running.")

M = TypeVar("M", Counter, Gauge, Histogram)


class Metrics:
    """kube-proxy's metrics; written by the main thread, read by /metrics."""

    def __init__(self, mode: str, *, plane: Callable[[], PlaneCounts] | None = None,
                 clock: Callable[[], float] = time.monotonic, process: bool = True) -> None:
        """``plane``: what the data plane says after a sync (``DataPlane.counts()`` of
        the daemon's plane); ``process``: serve the process_* families."""
        self.mode = mode
        self._plane = plane
        self._clock = clock
        the_mode = modes.get(mode)
        self._failures = BY_NAME[the_mode.sync_failures_metric.removeprefix("kubeproxy_")]
        self._partial = (None if the_mode.partial_failures_metric is None else
                         BY_NAME[the_mode.partial_failures_metric.removeprefix("kubeproxy_")])
        self._families: tuple[Family, ...] = (4,)  # those the last successful sync wrote
        self.configz = b"{}"  # the effective KubeProxyConfiguration, as JSON (/configz)
        # The library's switch is process-wide; Metrics is its only user here.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self._lock = threading.Lock()  # every update, and the collection of _store
        self._store = CollectorRegistry()  # our families; served through _Snapshot
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        for f in FAMILIES:  # unlabelled counters and gauges are served from the start, at 0
            doc = f"[ALPHA] {f.help}"  # as client_golang serves upstream's ALPHA metrics
            if f.kind == "counter":
                self._counters[f.name] = Counter(f.full, doc, f.labels, registry=self._store)
            elif f.kind == "gauge":
                self._gauges[f.name] = Gauge(f.full, doc, f.labels, registry=self._store)
            else:
                self._histograms[f.name] = Histogram(f.full, doc, f.labels,
                                                     registry=self._store, buckets=f.buckets)
        Gauge("kubernetes_build_info", BUILD_INFO_HELP, BUILD_INFO_LABELS,
              registry=self._store).labels(*_build_info_values()).set(1)
        self.registry = CollectorRegistry()  # what /metrics serves
        self.registry.register(_Snapshot(self._store, self._lock))
        if process:
            ProcessCollector(registry=self.registry)

    # --- strict about names, labels and kinds -----------------------------------------

    def _family(self, name: str, labels: Mapping[str, str]) -> MetricFamily:
        family = BY_NAME.get(name)
        if family is None:
            raise KeyError(f"no metric family {name!r}")
        if set(labels) != set(family.labels):
            raise ValueError(f"{family.full}: labels {sorted(labels)}, want "
                             f"{sorted(family.labels)}")
        return family

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        family = self._family(name, labels)
        counter = self._counters.get(name)
        if counter is None or by < 0:
            raise ValueError(f"{family.full}: a {family.kind} cannot be increased by {by}")
        with self._lock:
            _series(counter, labels).inc(by)

    def set(self, name: str, value: float, **labels: str) -> None:
        family = self._family(name, labels)
        gauge = self._gauges.get(name)
        if gauge is None:
            raise ValueError(f"{family.full}: a {family.kind} cannot be set")
        with self._lock:
            _series(gauge, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        family = self._family(name, labels)
        histogram = self._histograms.get(name)
        if histogram is None:
            raise ValueError(f"{family.full}: a {family.kind} takes no observations")
        with self._lock:
            _series(histogram, labels).observe(value)

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

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def answer(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry)


def _series(metric: M, labels: Mapping[str, str]) -> M:
    """The series of ``metric`` with ``labels`` (created at its first update)."""
    return metric.labels(**labels) if labels else metric


class _Snapshot:
    """Our families, collected under the lock every update holds, in client_golang's
    shape: series sorted by label values, bucket bounds spelled as Go spells them."""

    def __init__(self, store: CollectorRegistry, lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            families = list(self._store.collect())
        for family in families:
            family.samples = sorted(map(_go_le, family.samples), key=_label_values)
            yield family


def _go_le(sample: Sample) -> Sample:
    """``le`` as client_golang writes it (Go's shortest 'g': 1, 0.25, 1e+06).
    prometheus-client's floatToGoString matches it but for whole numbers ("1.0")."""
    le = sample.labels.get("le")
    if le is None or not le.endswith(".0"):
        return sample
    return sample._replace(labels={**sample.labels, "le": le.removesuffix(".0")})


def _label_values(sample: Sample) -> tuple[str, ...]:
    """A series' sort key; ``le`` aside, so a histogram's samples stay in their order."""
    return tuple(value for name, value in sample.labels.items() if name != "le")


def _build_info_values() -> tuple[str, ...]:
    """kubernetes_build_info's label values (:data:`BUILD_INFO_LABELS`): the runtime is
    CPython, so ``compiler`` says so and ``go_version`` carries the Python version."""
    major, minor, *_ = __version__.split(".")
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                          platform.machine())
    return ("1970-01-01T00:00:00Z", "cpython", "", "", f"v{__version__}",
            platform.python_version(), major, minor, f"{sys.platform}/{machine}")
