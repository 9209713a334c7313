"""The data-plane modes, one registry: how a proxy mode plugs in.

Theory of operation
-------------------
Everything above the renderers is shared by every mode: the tracker, topology, the node
view (all policy), the sync loop, the daemon, the lab. What differs per mode is how a
node view is *spelled* (iptables chains, nftables tables, ...), how it is *written* to
the kernel, and how a packet is *followed* through it. A :class:`~kubeproxy.modes.base.Mode`
bundles exactly those parts; code outside this package asks the registry for the mode
by name and never branches on it. What the lab shows about a mode (its diagrams, its
status line) is a second record, :class:`~kubeproxy.modes.base.Presentation`
(:func:`presentation`), so the proxy's record carries nothing only the lab reads.

Adding a mode = writing one module ``kubeproxy/modes/<name>.py`` that defines ``MODE``
and ``PRESENTATION`` and adding one line to :data:`REGISTRY`. No mode module imports
another: what two modes share lives in ``modes/base.py`` or in ``dataplane/``. Modules
are imported on first use, so naming the modes (for flag choices and config
validation) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kubeproxy.config.types import EBPF, IPTABLES, IPVS, MODES, NFTABLES
from kubeproxy.errors import ConfigError

if TYPE_CHECKING:
    from kubeproxy.config.types import ProxyConfig
    from kubeproxy.modes.base import Mode, Presentation

# Mode name (as --proxy-mode spells it) -> the module whose MODE implements it.
# The names are the configuration's (config.types.MODES, upstream's ProxyMode).
REGISTRY: dict[str, str] = {
    IPTABLES: "kubeproxy.modes.iptables",
    NFTABLES: "kubeproxy.modes.nftables",
    EBPF: "kubeproxy.modes.ebpf",
    IPVS: "kubeproxy.modes.ipvs",
}
NAMES: tuple[str, ...] = MODES


class UnknownModeError(ConfigError):
    """A mode name that is not in the registry."""


def _module(name: str) -> Any:
    """The module implementing mode ``name`` (imported on first use)."""
    try:
        module = REGISTRY[name]
    except KeyError:
        raise UnknownModeError(
            f"unknown proxy mode {name!r}: one of {', '.join(NAMES)}") from None
    return importlib.import_module(module)


def get(name: str) -> Mode[Any]:
    """The mode called ``name`` (imported on first use)."""
    mode: Mode[Any] = _module(name).MODE
    return mode


def presentation(name: str) -> Presentation:
    """What the lab shows about mode ``name``: chain names, virtual servers, load
    balancing in words, with the mode's default settings."""
    shown: Presentation = _module(name).PRESENTATION
    return shown


def for_config(config: ProxyConfig) -> Mode[Any]:
    """The mode ``config`` names, with the mode's own settings applied (Mode.configure)."""
    mode = get(config.mode)
    return mode.configure(config) if mode.configure is not None else mode


def every() -> list[Mode[Any]]:
    """All registered modes (``cleanup`` removes what any of them may have written)."""
    return [get(name) for name in NAMES]
