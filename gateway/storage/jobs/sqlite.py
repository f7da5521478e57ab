"""The embedded job store: table ``jobs`` in the receipt store's SQLite file.

Same discipline as :mod:`gateway.storage.sqlite_file`: one worker thread owns the connection (the event loop never
blocks on the file), every write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken before the row
is read, so a compare-and-set cannot interleave with another process's), WAL mode, ``synchronous=FULL`` (a paid
job's record must survive a power cut as its receipt does). The record is a JSON document; the columns beside it
are the ones the queries filter and sort on.

Runner liveness (``heartbeat`` / ``alive``): each runner instance holds a lock file in ``<database>.jobs.instances``
for as long as its process lives (:class:`gateway.storage.liveness.ProcessLocks`; a directory of its own, so that
the receipt store's sweep, which forgets the heartbeats of the instances whose files it removes, never meets them).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from gateway.jobs.model import ACTIVE, Job, JobExists, JobStatus, JobStoreFull, StatusUpdate
from gateway.storage.jobs.contract import JobStats
from gateway.storage.liveness import ProcessLocks
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteJobStore"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    payer         TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    lease_until   INTEGER,
    expires_at    INTEGER,
    purge_at      INTEGER,
    processing_ms INTEGER,
    doc           TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS jobs_payer ON jobs (payer, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    "CREATE INDEX IF NOT EXISTS jobs_evictable ON jobs (created_at) WHERE purge_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_purge ON jobs (purge_at) WHERE purge_at IS NOT NULL",
)
# Every value goes through a parameter; status sets travel as one JSON array parameter (json_each).
_INSERT = (
    "INSERT INTO jobs (job_id, payer, status, created_at, lease_until, expires_at, purge_at, processing_ms, doc)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE jobs SET payer = ?, status = ?, created_at = ?, lease_until = ?, expires_at = ?, purge_at = ?,"
    " processing_ms = ?, doc = ? WHERE job_id = ?"
)
_GET = "SELECT doc FROM jobs WHERE job_id = ?"
_COUNT = "SELECT COUNT(*) FROM jobs"
_OLDEST_EVICTABLE = "SELECT job_id FROM jobs WHERE purge_at IS NOT NULL ORDER BY created_at, rowid LIMIT ?"
_DELETE = "DELETE FROM jobs WHERE job_id = ?"
_LIST = (
    "SELECT doc FROM jobs WHERE payer = :payer AND (:any OR status IN (SELECT value FROM json_each(:statuses)))"
    " ORDER BY created_at DESC, rowid DESC LIMIT :limit"
)
_COUNT_PAYER = "SELECT COUNT(*) FROM jobs WHERE payer = ?"
_STALE = (
    "SELECT doc FROM jobs WHERE status IN ('pending', 'processing') AND lease_until IS NOT NULL"
    " AND (lease_until < :now OR (expires_at IS NOT NULL AND expires_at + :grace < :now)) LIMIT :limit"
)
_PURGE = "DELETE FROM jobs WHERE purge_at IS NOT NULL AND purge_at < ?"
_STATS = "SELECT status, COUNT(*), COALESCE(SUM(processing_ms), 0) FROM jobs GROUP BY status"


def _row(job: Job) -> tuple[Any, ...]:
    doc = json.dumps(job.to_doc(), separators=(",", ":"), ensure_ascii=False)
    return (
        job.payer,
        job.status.value,
        job.created_at,
        job.runner_lease_until,
        job.expires_at,
        job.purge_at,
        job.processing_ms,
        doc,
    )


def _job(doc: str) -> Job:
    return Job.from_doc(json.loads(doc))


class _RunnerLocks(ProcessLocks):
    def held(self, instance: str) -> bool:
        """True while a process of ``instance`` holds one of its lock files: it exists, whatever any clock says.
        False once every such process died (their files are removed then), or when ``instance`` never held one
        here (a record from before runners were named, a directory that cannot be written): the lease decides."""
        return not self.gone(instance) and bool(self._files(instance))


class SQLiteJobStore:
    """:class:`gateway.storage.jobs.JobStore` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path, schema=_SCHEMA, busy_timeout=busy_timeout, what="job store", thread="x402-sqlite-jobs"
        )
        self._runners = _RunnerLocks(path + ".jobs")  # <database>.jobs.instances: see the module docstring

    def __repr__(self) -> str:
        return f"SQLiteJobStore(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute(_GET, (job_id,)).fetchone()
        return None if row is None else _job(row[0])

    @staticmethod
    def _save(conn: sqlite3.Connection, job: Job) -> None:
        conn.execute(_UPDATE, (*_row(job), job.job_id))

    def _create(self, job: Job, max_jobs: int) -> None:
        def body(conn: sqlite3.Connection) -> None:
            if conn.execute(_GET, (job.job_id,)).fetchone() is not None:
                raise JobExists("the upstream returned a job id that is already recorded")
            (total,) = conn.execute(_COUNT).fetchone()
            need = total - max_jobs + 1
            if need > 0:
                victims = [r[0] for r in conn.execute(_OLDEST_EVICTABLE, (need,)).fetchall()]
                if len(victims) < need:
                    raise JobStoreFull("the job store holds max_jobs live jobs; try again later")
                conn.executemany(_DELETE, [(v,) for v in victims])
            conn.execute(_INSERT, (job.job_id, *_row(job)))

        self._db.transaction(body)

    def _transition(
        self, job_id: str, when: frozenset[JobStatus], to: JobStatus | None, changes: Mapping[str, Any]
    ) -> tuple[bool, Job | None]:
        def body(conn: sqlite3.Connection) -> tuple[bool, Job | None]:
            job = self._load(conn, job_id)
            if job is None or job.status not in when:
                return False, job
            new = job.changed(**changes) if to is None else job.changed(status=to, **changes)
            self._save(conn, new)
            return True, new

        return self._db.transaction(body)

    def _append(self, job_id: str, update: StatusUpdate, limit: int) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            job = self._load(conn, job_id)
            if job is None or job.status not in ACTIVE or len(job.status_updates) >= limit:
                return False
            self._save(conn, job.changed(status_updates=(*job.status_updates, update)))
            return True

        return self._db.transaction(body)

    def _list(self, payer: str, statuses: frozenset[JobStatus] | None, limit: int) -> tuple[list[Job], int]:
        conn = self._db.connection()
        wanted = json.dumps(sorted(s.value for s in statuses or ()))
        rows = conn.execute(
            _LIST, {"payer": payer, "any": statuses is None, "statuses": wanted, "limit": limit}
        ).fetchall()
        (total,) = conn.execute(_COUNT_PAYER, (payer,)).fetchone()
        return [_job(r[0]) for r in rows], int(total)

    def _stale(self, now: int, grace_ms: int, limit: int) -> list[Job]:
        rows = self._db.connection().execute(_STALE, {"now": now, "grace": grace_ms, "limit": limit}).fetchall()
        return [_job(r[0]) for r in rows]

    def _purge(self, now: int) -> int:
        return self._db.transaction(lambda conn: conn.execute(_PURGE, (now,)).rowcount)

    def _stats(self) -> JobStats:
        counts: dict[JobStatus, int] = {}
        completed_ms = 0
        for status, count, ms in self._db.connection().execute(_STATS).fetchall():
            counts[JobStatus(status)] = int(count)
            if status == JobStatus.COMPLETED:
                completed_ms = int(ms)
        return JobStats(counts=counts, completed_ms_total=completed_ms)

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    # -- event-loop side ------------------------------------------------------------------------------------

    async def create(self, job: Job, *, max_jobs: int) -> None:
        await self._db.run(self._create, job, max_jobs)

    async def get(self, job_id: str) -> Job | None:
        return await self._db.read(lambda conn: self._load(conn, job_id))

    async def transition(
        self, job_id: str, *, when: frozenset[JobStatus], to: JobStatus | None, changes: Mapping[str, Any]
    ) -> tuple[bool, Job | None]:
        return await self._db.run(self._transition, job_id, when, to, dict(changes))

    async def append_update(self, job_id: str, update: StatusUpdate, *, limit: int) -> bool:
        return await self._db.run(self._append, job_id, update, limit)

    async def list_for_payer(
        self, payer: str, *, statuses: frozenset[JobStatus] | None, limit: int
    ) -> tuple[list[Job], int]:
        return await self._db.run(self._list, payer, statuses, limit)

    async def stale(self, now: int, *, grace_ms: int, limit: int) -> list[Job]:
        return await self._db.run(self._stale, now, grace_ms, limit)

    async def purge(self, now: int) -> int:
        return await self._db.run(self._purge, now)

    async def heartbeat(self, instance: str, *, ttl: float) -> None:
        # Idempotent once held; the lock lasts as long as the process, so ``ttl`` has nothing to do here.
        await self._db.run(self._runners.hold, instance)

    async def alive(self, instance: str) -> bool:
        return await self._db.run(self._runners.held, instance)

    async def stats(self) -> JobStats:
        return await self._db.run(self._stats)

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._db.aclose()
        self._runners.close()  # other instances find this one's runner gone at once
