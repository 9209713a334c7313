"""Names of the per-service nftables objects, as upstream kube-proxy spells them.

Upstream (pkg/proxy/nftables/proxier.go) names a service port's chains
``PREFIX-HASH-ns/svc/proto/port`` where HASH is the first 8 characters of the base32
SHA-256 of ``ns/svc/proto/port`` (``ns1/svc1/tcp/p80`` -> ``ULMVA6XW``), and its
per-endpoint objects ``PREFIX-HASH-ns/svc/proto/port__IP/PORT`` (IPv6 colons become
dots). Users and upstream's documentation look for these names, so they are kept.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from kubeproxy.model import ServicePortName
from kubeproxy.nodeview import EndpointView

NAME_MAX = 256  # nftables' NFT_NAME_MAXLEN (including the terminating NUL)
_BASE_MAX = NAME_MAX - 1 - 16  # upstream reserves 16 characters for the prefix
ENDPOINT_GROUPS = 256  # shared endpoint maps per family; see render.nftables


@lru_cache(maxsize=1024)
def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def hash_and_truncate(text: str) -> str:
    """Upstream's hashAndTruncate: ``HASH-text``, cut to fit with ``...``."""
    name = base64.b32encode(_digest(text)).decode()[:8] + "-" + text
    if len(name) > _BASE_MAX:
        name = name[: _BASE_MAX - 3] + "..."
    return name


def port_base(name: ServicePortName) -> str:
    """``ns/svc/proto/port`` (the port part is empty for an unnamed port)."""
    svc = name.service
    return f"{svc.namespace}/{svc.name}/{name.protocol.lower()}/{name.port}"


def chain_base(name: ServicePortName) -> str:
    """``HASH-ns/svc/proto/port``: the suffix of every chain of one service port."""
    return hash_and_truncate(port_base(name))


def endpoint_base(name: ServicePortName, ep: EndpointView) -> str:
    """``HASH-ns/svc/proto/port__IP/PORT`` (upstream servicePortEndpointChainNameBase)."""
    ip = str(ep.ip).replace(":", ".")
    return hash_and_truncate(f"{port_base(name)}__{ip}/{ep.port}")


def endpoint_group(name: ServicePortName) -> int:
    """Which shared endpoint map holds this service port's endpoints (0..255)."""
    return _digest(port_base(name))[-1] % ENDPOINT_GROUPS


_MAP_NAMES = tuple(f"endpoints-{g:02x}" for g in range(ENDPOINT_GROUPS))


def endpoint_map(group: int) -> str:
    return _MAP_NAMES[group]
