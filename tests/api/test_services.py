"""Service defaulting, allocation and validation, as tables of named cases."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from kubeproxy.apiserver import services
from kubeproxy.apiserver.services import Allocations, ServiceNetwork

NET = ServiceNetwork(ipaddress.IPv4Network("10.96.0.0/28"), 30000, 30003)
FREE = Allocations(frozenset(), frozenset())
Obj = dict[str, Any]


def defaulted(spec: Obj, taken: Allocations = FREE) -> Obj:
    obj: Obj = {"metadata": {"name": "s"}, "spec": spec}
    services.default(obj, NET, taken)
    return obj


@dataclass(frozen=True)
class DefaultCase:
    name: str
    spec: Obj
    expect: Obj  # subset of the defaulted spec
    taken: Allocations = FREE


DEFAULTS = [
    DefaultCase("ClusterIP: first free address after the reserved .1",
                {"ports": [{"port": 80}]},
                {"type": "ClusterIP", "clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2"],
                 "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"}),
    DefaultCase("ClusterIP skips taken addresses", {"ports": [{"port": 80}]},
                {"clusterIP": "10.96.0.4"},
                Allocations(frozenset({"10.96.0.2", "10.96.0.3"}), frozenset())),
    DefaultCase("headless keeps None", {"clusterIP": "None", "ports": [{"port": 80}]},
                {"clusterIP": "None", "clusterIPs": ["None"]}),
    DefaultCase("NodePort allocates per port and defaults eTP",
                {"type": "NodePort", "ports": [{"name": "a", "port": 80},
                                               {"name": "b", "port": 81, "nodePort": 30000}]},
                {"externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "a", "port": 80, "protocol": "TCP", "targetPort": 80,
                            "nodePort": 30001},
                           {"name": "b", "port": 81, "protocol": "TCP", "targetPort": 81,
                            "nodePort": 30000}]}),
    DefaultCase("one NodePort for TCP and UDP on the same port",
                {"type": "NodePort", "ports": [{"name": "t", "port": 53},
                                               {"name": "u", "port": 53, "protocol": "UDP"}]},
                {"ports": [{"name": "t", "port": 53, "protocol": "TCP", "targetPort": 53,
                            "nodePort": 30000},
                           {"name": "u", "port": 53, "protocol": "UDP", "targetPort": 53,
                            "nodePort": 30000}]}),
    DefaultCase("LoadBalancer with eTP Local gets a healthCheckNodePort",
                {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "ports": [{"port": 80}]},
                {"allocateLoadBalancerNodePorts": True, "healthCheckNodePort": 30001}),
    DefaultCase("LoadBalancer without NodePorts",
                {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False,
                 "ports": [{"port": 80}]},
                {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}]}),
    DefaultCase("ExternalName has no cluster IP", {"type": "ExternalName",
                                                   "externalName": "example.com"},
                {"type": "ExternalName", "externalName": "example.com"}),
    DefaultCase("ClientIP affinity gets the default timeout",
                {"sessionAffinity": "ClientIP", "ports": [{"port": 80}]},
                {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}}}),
    DefaultCase("externalIPs make eTP apply", {"externalIPs": ["192.168.99.1"],
                                               "ports": [{"port": 80}]},
                {"externalTrafficPolicy": "Cluster"}),
]


@pytest.mark.parametrize("case", DEFAULTS, ids=lambda c: c.name)
def test_defaults(case: DefaultCase) -> None:
    spec = defaulted(dict(case.spec), case.taken)["spec"]
    for key, value in case.expect.items():
        assert spec.get(key) == value, key
    if case.spec.get("type") == "ExternalName":
        assert "clusterIP" not in spec


@dataclass(frozen=True)
class InvalidCase:
    name: str
    spec: Obj
    field: str
    message: str
    taken: Allocations = FREE
    old: Obj | None = None


INVALID = [
    InvalidCase("port out of range", {"ports": [{"port": 70000}]}, "spec.ports[0].port",
                "must be between 1 and 65535"),
    InvalidCase("unknown protocol", {"ports": [{"port": 80, "protocol": "ICMP"}]},
                "spec.ports[0].protocol", 'Unsupported value: "ICMP"'),
    InvalidCase("names required with two ports", {"ports": [{"port": 80}, {"port": 81}]},
                "spec.ports[0].name", "Required value"),
    InvalidCase("duplicate port", {"ports": [{"name": "a", "port": 80},
                                             {"name": "b", "port": 80}]},
                "spec.ports[1]", "Duplicate value"),
    InvalidCase("no ports", {"ports": []}, "spec.ports", "Required value"),
    InvalidCase("bad targetPort name", {"ports": [{"port": 80, "targetPort": "Not_OK"}]},
                "spec.ports[0].targetPort", "Invalid value"),
    InvalidCase("nodePort on ClusterIP", {"ports": [{"port": 80, "nodePort": 30000}]},
                "spec.ports[0].nodePort", "may not be used when `type` is 'ClusterIP'"),
    InvalidCase("nodePort out of range", {"type": "NodePort",
                                          "ports": [{"port": 80, "nodePort": 20000}]},
                "spec.ports[0].nodePort", "30000-30003"),
    InvalidCase("nodePort taken", {"type": "NodePort",
                                   "ports": [{"port": 80, "nodePort": 30002}]},
                "spec.ports[0].nodePort", "already allocated",
                Allocations(frozenset(), frozenset({30002}))),
    InvalidCase("clusterIP outside the CIDR", {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]},
                "spec.clusterIP", "not in the valid range"),
    InvalidCase("clusterIP taken", {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]},
                "spec.clusterIP", "already allocated",
                Allocations(frozenset({"10.96.0.5"}), frozenset())),
    InvalidCase("clusterIP not an IP", {"clusterIP": "ten", "ports": [{"port": 80}]},
                "spec.clusterIP", "must be a valid IP"),
    InvalidCase("clusterIP is immutable", {"clusterIP": "10.96.0.6", "ports": [{"port": 80}]},
                "spec.clusterIP", "field is immutable",
                old={"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.5"}}),
    InvalidCase("unknown type", {"type": "Magic", "ports": [{"port": 80}]}, "spec.type",
                "Unsupported value"),
    InvalidCase("eTP Local on an internal service",
                {"externalTrafficPolicy": "Local", "ports": [{"port": 80}]},
                "spec.externalTrafficPolicy", "externally-accessible"),
    InvalidCase("ExternalName needs a name", {"type": "ExternalName"}, "spec.externalName",
                "Required value"),
    InvalidCase("affinity timeout too long",
                {"sessionAffinity": "ClientIP", "ports": [{"port": 80}],
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 90000}}},
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "86400"),
    InvalidCase("bad source range", {"type": "LoadBalancer", "ports": [{"port": 80}],
                                     "loadBalancerSourceRanges": ["10.0.0.0/33"]},
                "spec.loadBalancerSourceRanges[0]", "valid CIDR"),
]


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid(case: InvalidCase) -> None:
    obj: Obj = {"metadata": {"name": "s"}, "spec": dict(case.spec)}
    spec = obj["spec"]
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for p in spec.get("ports") or []:
        p.setdefault("protocol", "TCP")
        p.setdefault("targetPort", p["port"])
    causes = services.validate(obj, case.old, NET, case.taken)
    matching = [c for c in causes if c.field == case.field and case.message in c.message]
    assert matching, causes


def test_a_valid_service_has_no_causes() -> None:
    obj = defaulted({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}],
                     "selector": {"app": "web"}, "loadBalancerSourceRanges": ["203.0.113.0/25"]})
    assert services.validate(obj, None, NET, FREE) == []


@dataclass(frozen=True)
class CarryCase:
    name: str
    old: Obj
    new: Obj
    expect: Obj = field(default_factory=dict)
    absent: tuple[str, ...] = ()


CARRY = [
    CarryCase("omitted clusterIP is kept",
              {"clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"], "ports": [{"port": 80}]},
              {"ports": [{"port": 80}]}, {"clusterIP": "10.96.0.9"}),
    CarryCase("omitted nodePort is kept",
              {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]},
              {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]},
              {"ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]}),
    CarryCase("back to ClusterIP drops the allocated nodePort",
              {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]},
              {"type": "ClusterIP", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]},
              {"ports": [{"port": 80, "protocol": "TCP"}]}),
    CarryCase("eTP Cluster drops the healthCheckNodePort",
              {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": 30002, "ports": []},
              {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
               "healthCheckNodePort": 30002, "ports": []},
              absent=("healthCheckNodePort",)),
]


@pytest.mark.parametrize("case", CARRY, ids=lambda c: c.name)
def test_carry_over(case: CarryCase) -> None:
    new: Obj = {"spec": dict(case.new)}
    services.carry_over({"spec": case.old}, new)
    for key, value in case.expect.items():
        assert new["spec"][key] == value
    for key in case.absent:
        assert key not in new["spec"]
