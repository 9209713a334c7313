"""KubeProxyConfiguration v1alpha1: read, default and convert, as upstream does.

Theory of operation
-------------------
A configuration is kept in its wire shape (the camelCase YAML/JSON of
kubeproxy.config.k8s.io/v1alpha1, durations as Go duration strings), so what
``/configz`` and ``--write-config-to`` print is what an operator wrote or would write.
Three pure steps, each upstream's:

1. **decode** (:func:`decode`): every key is checked against :data:`FIELDS`, the
   literal table of v1alpha1's fields; an unknown key is a *warning*, not an error
   (upstream falls back to lenient decoding and logs), a wrongly typed value is an error
   naming the field.
2. **default** (:func:`defaulted`): ``SetDefaults_KubeProxyConfiguration`` - a field
   that is missing, ``null`` or zero takes upstream's default. kubeadm's generated
   ``config.conf`` spells every field, with ``syncPeriod: 0s``, ``masqueradeBit: null``,
   ``healthzBindAddress: ""`` ...; all of them mean "the default".
3. **convert** (:func:`proxy_settings`): v1alpha1 -> the settings the proxy uses. As
   upstream's conversion does, the mode picks the section: ``nftables:`` gives the
   nftables mode its masqueradeAll, masqueradeBit and sync periods, ``iptables:`` every
   other mode. The top-level ``syncPeriod`` / ``minSyncPeriod`` / ``masqueradeAll`` of
   newer API versions win when set. nftables mode defaults ``nodePortAddresses`` to
   ``primary`` (upstream's platformApplyDefaults).

Flags and a file follow upstream's precedence (cmd/kube-proxy/app/options.go): without
``--config`` the flags given set fields of a defaulted configuration; with ``--config``
the file is the whole configuration and only ``--hostname-override`` (and the logging
flags) still apply - every other configuration flag given is ignored (we log each).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kubeproxy.config.types import NODEPORT_DEFAULTS, parse_duration
from kubeproxy.errors import ConfigError

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
Kind = Literal["str", "bool", "int", "float", "duration", "list", "map", "object"]

# Every v1alpha1 field (k8s.io/kube-proxy/config/v1alpha1 types.go), with upstream's
# default (defaults.go) where a missing, null or zero value is defaulted; None: no
# default (zero stays zero). Nested sections are dotted.
FIELDS: dict[str, tuple[Kind, object]] = {
    "apiVersion": ("str", API_VERSION),
    "kind": ("str", KIND),
    "featureGates": ("map", None),  # name -> bool
    # clientConnection: how the API server is reached
    "clientConnection.kubeconfig": ("str", None),
    "clientConnection.acceptContentTypes": ("str", None),
    "clientConnection.contentType": ("str", "application/vnd.kubernetes.protobuf"),
    "clientConnection.qps": ("float", 5.0),
    "clientConnection.burst": ("int", 10),
    # logging (component-base LoggingConfiguration)
    "logging.format": ("str", "text"),
    "logging.flushFrequency": ("object", "5s"),  # a duration string or nanoseconds
    "logging.verbosity": ("int", None),
    "logging.vmodule": ("object", None),  # [{filePattern, verbosity}]
    "logging.options": ("object", None),  # text/json buffer options
    "hostnameOverride": ("str", None),
    "bindAddress": ("str", "0.0.0.0"),  # the node's primary IP override
    "healthzBindAddress": ("str", "0.0.0.0:10256"),
    "metricsBindAddress": ("str", "127.0.0.1:10249"),
    "bindAddressHardFail": ("bool", None),
    "enableProfiling": ("bool", None),
    "showHiddenMetricsForVersion": ("str", None),
    "mode": ("str", "iptables"),  # platformApplyDefaults: "" -> iptables on Linux
    # iptables: the iptables mode's section (and every mode but nftables and ipvs)
    "iptables.masqueradeAll": ("bool", None),
    "iptables.masqueradeBit": ("int", 14),
    "iptables.localhostNodePorts": ("bool", True),
    "iptables.syncPeriod": ("duration", "30s"),
    "iptables.minSyncPeriod": ("duration", "1s"),
    # ipvs: the ipvs mode's sync periods and its settings (config.IpvsConfig)
    "ipvs.syncPeriod": ("duration", "30s"),
    "ipvs.minSyncPeriod": ("duration", None),
    "ipvs.scheduler": ("str", None),
    "ipvs.excludeCIDRs": ("list", None),
    "ipvs.strictARP": ("bool", None),
    "ipvs.tcpTimeout": ("duration", None),
    "ipvs.tcpFinTimeout": ("duration", None),
    "ipvs.udpTimeout": ("duration", None),
    # nftables: the nftables mode's section
    "nftables.masqueradeAll": ("bool", None),
    "nftables.masqueradeBit": ("int", 14),
    "nftables.syncPeriod": ("duration", "30s"),
    "nftables.minSyncPeriod": ("duration", "1s"),
    # winkernel: Windows only; accepted and ignored on Linux
    "winkernel.networkName": ("str", None),
    "winkernel.sourceVip": ("str", None),
    "winkernel.enableDSR": ("bool", None),
    "winkernel.rootHnsEndpointName": ("str", None),
    "winkernel.forwardHealthCheckVip": ("bool", None),
    "detectLocalMode": ("str", "ClusterCIDR"),  # "" -> ClusterCIDR
    "detectLocal.bridgeInterface": ("str", None),
    "detectLocal.interfaceNamePrefix": ("str", None),
    "clusterCIDR": ("str", None),  # comma-separated, one per family
    "nodePortAddresses": ("list", None),  # empty: types.NODEPORT_DEFAULTS
    "oomScoreAdj": ("int", -999),  # qos.KubeProxyOOMScoreAdj
    # conntrack: node tuning at start (app/tuning.py)
    "conntrack.maxPerCore": ("int", 32 * 1024),
    "conntrack.min": ("int", 128 * 1024),
    "conntrack.tcpEstablishedTimeout": ("duration", "24h0m0s"),
    "conntrack.tcpCloseWaitTimeout": ("duration", "1h0m0s"),
    "conntrack.tcpBeLiberal": ("bool", None),
    "conntrack.udpTimeout": ("duration", None),  # 0: leave as-is
    "conntrack.udpStreamTimeout": ("duration", None),
    "configSyncPeriod": ("duration", "15m0s"),
    "portRange": ("str", None),  # removed upstream (userspace mode); ignored
    "windowsRunAsService": ("bool", None),
    # Newer API versions' top-level settings, honoured when set (they win).
    "syncPeriod": ("duration", None),
    "minSyncPeriod": ("duration", None),
    "masqueradeAll": ("bool", None),
    # Ours (not upstream's): the ebpf mode's cgroup.
    "cgroupPath": ("str", None),
}
# Fields whose explicit zero upstream keeps (pointers in v1alpha1: only null defaults).
_POINTERS = frozenset({"iptables.masqueradeBit", "nftables.masqueradeBit",
                       "iptables.localhostNodePorts", "oomScoreAdj", "conntrack.maxPerCore",
                       "conntrack.min", "conntrack.tcpEstablishedTimeout",
                       "conntrack.tcpCloseWaitTimeout"})
# The file's section each mode reads its masquerade and sync settings from (upstream's
# v1alpha1 conversion); a mode not listed reads `iptables:`.
SECTIONS: dict[str, str] = {
    "nftables": "nftables",  # nftables.{masqueradeAll,masqueradeBit,syncPeriod,minSyncPeriod}
    "ipvs": "ipvs",  # ipvs.{syncPeriod,minSyncPeriod}
}
_SECTIONS = frozenset(k.split(".", 1)[0] for k in FIELDS if "." in k)
_ZERO: dict[Kind, object] = {"str": "", "bool": False, "int": 0, "float": 0.0,
                             "duration": "0s", "list": None, "map": None, "object": None}


@dataclass(frozen=True)
class Decoded:
    """A decoded file: its fields (dotted name -> value, wire form) and the warnings."""

    fields: Mapping[str, object]
    warnings: tuple[str, ...]


def decode(doc: object, source: str) -> Decoded:
    """Check a parsed KubeProxyConfiguration document; unknown keys become warnings."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ConfigError(f"{source}: not a KubeProxyConfiguration")
    if doc.get("apiVersion") != API_VERSION:
        raise ConfigError(f"{source}: apiVersion must be {API_VERSION}")
    out: dict[str, object] = {}
    warnings: list[str] = []
    for key, value in doc.items():
        if key in _SECTIONS and key not in FIELDS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping")
            for sub, subvalue in value.items():
                _take(f"{key}.{sub}", subvalue, source, out, warnings)
        else:
            _take(str(key), value, source, out, warnings)
    return Decoded(out, tuple(warnings))


def _take(name: str, value: object, source: str, out: dict[str, object],
          warnings: list[str]) -> None:
    spec = FIELDS.get(name)
    if spec is None:
        warnings.append(f"{source}: unknown field {name!r} (ignored)")
        return
    if value is not None:
        out[name] = _check(name, spec[0], value, source)


def _check(name: str, kind: Kind, value: object, source: str) -> object:
    def fail(what: str) -> ConfigError:
        return ConfigError(f"{source}: {name} must be {what}")

    if kind == "str" and not isinstance(value, str):
        raise fail("a string")
    if kind == "bool" and not isinstance(value, bool):
        raise fail("true or false")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise fail("an integer")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail("a number")
        return float(value)
    if kind == "duration":
        if not isinstance(value, str):
            raise fail("a duration such as 30s or 1m")
        return format_duration(parse_duration(value, name))
    if kind == "list" and not (isinstance(value, list)
                               and all(isinstance(v, str) for v in value)):
        raise fail("a list of strings")
    if kind == "map" and not (isinstance(value, dict)
                              and all(isinstance(v, bool) for v in value.values())):
        raise fail("a map of names to true/false")
    return value


def _is_zero(kind: Kind, value: object) -> bool:
    if value is None:
        return True
    if kind == "duration":
        return parse_duration(str(value), "") == 0
    if kind == "list":
        return not value
    return value == _ZERO[kind]


def defaulted(fields: Mapping[str, object]) -> dict[str, object]:
    """Every field, upstream's defaults where the value is missing, null or zero."""
    out: dict[str, object] = {}
    for name, (kind, default) in FIELDS.items():
        value = fields.get(name)
        missing = value is None if name in _POINTERS else _is_zero(kind, value)
        if missing and default is not None:
            value = default
        elif value is None:
            value = _ZERO[kind]
        out[name] = copy.deepcopy(value)
    for name in ("healthzBindAddress", "metricsBindAddress"):
        out[name] = _append_port(str(out[name]), str(FIELDS[name][1]).rsplit(":", 1)[1])
    return out


def resolve(file_fields: Mapping[str, object] | None, flag_fields: Mapping[str, object]
            ) -> dict[str, object]:
    """The effective configuration: the file's (or none) defaulted, the flags given set
    on top (the caller, flags.py, has already dropped those --config ignores), then
    upstream's platformApplyDefaults."""
    out = defaulted(file_fields or {})
    out.update(copy.deepcopy(dict(flag_fields)))
    for name in ("mode", "detectLocalMode"):
        if not out[name]:
            out[name] = FIELDS[name][1]
    if not out["nodePortAddresses"]:
        # the mode's own default (nftables: upstream's ``primary``); every local
        # address for an unknown mode (it is rejected later, with the list of modes)
        out["nodePortAddresses"] = list(NODEPORT_DEFAULTS.get(str(out["mode"]), ()))
    return out


def _append_port(address: str, port: str) -> str:
    """upstream's AppendPortIfNeeded: a bare IP gets the default port."""
    if address.startswith("[") and "]:" in address:
        return address
    if address.count(":") == 1:
        return address
    if ":" in address:  # a bare IPv6 address
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def configz(fields: Mapping[str, object]) -> bytes:
    """What the metrics server's ``/configz`` answers, upstream's shape:
    ``{"kubeproxy.config.k8s.io": <the effective KubeProxyConfiguration>}``."""
    return json.dumps({"kubeproxy.config.k8s.io": nested(fields)}).encode()


def nested(fields: Mapping[str, object]) -> dict[str, Any]:
    """Dotted fields -> the v1alpha1 document (sections as mappings)."""
    doc: dict[str, Any] = {}
    for name, value in fields.items():
        head, dot, tail = name.partition(".")
        if dot:
            doc.setdefault(head, {})[tail] = value
        else:
            doc[name] = value
    return doc


def section(fields: Mapping[str, object]) -> str:
    """The section whose masquerade and sync settings the mode uses (upstream's
    conversion: nftables and ipvs have their own, everything else reads iptables)."""
    return SECTIONS.get(str(fields.get("mode") or "iptables"), "iptables")


def proxy_settings(fields: Mapping[str, object]) -> dict[str, Any]:
    """Defaulted fields -> ProxyConfig keyword arguments (the conversion)."""
    from kubeproxy.config.types import (
        ipvs_config,
        parse_cidr_list,
        parse_detect_local_mode,
        primary_ip_override,
    )

    sec = section(fields)
    kw: dict[str, Any] = {
        "mode": fields["mode"],
        "masquerade_all": bool(fields["masqueradeAll"] or fields.get(f"{sec}.masqueradeAll")),
        "masquerade_bit": fields.get(f"{sec}.masqueradeBit", 14),
        "localhost_nodeports": fields["iptables.localhostNodePorts"],
        "sync_period": _seconds(fields["syncPeriod"]) or _seconds(fields[f"{sec}.syncPeriod"]),
        "min_sync_period": _seconds(fields["minSyncPeriod"])
        or _seconds(fields[f"{sec}.minSyncPeriod"]),
        "nodeport_addresses": _strings(fields["nodePortAddresses"]),
        "detect_local_mode": parse_detect_local_mode(str(fields["detectLocalMode"])),
        "bridge_interface": fields["detectLocal.bridgeInterface"],
        "interface_name_prefix": fields["detectLocal.interfaceNamePrefix"],
        "cluster_cidrs": parse_cidr_list(str(fields["clusterCIDR"]), "clusterCIDR"),
        "healthz_bind_address": fields["healthzBindAddress"],
        "metrics_bind_address": fields["metricsBindAddress"],
        "kubeconfig": fields["clientConnection.kubeconfig"],
        "ipvs": ipvs_config(fields),  # ipvs.{scheduler,strictARP,excludeCIDRs,*Timeout}
        "bind_address": primary_ip_override(str(fields["bindAddress"] or "0.0.0.0")),
        "config_sync_period": _seconds(fields["configSyncPeriod"]),
    }
    if fields["hostnameOverride"]:
        kw["hostname"] = str(fields["hostnameOverride"]).strip().lower()
    if fields["cgroupPath"]:
        kw["cgroup_path"] = fields["cgroupPath"]
    return kw


def _strings(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _seconds(value: object) -> float:
    return parse_duration(str(value), "duration") if value else 0.0


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String(): 30s, 1m0s, 24h0m0s, 250ms, 1.5s, 0s."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}µs"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


_GATE = re.compile(r"^([A-Za-z0-9]+)=(true|false)$", re.IGNORECASE)


def parse_feature_gates(text: str) -> dict[str, bool]:
    """``--feature-gates`` as cliflag.MapStringBool: ``A=true,B=false``."""
    out: dict[str, bool] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _GATE.match(part)
        if m is None:
            raise ConfigError(f"--feature-gates: {part!r} is not NAME=true|false")
        out[m.group(1)] = m.group(2).lower() == "true"
    return out
