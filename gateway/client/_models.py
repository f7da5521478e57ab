"""What the jobs calls return: small frozen value objects parsed from either API style (docs/jobs.md).

Both styles become one :class:`Job`: style A's ISO-8601 strings and style B's epoch milliseconds both become
aware ``datetime`` objects, style B's ``result.message.content`` becomes ``response`` and its
``processingTimeMs`` ``processing_time_ms``. Style B shows a cancelled job as ``failed`` with a ``cancelledAt``
(its clients know no ``cancelled``): that reads as ``cancelled`` here. ``raw`` keeps the document as sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.x402.codec import decode_header

__all__ = [
    "ACTIVE_STATUSES",
    "TERMINAL_STATUSES",
    "Job",
    "JobList",
    "JobsHealth",
    "PaymentReceipt",
    "StatusUpdate",
    "SubmitResult",
    "payment_receipt",
]

ACTIVE_STATUSES = frozenset({"pending", "processing"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timeout"})


def _time(value: Any) -> datetime | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _seq(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else ()


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusUpdate:
    """One progress message of a running job."""

    message: str
    timestamp: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, doc: Any) -> StatusUpdate:
        if not isinstance(doc, dict):
            return cls(message=str(doc))
        return cls(message=str(doc.get("message", "")), timestamp=_time(doc.get("timestamp")), raw=doc)

    def key(self) -> tuple[str, Any]:
        """What makes two updates the same one (the raw timestamp, as sent)."""
        return self.message, self.raw.get("timestamp")


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A job's state, whatever the API style."""

    job_id: str
    status: str  # pending | processing | completed | failed | cancelled | timeout
    prompt: str = ""
    response: str | None = None
    rich_data: tuple[Any, ...] = ()
    transactions: tuple[Any, ...] = ()
    status_updates: tuple[StatusUpdate, ...] = ()
    error: str | None = None
    thread_id: str | None = None
    agent_id: str | None = None
    user_id: str | None = None
    metadata: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    expires_at: datetime | None = None
    processing_time_ms: int | None = None
    cancellable: bool | None = None
    submission: SubmitResult | None = field(default=None, compare=False, hash=False)  # set by prompt_and_wait
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def terminal(self) -> bool:
        """A final status (an unknown status is not: polling goes on until a known one or the deadline)."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def parse(cls, doc: Mapping[str, Any], *, job_id: str | None = None) -> Job:
        """Either style's status, cancel or list entry document."""
        status = str(doc.get("status", "unknown"))
        if status == "failed" and doc.get("cancelledAt") is not None:
            status = "cancelled"  # style B's rendering of a cancelled job
        result = doc.get("result") if isinstance(doc.get("result"), dict) else None
        message = result.get("message") if result and isinstance(result.get("message"), dict) else None
        response = _str(doc.get("response"))
        if response is None and message is not None:
            response = _str(message.get("content"))
        processing = _int(doc.get("processingTime"))
        if processing is None and result is not None:
            processing = _int(result.get("processingTimeMs"))
        metadata = doc.get("metadata")
        cancellable = doc.get("cancellable")
        return cls(
            job_id=str(doc.get("jobId") or job_id or ""),
            status=status,
            prompt=str(doc.get("prompt") or ""),
            response=response,
            rich_data=_seq(doc.get("richData")),
            transactions=_seq(doc.get("transactions")),
            status_updates=tuple(StatusUpdate.parse(u) for u in _seq(doc.get("statusUpdates"))),
            error=_str(doc.get("error")),
            thread_id=_str(doc.get("threadId")),
            agent_id=_str(doc.get("agentId")),
            user_id=_str(doc.get("userId")),
            metadata=metadata if isinstance(metadata, dict) else None,
            created_at=_time(doc.get("createdAt")),
            started_at=_time(doc.get("startedAt")),
            completed_at=_time(doc.get("completedAt")) or (_time(message.get("createdAt")) if message else None),
            cancelled_at=_time(doc.get("cancelledAt")),
            expires_at=_time(doc.get("expiresAt")),
            processing_time_ms=processing,
            cancellable=cancellable if isinstance(cancellable, bool) else None,
            raw=dict(doc),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class JobList:
    """The caller's jobs, newest first: ``total`` of the caller's jobs, ``filtered`` returned here."""

    jobs: tuple[Job, ...]
    total: int
    filtered: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> JobList:
        jobs = tuple(Job.parse(j) for j in _seq(doc.get("jobs")) if isinstance(j, dict))
        return cls(
            jobs=jobs,
            total=_int(doc.get("total")) or len(jobs),
            filtered=_int(doc.get("filtered")) or len(jobs),
            raw=dict(doc),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsHealth:
    """The job service's health (style B's ``GET /api/messaging/jobs/health``): counts by status and rates over
    finished jobs. ``status_counts`` holds whatever statuses the server counts (this gateway's runner adds
    ``cancelled``); ``metrics`` the rates as sent (``successRate``, ``failureRate``, ``timeoutRate``,
    ``averageProcessingTimeMs``)."""

    healthy: bool
    total_jobs: int
    max_jobs: int | None = None
    status_counts: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    timestamp: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> JobsHealth:
        counts = doc.get("statusCounts")
        metrics = doc.get("metrics")
        return cls(
            healthy=doc.get("healthy") is True,
            total_jobs=_int(doc.get("totalJobs")) or 0,
            max_jobs=_int(doc.get("maxJobs")),
            status_counts={
                str(k): n for k, v in (counts.items() if isinstance(counts, dict) else ()) if (n := _int(v)) is not None
            },
            metrics={
                str(k): float(v)
                for k, v in (metrics.items() if isinstance(metrics, dict) else ())
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
            timestamp=_time(doc.get("timestamp")),
            raw=dict(doc),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentReceipt:
    """The settlement receipt a paid answer carries (``PAYMENT-RESPONSE`` or ``X-PAYMENT-RESPONSE``)."""

    success: bool
    tx_hash: str | None
    network: str | None
    payer: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)


def payment_receipt(headers: Mapping[str, str] | Any) -> PaymentReceipt | None:
    """The receipt in a response's headers, or None (no header, or not a receipt)."""
    value = headers.get("payment-response") or headers.get("x-payment-response")
    if not value:
        return None
    try:
        doc = decode_header(value)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return PaymentReceipt(
        success=doc.get("success") is True,
        tx_hash=_str(doc.get("transaction")) or None,
        network=_str(doc.get("network")),
        payer=_str(doc.get("payer")),
        raw=doc,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitResult:
    """A paid submit: the job, its access token, and the payment that paid for it."""

    job_id: str
    status: str
    token: str | None = field(default=None, repr=False)  # X-Job-Token: opens this job's status and cancel
    thread_id: str | None = None
    tx_hash: str | None = None
    network: str | None = None
    payer: str | None = None
    created_at: datetime | None = None
    expires_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, doc: Mapping[str, Any], *, token: str | None, receipt: PaymentReceipt | None) -> SubmitResult:
        return cls(
            job_id=str(doc.get("jobId") or ""),
            status=str(doc.get("status") or "pending"),
            token=token,
            thread_id=_str(doc.get("threadId")),
            tx_hash=receipt.tx_hash if receipt else None,
            network=receipt.network if receipt else None,
            payer=receipt.payer if receipt else None,
            created_at=_time(doc.get("createdAt")),
            expires_at=_time(doc.get("expiresAt")),
            raw=dict(doc),
        )
