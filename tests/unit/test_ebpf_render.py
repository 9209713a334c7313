"""ebpf mode without a kernel: the flow table, the map encoding, the strict fake maps.

tests/flows/test_flows.py runs the flow table through every registered mode; here its
cases also run through ``kubeproxy.modes.ebpf.MODE`` directly (with their
``only={"ebpf": ...}`` outcomes), beside the map encoding they exercise.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.config.types import LBAlgorithm, ProxyConfig
from kubeproxy.dataplane import bpf_sys
from kubeproxy.dataplane.ebpf import EbpfDataPlane
from kubeproxy.dataplane.nftables import NftablesDataPlane
from kubeproxy.errors import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName, parse_cidr
from kubeproxy.modes import ebpf as mode_ebpf
from kubeproxy.modes.base import PlaneOptions
from kubeproxy.nodeview import node_views
from kubeproxy.proxier import Proxier
from kubeproxy.render import ebpf as r
from kubeproxy.render.ebpf import Flag, Kind
from kubeproxy.testing.ebpf import FakeMaps, InconsistentMaps
from kubeproxy.testing.nftables import FakeNftables, NoRunner
from kubeproxy.trace.result import Packet
from tests.builders import NODE, NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.flows.test_flows import CASES, CIDR, Case
from tests.unit.test_modes import STEPS, svc_a

MODE = mode_ebpf.MODE
IP = ipaddress.ip_address


def views(objs: list[Obj], **config: Any) -> Any:
    cluster = decode_objects(objs)
    assert not cluster.errors
    settings: dict[str, Any] = {"hostname": NODE, "cluster_cidrs": (parse_cidr(CIDR, "t"),)}
    return node_views(cluster, ProxyConfig(**{**settings, **config}))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_flow_table(case: Case) -> None:
    ruleset = MODE.render(views(case.objects, **case.config))
    dst = IP(case.dst)
    local = frozenset(ip for ip in (IP(NODE_IP), IP("fd00::2")) if ip.version == dst.version)
    packet = Packet(src=IP(case.src), dst=dst, port=case.port, proto=case.proto,
                    in_interface=case.in_interface)
    want = case.only.get("ebpf", (case.verdict, case.endpoints, case.masquerade))
    got = MODE.trace(ruleset, packet, local)
    assert (got.verdict, tuple(got.endpoints), got.masquerade) == want, got.to_text()


BASIC = [node(), service("svc1", type="NodePort", ports=[("p80", 80, "TCP", 3001)],
                         externalIPs=["192.168.99.11"], sessionAffinity="ClientIP"),
         endpoint_slice("svc1", [endpoint("10.180.0.1"), endpoint("10.180.1.1", "node2")])]


def test_frontends_of_a_service_port() -> None:
    fam = MODE.render(views(BASIC, lb_algorithm=LBAlgorithm.ROUND_ROBIN)).families[0]
    got = {(s.kind, str(s.address), s.port): s for s in fam.services}
    assert set(got) == {(Kind.CLUSTER_IP, "172.30.0.41", 80), (Kind.NODE_PORT, NODE_IP, 3001),
                        (Kind.NODE_PORT, "127.0.0.1", 3001),  # localhost NodePorts
                        (Kind.EXTERNAL_IP, "192.168.99.11", 80)}
    for s in got.values():
        assert s.flags == Flag.AFFINITY | Flag.ROUND_ROBIN and s.affinity_timeout == 10800
        assert [f"{a}:{p}" for a, p in s.backends] == ["10.180.0.1:80", "10.180.1.1:80"]


@pytest.mark.parametrize(("svc", "eps", "flags", "backends"), [
    ({}, [], Flag.REJECT, []),
    ({"internalTrafficPolicy": "Local"}, [endpoint("10.180.1.1", "node2")],
     Flag.PASS | Flag.INTERNAL_LOCAL, []),
    ({"internalTrafficPolicy": "Local"},
     [endpoint("10.180.0.1"), endpoint("10.180.1.1", "node2")],
     Flag.INTERNAL_LOCAL, ["10.180.0.1:80"]),
], ids=["no-endpoints-refuses", "itp-local-none-passes-to-nft", "itp-local-local-only"])
def test_cluster_ip_entry_follows_the_node_view(svc: dict[str, Any], eps: list[Obj],
                                                flags: Flag, backends: list[str]) -> None:
    fam = MODE.render(views([node(), service("svc1", **svc),
                             endpoint_slice("svc1", eps)])).families[0]
    (entry,) = fam.services
    assert entry.flags == flags
    assert [f"{a}:{p}" for a, p in entry.backends] == backends


def test_wire_layout_round_trips() -> None:
    for address in (IP("172.30.0.41"), IP("fd00:30::46")):
        key = r.pack_service_key(address, 80, "udp", 3)
        assert len(key) == r.MAPS[r.svc_map(address.version)].key_size
        assert r.unpack_service_key(key) == (address, 80, "udp", 3)
        assert key[len(address.packed):][:2] == b"\x00\x50"  # port big-endian
        value = r.pack_backend(address, 8080, "tcp")
        assert len(value) == r.MAPS[r.be_map(address.version)].value_size
        assert r.unpack_backend(value) == (address, 8080, "tcp")
        rn = r.pack_rev_nat(address, 80, 7)
        assert r.unpack_rev_nat(rn) == (address, 80, 7)
    value = r.pack_service_value(10800, 2, 7, Flag.AFFINITY)
    assert len(value) == 12 and r.unpack_service_value(value) == (10800, 2, 7, Flag.AFFINITY)


@pytest.mark.skipif(not mode_ebpf.OBJECT.is_file() or shutil.which("bpftool") is None,
                    reason="bpf/sock_lb.o not built (make bpf) or bpftool missing")
def test_wire_layout_matches_the_compiled_structs() -> None:
    btf = subprocess.run(["bpftool", "btf", "dump", "file", str(mode_ebpf.OBJECT)],
                         capture_output=True, text=True, check=True).stdout
    sizes = {line.split("'")[1]: int(line.split("size=")[1].split()[0])
             for line in btf.splitlines() if "STRUCT '" in line}
    assert sizes["svc4_key"] == r.MAPS["kp_svc4"].key_size
    assert sizes["svc6_key"] == r.MAPS["kp_svc6"].key_size
    assert sizes["svc_val"] == r.MAPS["kp_svc4"].value_size
    assert sizes["be4"] == r.MAPS["kp_be4"].value_size
    assert sizes["be6"] == r.MAPS["kp_be6"].value_size
    assert sizes["rnat4"] == r.MAPS["kp_rnat4"].value_size
    assert sizes["rnat6"] == r.MAPS["kp_rnat6"].value_size
    assert sizes["sknat4_key"] == r.MAPS["kp_sknat4"].key_size
    assert sizes["sknat6_key"] == r.MAPS["kp_sknat6"].key_size
    assert sizes["aff_key"] == r.MAPS["kp_aff"].key_size


def test_text_prints_one_block_per_service_and_traces_back() -> None:
    ruleset = MODE.render(views(BASIC))
    text = MODE.text(ruleset, NODE)
    assert text.count("# service ns1/svc1:p80") == 1
    assert "frontend 172.30.0.41:80/tcp flags=affinity timeout=10800 " \
           "backends=10.180.0.1:80,10.180.1.1:80" in text
    packet = Packet(src=IP(NODE_IP), dst=IP("172.30.0.41"), port=80, proto="tcp")
    local = frozenset({IP(NODE_IP)})
    assert MODE.trace_rules(text, packet, local) == MODE.trace(ruleset, packet, local)


# --- the data plane over the strict fake -----------------------------------------------


def config() -> ProxyConfig:
    return ProxyConfig(hostname=NODE, cluster_cidrs=(parse_cidr(CIDR, "t"),),
                       mode="nftables")


def test_partial_syncs_equal_one_full_sync() -> None:
    incremental = Proxier(MODE, config(), MODE.fake())
    incremental.sync(decode_objects([node(), *svc_a("10.180.0.1", "10.180.0.2")]), None)
    assert "10.180.0.2:80" in incremental.plane.rules()
    for changed, objs in STEPS:
        cluster = decode_objects(objs)
        incremental.sync(cluster, changed)
        scratch = Proxier(MODE, config(), MODE.fake())
        scratch.sync(cluster, None)
        assert incremental.plane.rules() == scratch.plane.rules(), changed


def test_cleanup_empties_the_fake_maps() -> None:
    proxier = Proxier(MODE, config(), MODE.fake())
    proxier.sync(decode_objects(STEPS[0][1]), None)
    assert "10.180.0.7" in proxier.plane.rules()
    proxier.plane.cleanup()
    assert "10.180.0.7" not in proxier.plane.rules()
    assert "172.30.0.41" not in proxier.plane.rules()


def test_backend_ids_stay_stable_and_are_reused() -> None:
    maps = FakeMaps()
    plane = EbpfDataPlane(maps, NftablesDataPlane(NoRunner(), FakeNftables()), lambda: None)
    plane.sync(MODE.render(views([node(), *svc_a("10.180.0.1", "10.180.0.2")])))
    ids = dict(plane.backends.by_key)
    plane.sync(MODE.render(views([node(), *svc_a("10.180.0.1", "10.180.0.2", "10.180.0.3")])))
    assert all(plane.backends.by_key[k] == v for k, v in ids.items())
    plane.sync(MODE.render(views([node(), *svc_a("10.180.0.3")])))
    assert len(maps.maps["kp_be4"]) == 1


def test_a_restarted_data_plane_takes_over_the_maps() -> None:
    maps, objs = FakeMaps(), [node(), *svc_a("10.180.0.1", "10.180.0.2")]
    first = EbpfDataPlane(maps, NftablesDataPlane(NoRunner(), FakeNftables()), lambda: None)
    first.sync(MODE.render(views(objs)))
    before = {k: dict(v) for k, v in maps.maps.items()}
    ops = maps.ops
    second = EbpfDataPlane(maps, NftablesDataPlane(NoRunner(), FakeNftables()), lambda: None)
    second.sync(MODE.render(views(objs)))
    assert maps.ops == ops and maps.maps == before  # nothing rewritten


def test_the_fake_refuses_a_slot_zero_before_its_slots() -> None:
    maps = FakeMaps()
    address = IP("172.30.0.41")
    maps.update("kp_rnat4", r.pack_id(1), r.pack_rev_nat(address, 80, 1))
    with pytest.raises(InconsistentMaps, match="slot 1 of 1 missing"):
        maps.update("kp_svc4", r.pack_service_key(address, 80, "tcp", 0),
                    r.pack_service_value(0, 1, 1, Flag(0)))
    with pytest.raises(DataPlaneError, match="size"):
        maps.update("kp_svc4", b"\0" * 3, b"\0" * 12)
    with pytest.raises(DataPlaneError, match="no such key"):
        maps.delete("kp_be4", r.pack_id(9))


def test_the_root_cgroup_is_refused(tmp_path: Path) -> None:
    root = bpf_sys.cgroup2_root()
    with pytest.raises(DataPlaneError, match="root cgroup"):
        bpf_sys.check_cgroup(root, allow_root=False)
    assert bpf_sys.check_cgroup(root, allow_root=True) == root.resolve()
    with pytest.raises(DataPlaneError, match="not a cgroup2 directory"):
        bpf_sys.check_cgroup(tmp_path, allow_root=False)
    with pytest.raises(DataPlaneError, match="root cgroup"):
        mode_ebpf.data_plane(NoRunner(), PlaneOptions())


def test_services_are_named_in_the_views() -> None:
    fam = MODE.render(views(BASIC)).families[0]
    assert {s.name for s in fam.services} == {NamespacedName("ns1", "svc1")}
