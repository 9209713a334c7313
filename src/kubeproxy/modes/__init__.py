"""The data-plane modes, one registry: how a proxy mode plugs in.

Theory of operation
-------------------
Everything above the renderers is shared by every mode: the tracker, topology, the node
view (all policy), the sync loop, the daemon, the lab. What differs per mode is how a
node view is *spelled* (iptables chains, nftables tables, ...), how it is *written* to
the kernel, and how a packet is *followed* through it. A :class:`~kubeproxy.modes.base.Mode`
bundles exactly those parts; code outside this package asks the registry for the mode
by name and never branches on it.

Adding a mode = writing one module ``kubeproxy/modes/<name>.py`` that defines ``MODE``
and adding one line to :data:`REGISTRY`. Modules are imported on first use, so naming
the modes (for flag choices and config validation) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubeproxy.config.types import ProxyConfig
    from kubeproxy.modes.base import Mode

# Mode name (as --proxy-mode spells it) -> the module whose MODE implements it.
REGISTRY: dict[str, str] = {
    "iptables": "kubeproxy.modes.iptables",  # upstream's chain layout, iptables-restore
    "nftables": "kubeproxy.modes.nftables",  # upstream's table layout, netlink batches
    "ebpf": "kubeproxy.modes.ebpf",  # socket load balancing + nftables for north-south
    "ipvs": "kubeproxy.modes.ipvs",  # IPVS virtual servers + ipsets, iptables around them
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


class UnknownModeError(ValueError):
    """A mode name that is not in the registry."""


def get(name: str) -> Mode[Any]:
    """The mode called ``name`` (imported on first use)."""
    try:
        module = REGISTRY[name]
    except KeyError:
        raise UnknownModeError(
            f"unknown proxy mode {name!r}: one of {', '.join(NAMES)}") from None
    mode: Mode[Any] = importlib.import_module(module).MODE
    return mode


def for_config(config: ProxyConfig) -> Mode[Any]:
    """The mode ``config`` names, with the mode's own settings applied (Mode.configure)."""
    mode = get(config.mode)
    return mode.configure(config) if mode.configure is not None else mode


def every() -> list[Mode[Any]]:
    """All registered modes (``cleanup`` removes what any of them may have written)."""
    return [get(name) for name in NAMES]
