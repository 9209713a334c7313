"""The lab kubelet's container runtime: a host-network Pod's image run with podman.

Theory of operation
-------------------
A DaemonSet Pod whose image is in this machine's local podman storage (``make image``
puts ``kubeproxy:0.1.0`` there, the name deploy/ uses) runs as a container, as a
kubelet would run it, instead of as a process from this checkout (hostpods.py). The
lab's kubelet keeps the same life cycle for both (hostkubelet.py): a container is one
``podman run`` in the foreground, so its output goes to the Pod's log file
(``kubectl logs``), its exit is the process's exit, SIGTERM to it stops the container
(podman passes the signal on) and ``--rm`` removes it. What kubelet and the container
runtime would give the container, :func:`run_argv` spells as podman flags (pure):

- ``--network ns:/run/netns/<node>``: the node's network namespace (hostNetwork);
- ``--privileged`` from the container's ``securityContext.privileged``;
- the Pod's volumes bind-mounted at their mount paths (ConfigMaps, the projected
  service-account token, hostPaths; read-only ones ``:ro``), its environment (the
  ``KUBERNETES_SERVICE_*`` variables, ``env``), ``command`` as the entrypoint and
  ``args`` after the image, the node's name as the hostname;
- ``--pull=never``: only what is in local storage (no registry is reached);
- ``--ulimit``: a container may not raise its limits on these machines (no
  CAP_SYS_RESOURCE), so runc gets explicit ones at or below the current hard limits.

Every podman call names :data:`CONTAINERS_CONF` (``CONTAINERS_CONF``): the runc runtime
(crun refuses the hybrid cgroup layout of these machines) and no default network, so
podman never sets up its own network, whose NAT rules would land in the machine's own
namespace. Containers are named ``kpl-<lab>-<namespace>-<pod>``: ``lab down`` removes
every container of its lab by that prefix (:meth:`Podman.remove_lab`), whatever state
the kubelet left them in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubeproxy.errors import LabError
from kubeproxy.lab.hostpods import Launch
from kubeproxy.lab.layout import NS_PREFIX

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
RUNTIME = "runc"
ULIMITS = ("nofile=20000:20000", "nproc=4096:4096")
NETNS_DIR = "/run/netns"
TIMEOUT = 60.0  # seconds for one podman query


def lab_prefix(lab: str) -> str:
    """What the names of lab ``lab``'s containers start with."""
    return f"{NS_PREFIX}{lab}-"


def container_name(lab: str, namespace: str, pod: str) -> str:
    return f"{lab_prefix(lab)}{namespace}-{pod}"


def run_argv(launch: Launch, image: str, name: str, node_ns: str, hostname: str,
             *, privileged: bool) -> list[str]:
    """``podman run`` for a host-network Pod's container (see the module docstring).
    ``launch.argv`` is the container's command and args as the Pod gives them."""
    argv = ["podman", "--runtime", RUNTIME, "run", "--rm", "--replace", "--name", name,
            "--pull=never", f"--network=ns:{NETNS_DIR}/{node_ns}", "--hostname", hostname]
    argv += [f"--ulimit={u}" for u in ULIMITS]
    if privileged:
        argv.append("--privileged")
    for m in launch.mounts:
        if m.source == m.target and not Path(m.source).exists():
            continue  # a hostPath at its own path the host lacks (/lib/modules): none
        argv += ["--volume", f"{m.source}:{m.target}" + (":ro" if m.read_only else "")]
    for key, value in launch.env.items():
        argv += ["--env", f"{key}={value}"]
    program, *args = launch.argv
    return [*argv, "--entrypoint", program, image, *args]


def podman_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every podman call runs with: ours, with CONTAINERS_CONF."""
    env = dict(os.environ if base is None else base)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


class Podman:
    """The few podman queries the lab kubelet makes (the I/O edge)."""

    def available(self) -> bool:
        return shutil.which("podman") is not None

    def image_exists(self, image: str) -> bool:
        """Whether ``image`` is in local storage (a short name as podman resolves it)."""
        if not image or not self.available():
            return False
        return self._run("image", "exists", image).returncode == 0

    def names(self, prefix: str) -> list[str]:
        """The containers (any state) whose name starts with ``prefix``."""
        if not self.available():
            return []
        done = self._run("ps", "--all", "--format", "{{.Names}}", "--filter",
                         f"name=^{prefix}")
        return [n for n in done.stdout.split() if n.startswith(prefix)]

    def remove(self, names: Sequence[str]) -> None:
        """Stop (2 s grace) and remove these containers; one already gone is no error."""
        if names and self.available():
            done = self._run("rm", "--force", "--ignore", "--time", "2", *names)
            if done.returncode != 0:
                raise LabError(f"podman rm {' '.join(names)}: {done.stderr.strip()}")

    def remove_lab(self, lab: str) -> list[str]:
        """Remove every container of lab ``lab``; returns their names."""
        names = self.names(lab_prefix(lab))
        self.remove(names)
        return names

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["podman", "--runtime", RUNTIME, *args], env=podman_env(),
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"podman {' '.join(args)}: {err}") from err
