"""`kubeproxy run`: the proxy as a long-running daemon, as upstream's kube-proxy binary.

Theory of operation
-------------------
Three informer threads (Services, EndpointSlices, this Node; sources/informer.py) list
and watch the API server and put decoded updates on one queue. The main thread is the
only one that touches the proxy's state: it drains the queue, folds the updates into
the :class:`~kubeproxy.tracker.Tracker`, and runs the :class:`~kubeproxy.sync.SyncLoop`
when it is due. A sync renders this node's rules from the tracker's cluster (node view
-> the mode's renderer, proxier.py) and hands them to the mode's data plane, whole or
for the changed services only. Between turns the main thread sleeps on the queue, with the loop's
next deadline as the timeout, so it wakes for an event or for a sync, never to poll.

Between syncs, about once a second (``SyncLoop.next_check``), it asks the data plane
whether what it wrote is still there (``DataPlane.intact()``, cheap: a generation number
or a table fingerprint, looked at closer only when it moved). If not (someone flushed
KUBE-SERVICES, deleted the kube-proxy table ...), the plane logs what it found, the
``kubeproxy_sync_proxy_rules_flush_detected_total`` counter goes up, and the loop runs a
full sync at once, so the rules are back within a second or two.

After each successful sync it keeps the node views the proxier wrote and, against the
previous ones, deletes stale UDP conntrack entries (conntrack.py,
dataplane/conntrack.py) and opens / closes the health-check node ports of eTP=Local
LoadBalancers (health/service_health.py). After each turn it publishes a health snapshot
and the sync's metrics for the HTTP servers (health/server.py). SIGTERM / SIGINT put a
stop marker on the queue (a SimpleQueue, whose put is safe in a signal handler); the
main thread then stops the informers and servers and returns. Rules stay in place on
exit, as upstream's do; ``--cleanup`` removes them. At start, before anything else
touches the kernel, what the *other* modes left there is removed (a mode switch;
modes/leftovers.py), as upstream's platformCleanup does.

Every ``configSyncPeriod`` (default 15 minutes; 0: never) the main thread asks each
informer to re-deliver every object it holds as an update (``Informer.resync``),
as upstream's informers do on their resync period. The updates come through the
queue like any other, after the informer's earlier ones, and are folded the same way:
an object that did not change changes nothing in the tracker (no sync), an invalid
one is reported again.

``bindAddress`` (when not 0.0.0.0 / ::) is this node's primary IP: every version of
this node's Node is folded with that address first (config.with_bind_address), which
is what the node view reads as the family's primary IP. Nothing binds to it.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig, with_bind_address
from kubeproxy.conntrack import stale_udp_flows
from kubeproxy.dataplane.base import Runner, SubprocessRunner
from kubeproxy.dataplane.conntrack import ConntrackCleaner
from kubeproxy.errors import ConfigError, DataPlaneError, InvalidObject
from kubeproxy.health.server import (
    Health,
    HealthState,
    HttpEndpoint,
    Metrics,
    health_endpoint,
    metrics_endpoint,
    parse_bind_address,
)
from kubeproxy.health.service_health import HealthCheckServers, desired_servers
from kubeproxy.model import Family, NamespacedName, Node
from kubeproxy.modes import leftovers
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.nodeview import NodeView
from kubeproxy.proxier import Proxier
from kubeproxy.sources.client import Client, ClientError, ClientOptions
from kubeproxy.sources.informer import STALL_TIMEOUT, Informer, Replace, resources
from kubeproxy.sources.kubeconfig import resolve
from kubeproxy.sync import Syncer, SyncLoop, SyncResult
from kubeproxy.tracker import Tracker, Update
from kubeproxy.util.queues import drain

log = logging.getLogger("kubeproxy.daemon")
HEALTHZ_PORT = 10256
METRICS_PORT = 10249


@dataclass(frozen=True)
class DaemonOptions:
    kubeconfig: Path | None = None
    master: str | None = None
    iptables_backend: str = "auto"  # auto, legacy, nft
    bpf_dir: str = ""  # the ebpf mode's private bpffs ("" = its default)
    allow_root_cgroup: bool = False  # let the ebpf mode attach to the cgroup2 root
    watch_timeout: tuple[int, int] = (300, 600)  # seconds, randomized per watch
    # A watch with no event and no bookmark for this long is given up and re-opened.
    watch_stall_timeout: float = STALL_TIMEOUT
    # The effective KubeProxyConfiguration as JSON, served at /configz (cli.py).
    configz: bytes = b"{}"
    # clientConnection: QPS/burst limits and content type for the API client.
    client: ClientOptions = field(default_factory=ClientOptions)


# --- the main loop ----------------------------------------------------------------


class _Stop:
    """The marker that ends the main loop."""


Item = Update | Replace | _Stop


def _report_invalid(error: InvalidObject) -> None:
    log.warning("ignoring invalid %s %s: %s: %s", error.kind, error.ref, error.field_path,
                error.message)


class Daemon:
    def __init__(self, config: ProxyConfig, proxier: Syncer, *, health: Health,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, conntrack: Runner | None = None,
                 healthcheck_addresses: Sequence[str] | None = None,
                 intact: Callable[[], bool] | None = None,
                 resync: Callable[[], int] | None = None) -> None:
        """``conntrack``: runs ``conntrack -D`` for stale UDP flows (None: no cleanup).
        ``healthcheck_addresses``: where health-check node ports listen (None: the
        node's addresses). ``intact``: the data plane's ``intact()`` (None: no flush
        detection). ``resync``: has the informers re-deliver what they hold (through
        :meth:`emit`) and says how many objects; called every
        ``config.config_sync_period`` seconds (None or 0: never)."""
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.tracker = Tracker(config.hostname, report=_report_invalid)
        self.loop = SyncLoop(self.tracker, proxier, clock,
                             min_sync_period=config.min_sync_period,
                             sync_period=config.sync_period)
        self.proxier = proxier
        self.health = health
        self.metrics = metrics
        self.health_checks = HealthCheckServers(health.healthy)
        self._cleaner = ConntrackCleaner(conntrack) if conntrack is not None else None
        self._healthcheck_addresses = healthcheck_addresses
        self._views: dict[Family, NodeView] = {}  # written by the last successful sync
        self._intact = intact
        self._clock = clock
        self._wall = wall
        self._last_updated: float | None = None
        self._bind_address = config.bind_address
        self._resync = resync if config.config_sync_period > 0 else None
        self.resync_period = config.config_sync_period
        self.next_resync: float | None = (clock() + self.resync_period
                                          if self._resync is not None else None)
        self.resyncs = 0  # resyncs done (tests, logs)

    def emit(self, item: Update | Replace) -> None:
        """Called by the informer threads."""
        self.queue.put(item)

    def stop(self) -> None:
        """Safe from a signal handler and from any thread."""
        self.queue.put(_Stop())

    def run(self) -> None:
        """Until stop(): fold events, sync when due, publish health."""
        try:
            while self.step(self._wait()):
                pass
        finally:
            self.health_checks.close()

    def step(self, items: Sequence[Item]) -> bool:
        """One turn of the main loop over a batch of queued items; False at a stop."""
        for item in items:
            if isinstance(item, _Stop):
                return False
            self._fold(item)
        self._resync_if_due()
        result = self.loop.run_if_due()
        if result is not None:
            self._record(result)
            if result.report is not None:
                self._after_sync(dict(result.report.views),
                                 None if result.full else result.changes.services)
        self._check_intact()
        self._publish()
        return True

    def _resync_if_due(self) -> None:
        """configSyncPeriod: the informers re-deliver what they hold (onto the queue,
        behind what they emitted before, so folded in order on the next turn)."""
        if self._resync is None or self.next_resync is None:
            return
        now = self._clock()
        if now < self.next_resync:
            return
        count = self._resync()
        self.resyncs += 1
        self.next_resync = now + self.resync_period
        log.debug("resync: %d objects re-delivered", count)

    def _after_sync(self, views: dict[Family, NodeView],
                    changed: frozenset[NamespacedName] | None) -> None:
        """Conntrack cleanup and health-check servers for what the sync wrote
        (``changed``: the services a partial sync wrote; None after a full one)."""
        if self._cleaner is not None:
            flows = [f for fam in sorted(views)
                     for f in stale_udp_flows(self._views.get(fam), views[fam], changed)]
            try:
                if flows:
                    deleted = self.metrics.reconcile_conntrack(self._cleaner.delete, flows)
                    log.info("conntrack: %d stale UDP entries deleted (%d filters)",
                             deleted, len(flows))
            except DataPlaneError as err:
                log.warning("conntrack cleanup: %s", err)
        desired = desired_servers(views.values(), self._healthcheck_addresses)
        for error in self.health_checks.update(desired):
            log.warning("%s", error)
        self._views = views

    def _check_intact(self) -> None:
        """Flush detection: ask the data plane when the loop says so (at most once a
        second, never while a sync is due); a full sync follows a False answer."""
        if self._intact is None or not self.loop.check_due():
            return
        intact = self._intact()
        self.loop.checked(intact)
        if not intact:
            self.metrics.record_flush()
            log.info("rules changed from outside: full sync to restore them")

    def _wait(self) -> list[Item]:
        """The queued items: blocks until the first one, the next sync or the next
        flush check."""
        deadlines = [self.loop.next_run(), self.next_resync]
        if self._intact is not None:
            deadlines.append(self.loop.next_check())
        due = min((d for d in deadlines if d is not None), default=None)
        return drain(self.queue, None if due is None else max(0.0, due - self._clock()))

    def _fold(self, item: Update | Replace) -> None:
        if isinstance(item, Replace):
            changed = self.tracker.replace(item.kind, [self._seen(u) for u in item.updates])
            if not self.loop.ready:
                log.info("initial %s list: %d objects", item.kind, len(item.updates))
            self.loop.initial_list_done(item.kind)
        else:
            changed = self.tracker.update(self._seen(item))
        if changed:
            self.loop.trigger()
            self.metrics.set_queued(self._wall())

    def _seen(self, update: Update) -> Update:
        """The update as this proxy sees it: a Node with bindAddress as its primary IP."""
        if update.kind != "Node" or self._bind_address is None:
            return update
        assert update.obj is None or isinstance(update.obj, Node)
        if update.obj is None:
            return update
        return replace(update, obj=with_bind_address(update.obj, self._bind_address))

    def _record(self, result: SyncResult) -> None:
        wall = self._wall()
        self.metrics.record_sync(result, wall)
        if result.ok:
            self._last_updated = wall
        log_sync(result)

    def _publish(self) -> None:
        node = self.tracker.node
        eligible = node is None or not (node.deleting or node.to_be_deleted)
        self.health.publish(HealthState(self.loop.oldest_pending, self._last_updated, eligible))
        self.metrics.set_pending(*self.tracker.pending)


def log_sync(result: SyncResult) -> None:
    """One line per sync: kind, services changed, duration."""
    kind = "full" if result.full else "partial"
    names = sorted(str(n) for n in result.changed)
    shown = ", ".join(names[:5]) + (f", +{len(names) - 5} more" if len(names) > 5 else "")
    changed = f"{len(names)} changed" + (f" ({shown})" if names else "")
    if not result.ok:
        log.warning("%s sync failed after %.3fs (%s): %s; retrying in %.1fs as a full sync",
                    kind, result.duration, changed, result.error, result.retry_in)
    elif result.skipped:
        log.debug("sync skipped: changes cancelled out")
    else:
        log.info("%s sync: %d services, %s, %.3fs", kind, result.service_count, changed,
                 result.duration)


# --- wiring -----------------------------------------------------------------------


def _endpoints(config: ProxyConfig, health: Health, metrics: Metrics) -> list[HttpEndpoint]:
    out: list[HttpEndpoint] = []
    try:
        if config.healthz_bind_address:
            address = parse_bind_address(config.healthz_bind_address, HEALTHZ_PORT)
            out.append(health_endpoint(address, health, metrics).start())
            log.info("healthz on %s:%d", address[0], out[-1].port)
        if config.metrics_bind_address:
            address = parse_bind_address(config.metrics_bind_address, METRICS_PORT)
            out.append(metrics_endpoint(address, metrics, health).start())
            log.info("metrics on %s:%d", address[0], out[-1].port)
    except (OSError, ValueError) as err:
        for endpoint in out:
            endpoint.stop()
        raise ConfigError(f"cannot serve healthz/metrics: {err}") from err
    return out


def run(config: ProxyConfig, options: DaemonOptions, runner: Runner | None = None) -> int:
    """Run until SIGTERM/SIGINT. Raises ConfigError for bad settings (exit 2)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    if config.sync_period <= 0 or config.min_sync_period < 0:
        raise ConfigError("syncPeriod must be > 0 and minSyncPeriod >= 0")
    access = resolve(options.kubeconfig, options.master)
    try:
        client = Client(access, options=options.client)
    except ClientError as err:
        raise ConfigError(str(err)) from err
    runner = runner or SubprocessRunner()
    mode = modes.for_config(config)
    plane_options = PlaneOptions(
        iptables_backend=options.iptables_backend, cgroup_path=config.cgroup_path,
        bpf_dir=options.bpf_dir, allow_root_cgroup=options.allow_root_cgroup)
    try:
        leftovers.clean_at_start(config, runner, plane_options)  # other modes' rules
        plane = mode.data_plane(runner, plane_options)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    proxier = Proxier(mode, config, plane)
    health = Health(2 * config.sync_period)
    metrics = Metrics(config.mode, plane=plane.counts)
    metrics.configz = options.configz
    informers: list[Informer] = []
    daemon = Daemon(config, proxier, health=health, metrics=metrics, conntrack=runner,
                    intact=plane.intact, resync=lambda: sum(i.resync() for i in informers))
    endpoints = _endpoints(config, health, metrics)
    log.info("kubeproxy run: node %s, mode %s, API server %s", config.hostname, config.mode,
             access.server)
    if config.bind_address is not None:
        log.info("primary IP (bindAddress): %s", config.bind_address)
    informers += [Informer(client, res, daemon.emit, watch_timeout=options.watch_timeout,
                           stall_timeout=options.watch_stall_timeout)
                  for res in resources(config.hostname)]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        daemon.stop()  # only this: a signal handler must not take locks

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for informer in informers:
            informer.start()
        daemon.run()
        log.info("stopping")
    finally:
        for informer in informers:
            informer.stop()
        for endpoint in endpoints:
            endpoint.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
    return 0
