"""The two job API styles on the wire (docs/jobs.md), rendered from one :class:`Job` record.

Style A, ``"agent"`` (seeds 000-003): ISO-8601 timestamps, ``success``, ``processingTime``, ``cancellable``;
statuses ``pending processing completed failed cancelled``. Style B, ``"messaging"`` (seed 004): epoch-ms
timestamps, ``result.message{id, content, authorId, createdAt, metadata?}``, ``processingTimeMs``; statuses
``pending processing completed failed timeout``. Errors: ``{"error": short, "message": sentence}``.

Each style only ever shows its own statuses, because its clients poll until they see a final one they know
(seed 003's loop breaks on ``completed|failed|cancelled``; seed 004's ``pollJob`` on ``completed|failed|timeout``)
and would otherwise poll until they give up:

* style A shows a timed-out job as ``failed`` with the timeout as ``error``;
* style B shows a cancelled job (the runner's cancel extension) as ``failed`` with ``error: "Job cancelled"``
  and a ``cancelledAt``.

Additive fields: style B carries ``statusUpdates`` (epoch ms) when the runner recorded progress, and the health
counts include ``cancelled``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.jobs.auth import PAYER_AUTH_REQUIRED, AuthProblem
from gateway.jobs.model import Job, JobStatus
from gateway.storage.jobs import JobStats
from gateway.x402.codec import loads

Style = Literal["agent", "messaging"]

MAX_PROMPT_CHARS = 10_000  # style A
MAX_CONTENT_CHARS = 50_000  # style B
MAX_METADATA_BYTES = 10_000
MAX_ID_CHARS = 200
MIN_TIMEOUT_MS = 1_000
# Style B's agentId when the submit names none: seed 004 types it as a UUID that is always there (the reference
# "uses the first agent"), and the runner's one agent is its upstream. Also the result message's authorId.
RUNNER_AGENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "x402-gateway:jobs-runner-agent"))


class WireError(Exception):
    """A refusal in the style's own words: ``status`` and the JSON ``body``."""

    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {**extra, "error": error, "message": message}


def not_found(job_id: str) -> WireError:
    # Exactly the upstream's answer for an unknown job *and* for another account's job.
    return WireError(404, "Job not found", f"No job found with ID {job_id[:200]}")


def job_id_required() -> WireError:
    return WireError(400, "Job ID required", "Please provide a job ID")


def authentication_required() -> WireError:
    return WireError(
        401,
        "Authentication required",
        "Sign the request with the paying wallet (X-Payer-Auth) to list its jobs",
        reason=PAYER_AUTH_REQUIRED,
    )


def payer_auth_refused(problem: AuthProblem) -> WireError:
    """401 in the seeds' words (``Authentication required``), with what is wrong in ``reason`` and ``message``."""
    return WireError(401, "Authentication required", problem.message, reason=problem.reason)


def invalid(message: str) -> WireError:
    return WireError(400, "Invalid request", message)


def iso(ms: int | None) -> str | None:
    """``2024-01-15T10:30:00.123Z`` (what JavaScript's ``toISOString`` prints)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shown_status(style: Style, job: Job) -> str:
    if style == "agent" and job.status == JobStatus.TIMEOUT:
        return JobStatus.FAILED.value
    if style == "messaging" and job.status == JobStatus.CANCELLED:
        return JobStatus.FAILED.value
    return job.status.value


def statuses_shown_as(style: Style, shown: str) -> frozenset[JobStatus]:
    """The stored statuses a list filter ``?status=<shown>`` selects."""
    try:
        status = JobStatus(shown)
    except ValueError:
        return frozenset()
    if status == JobStatus.FAILED:
        extra = JobStatus.TIMEOUT if style == "agent" else JobStatus.CANCELLED
        return frozenset({JobStatus.FAILED, extra})
    if (style, status) in (("agent", JobStatus.TIMEOUT), ("messaging", JobStatus.CANCELLED)):
        return frozenset()
    return frozenset({status})


def cancel_refused(style: Style, job: Job) -> WireError:
    """400 for cancelling a finished job, as seed 002 words it."""
    shown = shown_status(style, job)
    if shown == JobStatus.COMPLETED:
        return WireError(400, "Job already completed", "Cannot cancel a completed job", success=False)
    if shown == JobStatus.TIMEOUT:
        return WireError(400, "Job already timed out", "Cannot cancel a timed-out job", success=False)
    return WireError(400, "Job already failed", "Cannot cancel a failed job", success=False)


# ------------------------------------------------------------------------------------------- style A: agent


def agent_submitted(job: Job) -> dict[str, Any]:
    return {
        "success": True,
        "jobId": job.job_id,
        "threadId": job.thread_id,
        "status": job.status.value,
        "message": "Job submitted successfully",
    }


def agent_details(job: Job) -> dict[str, Any]:
    shown = shown_status("agent", job)
    out: dict[str, Any] = {"success": True, "jobId": job.job_id}
    if job.thread_id:
        out["threadId"] = job.thread_id
    out.update(status=shown, prompt=job.prompt, createdAt=iso(job.created_at))
    if job.status_updates:
        out["statusUpdates"] = [{"message": u.message, "timestamp": iso(u.timestamp)} for u in job.status_updates]
    if job.started_at is not None:
        out["startedAt"] = iso(job.started_at)
    if job.status == JobStatus.COMPLETED:
        out["response"] = job.response or ""
        out["richData"] = job.rich_data or []
        if job.transactions:
            out["transactions"] = job.transactions
        out["completedAt"] = iso(job.completed_at)
        out["processingTime"] = job.processing_ms
    elif shown == JobStatus.FAILED:
        out["error"] = job.error or "Job failed"
        if job.completed_at is not None:
            out["completedAt"] = iso(job.completed_at)
    elif job.status == JobStatus.CANCELLED:
        out["cancelledAt"] = iso(job.cancelled_at)
    out["cancellable"] = job.active
    return out


def agent_cancelled(job: Job) -> dict[str, Any]:
    return {
        "success": True,
        "jobId": job.job_id,
        "status": JobStatus.CANCELLED.value,
        "prompt": job.prompt,
        "createdAt": iso(job.created_at),
        "cancelledAt": iso(job.cancelled_at),
    }


# --------------------------------------------------------------------------------------- style B: messaging


def messaging_created(job: Job) -> dict[str, Any]:
    return {"jobId": job.job_id, "status": job.status.value, "createdAt": job.created_at, "expiresAt": job.expires_at}


def messaging_details(job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {
        "jobId": job.job_id,
        "status": shown_status("messaging", job),
        "agentId": job.agent_id or RUNNER_AGENT_ID,
        "userId": job.user_id,
        "prompt": job.prompt,
        "createdAt": job.created_at,
        "expiresAt": job.expires_at,
    }
    if job.status == JobStatus.COMPLETED:
        message: dict[str, Any] = {
            "id": job.result_id,
            "content": job.response or "",
            "authorId": job.agent_id or RUNNER_AGENT_ID,
            "createdAt": job.completed_at,
        }
        if job.result_metadata:
            message["metadata"] = job.result_metadata
        out["result"] = {"message": message, "processingTimeMs": job.processing_ms}
    elif job.status == JobStatus.CANCELLED:
        out["error"] = job.error or "Job cancelled"
        out["cancelledAt"] = job.cancelled_at
    elif job.error is not None:
        out["error"] = job.error
    out["metadata"] = job.metadata or {}
    if job.status_updates:
        out["statusUpdates"] = [{"message": u.message, "timestamp": u.timestamp} for u in job.status_updates]
    return out


def details(style: Style, job: Job) -> dict[str, Any]:
    return agent_details(job) if style == "agent" else messaging_details(job)


def job_list(style: Style, jobs: list[Job], total: int) -> dict[str, Any]:
    """``{jobs, total, filtered}``: total counts the caller's jobs, filtered the ones returned."""
    return {"jobs": [details(style, j) for j in jobs], "total": total, "filtered": len(jobs)}


def health(stats: JobStats, *, max_jobs: int, now: int) -> dict[str, Any]:
    """Counts by status and rates over finished jobs (completed + failed + timeout; a cancel says nothing about
    the agent). ``averageProcessingTimeMs`` averages the completed jobs still stored."""
    completed = stats.count(JobStatus.COMPLETED)
    failed = stats.count(JobStatus.FAILED)
    timeout = stats.count(JobStatus.TIMEOUT)
    finished = completed + failed + timeout

    def rate(n: int) -> float:
        return round(n / finished, 4) if finished else 0.0

    return {
        "healthy": True,
        "timestamp": now,
        "totalJobs": stats.total,
        "statusCounts": {s.value: stats.count(s) for s in JobStatus},
        "metrics": {
            "averageProcessingTimeMs": round(stats.completed_ms_total / completed) if completed else 0,
            "successRate": rate(completed),
            "failureRate": rate(failed),
            "timeoutRate": rate(timeout),
        },
        "maxJobs": max_jobs,
    }


# ----------------------------------------------------------------------------------------- submit requests


@dataclass(frozen=True, slots=True)
class NewJob:
    prompt: str
    timeout_ms: int
    thread_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    metadata: dict[str, Any] | None = None


def _document(body: bytes) -> dict[str, Any]:
    try:
        doc = loads(body) if body.strip() else None
    except ValueError:
        raise invalid("The request body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise invalid("The request body must be a JSON object")
    return doc


def _optional_id(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise invalid(f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def _timeout(doc: dict[str, Any], default_ms: int, max_ms: int) -> int:
    value = doc.get("timeoutMs")
    if value is None:
        return default_ms
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_TIMEOUT_MS <= value <= max_ms:
        raise invalid(f"timeoutMs must be an integer from {MIN_TIMEOUT_MS} to {max_ms}")
    return value


def parse_submit(style: Style, body: bytes, *, default_timeout_ms: int, max_timeout_ms: int) -> NewJob:
    """Validate a submit body in the style's rules; raises :class:`WireError` (400, nothing is charged)."""
    doc = _document(body)
    timeout_ms = _timeout(doc, default_timeout_ms, max_timeout_ms)
    if style == "agent":
        prompt = doc.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise invalid("prompt is required and must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise WireError(400, "Prompt too long", f"Prompt must be at most {MAX_PROMPT_CHARS:,} characters")
        return _storable(NewJob(prompt=prompt, timeout_ms=timeout_ms, thread_id=_optional_id(doc, "threadId")))
    user_id, content = doc.get("userId"), doc.get("content")
    if not isinstance(user_id, str) or not user_id or not isinstance(content, str) or not content:
        raise invalid("Required fields: userId, content")
    if len(user_id) > MAX_ID_CHARS:
        raise invalid(f"userId must be at most {MAX_ID_CHARS} characters")
    if len(content) > MAX_CONTENT_CHARS:
        raise invalid(f"content must be at most {MAX_CONTENT_CHARS:,} characters")
    metadata = doc.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid("metadata must be a JSON object")
        # Bytes of the JSON as UTF-8 (as the client sent it), not of Python's \uXXXX escapes of every non-ASCII
        # character, which would count an "é" as 6 bytes.
        if len(_utf8("metadata", json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))) > MAX_METADATA_BYTES:
            raise invalid(f"metadata must be at most {MAX_METADATA_BYTES:,} bytes of JSON")
    return _storable(
        NewJob(
            prompt=content,
            timeout_ms=timeout_ms,
            user_id=user_id,
            agent_id=_optional_id(doc, "agentId"),
            metadata=metadata,
        )
    )


def _utf8(name: str, text: str) -> bytes:
    """``text`` as UTF-8; a 400 if it holds an unpaired surrogate. JSON lets a client escape one (``"\\ud83d"``:
    a JavaScript client that cut a prompt at 10,000 UTF-16 units may split an emoji so), Python decodes it, and
    no store, upstream or answer can encode it: it must be refused here, before the payment settles, not found
    once the job is being recorded."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(
            f"{name} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff, e.g. half of an emoji): "
            "send valid Unicode text"
        ) from None


def _storable(new: NewJob) -> NewJob:
    """``new`` if every text it keeps (and shows, and sends upstream) is valid Unicode, else a 400 (:func:`_utf8`)."""
    for name, text in (
        ("prompt" if new.user_id is None else "content", new.prompt),
        ("threadId", new.thread_id),
        ("userId", new.user_id),
        ("agentId", new.agent_id),
    ):
        if text is not None:
            _utf8(name, text)
    return new  # metadata: checked with its size
