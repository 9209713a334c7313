"""The IPVS data plane over its strict fake kernel (kubeproxy.testing.ipvs).

Partial syncs must leave the kernel as one full sync does; real servers that go away
drain (weight 0) while they have connections; intact() sees what others break; cleanup
removes everything; the fakes refuse what the kernel refuses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from kubeproxy.dataplane.base import DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName
from kubeproxy.modes.ipvs import MODE, DataPlane
from kubeproxy.proxier import Proxier
from kubeproxy.render.ipvs import RealServer
from kubeproxy.testing.ipvs import FakeIpvs, FakeNode
from kubeproxy.trace.result import Packet
from tests.builders import NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.unit.test_modes import CONFIG, STEPS

A = NamespacedName("ns1", "a")
VIP = ipaddress.ip_address("172.30.0.41")


def proxier() -> Proxier:
    return Proxier(MODE, CONFIG, MODE.fake())


def parts(p: Proxier) -> tuple[DataPlane, FakeNode, FakeIpvs]:
    plane = p.plane
    assert isinstance(plane, DataPlane)
    node_runner, kernel = plane.plane.runner, plane.plane.kernel
    assert isinstance(node_runner, FakeNode) and isinstance(kernel, FakeIpvs)
    return plane, node_runner, kernel


def cluster(*ips: str, proto: str = "TCP") -> Any:
    objs: list[Obj] = [node(), service("a", cluster_ip="172.30.0.41",
                                       ports=[("p80", 80, proto, 0)]),
                       endpoint_slice("a", [endpoint(ip) for ip in ips],
                                      ports=[("p80", 80, proto)])]
    return decode_objects(objs)


def test_partial_syncs_equal_one_full_sync() -> None:
    incremental = proxier()
    incremental.sync(decode_objects(STEPS[0][1]), None)
    for changed, objects in STEPS:
        c = decode_objects(objects)
        incremental.sync(c, changed)
        scratch = proxier()
        scratch.sync(c, None)
        assert incremental.plane.rules() == scratch.plane.rules(), changed


def test_partial_sync_touches_only_the_changed_service() -> None:
    p = proxier()
    p.sync(decode_objects(STEPS[0][1]), None)
    _, _, kernel = parts(p)
    kernel.calls.clear()
    p.sync(decode_objects(STEPS[1][1]), frozenset({A}))
    assert kernel.calls and all("172.30.0.41" in c for c in kernel.calls), kernel.calls


def reals(kernel: FakeIpvs, proto: str = "tcp") -> dict[str, int]:
    return {f"{ip}:{port}": w for (ip, port), w in kernel.reals[(VIP, proto, 80)].items()}


def test_graceful_termination_drains_then_deletes() -> None:
    p = proxier()
    p.sync(cluster("10.180.0.1", "10.180.0.2"), None)
    plane, _, kernel = parts(p)
    key = (VIP, "tcp", 80)
    kernel.connections[(key, ipaddress.ip_address("10.180.0.2"), 80)] = (1, 0)
    p.sync(cluster("10.180.0.1"), frozenset({A}))
    assert reals(kernel) == {"10.180.0.1:80": 1, "10.180.0.2:80": 0}
    # Weight 0: no new connection goes there (the kernel's own account says so too).
    packet = Packet(ipaddress.ip_address("10.180.0.9"), VIP, 80, "tcp")
    traced = MODE.trace_rules(plane.rules(), packet, frozenset({ipaddress.ip_address(NODE_IP)}))
    assert traced.endpoints == ("10.180.0.1:80",)
    p.sync(cluster("10.180.0.1"), frozenset())  # connections still there: kept
    assert "10.180.0.2:80" in reals(kernel)
    kernel.connections[(key, ipaddress.ip_address("10.180.0.2"), 80)] = (0, 0)
    p.sync(cluster("10.180.0.1"), frozenset())  # any later sync finishes the job
    assert reals(kernel) == {"10.180.0.1:80": 1}


def test_a_draining_endpoint_that_comes_back_gets_its_weight_back() -> None:
    p = proxier()
    p.sync(cluster("10.180.0.1", "10.180.0.2"), None)
    _, _, kernel = parts(p)
    kernel.connections[((VIP, "tcp", 80), ipaddress.ip_address("10.180.0.2"), 80)] = (0, 3)
    p.sync(cluster("10.180.0.1"), frozenset({A}))
    assert reals(kernel)["10.180.0.2:80"] == 0
    p.sync(cluster("10.180.0.1", "10.180.0.2"), frozenset({A}))
    assert reals(kernel) == {"10.180.0.1:80": 1, "10.180.0.2:80": 1}
    assert not parts(p)[0].plane.terminating


def test_udp_real_servers_are_deleted_at_once() -> None:
    p = proxier()
    p.sync(cluster("10.180.0.1", "10.180.0.2", proto="UDP"), None)
    _, _, kernel = parts(p)
    kernel.connections[((VIP, "udp", 80), ipaddress.ip_address("10.180.0.2"), 80)] = (1, 1)
    p.sync(cluster("10.180.0.1", proto="UDP"), frozenset({A}))
    assert reals(kernel, "udp") == {"10.180.0.1:80": 1}


# --- intact() -------------------------------------------------------------------------------

Damage = Callable[[FakeNode, FakeIpvs], object]


def _ipt(*args: str) -> Damage:
    def run(runner: FakeNode, kernel: FakeIpvs) -> object:
        res = runner.run(["iptables-nft", "-w", *args])
        assert res.returncode == 0, res.stderr
        return res
    return run


@dataclass(frozen=True)
class FlushCase:
    name: str
    damage: Damage
    breaks: bool = True


FLUSHES = [
    FlushCase("ip link del kube-ipvs0", lambda r, k: r.run(["ip", "link", "del", "kube-ipvs0"])),
    FlushCase("ipvsadm -D (a virtual server)", lambda r, k: k.del_service((VIP, "tcp", 80))),
    FlushCase("ipvsadm -C", lambda r, k: k.flush()),
    FlushCase("-t nat -F KUBE-SERVICES", _ipt("-t", "nat", "-F", "KUBE-SERVICES")),
    FlushCase("-t filter -F KUBE-IPVS-FILTER", _ipt("-t", "filter", "-F", "KUBE-IPVS-FILTER")),
    FlushCase("-t nat -D PREROUTING (our jump)", _ipt(
        "-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
        "kubernetes service portals", "-j", "KUBE-SERVICES")),
    FlushCase("someone else's nat chain", lambda r, k: (
        _ipt("-t", "nat", "-N", "OTHER")(r, k),
        _ipt("-t", "nat", "-A", "PREROUTING", "-j", "OTHER")(r, k)), breaks=False),
]


@pytest.mark.parametrize("case", FLUSHES, ids=lambda c: c.name)
def test_intact_sees_damage_and_a_full_sync_repairs(case: FlushCase) -> None:
    p = proxier()
    plane, runner, kernel = parts(p)
    assert plane.intact(), "nothing written yet"
    c = decode_objects(STEPS[0][1])
    p.sync(c, None)
    assert plane.intact() and plane.intact()
    before = plane.rules()
    case.damage(runner, kernel)
    assert plane.intact() is not case.breaks
    if case.breaks:
        p.sync(c, None)
        assert plane.intact()
        assert plane.rules() == before


def test_intact_is_cheap_while_nothing_moved() -> None:
    p = proxier()
    plane, runner, _ = parts(p)
    p.sync(decode_objects(STEPS[0][1]), None)
    runner.calls.clear()
    assert plane.intact()
    assert [c[0][0] for c in runner.calls] == ["ip"]  # the link check; no iptables-save


# --- failures, cleanup, strictness ------------------------------------------------------------


def test_a_failed_sync_makes_the_next_one_full() -> None:
    p = proxier()
    plane, runner, _ = parts(p)
    p.sync(decode_objects(STEPS[0][1]), None)
    runner.iptables.fail("restore")
    with pytest.raises(DataPlaneError):
        p.sync(decode_objects(STEPS[1][1]), frozenset({A}))
    assert plane.plane.needs_full
    p.sync(decode_objects(STEPS[1][1]), frozenset({A}))
    scratch = proxier()
    scratch.sync(decode_objects(STEPS[1][1]), None)
    assert plane.rules() == scratch.plane.rules()


def test_cleanup_removes_everything() -> None:
    p = proxier()
    plane, runner, kernel = parts(p)
    p.sync(decode_objects(STEPS[0][1]), None)
    assert runner.run(["ipset", "destroy", "KUBE-CLUSTER-IP"]).returncode == 1  # in use
    plane.cleanup()
    assert not kernel.services_ and not runner.sets and "kube-ipvs0" not in runner.links
    assert "KUBE-" not in runner.iptables.snapshot()
    assert "172.30.0.41" not in plane.rules()


@pytest.mark.parametrize(("payload", "error"), [
    ("create S hash:ip,port family inet hashsize 1024 maxelem 65536\nadd S 10.0.0.1\n",
     "Syntax error"),
    ("create S hash:ip,port family inet hashsize 1024 maxelem 65536\nadd S fd00::1,tcp:80\n",
     "not an IPv4"),
    ("create S bitmap:port range 0-65535\nadd S tcp:80\n", "bare port"),
    ("add T 10.0.0.1\n", "does not exist"),
    ("create S hash:ip family inet\ncreate S hash:ip family inet\n", "already exists"),
], ids=["entry shape", "family", "bitmap protocol", "missing set", "create twice"])
def test_fake_ipset_refuses_what_the_kernel_refuses(payload: str, error: str) -> None:
    runner = FakeNode()
    res = runner.run(["ipset", "restore"], payload)
    assert res.returncode == 1 and error in res.stderr
    assert not runner.sets  # all or nothing


def test_fake_ipvs_refuses_what_the_kernel_refuses() -> None:
    key = (VIP, "tcp", 80)
    with pytest.raises(DataPlaneError, match="ENOENT"):
        FakeIpvs().add_dest(key, RealServer(ipaddress.ip_address("10.0.0.1"), 80))
    p = proxier()
    p.sync(cluster("10.180.0.1"), None)
    _, _, k = parts(p)
    vs = p.plane.plane.written[key]  # type: ignore[attr-defined]
    with pytest.raises(DataPlaneError, match="EEXIST"):
        k.add_service(vs)
    with pytest.raises(DataPlaneError, match="EEXIST"):
        k.add_dest(key, RealServer(ipaddress.ip_address("10.180.0.1"), 80))
    with pytest.raises(DataPlaneError, match="other family"):
        k.add_dest(key, RealServer(ipaddress.ip_address("fd00::1"), 80))
    with pytest.raises(DataPlaneError, match="ENOENT"):
        k.del_dest(key, ipaddress.ip_address("10.9.9.9"), 80)


def test_fake_ip_batch_is_all_or_nothing() -> None:
    runner = FakeNode()
    runner.run(["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
    res = runner.run(["ip", "-batch", "-"], "address add 172.30.0.1/32 dev kube-ipvs0\n"
                     "address add 172.30.0.1/32 dev kube-ipvs0\n")
    assert res.returncode == 2 and "File exists" in res.stderr
    assert runner.links["kube-ipvs0"] == set()


def test_cleanup_without_ipvs_in_the_kernel() -> None:
    runner = FakeNode(ipvs_loaded=False)
    from kubeproxy.modes.base import PlaneOptions
    MODE.cleanup(runner, PlaneOptions(iptables_backend="nft"))
    assert "no IPVS" in (MODE.kernel_support(runner) or "")


def test_batched_requests_read_back_with_pyroute2s_decoder() -> None:
    """The hand-spelled netlink requests (dataplane/ipvs.py _GenlBatch) decode, with
    pyroute2's own IPVS message classes, to the service and real server meant."""
    import struct

    from pyroute2.netlink.generic import ipvs as genl  # type: ignore[import-untyped]

    from kubeproxy.dataplane import ipvs as dp

    p = proxier()
    p.sync(cluster("10.180.0.1"), None)
    vs = p.plane.plane.written[(VIP, "tcp", 80)]  # type: ignore[attr-defined]
    body = (struct.pack("=BBH", 1, 1, 0)
            + dp._nla(1 | 0x8000, dp._service_attrs((VIP, "tcp", 80), vs))
            + dp._nla(2 | 0x8000, dp._dest_attrs(RealServer(ipaddress.ip_address(
                "10.180.0.1"), 8080, 3))))
    msg = genl.ipvsmsg(struct.pack("=IHHII", 16 + len(body), 99, 5, 1, 0) + body)
    msg.decode()
    svc, dest = msg.get_attr("IPVS_CMD_ATTR_SERVICE"), msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert (svc.get_attr("IPVS_SVC_ATTR_AF"), svc.get_attr("IPVS_SVC_ATTR_PROTOCOL"),
            svc.get_attr("IPVS_SVC_ATTR_ADDR"), svc.get_attr("IPVS_SVC_ATTR_PORT"),
            svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
            svc.get_attr("IPVS_SVC_ATTR_TIMEOUT")) == (2, 6, "172.30.0.41", 80, "rr", 0)
    assert (dest.get_attr("IPVS_DEST_ATTR_ADDR"), dest.get_attr("IPVS_DEST_ATTR_PORT"),
            dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD"), dest.get_attr("IPVS_DEST_ATTR_WEIGHT"),
            dest.get_attr("IPVS_DEST_ATTR_ADDR_FAMILY")) == ("10.180.0.1", 8080, 0, 3, 2)
