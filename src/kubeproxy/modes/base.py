"""What a data-plane mode supplies: the shape every mode plugs into.

A mode is a value, not a class hierarchy: :class:`Mode` is a frozen record of functions
over the mode's own ruleset type ``R`` (``iptables``: one iptables-save ruleset per
family; ``nftables``: both families' tables in one ruleset). Every function takes the
node views of *all* IP families in use, so callers never care how a mode groups them.
The record holds only what the proxy itself runs on (the CLI, the daemon, the metrics,
the flow table); what the lab merely shows about a mode (chain names, virtual servers,
load balancing in words) is a second, smaller record, :class:`Presentation`.

``render`` and ``trace`` are pure. ``data_plane`` and ``cleanup`` are the I/O edge: they
talk to the kernel only through the :class:`~kubeproxy.dataplane.base.Runner` they are
given (the real one, a namespace's, or a test's). ``fake`` is the same data plane code
over a strict fake kernel that the package ships (``kubeproxy.testing``), as knftables
ships its ``Fake``: it rejects what the kernel would reject, so tests of syncs without
root still prove something.

A data plane (:class:`DataPlane`) syncs, cleans up, prints its rules, reports its last
sync's counts for the metrics, and answers ``intact()``; every mode answers that last
one the same way, through :func:`intact`: its own ``damage()`` names what was changed
from outside, or None.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from kubeproxy.dataplane.base import Keep, Runner
from kubeproxy.errors import DataPlaneError
from kubeproxy.model import Family, IPAddress, NamespacedName
from kubeproxy.nodeview import NodeView, ServicePortView
from kubeproxy.render.names import ChainNames
from kubeproxy.trace.result import Packet, TraceResult

if TYPE_CHECKING:
    from kubeproxy.config.types import ProxyConfig

R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)


@dataclass(frozen=True)
class PlaneCounts:
    """What a data plane's last sync tells the metrics (upstream's per-mode families)."""

    # iptables: (family, table) -> (rules kube-proxy owns, rules the last sync wrote).
    rules: Mapping[tuple[Family, str], tuple[int, int]] = field(default_factory=dict)
    # nftables: the families whose stale-chain cleanup failed in the last sync.
    cleanup_failures: tuple[Family, ...] = ()


class DataPlane(Protocol[R_contra]):
    """Writes a mode's ruleset to one node's kernel."""

    def sync(self, ruleset: R_contra, changed: frozenset[NamespacedName] | None = None
             ) -> None:
        """Apply ``ruleset``: all of it when ``changed`` is None, else only what belongs
        to the ``changed`` services (plus the node-wide parts). All or nothing: on
        DataPlaneError the kernel keeps what it had, and the next sync must be full."""

    def cleanup(self) -> None:
        """Remove everything this data plane may have written."""

    def rules(self) -> str:
        """What the kernel holds now, as the mode's own tools print it."""

    def intact(self) -> bool:
        """False when something this data plane wrote was changed or removed from
        outside since its last successful sync (a flushed chain, a deleted table, a
        detached program ...); True before any sync. Logs what it found (a warning).

        The daemon calls it about once a second between syncs and answers False with a
        full sync, so it must be cheap at 10,000 services: compare something the kernel
        keeps anyway (a generation number, a count) with what it was after our last
        write, and look closer only when that moved. It need not see every change to
        every per-service object: the hourly full sync rewrites those."""

    def counts(self) -> PlaneCounts:
        """What the last successful sync says for the metrics (iptables: rule counts,
        nftables: stale-chain cleanup failures); ``PlaneCounts()`` when the mode reports
        nothing beyond success or failure."""


def intact(damage: Callable[[], str | None], unreadable: str, log: logging.Logger
           ) -> bool:
    """``DataPlane.intact()``, as every mode answers it: ``damage()`` says what was
    changed from outside (None: nothing). Not being able to look (a DataPlaneError,
    ``unreadable: error``) counts as damage too, since the full sync that follows
    either repairs it or fails loudly. What was found is logged as a warning on the
    mode's ``log``."""
    try:
        found = damage()
    except DataPlaneError as err:
        found = f"{unreadable}: {err}"
    if found is not None:
        log.warning("%s (changed from outside)", found)
    return found is None


@dataclass(frozen=True)
class PlaneOptions:
    """Settings of the I/O edge (not policy: the node view has all of that)."""

    iptables_backend: str = "auto"  # auto (as iptables-wrapper decides), legacy, nft
    # Modes that attach programs to a cgroup (Mode.needs_cgroup): where, and the private
    # bpffs their pins live in. "" = the mode's default (the cgroup2 root, which is
    # refused unless allow_root_cgroup).
    cgroup_path: str = ""
    bpf_dir: str = ""
    allow_root_cgroup: bool = False


# --- what a mode leaves in the kernel -------------------------------------------------

# The kernel parts modes write (Part.name). One mode writes each, but the nftables
# tables, which the ebpf mode writes too (its north-south half).
IPTABLES_CHAINS = "iptables chains"  # the iptables mode's KUBE-* chains and jumps
IPVS_STATE = "IPVS state"  # virtual servers, kube-ipvs0, the ipsets, IPVS's KUBE-* chains
NFTABLES_TABLES = "nftables tables"  # ip / ip6 kube-proxy
BPF_PROGRAMS = "bpf programs"  # the programs' cgroup links, pinned maps, private bpffs

Removed = Mapping[str, int]  # what a removal took away, by kind: {"chains": 15, ...}


@dataclass(frozen=True)
class Part:
    """One part of the kernel a mode writes, and how to take it off a node: a mode
    starting removes every part it does not own itself (modes/leftovers.py), as
    upstream's kube-proxy removes the other modes' rules at start."""

    name: str  # IPTABLES_CHAINS, IPVS_STATE, NFTABLES_TABLES or BPF_PROGRAMS
    # Remove the part from the node the runner reaches, but what ``Keep`` names (the
    # starting mode's iptables chains and jumps of the same names). Returns what went,
    # by kind. A backend the node lacks (a binary, a kernel module, a bpffs) holds
    # nothing: logged at debug level, never raised.
    remove: Callable[[Runner, PlaneOptions, Keep], Removed]


@dataclass(frozen=True)
class VirtualServers:
    """The load balancers a mode writes for one service port's frontends of one kind,
    when it balances in per-frontend virtual servers (IPVS) rather than per-service
    chains: what the lab's diagram draws between a frontend and its Pods."""

    frontend: str  # the frontends' kind: ClusterIP, NodePort, External, LoadBalancer
    addresses: tuple[str, ...]  # "ip:port/proto" of each virtual server, as rendered
    scheduler: str  # rr ...
    reals: tuple[str, ...]  # real servers, "ip:port" (EndpointView.target); () refuses
    firewall: str | None  # the chain that filters its traffic first (source ranges)


@dataclass(frozen=True)
class Mode(Generic[R]):
    """One proxy mode, as the proxy runs it: the record ``modes.get(name)`` returns.

    Every field is something the CLI, the daemon, the metrics or the flow table call
    (render, trace, write, clean up, name a metric) and none of them asks which mode it
    is. What only the lab shows (chain names, virtual servers, load balancing in words)
    is in the mode's :class:`Presentation`; what a data plane reports after a sync is
    its own ``DataPlane.counts()``."""

    name: str
    # Node views of every family in use -> the mode's ruleset. Pure.
    render: Callable[[Sequence[NodeView]], R]
    # A render function with memory for a long-running proxy: same output as render,
    # but it may reuse what it rendered for port views it saw in an earlier call.
    renderer: Callable[[], Callable[[Sequence[NodeView]], R]]
    # The ruleset as `kubeproxy render` prints it, for node ``node``. Pure.
    text: Callable[[R, str], str]
    # Follow one packet through the ruleset (the node's local addresses given). Pure.
    trace: Callable[[R, Packet, frozenset[IPAddress]], TraceResult]
    # Follow one packet through rules as ``DataPlane.rules()`` prints them (the kernel's
    # own account, so a test or a user can check what was really written). Pure.
    trace_rules: Callable[[str, Packet, frozenset[IPAddress]], TraceResult]
    # The data plane for the kernel the runner reaches.
    data_plane: Callable[[Runner, PlaneOptions], DataPlane[R]]
    # The same data plane over the package's strict fake kernel.
    fake: Callable[[], DataPlane[R]]
    # Remove whatever this mode may ever have written (any backend), for `cleanup`.
    cleanup: Callable[[Runner, PlaneOptions], None]
    # The counter of failed syncs, upstream's name for this mode.
    sync_failures_metric: str
    # The mode load balances sockets in programs attached to a cgroup: a node's proxy
    # needs PlaneOptions.cgroup_path (and bpf_dir), and only processes in that cgroup are
    # load balanced (the lab gives each node a cgroup and puts its pods' processes in it).
    needs_cgroup: bool = False
    # Why this mode cannot run on the kernel the runner reaches (a missing module ...),
    # or None when it can: kernel tests skip the mode with this reason.
    kernel_support: Callable[[Runner], str | None] = lambda runner: None
    # The counter of failed *partial* syncs (a full one follows), if upstream has one
    # for this mode (iptables: sync_proxy_rules_iptables_partial_restore_failures_total).
    partial_failures_metric: str | None = None
    # The mode with its own section of the configuration applied (ipvs: the scheduler,
    # strictARP, ...), for `modes.for_config`; None: the mode has no settings of its own.
    configure: Callable[[ProxyConfig], Mode[R]] | None = None
    # The kernel parts this mode writes, each with its removal: a mode starting removes
    # the parts of the registered modes that it does not own (modes/leftovers.py).
    parts: tuple[Part, ...] = ()
    # What this mode writes under names another mode's part also has (the iptables and
    # ipvs modes share KUBE-SERVICES & co): that part's removal leaves these in place
    # when this mode starts.
    keep: Keep = field(default_factory=Keep)


@dataclass(frozen=True)
class Presentation:
    """What the lab shows about a mode (``modes.presentation(name)``): its diagrams, its
    ``lab status`` line and the demo's listing, so the lab never imports a mode's own
    modules nor asks which mode runs. Pure, except ``service_rules``' backend probe."""

    # The per-service chains the renderer writes for one service port (diagrams).
    chain_names: Callable[[ServicePortView], ChainNames]
    # Modes that balance in per-frontend virtual servers instead of per-service chains
    # (ipvs; chain_names then names none): a port view's virtual servers, by frontend
    # kind, from the renderer's own output. None: the mode writes chains.
    virtual_servers: Callable[[NodeView, ServicePortView], Sequence[VirtualServers]
                              ] | None = None
    # How the mode picks an endpoint, in words (`lab status`), given --lb-algorithm
    # (random, round-robin): that algorithm, unless the mode balances its own way (ipvs:
    # its scheduler).
    load_balancing: Callable[[str], str] = lambda algorithm: algorithm
    # The command that lists the node's Service dispatch rules as users read them
    # (`make demo` prints it), for the node the runner reaches; None: the mode has none.
    service_rules: Callable[[Runner], Sequence[str]] | None = None
