"""Small helpers with no kube-proxy knowledge: GC pausing, JSON typing, queue draining,
running a function inside another network namespace."""
