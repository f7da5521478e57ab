"""Job records: the :class:`JobStore` protocol both backends implement, pinned by ``tests/jobs/test_job_store.py``.

* ``create`` is insert-only (an existing id raises :class:`JobExists`) and keeps at most ``max_jobs`` records:
  it drops the oldest *evictable* ones (those with a ``purge_at``: terminal jobs, front-mode bindings) to make
  room and raises :class:`JobStoreFull` when only live jobs are left;
* ``transition`` is a compare-and-set on the status: of two racing transitions out of one status, one wins;
* ``heartbeat`` / ``alive`` tell which runner instances are alive without comparing two gateways' clocks (SQLite:
  a lock file the kernel lets go when the process dies, :mod:`gateway.storage.liveness`; Redis: a key the Redis
  server expires), so that a reader whose clock is ahead never takes a live runner's job for lost (docs/jobs.md);
* every method raises :class:`gateway.errors.StoreUnavailable` when the backend cannot answer (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.jobs.model import Job, JobStatus, StatusUpdate

__all__ = ["JobStats", "JobStore"]


@dataclass(frozen=True, slots=True)
class JobStats:
    counts: dict[JobStatus, int] = field(default_factory=dict)
    completed_ms_total: int = 0  # sum of processing_ms over the completed jobs counted

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, status: JobStatus) -> int:
        return self.counts.get(status, 0)


@runtime_checkable
class JobStore(Protocol):
    async def create(self, job: Job, *, max_jobs: int) -> None:
        """Insert ``job``; evict the oldest evictable records beyond ``max_jobs - 1``. Raises ``JobExists``,
        ``JobStoreFull``."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def transition(
        self, job_id: str, *, when: frozenset[JobStatus], to: JobStatus | None, changes: Mapping[str, Any]
    ) -> tuple[bool, Job | None]:
        """If the job's status is in ``when``: set ``status = to`` (unless None) and the ``changes`` (field name
        -> value). Returns (applied, the record as it is now; None if absent)."""
        ...

    async def append_update(self, job_id: str, update: StatusUpdate, *, limit: int) -> bool:
        """Append a progress message while the job is live and has fewer than ``limit``; True if appended."""
        ...

    async def list_for_payer(
        self, payer: str, *, statuses: frozenset[JobStatus] | None, limit: int
    ) -> tuple[list[Job], int]:
        """(up to ``limit`` of ``payer``'s jobs with a status in ``statuses``, newest first; how many jobs
        ``payer`` has in all)."""
        ...

    async def stale(self, now: int, *, grace_ms: int, limit: int) -> list[Job]:
        """Live runner-owned jobs whose lease lapsed or whose deadline passed more than ``grace_ms`` ago."""
        ...

    async def purge(self, now: int) -> int:
        """Delete every record whose ``purge_at`` has passed; return how many went."""
        ...

    async def heartbeat(self, instance: str, *, ttl: float) -> None:
        """Runner ``instance`` (this process) is alive: for as long as this process lives (SQLite), for ``ttl``
        more seconds by the Redis server's clock (Redis). Called again every third of ``ttl``."""
        ...

    async def alive(self, instance: str) -> bool:
        """Whether runner ``instance`` is known alive by no gateway's clock. False once it died, and for an instance
        that left no proof of life here (it never beat, or its lock file could not be made): the lease decides."""
        ...

    async def stats(self) -> JobStats: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
