"""The iptables data plane: apply a rendered Ruleset to the kernel, fully or partially.

Theory of operation
-------------------
Each sync (1) feeds one ``iptables-restore --noflush`` transaction per family holding:

* every top-level chain (KUBE-SERVICES, KUBE-NODEPORTS, ...), declared and so created
  if missing, or flushed, then rewritten whole; and the empty KUBE-PROXY-CANARY chain
  of the mangle, filter and nat tables (declared: created if missing);
* the per-service chains (KUBE-SVC-/SVL-/EXT-/FW-/SEP-) of the services that changed
  since the last successful sync, or of all services on a full sync;
* ``-X`` for chains that are no longer wanted (on a full sync: any per-service chain
  the kernel has that the ruleset does not; on a partial one: those we wrote earlier).

then (2), as upstream does, makes sure the jumps from the builtin chains into ours
exist (``iptables -C``, and ``-I`` for a missing one). Declaring a chain in the restore
is what creates it, so there is no ``iptables -N`` whose "already exists" failure would
have to be told apart from a real one by its message.

The restore is atomic per table, so a failure leaves the previous rules in place and
the caller falls back to a full sync next time.

Which iptables binary: as upstream's iptables-wrapper decides it, the backend (legacy
or nft) already holding kube rules wins, else the one with more rules, else nft.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from kubeproxy.dataplane.base import Runner, check
from kubeproxy.model import NamespacedName
from kubeproxy.render.iptables import (
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
    SERVICE_CHAIN_PREFIXES,
    TOP_CHAINS,
    Ruleset,
    jump_rule,
)

Backend = Literal["legacy", "nft"]
_HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_CHAIN_LINE = re.compile(r"^:(\S+) ")


def binaries(family: int, backend: Backend) -> tuple[str, str, str]:
    """(iptables, iptables-save, iptables-restore) for a family and backend."""
    base = "iptables" if family == 4 else "ip6tables"
    return (f"{base}-{backend}", f"{base}-{backend}-save", f"{base}-{backend}-restore")


def detect_backend(runner: Runner) -> Backend:
    """iptables-wrapper's rule: hints first, then whichever backend has more rules."""
    counts: dict[Backend, int] = {}
    for backend in ("legacy", "nft"):
        text = ""
        for family in (4, 6):
            res = runner.run([binaries(family, backend)[1]])
            if res.returncode == 0:
                text += res.stdout
        if any(f":{hint} " in text for hint in _HINT_CHAINS):
            return backend
        counts[backend] = sum(1 for line in text.splitlines() if line.startswith("-"))
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"


def is_ours(chain: str) -> bool:
    """Chains this proxy owns (kubelet's KUBE-KUBELET-CANARY & co are not ours)."""
    fixed = {KUBE_FIREWALL, KUBE_PROXY_CANARY, *TOP_CHAINS["filter"], *TOP_CHAINS["nat"]}
    return chain in fixed or chain.startswith(SERVICE_CHAIN_PREFIXES)


@dataclass
class SyncStats:
    chains_written: int = 0
    chains_deleted: int = 0
    rules_written: int = 0
    bytes: int = 0


@dataclass
class IptablesDataPlane:
    runner: Runner
    family: int
    backend: Backend
    # What we wrote last: nat chain -> owning service (for partial syncs and -X).
    written: dict[str, NamespacedName] = field(default_factory=dict)
    needs_full: bool = True

    @property
    def _bins(self) -> tuple[str, str, str]:
        return binaries(self.family, self.backend)

    def sync(self, ruleset: Ruleset, changed: Iterable[NamespacedName] | None = None
             ) -> SyncStats:
        """Apply ``ruleset``; only the chains of ``changed`` services unless None (full)."""
        full = changed is None or self.needs_full
        self.needs_full = True  # until this sync succeeds
        if full:
            existing = self._existing_service_chains()
            write = set(ruleset.owners)
            stale = existing - write
        else:
            assert changed is not None
            services = set(changed)
            write = {c for c, o in ruleset.owners.items() if o in services}
            stale = {c for c, o in self.written.items()
                     if o in services and c not in ruleset.owners}
        payload, stats = self._payload(ruleset, write, stale)
        check(self.runner, [self._bins[2], "-w", "--noflush", "--counters"], payload)
        self._ensure_jumps(ruleset)
        self.written = dict(ruleset.owners)
        self.needs_full = False
        return stats

    def _payload(self, ruleset: Ruleset, write: set[str], stale: set[str]
                 ) -> tuple[str, SyncStats]:
        stats = SyncStats(chains_deleted=len(stale))
        out = ["*mangle", f":{KUBE_PROXY_CANARY} - [0:0]", "COMMIT"]
        for table in ("filter", "nat"):
            chains = ruleset.tables[table]
            top = [c for c in chains if c in TOP_CHAINS[table] or c == KUBE_FIREWALL]
            body = top + (sorted(write) if table == "nat" else [])
            dead = sorted(stale) if table == "nat" else []
            # Declared, never written: the canary, and any jump target without rules.
            empty = sorted({KUBE_PROXY_CANARY} | {j[2] for j in ruleset.jumps
                                                  if j[0] == table} - set(body))
            out.append(f"*{table}")
            out.extend(f":{c} - [0:0]" for c in [*body, *empty, *dead])
            for chain in body:
                out.extend(chains[chain])
                stats.rules_written += len(chains[chain])
            out.extend(f"-X {c}" for c in dead)
            out.append("COMMIT")
            stats.chains_written += len(body)
        text = "\n".join(out) + "\n"
        stats.bytes = len(text)
        return text, stats

    def _ensure_jumps(self, ruleset: Ruleset) -> None:
        """The jumps from builtin chains into ours (their targets exist: the restore
        declared them)."""
        ipt = self._bins[0]
        # Insert missing jumps at the top, last first, so they end up in table order.
        for jump in reversed(ruleset.jumps):
            table = jump[0]
            spec = shlex.split(jump_rule(jump))[2:]
            if self.runner.run([ipt, "-w", "-t", table, "-C", jump[1], *spec]).returncode != 0:
                check(self.runner, [ipt, "-w", "-t", table, "-I", jump[1], "1", *spec])
        if any(j[2] == KUBE_FIREWALL for j in ruleset.jumps):
            # Localhost NodePorts: let DNAT from 127.0.0.1 to pods route (IPv4 only).
            check(self.runner, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"])

    def _existing_service_chains(self) -> set[str]:
        text = check(self.runner, [self._bins[1], "-t", "nat"])
        return {m.group(1) for line in text.splitlines() if (m := _CHAIN_LINE.match(line))
                and m.group(1).startswith(SERVICE_CHAIN_PREFIXES)}

    def save(self) -> str:
        """What the kernel holds now (iptables-save of filter and nat)."""
        return (check(self.runner, [self._bins[1], "-t", "filter"])
                + check(self.runner, [self._bins[1], "-t", "nat"]))

    def cleanup(self) -> None:
        """Remove every jump, chain and rule this proxy may have written."""
        ipt, save, restore = self._bins
        for table in ("filter", "nat", "mangle"):
            res = self.runner.run([save, "-t", table])
            if res.returncode != 0:
                continue
            ours = [m.group(1) for line in res.stdout.splitlines()
                    if (m := _CHAIN_LINE.match(line)) and is_ours(m.group(1))]
            # Jumps from builtin chains into ours, deleted one by one.
            for line in res.stdout.splitlines():
                parts = shlex.split(line) if line.startswith("-A ") else []
                if len(parts) > 2 and "-j" in parts and parts[parts.index("-j") + 1] in ours \
                        and not parts[1].startswith("KUBE-"):
                    self.runner.run([ipt, "-w", "-t", table, "-D", *parts[1:]])
            if ours:
                payload = "\n".join([f"*{table}", *(f":{c} - [0:0]" for c in ours),
                                     *(f"-X {c}" for c in ours), "COMMIT"]) + "\n"
                check(self.runner, [restore, "-w", "--noflush"], payload)
        self.written = {}
        self.needs_full = True
