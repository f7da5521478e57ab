"""The upstream client's errors: fixed sentences, so a message that reaches a log or a 502 never names the
origin (its host may be private, its URL may carry credentials)."""

from __future__ import annotations

__all__ = ["ClientBusy", "ConnectFailed", "ProtocolFailure", "ReadTimeout", "StaleConnection", "UpstreamError"]


class UpstreamError(Exception):
    """The upstream exchange failed; the message is a fixed sentence (no origin, no credentials)."""


class ConnectFailed(UpstreamError):
    """No connection: refused, unresolvable, TLS failure, connect timeout or a saturated pool."""


class ClientBusy(ConnectFailed):
    """No connection this request may hold became free in time because its own client's uploads hold all it may
    use (the pool's per-client bound on bodies still streaming up)."""


class ReadTimeout(UpstreamError, TimeoutError):
    """The upstream sent nothing for ``read_timeout`` while an answer was awaited."""


class ProtocolFailure(UpstreamError):
    """The connection broke, or the answer could not be parsed."""


class StaleConnection(Exception):
    """A reused connection closed before any byte of the answer: maybe the server's idle close.

    Never leaves the package: the pool turns it into a replay on a fresh connection or a ``ProtocolFailure``."""
