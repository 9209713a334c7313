"""KubeProxyConfiguration v1alpha1: kubeadm's file, defaulting, sections, precedence."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from kubeproxy.app.cli import build_parser
from kubeproxy.config import flags
from kubeproxy.config import v1alpha1 as kpconfig
from kubeproxy.config.flags import build_config
from kubeproxy.errors import ConfigError

DATA = Path(__file__).parent / "data"


def kubeadm_conf(tmp_path: Path, **changes: object) -> Path:
    cm = yaml.safe_load((DATA / "kubeadm-kube-proxy-configmap.yaml").read_text())
    doc = yaml.safe_load(cm["data"]["config.conf"])
    for dotted, value in changes.items():
        head, _, tail = dotted.partition("__")
        if tail:
            doc[head][tail] = value
        else:
            doc[head] = value
    path = tmp_path / "config.conf"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_kubeadm_config_loads_with_upstreams_defaults(tmp_path: Path) -> None:
    args = run_args("--config", str(kubeadm_conf(tmp_path)), "--hostname-override", "Node-1")
    eff = flags.effective(args)
    assert eff.notes == ()  # every field known, nothing ignored
    f = eff.fields
    assert (f["iptables.syncPeriod"], f["iptables.minSyncPeriod"]) == ("30s", "1s")
    assert (f["nftables.syncPeriod"], f["nftables.minSyncPeriod"]) == ("30s", "1s")
    assert f["iptables.masqueradeBit"] == 14 and f["iptables.localhostNodePorts"] is True
    assert f["healthzBindAddress"] == "0.0.0.0:10256"
    assert f["metricsBindAddress"] == "127.0.0.1:10249"
    assert f["conntrack.maxPerCore"] == 32768 and f["conntrack.min"] == 131072
    assert f["conntrack.tcpEstablishedTimeout"] == "24h0m0s"
    assert f["conntrack.tcpCloseWaitTimeout"] == "1h0m0s"
    assert f["oomScoreAdj"] == -999 and f["configSyncPeriod"] == "15m0s"
    assert f["clientConnection.qps"] == 5.0 and f["clientConnection.burst"] == 10
    assert f["mode"] == "iptables" and f["nodePortAddresses"] == []
    config = build_config(args)
    assert (config.sync_period, config.min_sync_period) == (30.0, 1.0)
    assert config.hostname == "node-1"  # --hostname-override wins, lowercased
    assert config.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert [str(c) for c in config.cluster_cidrs] == ["10.244.0.0/16"]


def test_nftables_section_governs_nftables_mode(tmp_path: Path) -> None:
    path = kubeadm_conf(tmp_path, mode="nftables", nftables__masqueradeAll=True,
                        nftables__masqueradeBit=9, nftables__syncPeriod="45s",
                        iptables__masqueradeBit=3, iptables__syncPeriod="10s")
    config = build_config(run_args("--config", str(path)))
    assert (config.masquerade_all, config.masquerade_bit, config.sync_period) == (
        True, 9, 45.0)
    # Upstream's nftables default (types.NODEPORT_DEFAULTS): the Node's primary IPs only.
    assert config.nodeport_addresses == ("primary",)
    iptables = build_config(run_args("--config", str(kubeadm_conf(
        tmp_path, iptables__masqueradeBit=3, iptables__syncPeriod="10s"))))
    assert (iptables.masquerade_bit, iptables.sync_period) == (3, 10.0)
    assert iptables.nodeport_addresses == ()


def test_top_level_sync_periods_of_newer_versions_win(tmp_path: Path) -> None:
    path = kubeadm_conf(tmp_path, syncPeriod="1m", minSyncPeriod="2s")
    config = build_config(run_args("--config", str(path)))
    assert (config.sync_period, config.min_sync_period) == (60.0, 2.0)


def test_unknown_fields_warn(tmp_path: Path) -> None:
    path = kubeadm_conf(tmp_path, bogus=1, iptables__nope=True)
    notes = flags.effective(run_args("--config", str(path))).notes
    assert any("unknown field 'bogus'" in n for n in notes)
    assert any("unknown field 'iptables.nope'" in n for n in notes)


def test_with_config_flags_are_ignored_and_logged(tmp_path: Path) -> None:
    path = kubeadm_conf(tmp_path)
    args = run_args("--config", str(path), "--masquerade-all", "--cluster-cidr",
                    "10.9.0.0/16", "-v", "4")
    eff = flags.effective(args)
    assert eff.fields["masqueradeAll"] is False
    assert eff.fields["clusterCIDR"] == "10.244.0.0/16"
    assert eff.fields["logging.verbosity"] == 4  # logging flags still win
    assert any("ignoring --masquerade-all, --cluster-cidr" in n for n in eff.notes)


@pytest.mark.parametrize(("argv", "field", "want"), [
    (["--iptables-sync-period", "2m"], "nftables.syncPeriod", "2m0s"),
    (["--iptables-min-sync-period", "0s"], "iptables.minSyncPeriod", "0s"),
    (["--metrics-bind-address", ""], "metricsBindAddress", ""),  # empty: off
    (["--healthz-port", "0"], "healthzBindAddress", ""),
    (["--metrics-port", "9999"], "metricsBindAddress", "127.0.0.1:9999"),
    (["--conntrack-tcp-be-liberal"], "conntrack.tcpBeLiberal", True),
    (["--iptables-localhost-nodeports=false"], "iptables.localhostNodePorts", False),
    (["--feature-gates", "A=true,B=false"], "featureGates", {"A": True, "B": False}),
    (["--nodeport-addresses", "10.0.0.0/8,fd00::/64"], "nodePortAddresses",
     ["10.0.0.0/8", "fd00::/64"]),
])
def test_flags_without_config(argv: list[str], field: str, want: object) -> None:
    assert flags.effective(run_args(*argv)).fields[field] == want


def test_zero_min_sync_period_flag_is_kept() -> None:
    assert build_config(run_args("--iptables-min-sync-period", "0s")).min_sync_period == 0.0


def test_no_effect_flags_are_logged() -> None:
    notes = flags.effective(run_args("--ipvs-scheduler", "rr", "--profiling")).notes
    assert any("--profiling" in n for n in notes)
    assert not any("--ipvs-scheduler" in n for n in notes), "honoured: modes.for_config"


@pytest.mark.parametrize(("flag", "honoured"), [
    (["--kube-api-qps", "50"], True),
    (["--kube-api-burst", "100"], True),
    (["--kube-api-content-type", "application/vnd.kubernetes.protobuf"], True),
    (["--show-hidden-metrics-for-version", "1.32"], True),  # nothing is hidden
    (["--profiling"], False),
    (["--config-sync-period", "1m"], True),  # informer resync (daemon.py)
    (["--bind-address", "192.168.0.2"], True),  # the primary IP override (config.py)
], ids=lambda v: v[0] if isinstance(v, list) else str(v))
def test_which_flags_say_they_have_no_effect(flag: list[str], honoured: bool) -> None:
    notes = flags.effective(run_args(*flag)).notes
    assert any(flag[0] in n and "no effect" in n for n in notes) is not honoured


def test_api_client_flags_reach_the_rate_limiter() -> None:
    from kubeproxy.app.cli import _client_options

    args = run_args("--kube-api-qps", "50", "--kube-api-burst", "100",
                    "--kube-api-content-type", "application/vnd.kubernetes.protobuf")
    options = _client_options(flags.effective(args).fields)
    limiter = options.limiter()
    assert limiter is not None and (limiter.qps, limiter.burst) == (50.0, 100)
    assert options.content_type == "application/vnd.kubernetes.protobuf"
    default = _client_options(flags.effective(run_args()).fields).limiter()
    assert default is not None and (default.qps, default.burst) == (5.0, 10)  # client-go's
    with pytest.raises(ConfigError, match="content type"):
        _client_options(flags.effective(run_args("--kube-api-content-type", "text/xml")).fields)


@pytest.mark.parametrize(("mode", "nodeports"), [
    ("nftables", ("primary",)),  # upstream's platformApplyDefaults
    ("iptables", ()), ("ipvs", ()), ("ebpf", ()),  # every local address
])
def test_nodeport_addresses_default_by_mode(mode: str, nodeports: tuple[str, ...]) -> None:
    assert build_config(run_args("--proxy-mode", mode)).nodeport_addresses == nodeports
    given = build_config(run_args("--proxy-mode", mode, "--nodeport-addresses", "10.0.0.0/8"))
    assert given.nodeport_addresses == ("10.0.0.0/8",)  # given: never the default


def test_configz_is_upstreams_shape() -> None:
    doc = json.loads(kpconfig.configz(flags.effective(run_args("--proxy-mode", "nftables",
                                                                 "--kube-api-qps", "7")).fields))
    assert list(doc) == ["kubeproxy.config.k8s.io"]
    cfg = doc["kubeproxy.config.k8s.io"]
    assert (cfg["kind"], cfg["apiVersion"]) == (kpconfig.KIND, kpconfig.API_VERSION)
    assert cfg["mode"] == "nftables" and cfg["nodePortAddresses"] == ["primary"]
    assert cfg["clientConnection"]["qps"] == 7.0 and cfg["nftables"]["syncPeriod"] == "30s"


@pytest.mark.parametrize(("doc", "message"), [
    ({"iptables": {"syncPeriod": 30}}, "iptables.syncPeriod must be a duration"),
    ({"clientConnection": {"qps": "x"}}, "clientConnection.qps must be a number"),
    ({"apiVersion": "v1"}, "apiVersion"),
    ({"iptables": "yes"}, "iptables must be a mapping"),
])
def test_bad_files(doc: dict[str, object], message: str) -> None:
    full = {"apiVersion": kpconfig.API_VERSION, "kind": kpconfig.KIND, **doc}
    with pytest.raises(ConfigError, match=message):
        kpconfig.decode(full, "f")


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (30, "30s"), (60, "1m0s"), (900, "15m0s"), (86400, "24h0m0s"),
    (0.25, "250ms"), (1.5, "1.5s"), (3661, "1h1m1s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert kpconfig.format_duration(seconds) == text


def test_every_upstream_flag_is_in_the_table() -> None:
    upstream = [f for f in flags.FLAGS if f.group == "upstream"]
    assert len(upstream) == 47  # cmd/kube-proxy/app/options.go (Linux)
    help_text = build_parser().parse_args(["run"]) and flags_help()
    for flag in flags.FLAGS:
        assert flag.names[0] in help_text, flag.names[0]


def flags_help() -> str:
    parser = argparse.ArgumentParser(prog="kube-proxy")
    flags.add_flags(parser)
    return parser.format_help()
