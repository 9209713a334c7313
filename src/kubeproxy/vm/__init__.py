"""Run one command as root in a throwaway QEMU guest: ``tools/vmrun CMD [ARGS...]``.

Theory of operation. Some kernel features the project needs (IPVS) are not in this
machine's kernel and KVM is not usable here, so the command runs in a guest emulated by
``qemu-system-x86_64`` (TCG) that boots Debian 12's own 6.1 kernel in a few seconds.

* ``image`` builds the guest once and caches it (``~/.cache/kubeproxy-vm/guest``): the
  kernel package that ``linux-image-amd64`` points at and ``busybox-static``, fetched
  with ``apt-get download``; the kernel's whole module tree (``depmod``-ed, so
  ``modprobe ip_vs`` works in the guest); the uncompressed kernel (booted through its
  PVH entry point: no firmware, no decompression); a tiny busybox initramfs. Builds
  take a file lock and are renamed into place, so concurrent first uses are safe.
* The guest's **stage 1** (``image.STAGE1``) mounts the host's ``/`` read-only over 9p
  under a tmpfs overlay (the guest may write anywhere; all of it is thrown away), the
  project directory read-write at its own path, the cached modules at ``/lib/modules``
  and the run directory at ``/run/vmrun``, then ``switch_root``s into the host's
  userspace; **stage 2** (PID 1) runs the command, records its exit status in the run
  directory and powers off.
* ``run`` is the host side: it writes the command script (working directory, an
  allowlisted environment, argv), starts qemu (no network, no display, the kernel
  console to a file), copies the command's stdout and stderr files from the run
  directory to its own stdout and stderr while the guest runs (9p writes are
  synchronous, so nothing is lost at power-off and the streams stay apart), and kills
  qemu by PID on timeout, on SIGINT/SIGTERM/SIGHUP, and when vmrun itself dies
  (``PR_SET_PDEATHSIG``).

Standard library only, so that ``tools/vmrun`` works before the virtualenv exists.
See docs/vm.md.
"""
