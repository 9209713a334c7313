"""Health and metrics: upstream's answers, computed from published snapshots."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kubeproxy.model import NamespacedName
from kubeproxy.server import (
    Health,
    HealthState,
    HttpEndpoint,
    Metrics,
    go_time,
    health_endpoint,
    metrics_endpoint,
    parse_bind_address,
)
from kubeproxy.sync import SyncReport, SyncResult
from kubeproxy.tracker import Changes

TIMEOUT = 60.0  # 2 x syncPeriod


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("state", "age", "healthz", "livez"), [
    (HealthState(), 0, 200, 200),
    (HealthState(oldest_pending=100.0), 59.9, 200, 200),
    (HealthState(oldest_pending=100.0), 60.0, 503, 503),
    (HealthState(node_eligible=False), 0, 503, 200),
])
def test_health(state: HealthState, age: float, healthz: int, livez: int) -> None:
    clock = Clock(100.0 + age)
    health = Health(TIMEOUT, clock, wall=lambda: 1704067200.5)
    health.publish(state)
    code, ctype, body = health.answer(node=True)
    assert (code, ctype) == (healthz, "application/json")
    doc = json.loads(body)
    assert doc["currentTime"] == "2024-01-01 00:00:00.5 +0000 UTC"
    assert doc["nodeEligible"] is state.node_eligible
    code, _, body = health.answer(node=False)
    assert code == livez and "nodeEligible" not in json.loads(body)


def test_go_time() -> None:
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(1704067200.0) == "2024-01-01 00:00:00 +0000 UTC"
    assert go_time(1704067200.25) == "2024-01-01 00:00:00.25 +0000 UTC"


def result(*, full: bool = True, ok: bool = True, duration: float = 0.003,
           services: int = 0, endpoints: int = 0, triggers: tuple[float, ...] = (),
           report: SyncReport | None = None) -> SyncResult:
    changes = Changes(frozenset({NamespacedName("ns1", "a")}), False, services, endpoints,
                      triggers)
    return SyncResult(10.0, duration, full, changes, 1, (report or SyncReport()) if ok else None,
                      None if ok else "boom")


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_metrics_follow_syncs() -> None:
    m = Metrics("iptables")
    m.record_sync(result(services=2, endpoints=3, triggers=(99.0,),
                         report=SyncReport(no_local_internal=1, no_local_external=2)), 100.0)
    m.record_sync(result(full=False, duration=0.5, endpoints=1,
                         report=SyncReport(no_local_internal=1, no_local_external=2)), 101.0)
    m.record_sync(result(ok=False, services=1), 102.0)
    m.set_pending(4, 5)
    s = samples(m.render())
    p = "kubeproxy_"
    assert s[p + "sync_proxy_rules_duration_seconds_count"] == "2"
    assert s[p + "sync_full_proxy_rules_duration_seconds_count"] == "1"
    assert s[p + "sync_partial_proxy_rules_duration_seconds_count"] == "1"
    assert s[p + 'sync_partial_proxy_rules_duration_seconds_bucket{le="0.512"}'] == "1"
    assert s[p + 'sync_partial_proxy_rules_duration_seconds_bucket{le="0.256"}'] == "0"
    assert s[p + 'sync_proxy_rules_duration_seconds_bucket{le="+Inf"}'] == "2"
    assert s[p + 'network_programming_duration_seconds_bucket{le="1"}'] == "1"
    assert s[p + "network_programming_duration_seconds_sum"] == "1"
    assert s[p + "sync_proxy_rules_last_timestamp_seconds"] == "101"
    assert s[p + "sync_proxy_rules_service_changes_total"] == "3"
    assert s[p + "sync_proxy_rules_endpoint_changes_total"] == "4"
    assert s[p + "sync_proxy_rules_iptables_restore_failures_total"] == "1"
    assert s[p + "sync_proxy_rules_service_changes_pending"] == "4"
    assert s[p + 'sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"}'] == "1"
    assert s[p + 'sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"}'] == "2"
    text = m.render()
    assert "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram" in text
    assert "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter" in text


def test_nftables_failures_have_their_own_counter() -> None:
    m = Metrics("nftables")
    m.record_sync(result(ok=False), 1.0)
    s = samples(m.render())
    assert s["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"] == "1"
    assert s["kubeproxy_sync_proxy_rules_iptables_restore_failures_total"] == "0"


def test_flushes_found_are_counted() -> None:
    m = Metrics("nftables")
    name = "kubeproxy_sync_proxy_rules_flush_detected_total"
    assert samples(m.render())[name] == "0"
    m.record_flush()
    m.record_flush()
    assert samples(m.render())[name] == "2"
    assert f"# TYPE {name} counter" in m.render()


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:10256", ("127.0.0.1", 10256)),
    ("0.0.0.0", ("0.0.0.0", 7)),
    (":0", ("0.0.0.0", 0)),
    ("[::1]:99", ("::1", 99)),
    ("::", ("::", 7)),
])
def test_parse_bind_address(text: str, want: tuple[str, int]) -> None:
    assert parse_bind_address(text, 7) == want


@pytest.mark.parametrize("text", ["1.2.3.4:x", "1.2.3.4:70000"])
def test_bad_bind_address(text: str) -> None:
    with pytest.raises(ValueError, match="bad port"):
        parse_bind_address(text, 7)


@pytest.fixture
def endpoints() -> Iterator[tuple[HttpEndpoint, HttpEndpoint, Health]]:
    health = Health(TIMEOUT)
    metrics = Metrics("iptables")
    hz = health_endpoint(("127.0.0.1", 0), health).start()
    mx = metrics_endpoint(("127.0.0.1", 0), metrics, health).start()
    try:
        yield hz, mx, health
    finally:
        hz.stop()
        mx.stop()


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_http(endpoints: tuple[HttpEndpoint, HttpEndpoint, Health]) -> None:
    hz, mx, health = endpoints
    assert get(hz.port, "/healthz")[0] == 200
    health.publish(HealthState(node_eligible=False))
    code, ctype, body = get(hz.port, "/healthz")
    assert (code, ctype, json.loads(body)["nodeEligible"]) == (503, "application/json", False)
    assert get(hz.port, "/livez")[0] == 200
    assert get(hz.port, "/metrics")[0] == 404
    assert get(mx.port, "/proxyMode")[2] == "iptables"
    code, ctype, body = get(mx.port, "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds 0" in body


def test_probes_configz_and_build_info() -> None:
    health, metrics = Health(TIMEOUT), Metrics("iptables")
    metrics.configz = b'{"kubeproxy.config.k8s.io": {"mode": "iptables"}}'
    hz = health_endpoint(("127.0.0.1", 0), health, metrics).start()
    mx = metrics_endpoint(("127.0.0.1", 0), metrics, health).start()
    try:
        get(hz.port, "/healthz")
        get(hz.port, "/healthz")
        health.publish(HealthState(node_eligible=False))
        get(hz.port, "/healthz")
        get(hz.port, "/livez")
        code, ctype, body = get(mx.port, "/configz")
        assert (code, ctype) == (200, "application/json")
        assert json.loads(body) == {"kubeproxy.config.k8s.io": {"mode": "iptables"}}
    finally:
        hz.stop()
        mx.stop()
    metrics.set_queued(123.5)
    s = samples(metrics.render())
    assert s['kubeproxy_proxy_healthz_total{code="200"}'] == "2"
    assert s['kubeproxy_proxy_healthz_total{code="503"}'] == "1"
    assert s['kubeproxy_proxy_livez_total{code="200"}'] == "1"
    assert s["kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"] == "123.5"
    assert any(k.startswith("kubernetes_build_info{gitVersion=") for k in s)
