"""The client's small error tree, shared by ``client``, ``transport`` and ``auth``.

Every failure of talking to the API server leaves ``sources`` as one of these (translated
at the boundary with ``raise ... from``), so callers decide by meaning, not socket detail:

* :class:`~kubeproxy.errors.ClientError` -- base: talking to the API server failed.
* :class:`TransportError` -- no connection, a timeout, or a stream that broke mid-way.
* :class:`WatchStalled` -- a watch showed no event and no bookmark within its bound.
* :class:`StatusError` -- the server answered with an error status (``code``, ``reason``).
* :class:`GoneError` -- 410: the resourceVersion is too old; the caller must relist.
* :class:`ProtocolError` -- the answer is not what the API promises (bad JSON, shape).
* ``auth.AuthError`` -- credentials could not be obtained (a plugin failed).
"""

from __future__ import annotations

import http.client

from kubeproxy.errors import ClientError


class TransportError(ClientError):
    """No connection, a timeout, or a stream that broke before its end."""


class WatchStalled(TransportError):
    """A watch went quiet for longer than its bound: the server may be stopped."""


class ProtocolError(ClientError):
    """The server's answer is not valid API JSON."""


class StatusError(ClientError):
    """The server answered with an error status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")


class GoneError(StatusError):
    """410 Gone/Expired: the resourceVersion is no longer served; relist."""


def status_error(code: int, status: object) -> StatusError:
    """The exception for an error status (a Status object if the server sent one)."""
    reason, message = "", ""
    if isinstance(status, dict):
        reason = str(status.get("reason") or "")
        message = str(status.get("message") or "")
        raw_code = status.get("code")
        code = raw_code if isinstance(raw_code, int) and raw_code else code
    reason = reason or http.client.responses.get(code, "Error")
    return (GoneError if code == 410 else StatusError)(code, reason, message)
