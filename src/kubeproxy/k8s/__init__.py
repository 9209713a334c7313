"""Kubernetes objects in and out: the only package that sees raw API objects."""

from kubeproxy.errors import ManifestError
from kubeproxy.k8s.decode import decode_objects
from kubeproxy.k8s.load import load_manifests, parse_manifest_text

__all__ = ["ManifestError", "decode_objects", "load_manifests", "parse_manifest_text"]
