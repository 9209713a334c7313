"""Names of the per-service iptables chains, as upstream kube-proxy spells them.

Upstream (pkg/proxy/iptables/proxier.go) names a service port's chains ``PREFIX-HASH``:
HASH is the first 16 characters of the base32 SHA-256 of ``ns/svc:port`` plus the
lowercase protocol (``ns1/svc1:p80tcp`` -> ``KUBE-SVC-XPGD46QRK7WJZT7O``), and an
endpoint's ``KUBE-SEP-`` chain hashes the same text with the endpoint's ``ip:port``
appended. Users and upstream's documentation look for these names, so they are kept.
Beside nft_names.py, so that naming a chain needs no renderer. Pure.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # 10 bits -> 2 characters


@lru_cache(maxsize=1 << 19)  # chain names repeat every sync: ~40k services x 10 fit
def hash16(text: str) -> str:
    """The first 16 base32 characters of sha256(text): the top 80 bits of the digest.

    Same result as base64.b32encode(digest)[:16], without its per-call overhead (the
    renderer hashes one name per endpoint, ~100,000 of them for a large cluster).
    """
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (p[n >> 70] + p[(n >> 60) & 1023] + p[(n >> 50) & 1023] + p[(n >> 40) & 1023]
            + p[(n >> 30) & 1023] + p[(n >> 20) & 1023] + p[(n >> 10) & 1023] + p[n & 1023])


def service_chain(prefix: str, port_name: str, protocol: str) -> str:
    """Upstream's servicePortPolicyClusterChain & co: prefix + hash("ns/svc:port" + proto)."""
    return prefix + hash16(port_name + protocol.lower())


def endpoint_chain(port_name: str, protocol: str, endpoint: str) -> str:
    return "KUBE-SEP-" + hash16(port_name + protocol.lower() + endpoint)
