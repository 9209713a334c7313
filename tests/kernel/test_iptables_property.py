"""Property: any cluster renders rules the real iptables-restore accepts (--test mode).

Hypothesis builds random clusters (every service type, policies, affinity, source
ranges, both families, endpoints in every condition); the rendered ruleset must load
in the kernel's parser inside a namespace the test makes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubeproxy.config.types import DetectLocalMode, LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects
from kubeproxy.model import parse_cidr
from tests.builders import NODE, Obj, endpoint, endpoint_slice, node, render_iptables, service
from tests.kernel.conftest import scratch_namespace

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)


@st.composite
def service_objects(draw: st.DrawFn, index: int) -> list[Obj]:
    v6 = draw(st.booleans())
    svc_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    n_ports = draw(st.integers(1, 3))
    protos = draw(st.lists(st.sampled_from(["TCP", "UDP", "SCTP"]), min_size=n_ports,
                           max_size=n_ports))
    port_list = [(f"p{i}", draw(ports), protos[i],
                  30000 + index * 3 + i if svc_type != "ClusterIP" else 0)
                 for i in range(n_ports)]
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    if svc_type != "ClusterIP":
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    spec["internalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    if draw(st.booleans()):
        spec["externalIPs"] = [f"192.168.99.{index % 250 + 1}"]
    lb_ips: list[str | dict[str, str]] | None = None
    if svc_type == "LoadBalancer":
        lb_ips = [f"5.6.{index // 250}.{index % 250 + 1}"]
        if v6:
            lb_ips.append(f"2001:db8::{index + 1:x}")
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = ["203.0.113.0/25", "192.168.0.0/24"]
    v4_ip = f"172.30.{index // 250}.{index % 250 + 1}"
    cluster_ip: str | list[str] = [v4_ip, f"fd00:30::{index + 1:x}"] if v6 else v4_ip
    name = f"s{index}-{draw(names)}"
    objs = [service(name, cluster_ip=cluster_ip, type=svc_type, ports=port_list,
                    lb_ips=lb_ips, **spec)]
    eps = [endpoint(f"10.180.{index % 250}.{i + 1}",
                    node=draw(st.sampled_from([NODE, "node2", None])),
                    ready=draw(st.booleans()), serving=draw(st.booleans()),
                    terminating=draw(st.booleans()))
           for i in range(draw(st.integers(0, 4)))]
    slice_ports = [(n, draw(ports), proto) for n, _, proto, _ in port_list]
    objs.append(endpoint_slice(name, eps, ports=slice_ports))
    if v6:
        objs.append(endpoint_slice(name, [endpoint(f"fd00:180::{index + 1:x}")],
                                   name=f"{name}-v6", family="IPv6", ports=slice_ports))
    return objs


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Obj], ProxyConfig]:
    objs: list[Obj] = [node(ips=["192.168.0.2", "fd00::2"])]
    for i in range(draw(st.integers(0, 6))):
        objs += draw(service_objects(i))
    mode = draw(st.sampled_from(list(DetectLocalMode)))
    config = ProxyConfig(
        hostname=NODE,
        cluster_cidrs=(parse_cidr("10.0.0.0/8", "t"), parse_cidr("fd00:180::/64", "t")),
        masquerade_all=draw(st.booleans()),
        detect_local_mode=mode,
        bridge_interface="cbr0",
        interface_name_prefix="veth",
        lb_algorithm=draw(st.sampled_from(list(LBAlgorithm))),
        nodeport_addresses=draw(st.sampled_from([(), ("primary",), ("192.168.0.0/16",
                                                                    "127.0.0.0/8")])),
    )
    return objs, config


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with scratch_namespace() as name:
        yield name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(clusters())
def test_random_clusters_load(netns: str, generated: tuple[list[Obj], ProxyConfig]) -> None:
    objs, config = generated
    cluster = decode_objects(objs)
    assert not cluster.errors, cluster.errors
    for family, ruleset in render_iptables(cluster, config).items():
        tool = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
        done = subprocess.run(["ip", "netns", "exec", netns, tool, "--test"],
                              input=ruleset.save_text(), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, f"IPv{family}: {done.stderr}"
