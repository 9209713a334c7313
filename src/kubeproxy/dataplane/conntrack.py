"""Deleting stale UDP conntrack entries with the ``conntrack`` tool.

Theory of operation
-------------------
:func:`kubeproxy.conntrack.stale_udp_flows` decides what is stale; this module only
spells each :class:`~kubeproxy.conntrack.StaleFlow` as one ``conntrack -D`` command and
runs it through a :class:`~kubeproxy.dataplane.base.Runner` (so it acts in whatever
network namespace the runner does). Entries are matched on the original destination
(``--orig-dst``, ``--orig-port-dst``) and, for a departed endpoint, on the reply source
(``--reply-src``): after DNAT the reply comes from the endpoint, which is what upstream's
netlink filter compares. ``conntrack -D`` exits 1 with "0 flow entries have been
deleted" when nothing matched; that is success here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kubeproxy.conntrack import StaleFlow
from kubeproxy.dataplane.base import Runner
from kubeproxy.errors import DataPlaneError

_DELETED = re.compile(r"(\d+) flow entries have been deleted")


def delete_argv(flow: StaleFlow) -> list[str]:
    argv = ["conntrack", "-D", "-f", f"ipv{flow.family}", "-p", "udp"]
    if flow.frontend.address is not None:
        argv += ["--orig-dst", str(flow.frontend.address)]
    argv += ["--orig-port-dst", str(flow.frontend.port)]
    if flow.endpoint is not None:
        argv += ["--reply-src", str(flow.endpoint)]
    return argv


class ConntrackCleaner:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def delete(self, flows: Iterable[StaleFlow]) -> int:
        """Run every delete; the number of entries removed. Raises DataPlaneError after
        trying them all, naming the ones that failed."""
        deleted = 0
        errors: list[str] = []
        for flow in flows:
            argv = delete_argv(flow)
            try:
                res = self.runner.run(argv)
            except DataPlaneError as err:
                errors.append(str(err))
                if "not installed" in str(err):
                    break
                continue
            found = _DELETED.search(res.stderr + res.stdout)
            count = int(found.group(1)) if found else None
            if res.returncode == 0 or (res.returncode == 1 and count == 0):
                deleted += count or 0
                continue
            detail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
            errors.append(f"{' '.join(argv)} failed (exit {res.returncode}): {detail}")
        if errors:
            raise DataPlaneError("; ".join(errors))
        return deleted
