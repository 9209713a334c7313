"""At start, remove what the other modes left in the kernel: a mode switch leaves no rules.

Theory of operation
-------------------
Switch ``mode: iptables`` to ``nftables`` and restart the proxies: the nftables tables
are written, but unless someone removes them the 15 KUBE-* nat chains stay in force and
steer traffic to endpoints nobody updates any more. Upstream's kube-proxy removes, at
every start, the rules of the modes it is not running (cmd/kube-proxy/app/
server_linux.go ``platformCleanup``): starting nftables, the iptables and IPVS modes'
rules; starting iptables or IPVS, the nftables tables. This module does the same for
every registered mode, through the registry:

* each mode lists the kernel parts it writes (``Mode.parts``: the iptables chains,
  the IPVS state, the nftables tables, the bpf programs), each with its removal, which
  is the mode's own cleanup code;
* :func:`clean` removes, before the first sync, every part of every registered mode
  that the starting mode does not own: starting nftables removes the iptables chains,
  the IPVS state and the bpf programs; starting ebpf the iptables chains and the IPVS
  state (the nftables tables are its own north-south half: its first sync takes over
  what the nftables mode left there, as after a restart); starting iptables the IPVS
  state, the nftables tables and the bpf programs; starting ipvs the iptables chains,
  the nftables tables and the bpf programs. A part two modes write (the nftables
  tables) is removed once. Beyond upstream: IPVS leftovers when iptables starts (and
  the other way round), and the bpf programs;
* the iptables and ipvs modes write chains of the same names (KUBE-SERVICES,
  KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-FORWARD, KUBE-PROXY-FIREWALL) and some of the
  same jumps: the starting mode's ``Mode.keep`` names them, and the other's removal
  leaves them (it deletes only the rules in them that lead into what it removes, or
  that use the IPVS mode's ipsets). Restarting a mode therefore removes nothing: its
  rules stay in force until its first sync, as upstream's do;
* only what kube-proxy owns, by upstream's names: our chains (KUBE-SERVICES ...,
  KUBE-SVC-/SEP-/..., never kubelet's KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT or an
  older kubelet's KUBE-FIREWALL), the ``kube-proxy`` tables, virtual servers not in
  ipvs.excludeCIDRs, kube-ipvs0, the KUBE-* ipsets, the proxy's own bpffs.

Best effort, as upstream's: what cannot be removed is logged as a warning and the proxy
starts anyway; a backend the node lacks (no ipset or iptables binary, no IPVS module,
no nf_tables, no bpffs) has nothing to remove (debug). What each part's removal took
away is logged with its counts, per mode (``--cleanup`` removes everything of every
mode, as before: cli.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubeproxy import modes
from kubeproxy.config.types import ProxyConfig
from kubeproxy.dataplane.base import Keep, Runner
from kubeproxy.errors import DataPlaneError
from kubeproxy.modes.base import Mode, PlaneOptions, Removed

log = logging.getLogger("kubeproxy.modes.leftovers")

# Remove one part from one node, but what the Keep names.
Remover = Callable[[Keep], Removed]


def owners() -> dict[str, list[str]]:
    """Each part's name -> the registered modes that write it, in registry order."""
    out: dict[str, list[str]] = {}
    for mode in modes.every():
        for part in mode.parts:
            out.setdefault(part.name, []).append(mode.name)
    return out


def removers(config: ProxyConfig, runner: Runner, options: PlaneOptions
             ) -> dict[str, Remover]:
    """Each part's removal on the node ``runner`` reaches, by the first registered mode
    that writes it, with that mode's settings from ``config`` (ipvs.excludeCIDRs)."""
    out: dict[str, Remover] = {}
    for mode in modes.every():
        if mode.configure is not None:
            mode = mode.configure(config)
        for part in mode.parts:
            if part.name not in out:
                out[part.name] = _bound(part.remove, runner, options)
    return out


def _bound(remove: Callable[[Runner, PlaneOptions, Keep], Removed], runner: Runner,
           options: PlaneOptions) -> Remover:
    return lambda keep: remove(runner, options, keep)


def clean(mode: Mode[Any], parts: Mapping[str, Remover]) -> dict[str, Removed]:
    """Remove each of ``parts`` that ``mode`` does not own, leaving what its ``keep``
    names; log what went. Never raises for the kernel: a part that cannot be removed is
    logged (a warning) and left. Returns what went, by part (parts with nothing left
    included, empty)."""
    own = {part.name for part in mode.parts}
    written_by = owners()
    done: dict[str, Removed] = {}
    for name, remove in parts.items():
        if name in own:
            continue
        by = " or ".join(written_by.get(name, ["another"])) + " mode"
        try:
            removed = remove(mode.keep)
        except (DataPlaneError, OSError) as err:
            log.warning("starting in %s mode: could not remove the %s the %s left: %s "
                        "(starting anyway)", mode.name, name, by, err)
            continue
        done[name] = removed
        counted = {kind: n for kind, n in removed.items() if n}
        if counted:
            log.info("starting in %s mode: removed the %s the %s left: %s", mode.name, name,
                     by, ", ".join(f"{n} {kind.removesuffix('s') if n == 1 else kind}"
                                   for kind, n in sorted(counted.items())))
        else:
            log.debug("starting in %s mode: no %s of the %s left", mode.name, name, by)
    return done


def clean_at_start(config: ProxyConfig, runner: Runner, options: PlaneOptions
                   ) -> dict[str, Removed]:
    """What the daemon calls once, before its first sync: :func:`clean` for the mode
    ``config`` names, on the node ``runner`` reaches."""
    return clean(modes.for_config(config), removers(config, runner, options))
