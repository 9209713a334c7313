"""Health and metrics: upstream's answers, computed from published snapshots."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from kubeproxy.health.server import (
    Health,
    HealthState,
    HttpEndpoint,
    Metrics,
    go_time,
    health_endpoint,
    metrics_endpoint,
    parse_bind_address,
)
from tests.unit.test_metrics import parse_exposition, series

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


# What each metric records and how it reads back: tests/unit/test_metrics.py.


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
    assert code == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    served = parse_exposition(body)  # strict: HELP/TYPE lines, escaping, histograms
    assert served["kubeproxy_sync_proxy_rules_last_timestamp_seconds"].type == "gauge"
    assert "process_start_time_seconds" in served
    assert get(mx.port, "/healthz")[:3:2] == (200, "ok")


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
    p = "kubeproxy_proxy_"
    assert series(metrics, p + "healthz_total", code="200") == 2
    assert series(metrics, p + "healthz_total", code="503") == 1
    assert series(metrics, p + "livez_total", code="200") == 1
    assert series(metrics, p + "livez_total", code="503") is None
