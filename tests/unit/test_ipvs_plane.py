"""The IPVS data plane over its strict fake kernel (kubeproxy.testing.ipvs).

Partial syncs must leave the kernel as one full sync does; real servers that go away
drain (weight 0) while they have connections; intact() sees what others break; cleanup
removes everything; the fakes refuse what the kernel refuses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubeproxy.config.types import IpvsConfig
from kubeproxy.dataplane.ipvs import IpvsDataPlane
from kubeproxy.dataplane.ipvs_netlink import Timeouts
from kubeproxy.errors import ConfigError, DataPlaneError
from kubeproxy.k8s import decode_objects
from kubeproxy.model import NamespacedName
from kubeproxy.modes import ipvs as ipvs_mode
from kubeproxy.modes.ipvs import MODE, IpvsPlane
from kubeproxy.proxier import Proxier
from kubeproxy.render.ipvs import RealServer, VirtualServer
from kubeproxy.testing.ipvs import FakeIpvs, FakeNode
from kubeproxy.trace.result import Packet
from tests.builders import NODE_IP, Obj, endpoint, endpoint_slice, node, service
from tests.unit.test_modes import CONFIG, STEPS

A = NamespacedName("ns1", "a")
VIP = ipaddress.ip_address("172.30.0.41")


def proxier() -> Proxier:
    return Proxier(MODE, CONFIG, MODE.fake())


def parts(p: Proxier) -> tuple[IpvsPlane, FakeNode, FakeIpvs]:
    plane = p.plane
    assert isinstance(plane, IpvsPlane)
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
    kernel.connections[((VIP, "tcp", 80), ipaddress.ip_address("10.180.0.2"), 80)] = (1, 3)
    p.sync(cluster("10.180.0.1"), frozenset({A}))
    assert reals(kernel)["10.180.0.2:80"] == 0
    p.sync(cluster("10.180.0.1", "10.180.0.2"), frozenset({A}))
    assert reals(kernel) == {"10.180.0.1:80": 1, "10.180.0.2:80": 1}
    assert not parts(p)[0].plane.terminating


@pytest.mark.parametrize(("active", "inactive", "kept"), [
    (1, 0, True),  # an established connection: drained at weight 0
    (2, 5, True),
    (0, 5, True),  # closing / TIME_WAIT ones hold it too, as upstream
    (0, 0, False),  # none: deleted at once
])
def test_connections_hold_a_removed_real_server_until_none_is_left(
        active: int, inactive: int, kept: bool) -> None:
    p = proxier()
    p.sync(cluster("10.180.0.1", "10.180.0.2"), None)
    plane, _, kernel = parts(p)
    key = (VIP, "tcp", 80)
    kernel.connections[(key, ipaddress.ip_address("10.180.0.2"), 80)] = (active, inactive)
    p.sync(cluster("10.180.0.1"), frozenset({A}))
    want = {"10.180.0.1:80": 1, **({"10.180.0.2:80": 0} if kept else {})}
    assert reals(kernel) == want
    assert bool(plane.plane.terminating) is kept
    kernel.connections[(key, ipaddress.ip_address("10.180.0.2"), 80)] = (0, inactive)
    p.sync(cluster("10.180.0.1"), frozenset())
    assert reals(kernel) == {"10.180.0.1:80": 1, **({"10.180.0.2:80": 0} if inactive else {})}
    kernel.connections[(key, ipaddress.ip_address("10.180.0.2"), 80)] = (0, 0)
    p.sync(cluster("10.180.0.1"), frozenset())  # the last one gone: the next sync deletes
    assert reals(kernel) == {"10.180.0.1:80": 1}
    assert not plane.plane.terminating


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
    runner.fail("ipset")
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


def test_a_plane_that_has_not_synced_prints_the_same_state() -> None:
    """`lab rules` reads a node from a new process: its iptables part must be there too."""
    p = proxier()
    plane, runner, kernel = parts(p)
    p.sync(decode_objects(STEPS[0][1]), None)
    fresh = IpvsDataPlane(runner, kernel, plane.plane.backend)
    assert "-A KUBE-SERVICES" in fresh.rules()
    assert fresh.rules() == plane.rules()


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


@pytest.mark.parametrize("settings", [IpvsConfig(), IpvsConfig(
    exclude_cidrs=(ipaddress.ip_network("10.96.0.0/16"),))], ids=["flush", "excludes"])
def test_cleanup_without_ipvs_in_the_kernel(settings: IpvsConfig) -> None:
    runner = FakeNode(ipvs_loaded=False)
    from kubeproxy.modes.base import PlaneOptions
    runner.run(["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
    ipvs_mode.configure(settings).cleanup(runner, PlaneOptions(iptables_backend="nft"))
    assert "kube-ipvs0" not in runner.links  # the rest is still cleaned up
    assert "no IPVS" in (MODE.kernel_support(runner) or "")


def test_batched_requests_read_back_with_pyroute2s_decoder() -> None:
    """The hand-spelled netlink requests (dataplane/ipvs_netlink.py GenlBatch) decode,
    with pyroute2's own IPVS message classes, to the service and real server meant."""
    import struct

    from pyroute2.netlink.generic import ipvs as genl  # type: ignore[import-untyped]

    from kubeproxy.dataplane import ipvs_netlink as dp

    p = proxier()
    p.sync(cluster("10.180.0.1"), None)
    vs = p.plane.plane.written[(VIP, "tcp", 80)]  # type: ignore[attr-defined]
    body = (struct.pack("=BBH", 1, 1, 0)
            + dp.nla(1 | 0x8000, dp.service_attrs((VIP, "tcp", 80), vs))
            + dp.nla(2 | 0x8000, dp.dest_attrs(RealServer(ipaddress.ip_address(
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


# --- what a partial sync costs --------------------------------------------------------------

READS = {("ipset", "save"), ("ip", "-o", "addr")}


def test_a_partial_sync_reads_nothing_back_and_writes_only_the_change() -> None:
    p = proxier()
    p.sync(decode_objects(STEPS[0][1]), None)
    _, runner, kernel = parts(p)
    runner.calls.clear()
    kernel.calls.clear()
    p.sync(decode_objects(STEPS[1][1]), frozenset({A}))  # a: .2 goes, .3 and .4 come
    tools = [argv[:3] for argv, _ in runner.calls]
    assert not [t for t in tools if t[:2] in READS or t[:3] in READS], tools
    assert not [t for t in tools if t[0].startswith(("iptables", "ip6tables"))], tools
    assert not [t for t in tools if t[0] == "sysctl" or t[:2] == ("ip", "link")], tools
    payload = "".join(stdin or "" for argv, stdin in runner.calls if argv[0] == "ipset")
    assert "create" not in payload  # the sets exist: only their changed entries
    assert all("10.180.0." in line for line in payload.splitlines()), payload
    assert {c.split()[0] for c in kernel.calls} <= {"add-dest", "del-dest", "set-dest"}


def test_a_partial_sync_rewrites_the_fixed_chains_when_they_change() -> None:
    """The first NodePort makes KUBE-NODE-PORT-TCP non-empty: its rules appear."""
    p = proxier()
    base = [node(), *cluster_objs("a", "172.30.0.41")]
    p.sync(decode_objects(base), None)
    b = service("b", cluster_ip="172.30.0.42", type="NodePort", ports=[("p80", 80, "TCP", 3001)])
    c = decode_objects([*base, b, endpoint_slice("b", [endpoint("10.180.0.7")])])
    _, runner, _ = parts(p)
    runner.calls.clear()
    p.sync(c, frozenset({NamespacedName("ns1", "b")}))
    assert any(argv[0] == "iptables-nft-restore" for argv, _ in runner.calls)
    scratch = proxier()
    scratch.sync(c, None)
    assert p.plane.rules() == scratch.plane.rules()
    assert "KUBE-NODE-PORT-TCP" in p.plane.rules().split("# IPv4 iptables")[1]


def cluster_objs(name: str, vip: str) -> list[Obj]:
    return [service(name, cluster_ip=vip), endpoint_slice(name, [endpoint("10.180.0.1")])]


# --- the ipvs: settings (ProxyConfig.ipvs, modes.ipvs.configure) -------------------------------


def configured(**settings: Any) -> Proxier:
    mode = ipvs_mode.configure(IpvsConfig(**settings))
    return Proxier(mode, CONFIG, mode.fake())


def test_the_scheduler_reaches_render_and_kernel() -> None:
    p = configured(scheduler="wrr")
    p.sync(cluster("10.180.0.1"), None)
    _, _, kernel = parts(p)
    assert {s.scheduler for s in kernel.services_.values()} == {"wrr"}
    assert "-A -t 172.30.0.41:80 -s wrr" in p.plane.rules()
    views = [p._cache(4).build(cluster("10.180.0.1"), None)]
    assert "-s wrr" in ipvs_mode.configure(IpvsConfig(scheduler="wrr")).text(
        ipvs_mode.configure(IpvsConfig(scheduler="wrr")).render(views), "n")
    assert "-s rr" in MODE.text(MODE.render(views), "n")  # upstream's default


@pytest.mark.parametrize("strict", [True, False])
def test_strict_arp_sets_the_arp_sysctls(strict: bool) -> None:
    p = configured(strict_arp=strict)
    p.sync(cluster("10.180.0.1"), None)
    sysctls = parts(p)[1].iptables.sysctls
    assert sysctls["net.ipv4.vs.conntrack"] == "1"
    got = {k: sysctls.get(k) for k in ("net.ipv4.conf.all.arp_ignore",
                                        "net.ipv4.conf.all.arp_announce")}
    assert got == ({"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}
                   if strict else dict.fromkeys(got))


def test_excluded_cidrs_are_left_to_their_owner() -> None:
    """Virtual servers in excludeCIDRs survive full syncs and cleanup, and do not count
    as damage; others we did not write are deleted by a full sync."""
    p = configured(exclude_cidrs=(ipaddress.ip_network("10.96.0.0/16"),))
    plane, _, kernel = parts(p)
    theirs = _foreign("10.96.5.5", 443)
    stray = _foreign("192.0.2.1", 80)
    for vs in (theirs, stray):
        kernel.add_service(vs)
    kernel.add_dest(theirs_key := (theirs.ip, "tcp", 443),
                    RealServer(ipaddress.ip_address("10.0.0.9"), 443))
    p.sync(cluster("10.180.0.1"), None)
    assert theirs_key in kernel.services_ and (stray.ip, "tcp", 80) not in kernel.services_
    assert plane.intact()
    kernel.add_service(_foreign("10.96.5.6", 80))  # their change: not ours to repair
    assert plane.intact()
    kernel.add_service(stray)  # not excluded: damage
    assert not plane.intact()
    p.sync(cluster("10.180.0.2"), frozenset({A}))  # partial: the stray stays till a full one
    assert (stray.ip, "tcp", 80) in kernel.services_
    plane.cleanup()  # ours and the stray go; theirs stay
    assert set(kernel.services_) == {theirs_key, (ipaddress.ip_address("10.96.5.6"), "tcp", 80)}
    assert kernel.reals[theirs_key]  # its real servers untouched too


def test_without_excludes_cleanup_flushes_everything() -> None:
    p = configured()
    plane, _, kernel = parts(p)
    kernel.add_service(_foreign("10.96.5.5", 443))
    p.sync(cluster("10.180.0.1"), None)
    assert (ipaddress.ip_address("10.96.5.5"), "tcp", 443) not in kernel.services_
    plane.cleanup()
    assert not kernel.services_


def _foreign(ip: str, port: int) -> VirtualServer:
    return VirtualServer(ipaddress.ip_address(ip), port, "tcp", "rr", 0, 0, (),
                         NamespacedName("other", "x"), "cluster IP")


@pytest.mark.parametrize(("settings", "want"), [
    ({}, None),  # nothing set: the kernel's own stay, no request at all
    ({"tcp_timeout": 900.0, "tcpfin_timeout": 120.0, "udp_timeout": 300.0},
     Timeouts(900, 120, 300)),
    ({"udp_timeout": 30.5}, Timeouts(0, 0, 30)),  # whole seconds; the others unchanged
], ids=["none", "all", "udp only"])
def test_timeouts_are_requested_when_set(settings: dict[str, float],
                                         want: Timeouts | None) -> None:
    p = configured(**settings)
    p.sync(cluster("10.180.0.1"), None)
    _, _, kernel = parts(p)
    requests = [c for c in kernel.calls if c.startswith("set-timeouts")]
    if want is None:
        assert not requests and kernel.timeouts == Timeouts()
    else:
        assert requests == [f"set-timeouts {want}"] and kernel.timeouts == want


def test_the_timeouts_request_reads_back_with_pyroute2s_decoder() -> None:
    import struct

    from pyroute2.netlink.generic import ipvs as genl

    from kubeproxy.dataplane import ipvs_netlink as dp

    kernel = dp.NetlinkIpvs()
    kernel.set_timeouts(Timeouts(900, 0, 300))
    (body, _what), = kernel._pending
    msg = genl.ipvsmsg(struct.pack("=IHHII", 16 + len(body), 99, 5, 1, 0) + body)
    msg.decode()
    assert msg["cmd"] == genl.IPVS_CMD_SET_CONFIG

    def u32(name: str) -> int | None:  # pyroute2 declares these "hex": "84:03:00:00"
        value = msg.get_attr(f"IPVS_CMD_ATTR_TIMEOUT_{name}")
        return None if value is None else int.from_bytes(
            bytes.fromhex(value.replace(":", "")), "little")
    assert (u32("TCP"), u32("TCP_FIN"), u32("UDP")) == (900, None, 300)


@pytest.mark.parametrize(("argv", "want"), [
    ([], IpvsConfig()),
    (["--ipvs-scheduler", "wrr", "--ipvs-strict-arp", "--ipvs-exclude-cidrs",
      "10.96.0.0/16,fd00:96::/64", "--ipvs-tcp-timeout", "15m", "--ipvs-tcpfin-timeout",
      "2m", "--ipvs-udp-timeout", "300s"],
     IpvsConfig("wrr", True, (ipaddress.ip_network("10.96.0.0/16"),
                              ipaddress.ip_network("fd00:96::/64")), 900.0, 120.0, 300.0)),
], ids=["defaults", "every flag"])
def test_ipvs_flags_reach_proxy_config(argv: list[str], want: IpvsConfig) -> None:
    from kubeproxy.app.cli import build_parser
    from kubeproxy.config.flags import build_config

    assert build_config(build_parser().parse_args(["run", *argv])).ipvs == want


def test_ipvs_section_of_the_file_reaches_proxy_config(tmp_path: Path) -> None:
    from kubeproxy.app.cli import build_parser
    from kubeproxy.config.flags import build_config

    path = tmp_path / "kp.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                    "kind: KubeProxyConfiguration\nmode: ipvs\n"
                    "ipvs:\n  scheduler: lc\n  strictARP: true\n"
                    "  excludeCIDRs: [10.96.0.0/16]\n  udpTimeout: 30s\n")
    got = build_config(build_parser().parse_args(["run", "--config", str(path)])).ipvs
    assert got == IpvsConfig("lc", True, (ipaddress.ip_network("10.96.0.0/16"),), 0, 0, 30.0)


@pytest.mark.parametrize(("settings", "error"), [
    ({"scheduler": "random"}, "ipvs.scheduler"),
    ({"tcp_timeout": -1.0}, "ipvs.tcpTimeout"),
], ids=["unknown scheduler", "negative timeout"])
def test_bad_ipvs_settings_are_refused(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        IpvsConfig(**settings)
