"""The golden cases: which cluster, which configuration, which renderer, which file.

Shared by the test (test_golden.py compares) and the update step (update.py writes), so
the two cannot drift apart. A dump is canonical: built from the node view (services in
name order) by renderers that sort what has no meaning in its order (iptables chains;
nftables sets, maps, elements and chains) and keep what has (rules within a chain).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeproxy.config.types import LBAlgorithm, ProxyConfig
from kubeproxy.k8s import decode_objects, load_manifests
from kubeproxy.model import Family, parse_cidr
from kubeproxy.nodeview import NodeView, build_node_view
from kubeproxy.render import iptables, nftables

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
UPDATE_COMMAND = "python -m tests.golden.update"


def iptables_dump(views: list[NodeView]) -> str:
    """iptables-save text of each family, IPv4 first (iptables has one ruleset per family)."""
    return "".join(iptables.render(view).save_text() for view in views)


def nftables_dump(views: list[NodeView]) -> str:
    """The ``nft -f`` script of both families' tables."""
    return nftables.render(views).script()


@dataclass(frozen=True)
class Case:
    name: str
    manifest: str  # under the repository root
    config: ProxyConfig
    dump: Callable[[list[NodeView]], str]
    suffix: str  # the golden file's extension
    families: tuple[Family, ...] = (4,)  # the seed example is IPv4 only

    @property
    def path(self) -> Path:
        return DATA / f"{self.name}.{self.suffix}"

    def objects(self) -> list[Mapping[str, Any]]:
        return load_manifests([ROOT / self.manifest])

    def render(self, objects: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The dump of ``objects`` (default: the case's manifest)."""
        cluster = decode_objects(self.objects() if objects is None else objects)
        return self.dump([build_node_view(cluster, self.config, f) for f in self.families])


def seed_config(lb: LBAlgorithm) -> ProxyConfig:
    return ProxyConfig(hostname="node-1", cluster_cidrs=(parse_cidr("10.244.0.0/16", "t"),),
                       lb_algorithm=lb)


CASES = [
    Case(f"seed-{lb.value}", "examples/seed.yaml", seed_config(lb), dump, suffix)
    for suffix, dump in (("iptables", iptables_dump), ("nft", nftables_dump))
    for lb in (LBAlgorithm.RANDOM, LBAlgorithm.ROUND_ROBIN)
]
