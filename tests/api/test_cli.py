"""`python -m kubeproxy.apiserver` as the lab will run it: a subprocess that writes its
kubeconfig once it listens and exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml


def test_runs_writes_kubeconfig_and_stops_on_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "lab" / "kubeconfig"
    proc = subprocess.Popen([sys.executable, "-m", "kubeproxy.apiserver", "--listen",
                             "127.0.0.1:0", "--history", "50", "--kubeconfig-out",
                             str(kubeconfig)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not kubeconfig.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no kubeconfig written"
            time.sleep(0.05)
        doc = yaml.safe_load(kubeconfig.read_text())
        server = doc["clusters"][0]["cluster"]["server"]
        assert server.startswith("http://127.0.0.1:") and doc["current-context"]
        with urllib.request.urlopen(server + "/version", timeout=5) as resp:
            assert json.load(resp)["major"] == "1"
        proc.send_signal(signal.SIGTERM)  # our own child, by PID
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_refuses_a_listener_other_machines_could_reach(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kubeproxy.apiserver", "--listen",
                             "0.0.0.0:6443", "--kubeconfig-out", str(tmp_path / "k")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1 and "loopback" in result.stderr
    assert not (tmp_path / "k").exists()
