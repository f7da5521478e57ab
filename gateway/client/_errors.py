"""The client's one exception tree.

Every error the SDK raises on purpose is one of these. Each carries the HTTP ``status`` of the answer that caused
it, a machine-readable ``reason`` (the body's ``error`` where the server gave one) and the ``job_id`` it concerns;
any of them is ``None`` where it does not apply::

    X402ClientError
    ├── PaymentRefused      we did not pay: over a spend cap or the budget, a network or asset not allowed,
    │                       no option this client can pay, no wallet, a transfer that failed before it left;
    │                       nothing was sent
    ├── PaymentFailed       we paid (signed or transferred) and the server refused that payment (402 + reason)
    ├── ApiError            any other 4xx/5xx answer (status, reason, message; job_id for job calls)
    ├── JobError            a job ended without completing (``.job`` is the final :class:`Job`)
    │   ├── JobFailed       status ``failed`` (the job's ``error`` is the message)
    │   ├── JobCancelled    status ``cancelled``
    │   └── JobTimedOut     status ``timeout`` (reason ``job_timeout``), or polling gave up first (reason
    │                       ``poll_timeout``: the job may still finish; ``.job`` is the last one seen)
    └── TransientError      network errors, 429 or 5xx that outlasted every retry

``PaymentRefused`` is the safe one: no money moved. After ``PaymentFailed`` the server holds what was presented,
whatever it answered: an ``exact`` authorization it can still settle until its ``validBefore`` (the budget keeps
counting it), a session voucher it can claim; with a tx-hash payment the transfer is on chain and its hash is in
``tx_hash``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.client._models import Job

__all__ = [
    "ApiError",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobTimedOut",
    "PaymentFailed",
    "PaymentRefused",
    "TransientError",
    "X402ClientError",
]


def error_summary(exc: BaseException) -> str:
    """What may be shown of an error raised by an HTTP or RPC library: its type and, for an HTTP answer, the
    status code. Never its text: httpx, aiohttp and requests put the full URL there (``... for url
    'https://rpc.example/v2/<key>'``), and an RPC URL's path or query is often its API key."""
    status: object = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if not isinstance(status, int):
        try:
            status = getattr(getattr(exc, "response", None), "status_code", None)  # httpx, requests
        except Exception:  # a library's property may raise instead of answering None
            status = None
    name = type(exc).__name__
    return f"{name}, HTTP {status}" if isinstance(status, int) and not isinstance(status, bool) else name


class X402ClientError(Exception):
    """Base of every error the SDK raises on purpose."""

    default_reason = "client_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason or self.default_reason
        self.job_id = job_id

    def __repr__(self) -> str:
        parts = [f"reason={self.reason!r}", f"message={self.message!r}"]
        if self.status is not None:
            parts.insert(0, f"status={self.status}")
        if self.job_id is not None:
            parts.append(f"job_id={self.job_id!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class PaymentRefused(X402ClientError):
    """The client did not pay: nothing was sent (a transfer may have been signed, and was shown never to have left:
    refused by the node, or after a failed broadcast unknown to it with its nonce unused)."""

    default_reason = "payment_refused"


class PaymentFailed(X402ClientError):
    """The server refused the payment this client presented."""

    default_reason = "payment_failed"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        job_id: str | None = None,
        tx_hash: str | None = None,
    ) -> None:
        super().__init__(message, status=status, reason=reason, job_id=job_id)
        self.tx_hash = tx_hash


class ApiError(X402ClientError):
    """Any other 4xx/5xx answer."""

    default_reason = "api_error"


class JobError(X402ClientError):
    """A job ended without completing; ``job`` is its final state."""

    default_reason = "job_error"

    def __init__(self, message: str, *, job: Job, reason: str | None = None) -> None:
        super().__init__(message, reason=reason, job_id=job.job_id)
        self.job = job


class JobFailed(JobError):
    default_reason = "job_failed"


class JobCancelled(JobError):
    default_reason = "job_cancelled"


class JobTimedOut(JobError):
    default_reason = "job_timeout"


class TransientError(X402ClientError):
    """Network errors, 429 or 5xx answers that outlasted every retry."""

    default_reason = "transient_error"
