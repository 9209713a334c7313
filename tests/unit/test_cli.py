"""The `kubeproxy` command as a user runs it: render and trace on the seed example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubeproxy import __version__

ROOT = Path(__file__).resolve().parents[2]
SEED = str(ROOT / "examples" / "seed.yaml")
SEED_PODS = ["10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080"]


def kubeproxy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubeproxy", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_render_seed() -> None:
    done = kubeproxy("render", "-f", SEED, "--hostname-override", "node-1",
                     "--cluster-cidr", "10.244.0.0/16")
    assert done.returncode == 0, done.stderr
    assert "# IPv4 rules for node node-1" in done.stdout
    assert "-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/my-service-nodeport:http\" " \
           "-m tcp --dport 30080" in done.stdout
    assert done.stdout.count("-j DNAT") == 6


@pytest.mark.parametrize(("src", "dst", "port", "masquerade"), [
    ("10.244.1.9", "10.96.0.10", "80", False),  # a pod to my-service:80
    ("203.0.113.2", "192.168.49.2", "30080", True),  # outside to NODE_IP:30080
])
def test_trace_seed_json(src: str, dst: str, port: str, masquerade: bool) -> None:
    done = kubeproxy("trace", "-f", SEED, "--hostname-override", "node-1",
                     "--cluster-cidr", "10.244.0.0/16", "--src", src, "--dst", dst,
                     "--port", port, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result) == ["verdict", "endpoints", "masquerade", "path"]
    assert result["verdict"] == "DNAT"
    assert result["endpoints"] == SEED_PODS
    assert result["masquerade"] is masquerade
    assert result["path"][0] == "KUBE-SERVICES"


def test_trace_text_explains() -> None:
    done = kubeproxy("trace", "-f", SEED, "--hostname-override", "node-1",
                     "--cluster-cidr", "10.244.0.0/16", "--src", "10.244.1.9",
                     "--dst", "10.96.0.10", "--port", "80")
    assert done.returncode == 0, done.stderr
    assert "default/my-service:http" in done.stdout
    assert "10.244.1.3:8080" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--src", "10.0.0.1", "--dst", "10.0.0.300", "--port", "80"], "--src/--dst"),
    (["--src", "10.0.0.1", "--dst", "fd00::1", "--port", "80"], "same IP family"),
    (["--src", "10.0.0.1", "--dst", "10.0.0.2", "--port", "70000"], "--port"),
    (["--src", "10.0.0.1", "--dst", "10.0.0.2", "--port", "80", "--cluster-cidr", "10.0/99"],
     "--cluster-cidr"),
    (["--src", "10.0.0.1", "--dst", "10.0.0.2", "--port", "80", "--lb-algorithm", "fastest"],
     "lb-algorithm"),
    (["--src", "10.0.0.1", "--dst", "10.0.0.2", "--port", "80", "--detect-local-mode", "X"],
     "detectLocalMode"),
])
def test_trace_bad_flags(args: list[str], message: str) -> None:
    done = kubeproxy("trace", "-f", SEED, "--hostname-override", "node-1", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_invalid_object_warns_and_the_rest_renders(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
apiVersion: v1
kind: Service
metadata: {name: "evil\\" -j ACCEPT", namespace: default}
spec: {clusterIP: 10.96.0.99, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: toobig, namespace: default}
spec: {clusterIP: 10.96.0.98, ports: [{port: 99999}]}
""")
    done = kubeproxy("render", "-f", SEED, "-f", str(bad), "--hostname-override", "node-1")
    assert done.returncode == 0
    assert "Service default/evil" in done.stderr and "metadata.name" in done.stderr
    assert "Service default/toobig: spec.ports[0].port" in done.stderr
    assert "10.96.0.99" not in done.stdout and "10.96.0.98" not in done.stdout
    assert "10.96.0.10/32" in done.stdout


def test_missing_file() -> None:
    done = kubeproxy("render", "-f", "/nonexistent.yaml")
    assert done.returncode == 2 and "nonexistent.yaml" in done.stderr


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "kp.yaml"
    cfg.write_text("""
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: node-1
clusterCIDR: 10.244.0.0/16
iptables: {masqueradeAll: true, masqueradeBit: 12}
""")
    done = kubeproxy("render", "-f", SEED, "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "--set-xmark 0x1000/0x1000" in done.stdout
    # masqueradeAll: the cluster-IP masquerade rule has no source match.
    assert '-A KUBE-SVC-I37Z43XJW6BD4TLV -d 10.96.0.10/32 -p tcp' in done.stdout
    cfg.write_text("kind: KubeProxyConfiguration\napiVersion: v1\n")
    done = kubeproxy("render", "-f", SEED, "--config", str(cfg))
    assert done.returncode == 2 and "apiVersion" in done.stderr


def test_version_loads_neither_the_daemon_nor_the_metrics_library() -> None:
    """`kube-proxy --version` stays cheap: prometheus-client is the daemon's (docs/flags.md)."""
    code = ("import sys; from kubeproxy.app.cli import kube_proxy_main; "
            "rc = kube_proxy_main(['--version']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client' "
            "or m == 'kubeproxy.app.daemon'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"kubeproxy v{__version__} (kube-proxy's command line)", "[]"]


def test_bind_address_is_the_primary_ip_of_render() -> None:
    """nftables mode opens NodePorts on the primary IP (upstream's default): the Node's
    first address, or --bind-address where given (upstream's detectNodeIPs)."""
    def nodeport_ips(*extra: str) -> str:
        done = kubeproxy("render", "-f", SEED, "--hostname-override", "node-1",
                         "--proxy-mode", "nftables", *extra)
        assert done.returncode == 0, done.stderr
        text = done.stdout
        return text[text.index("set nodeport-ips"):].split("elements = {", 1)[1].split("}")[0]
    assert nodeport_ips().strip() == "192.168.49.2"
    assert nodeport_ips("--bind-address", "192.168.49.77").strip() == "192.168.49.77"
    assert nodeport_ips("--bind-address", "0.0.0.0").strip() == "192.168.49.2"
