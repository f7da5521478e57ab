"""The job record: one paid job, whatever API style serves it, and the rules every reader applies to it.

A record binds a job to the wallet that paid for it (``payer``, lowercase) and to that payment (``tx_hash``,
``network``), holds the SHA-256 of the job's access token (never the token), and, for jobs the gateway runs
itself, the whole job: prompt, status, progress, result. Times are epoch milliseconds (both API styles are
rendered from them by :mod:`gateway.jobs.wire`).

Life of a job the runner owns::

    pending --runner starts--> processing --upstream answers--> completed | failed
       |                           |--deadline passes--------> timeout
       '----------cancel-----------'-------------------------> cancelled
       '--runner_lease_until lapses, its runner's instance dead (the gateway died)--> failed ("runner lost")

Every change of status is a compare-and-set in the store, so a cancel racing a completion has one winner. A
record becomes *evictable* once it has a ``purge_at`` (terminal jobs, and the payer bindings kept in front mode):
the store drops the oldest evictable records first when ``max_jobs`` is reached and deletes them after
``purge_at``. A live job is never evicted.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from gateway.errors import BadGateway, ServiceUnavailable
from gateway.x402 import reasons

__all__ = [
    "ACTIVE",
    "RUNNER_LOST",
    "TERMINAL",
    "Job",
    "JobExists",
    "JobStatus",
    "JobStoreFull",
    "StatusUpdate",
    "now_ms",
    "overdue",
]

RUNNER_LOST = "runner lost"


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


ACTIVE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})
TERMINAL = frozenset(JobStatus) - ACTIVE


class JobExists(BadGateway):
    """A job id is already recorded: an upstream that reuses ids must not hand one payer's job to another."""

    default_reason = reasons.JOB_ID_REUSED


class JobStoreFull(ServiceUnavailable):
    """``max_jobs`` live jobs exist and none can be evicted: refuse before anyone pays for a job we cannot keep."""

    default_reason = reasons.JOB_STORE_FULL


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    message: str
    timestamp: int  # epoch ms


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    payer: str  # lowercase 0x address of the wallet that paid
    status: JobStatus
    created_at: int  # epoch ms
    prompt: str = ""
    thread_id: str | None = None
    agent_id: str | None = None
    user_id: str | None = None
    metadata: dict[str, Any] | None = None
    timeout_ms: int | None = None
    expires_at: int | None = None  # created_at + timeout_ms: the runner's deadline (style B's expiresAt)
    started_at: int | None = None
    completed_at: int | None = None  # completed, failed or timed out
    cancelled_at: int | None = None
    response: str | None = None
    rich_data: list[Any] | None = None
    transactions: list[Any] | None = None
    result_id: str | None = None  # style B's result.message.id
    result_metadata: dict[str, Any] | None = None
    status_updates: tuple[StatusUpdate, ...] = ()
    error: str | None = None
    token_hash: str | None = None  # hex SHA-256 of the job access token
    tx_hash: str | None = None
    network: str | None = None
    runner_lease_until: int | None = None  # None: no runner (front mode)
    runner: str | None = None  # the runner's instance name; None: a record written before runners were named
    purge_at: int | None = None  # None: live, never evicted or purged

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def processing_ms(self) -> int | None:
        """Style A's processingTime and style B's processingTimeMs: creation to completion."""
        if self.status != JobStatus.COMPLETED or self.completed_at is None:
            return None
        return max(0, self.completed_at - self.created_at)

    def changed(self, **changes: Any) -> Job:
        return replace(self, **changes)

    # -- serialisation (both backends) ---------------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        """JSON-able dict of every field (the SQLite row's document, the Redis hash before encoding)."""
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "status_updates":
                value = [{"message": u.message, "timestamp": u.timestamp} for u in value]
            elif f.name == "status":
                value = str(value)
            doc[f.name] = value
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Job:
        known = _JOB_FIELDS
        kwargs = {k: v for k, v in doc.items() if k in known}
        kwargs["status"] = JobStatus(kwargs["status"])
        kwargs["status_updates"] = tuple(
            StatusUpdate(str(u["message"]), int(u["timestamp"])) for u in kwargs.get("status_updates") or ()
        )
        return cls(**kwargs)


_JOB_FIELDS = frozenset(f.name for f in fields(Job))

# Field codec for stores that keep one string per field (Redis hashes): "" is None, JSON for containers.
_INT_FIELDS = frozenset(
    f.name for f in fields(Job) if f.type in ("int", "int | None") and f.name not in ("status_updates",)
)
_JSON_FIELDS = frozenset({"metadata", "rich_data", "transactions", "result_metadata"})


def encode_field(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in _JSON_FIELDS:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if name in _INT_FIELDS:
        return str(int(value))
    return str(value)


def decode_field(name: str, raw: str) -> Any:
    if raw == "" and name not in ("prompt", "status"):
        return None
    if name in _JSON_FIELDS:
        return json.loads(raw)
    if name in _INT_FIELDS:
        return int(raw)
    return raw


def now_ms() -> int:
    return int(time.time() * 1000)


def overdue(job: Job, now: int, *, grace_ms: int, runner_alive: bool = False) -> tuple[JobStatus, str] | None:
    """What a live runner-owned job must become, read at ``now``, if its runner is gone or its deadline passed.

    A lapsed lease means the gateway running it died (restart, crash): the job fails with "runner lost" rather
    than staying ``processing`` for ever. ``runner_alive``: the reader knows the runner's instance is alive
    (:meth:`gateway.jobs.runner.JobRunner.reconcile` asks the store only once the lease lapsed by the reader's
    clock); a lease lapsed by that clock then proves nothing, as the clock may be ahead of the runner's
    (docs/jobs.md). A deadline passed by more than ``grace_ms`` (the live runner times its own jobs out at the
    deadline; the grace lets it win) reads as ``timeout``.
    """
    if not job.active or job.runner_lease_until is None:
        return None
    if job.runner_lease_until < now and not runner_alive:
        return JobStatus.FAILED, RUNNER_LOST
    if job.expires_at is not None and job.expires_at + grace_ms < now:
        return JobStatus.TIMEOUT, timeout_error(job.timeout_ms)
    return None


def timeout_error(timeout_ms: int | None) -> str:
    return f"Job timed out after {timeout_ms} ms" if timeout_ms else "Job timed out"
