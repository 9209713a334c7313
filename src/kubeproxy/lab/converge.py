"""Waiting until what the API holds is in every node's rules (bounded, and why it works).

A change travels: API server -> agent (Pod started, EndpointSlices rewritten) -> API
server -> each node's proxy (watch, then a sync of its rules). ``lab`` commands that
change the lab, and ``lab probe``, wait for the end of that road, in two steps:

1. **The agent has caught up.** Read the API's resourceVersion R (after our own write).
   The agent publishes, after every turn, how far each of its four caches has seen and
   whether its last pass had nothing to do. "Seen >= R for every kind, and idle" means
   every change up to R was acted on and the agent's own writes are in the API. The API
   server sends bookmarks every 0.2 s, so a kind that did not change still moves to R.
2. **Every proxy has synced after the last change it reads.** The agent also says when
   it last saw a Service, EndpointSlice or Node change (T): the proxies got the same
   watch event within milliseconds. A node is done when its proxy's /metrics (read from
   inside the node namespace) shows ``sync_proxy_rules_last_timestamp_seconds`` > T with
   nothing pending, in two reads 50 ms apart. Why two reads: a sync that ends after T may
   have started just before the event was folded in; the proxy then folds it at the next
   turn and, its ``--iptables-min-sync-period`` not being over, publishes a pending
   change at once, which the second read sees. A proxy for which the change meant
   nothing never syncs again; it is done when nothing is pending and its last sync did
   not move for 0.5 s after T (it had time to fold and show the change, and did not).

Both waits are bounded (60 s for the agent, which may be starting Pods, 30 s for the
proxies; 5 s when the agent has caught up but keeps failing, e.g. an exhausted LB pool)
and fail with the agent's errors or the proxy's log tail, never hang.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubeproxy.errors import LabError
from kubeproxy.lab.agent import AgentStatus
from kubeproxy.lab.api import LabApi
from kubeproxy.lab.nsconnect import http_get
from kubeproxy.lab.processes import alive, log_tail, time_scale

METRICS_PORT = 10249
HEALTHZ_PORT = 10256
AGENT_TIMEOUT = 60.0
PROXY_TIMEOUT = 30.0
POLL = 0.02
STABLE = 0.05  # two reads at least this far apart agree
QUIET = 0.5  # nothing moved for this long: the change meant nothing to this proxy
ERROR_GRACE = 5.0  # the agent retries failures every second; this many seconds of them: fail

_LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
_PENDING = (
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
)
_FAILURES = (
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
)


@dataclass(frozen=True)
class ProxySample:
    last_sync: float  # wall clock; 0 before the first sync
    pending: int
    failures: int


def parse_metrics(text: str) -> ProxySample:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]  # ip_family="IPv4", ...: one sample per family
        try:
            number = float(value)
        except ValueError:
            continue
        # The oldest family's last sync; the other families summed.
        values[name] = (min(values[name], number) if name == _LAST_SYNC and name in values
                        else values.get(name, 0.0) + number)
    return ProxySample(
        values.get(_LAST_SYNC, 0.0),
        int(sum(values.get(n, 0.0) for n in _PENDING)),
        int(sum(values.get(n, 0.0) for n in _FAILURES)),
    )


def proxy_sample(ns: str) -> ProxySample | None:
    """The node proxy's sync state, or None while it does not answer."""
    try:
        status, body = http_get(ns, "127.0.0.1", METRICS_PORT, "/metrics", timeout=1.0)
    except LabError:
        return None
    return parse_metrics(body) if status == 200 else None


def wait_for_agent(
    api: LabApi, status_file: Path, agent_pid: int | None, log: Path, timeout: float = AGENT_TIMEOUT
) -> AgentStatus:
    target = api.resource_version()
    deadline = time.monotonic() + timeout
    failing_since: float | None = None
    while True:
        status = AgentStatus.read(status_file)
        if status is not None and status.idle and status.seen >= target:
            return status
        if status is not None and status.seen >= target and status.errors:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > ERROR_GRACE * time_scale():
                raise LabError(f"the lab agent keeps failing: {'; '.join(status.errors)}; "
                               f"see {log}")  # fmt: skip
        else:
            failing_since = None
        if agent_pid is None or not alive(agent_pid):
            raise LabError(f"the lab agent is not running; its log ends:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            errors = "; ".join(status.errors) if status and status.errors else "none"
            raise LabError(
                f"the lab agent did not catch up with the API (resourceVersion "
                f"{target}) within {timeout:.0f} s; its errors: {errors}; "
                f"see {log}"
            )
        time.sleep(POLL)


def wait_for_proxies(
    nodes: Mapping[str, str], since: float, logs: Mapping[str, Path], timeout: float = PROXY_TIMEOUT
) -> None:
    """Wait until every node's proxy (node name -> namespace) synced after ``since``."""
    waiting = dict(nodes)
    held: dict[str, tuple[float, float]] = {}  # node -> (last_sync, first seen settled)
    last: dict[str, ProxySample | None] = {}
    deadline = time.monotonic() + timeout
    while waiting:
        now = time.time()
        for node, ns in list(waiting.items()):
            sample = last[node] = proxy_sample(ns)
            if sample is None or sample.pending or not sample.last_sync:
                held.pop(node, None)
                continue
            if held.get(node, (None,))[0] != sample.last_sync:
                held[node] = (sample.last_sync, now)
            steady = now - held[node][1]
            if (sample.last_sync > since and steady >= STABLE) or steady >= QUIET:
                del waiting[node]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise LabError(_proxy_timeout(waiting, last, since, logs, timeout))
        time.sleep(POLL)


def _proxy_timeout(
    waiting: Mapping[str, str],
    last: Mapping[str, ProxySample | None],
    since: float,
    logs: Mapping[str, Path],
    timeout: float,
) -> str:
    lines = [f"the proxies of {', '.join(waiting)} did not apply the change within {timeout:.0f} s"]
    for node in waiting:
        sample = last.get(node)
        if sample is None:
            lines.append(f"{node}: its /metrics does not answer")
        else:
            lines.append(
                f"{node}: last sync {sample.last_sync - since:+.1f} s after the "
                f"change, {sample.pending} changes pending, {sample.failures} "
                "failed syncs"
            )
        tail = log_tail(logs[node], 800) if node in logs else ""
        if tail:
            lines.append(f"{node}: its log ends:\n{tail}")
    return "\n".join(lines)
