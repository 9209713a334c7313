"""The project's one error tree: every error raised on purpose is a KubeProxyError.

Each error is translated at the boundary where it happens (``raise ... from``), and its
message names what a person must look at: the flag or configuration field, the
Kubernetes object and field, the command that failed and what it printed. The commands
map the branches to exit codes (app/cli.py: 2 for bad input, 1 for failures).

``KubeProxyError``
 +- ``ConfigError``       a bad flag or configuration file; names the setting
 |   (app.cli.PrivilegeError, sources.kubeconfig.KubeconfigError, modes.UnknownModeError)
 +- ``ManifestError``     a manifest file that cannot be read or parsed at all (k8s/)
 +- ``InvalidObject``     an object that cannot be proxied: kind, namespace/name, field
 +- ``FieldError``        a bad field while a model object is built (wrapped into the above)
 +- ``DataPlaneError``    a kernel update failed: the command and what it printed
 +- ``ClientError``       talking to the API server failed (the subtree: sources/errors.py)
 +- ``TraceError``        rules that cannot be traced (trace/)
 +- ``LabError``          anything the lab refuses or meets (the subtree: lab/errors.py)
 +- ``ApiError``          the lab API server's answer as a Kubernetes Status (apiserver/)
 +- ``NetnsError``        a network namespace is missing, or entering it failed
 +- ``VmError``           the test guest (vm/) cannot be built or run

Branches that were ValueError, RuntimeError or OSError before keep that base as well,
so callers that catch the builtin still do.
"""

from __future__ import annotations


class KubeProxyError(Exception):
    """Base of every error kubeproxy raises on purpose."""


class ConfigError(KubeProxyError, ValueError):
    """A bad flag or configuration file; the message names the setting."""


class ManifestError(KubeProxyError, ValueError):
    """A file that cannot be read or parsed at all (bad objects inside are not this)."""


class InvalidObject(KubeProxyError, ValueError):
    """An object that cannot be proxied; names the object and the offending field."""

    def __init__(self, kind: str, ref: str, field_path: str, message: str) -> None:
        self.kind = kind
        self.ref = ref
        self.field_path = field_path
        self.message = message
        super().__init__(f"{kind} {ref}: {field_path}: {message}")


class FieldError(KubeProxyError, ValueError):
    """A bad field found while building a model object; wrapped into InvalidObject."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}")


class DataPlaneError(KubeProxyError, RuntimeError):
    """A kernel update failed; the message holds the command and what it printed."""


class ClientError(KubeProxyError):
    """Talking to the API server failed."""


class TraceError(KubeProxyError, ValueError):
    """The ruleset cannot be traced: it is malformed, or the kernel would refuse it."""


class LabError(KubeProxyError):
    """Base of every error the lab raises on purpose."""


class NetnsError(KubeProxyError, OSError):
    """The namespace is missing, or entering or leaving it failed."""


class VmError(KubeProxyError):
    """The test guest cannot be built, booted or run."""
