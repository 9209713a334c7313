"""A lab node's node views: what that node's proxy decides, decided here the same way.

Theory of operation
-------------------
Each lab node runs ``kubeproxy run`` against the lab's API server with the flags of
runtime.py ``proxy_flags``. :func:`proxy_config` parses those very flags with the
proxy's own command line into the :class:`~kubeproxy.config.types.ProxyConfig` they give,
and :func:`views_of` runs the proxy's own pipeline (``decode_objects`` ->
``build_node_view``, one view per IP family in use) over the objects the API holds. So
the lab's diagram shows the decisions the node's proxy renders, without reading rules
back. :func:`node_views` is the I/O edge: it lists Services, EndpointSlices and Nodes
from the lab's API server.
"""

from __future__ import annotations

from collections.abc import Iterable

from kubeproxy.config import flags
from kubeproxy.config.types import ProxyConfig
from kubeproxy.errors import ConfigError, LabError
from kubeproxy.k8s import decode_objects
from kubeproxy.lab.runtime import Lab, proxy_flags
from kubeproxy.lab.state import LabState
from kubeproxy.nodeview import NodeView
from kubeproxy.nodeview import node_views as views_in_use
from kubeproxy.util.jsontypes import JSON

KINDS = ("Service", "EndpointSlice", "Node")  # what kube-proxy watches


def proxy_config(state: LabState, node: str) -> ProxyConfig:
    """The configuration the lab's proxy on ``node`` runs with: its own flags, parsed
    by the command line that parses them for the proxy."""
    try:
        return flags.proxy_config(proxy_flags(state, node))
    except ConfigError as err:
        raise LabError(f"lab {state.name}: {err}") from err


def views_of(objects: Iterable[JSON], config: ProxyConfig) -> list[NodeView]:
    """The node views the proxy configured by ``config`` builds from these objects."""
    return views_in_use(decode_objects(objects), config)


def node_views(lab: Lab, node: str) -> list[NodeView]:
    """``node``'s views, from what the lab's API server holds now."""
    state = lab.state()
    if node not in {n.name for n in state.nodes}:
        raise LabError(f"no node {node!r} in lab {lab.name!r}")
    api = lab.api(state)
    objects = [obj for kind in KINDS for obj in api.list(kind)[0]]
    return views_of(objects, proxy_config(state, node))
