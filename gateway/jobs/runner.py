"""The built-in job runner: calls a slow synchronous upstream in the background and records the outcome.

A job is launched only from the submit's ``on_paid`` hook, i.e. after its payment settled: an unsettled payment
never runs a job. One task per job on the gateway instance that took the submit:

* ``pending -> processing`` (compare-and-set: a job cancelled before it started never runs), then the upstream
  call (the contract: docs/jobs.md), its progress lines appended to ``statusUpdates`` as they come;
* the call runs under the job's deadline (``created_at + timeoutMs``): past it the connection is closed and the
  job becomes ``timeout``;
* a heartbeat renews ``runner_lease_until`` every third of ``runner_lease_seconds`` while the job is processing;
  when it finds the job no longer processing (cancelled through another instance, or failed as lost) it cancels
  the call, which closes the upstream connection;
* the outcome is written with ``when={processing}``: if a cancel won the race, the result is dropped.

A job whose runner died (crash, restart) stops being heartbeaten: :meth:`JobRunner.reconcile` — on every read
and in the periodic sweep of *every* instance — marks it failed with ``"runner lost"`` once the lease lapses and
its runner's instance (recorded on the job, ``runner``) is not alive by the store's liveness, which compares no two
gateways' clocks (:meth:`gateway.storage.jobs.JobStore.alive`): an instance whose wall clock is ahead of the
runner's sees the lease lapse early, but not the runner die (docs/jobs.md). So no job of a dead runner stays
``processing`` past ``max(lease, deadline)``. A graceful shutdown waits up to ``shutdown_grace_seconds`` for
running jobs, then fails the rest the same way at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from gateway.config.jobs import JobsConfig
from gateway.errors import StoreUnavailable
from gateway.jobs.model import ACTIVE, RUNNER_LOST, Job, JobStatus, StatusUpdate, now_ms, overdue, timeout_error
from gateway.jobs.stream import (
    Failure,
    LineSplitter,
    Progress,
    Result,
    SSEParser,
    body_answer,
    framing,
    http_failure,
    ndjson_events,
    sse_events,
)
from gateway.storage.jobs import JobStore
from gateway.tasks import stop

__all__ = ["READ_GRACE_MS", "JobRunner"]

log = logging.getLogger("gateway.jobs.runner")

READ_GRACE_MS = 2_000  # a live runner times its job out at the deadline; readers step in only after this
CANCEL_WAIT_SECONDS = 5.0  # at shutdown, how long cancelled jobs get to end before the gateway stops without them
_PROCESSING = frozenset({JobStatus.PROCESSING})
_PENDING = frozenset({JobStatus.PENDING})
_ACCEPT = "application/x-ndjson, text/event-stream;q=0.9, application/json;q=0.8"


class _TimedOut:
    pass


_Alive = Callable[[Job], Awaitable[bool]]


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """(up to ``cap`` bytes of the body, whether that was all of it)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks)[:cap], False
    return b"".join(chunks), True


Outcome = Result | Failure | _TimedOut


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        config: JobsConfig,
        *,
        url: str,
        inject_headers: Mapping[str, str],
        connect_timeout: float,
        max_connections: int,
        instance: str | None = None,
    ) -> None:
        self.store = store
        # This runner's name on the jobs it runs, proved alive through the job store (heartbeat / alive).
        self.instance = instance or uuid.uuid4().hex
        self.config = config
        self._url = url
        self._headers = dict(inject_headers)
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._lease_ms = int(config.runner_lease_seconds * 1000)
        self._retention_ms = int(config.retention_seconds * 1000)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._liveness: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the injected header values: they are the upstream's API key
        return f"JobRunner(running={len(self._tasks)}, inject_headers={sorted(self._headers)})"

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(self._max_connections, 1)),
                timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        if self._liveness is None:
            await self._beat()  # before any job names this instance as its runner
            self._liveness = asyncio.create_task(self._beat_forever(), name="x402-jobs-runner-alive")

    async def _beat(self) -> None:
        try:
            await self.store.heartbeat(self.instance, ttl=self._lease_ms / 1000)
        except StoreUnavailable as exc:  # until the next beat, others judge this runner's jobs by the lease alone
            log.warning("could not prove the job runner alive: %s", exc.message)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            await self._beat()

    async def aclose(self) -> None:
        tasks = dict(self._tasks)
        if tasks and self.config.shutdown_grace_seconds > 0:
            await asyncio.wait(tasks.values(), timeout=self.config.shutdown_grace_seconds)
        left = {job_id: t for job_id, t in tasks.items() if not t.done()}
        for task in left.values():
            task.cancel()
        if left:
            # A job that does not end once cancelled (stuck in a store call) must not hold the shutdown for ever:
            # the rest of the gateway (its heartbeat, its sweeper) would go on running meanwhile.
            _done, stuck = await asyncio.wait(left.values(), timeout=CANCEL_WAIT_SECONDS)
            if stuck:
                log.warning("%d job(s) did not end when cancelled; stopping without them", len(stuck))
        now = now_ms()
        for job_id in left:
            with contextlib.suppress(StoreUnavailable):  # the lease will lapse instead
                await self.store.transition(
                    job_id,
                    when=ACTIVE,
                    to=JobStatus.FAILED,
                    changes=self._final(now, error=f"{RUNNER_LOST}: the gateway stopped before the job finished"),
                )
        liveness, self._liveness = self._liveness, None
        await stop(liveness)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------------------------------ lifecycle

    def launch(self, job: Job) -> None:
        task = asyncio.create_task(self._run(job), name=f"x402-job-{job.job_id}")
        self._tasks[job.job_id] = task

        def forget(_: asyncio.Task[None]) -> None:
            self._tasks.pop(job.job_id, None)

        task.add_done_callback(forget)

    def abort(self, job_id: str) -> None:
        """Cancel the job's upstream call if it runs here (closing the connection)."""
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()

    def _final(self, now: int, **changes: Any) -> dict[str, Any]:
        return {"completed_at": now, "purge_at": now + self._retention_ms, **changes}

    async def reconcile(self, job: Job, now: int | None = None, *, alive: _Alive | None = None) -> Job:
        """``job`` as a reader must see it: failed if its runner is lost, timed out past its deadline."""
        if job.job_id in self._tasks:
            # Running here: its runner is alive by definition, and it times the job out itself on the monotonic
            # clock. A wall clock that stepped forward must not declare it lost (docs/jobs.md).
            return job
        now = now_ms() if now is None else now
        verdict = overdue(job, now, grace_ms=READ_GRACE_MS)
        if verdict is None:
            return job
        if verdict[1] == RUNNER_LOST and await (alive or self._runner_alive)(job):
            # The lease lapsed by this instance's clock, yet the runner's instance is alive: this clock is ahead of
            # the runner's (or the runner is slow to renew). It keeps the job; its deadline still holds.
            verdict = overdue(job, now, grace_ms=READ_GRACE_MS, runner_alive=True)
            if verdict is None:
                return job
        status, error = verdict
        applied, current = await self.store.transition(
            job.job_id, when=ACTIVE, to=status, changes=self._final(now, error=error)
        )
        if applied:
            log.warning("job %s: %s", job.job_id, error)
            self.abort(job.job_id)
        return current or job

    async def _runner_alive(self, job: Job) -> bool:
        """Whether the instance that runs ``job`` is known alive, by no wall clock (docs/jobs.md)."""
        if job.runner is None or job.runner == self.instance:
            # A record from before runners were named: judged by its lease as then. Ours but not running here (its
            # task ended without writing an outcome, the store failed): nobody runs it.
            return False
        try:
            return await self.store.alive(job.runner)
        except StoreUnavailable:
            return True  # unknown: no verdict now; the next read or sweep asks again

    def liveness(self) -> _Alive:
        """:meth:`reconcile`'s ``alive`` for many jobs read at once (a sweep, a list): one question per runner."""
        known: dict[str | None, bool] = {}

        async def alive(job: Job) -> bool:
            if job.runner not in known:
                known[job.runner] = await self._runner_alive(job)
            return known[job.runner]

        return alive

    async def sweep(self) -> None:
        now = now_ms()
        alive = self.liveness()
        for job in await self.store.stale(now, grace_ms=READ_GRACE_MS, limit=1000):
            await self.reconcile(job, now, alive=alive)

    # ------------------------------------------------------------------------------------------------- run

    async def _run(self, job: Job) -> None:
        try:
            start = now_ms()
            applied, current = await self.store.transition(
                job.job_id,
                when=_PENDING,
                to=JobStatus.PROCESSING,
                changes={"started_at": start, "runner_lease_until": start + self._lease_ms, "runner": self.instance},
            )
            if not applied or current is None:
                return  # cancelled (or lost) before it started
            outcome = await self._call_with_deadline(current)
            await self._finish(current, outcome)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            log.warning("job %s: the job store failed (%s); its lease will lapse", job.job_id, exc.message)
        except Exception:
            log.exception("job %s: runner failed", job.job_id)
            with contextlib.suppress(StoreUnavailable):
                await self._finish(job, Failure("the gateway failed while running the job"))

    async def _call_with_deadline(self, job: Job) -> Outcome:
        loop = asyncio.get_running_loop()
        assert job.expires_at is not None
        deadline = loop.time() + max(0, job.expires_at - now_ms()) / 1000
        me = asyncio.current_task()
        assert me is not None
        heartbeat = asyncio.create_task(self._heartbeat(job.job_id, me))
        try:
            async with asyncio.timeout_at(deadline) as scope:
                try:
                    return await self._call(job)
                except TimeoutError:
                    if scope.expired():
                        raise
                    return Failure("the upstream did not answer in time")
                except (aiohttp.ClientError, OSError):
                    return Failure("the upstream could not be reached or dropped the connection")
        except TimeoutError:
            return _TimedOut()
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, job_id: str, main: asyncio.Task[Any]) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                applied, _ = await self.store.transition(
                    job_id, when=_PROCESSING, to=None, changes={"runner_lease_until": now_ms() + self._lease_ms}
                )
            except StoreUnavailable:
                continue
            if not applied:  # cancelled elsewhere, or declared lost: stop the upstream call
                main.cancel()
                return

    def _request_body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"jobId": job.job_id, "prompt": job.prompt, "payer": job.payer}
        optional = {"threadId": job.thread_id, "userId": job.user_id, "agentId": job.agent_id}
        body.update({k: v for k, v in optional.items() if v is not None})
        if job.metadata:
            body["metadata"] = job.metadata
        return body

    async def _call(self, job: Job) -> Result | Failure:
        assert self._session is not None, "JobRunner.start() was not awaited"
        headers = {**self._headers, "Accept": _ACCEPT, "X-Job-Id": job.job_id}
        async with self._session.post(self._url, json=self._request_body(job), headers=headers) as resp:
            if resp.status >= 300:
                return http_failure(resp.status, (await _read_capped(resp, 65536))[0])
            kind = framing(resp.headers.get("Content-Type"))
            if kind == "body":
                body, complete = await _read_capped(resp, self.config.max_result_bytes)
                if not complete:
                    return Failure("the upstream's answer exceeds max_result_bytes")
                return body_answer(body)
            lines = LineSplitter(self.config.max_result_bytes)
            sse = SSEParser()
            try:
                async for chunk in resp.content.iter_any():
                    events = ndjson_events(lines.feed(chunk)) if kind == "ndjson" else sse_events(sse.feed(chunk))
                    decided = await self._apply(job, events)
                    if decided is not None:
                        return decided  # leaving the block closes the connection: the rest is not read
                events = ndjson_events(lines.flush()) if kind == "ndjson" else sse_events(sse.flush())
            except ValueError:
                return Failure("the upstream's stream has a line over max_result_bytes")
            return await self._apply(job, events) or Failure("the upstream's stream ended without a result")

    async def _apply(self, job: Job, events: list[Progress | Result | Failure]) -> Result | Failure | None:
        for event in events:
            if not isinstance(event, Progress):
                return event
            try:
                await self.store.append_update(
                    job.job_id, StatusUpdate(event.message, now_ms()), limit=self.config.max_status_updates
                )
            except StoreUnavailable:
                log.warning("job %s: a progress message was not recorded (job store unavailable)", job.job_id)
        return None

    async def _finish(self, job: Job, outcome: Outcome) -> None:
        now = now_ms()
        if isinstance(outcome, Result):
            result = {
                "response": outcome.response,
                "rich_data": outcome.rich_data,
                "transactions": outcome.transactions,
                "result_metadata": outcome.metadata,
                "result_id": str(uuid.uuid4()),
            }
            to, changes = JobStatus.COMPLETED, self._final(now, **result)
        elif isinstance(outcome, Failure):
            to, changes = JobStatus.FAILED, self._final(now, error=outcome.error)
        else:
            to, changes = JobStatus.TIMEOUT, self._final(now, error=timeout_error(job.timeout_ms))
        applied, _ = await self.store.transition(job.job_id, when=_PROCESSING, to=to, changes=changes)
        if not applied:
            log.info("job %s: outcome dropped, the job was cancelled or declared lost meanwhile", job.job_id)
