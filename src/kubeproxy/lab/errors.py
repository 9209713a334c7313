"""The lab's error tree. Every failure a user can cause or meet is one of these.

``kubeproxy.errors.LabError``  base; the CLI prints its message and exits 1
 +- ``LabManifestError``       bad input YAML; names the object and the field
 +- ``LabStateError``          the lab named is missing, already up, or its state is unreadable
 +- ``CommandError``           an external command (ip, the core's apply, ...) failed
"""

from __future__ import annotations

from kubeproxy.errors import LabError

__all__ = ["CommandError", "LabError", "LabManifestError", "LabStateError"]


class LabManifestError(LabError):
    """A Kubernetes object in the lab's input is invalid or unsupported."""


class LabStateError(LabError):
    """The lab's recorded state does not allow the request."""


class CommandError(LabError):
    """An external command failed; the message carries its stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        shown = " ".join(argv)
        super().__init__(f"command failed ({returncode}): {shown}\n{stderr.strip()}")
