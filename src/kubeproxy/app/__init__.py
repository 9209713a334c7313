"""The commands: ``kubeproxy`` (render, trace, apply, cleanup, run, lab) and
``kube-proxy``; the daemon's wiring, node tuning at start, klog-style logs."""
