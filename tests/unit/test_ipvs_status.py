"""What `lab status` says about load balancing, per mode (Presentation.load_balancing).

IPVS mode ignores --lb-algorithm: its scheduler picks the real server, so the status
must name the scheduler, and the one the settings choose.
"""

from __future__ import annotations

import pytest

from kubeproxy import modes
from kubeproxy.config.types import IpvsConfig
from kubeproxy.modes import ipvs as ipvs_mode

CASES = [
    # (mode, --lb-algorithm, what status says)
    ("iptables", "random", "random"),
    ("iptables", "round-robin", "round-robin"),
    ("nftables", "round-robin", "round-robin"),
    ("ipvs", "random", "IPVS scheduler rr"),
    ("ipvs", "round-robin", "IPVS scheduler rr"),
]


@pytest.mark.parametrize(("mode", "algorithm", "said"), CASES)
def test_load_balancing_in_words(mode: str, algorithm: str, said: str) -> None:
    assert modes.presentation(mode).load_balancing(algorithm) == said


@pytest.mark.parametrize("scheduler", ["wrr", "sh", "mh"])
def test_ipvs_settings_name_their_scheduler(scheduler: str) -> None:
    shown = ipvs_mode.presentation(IpvsConfig(scheduler=scheduler))
    assert shown.load_balancing("random") == f"IPVS scheduler {scheduler}"
