"""kubeproxy: Kubernetes' kube-proxy, rebuilt in Python. See docs/architecture.md."""

__version__ = "0.1.0"
