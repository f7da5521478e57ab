"""Runner mode: the gateway itself serves the job API (style A or B) in front of a synchronous upstream.

* **submit** (priced): the body is validated in the style's rules (400 costs nothing), a live-job capacity check
  answers 503 before any money moves, and the answer (202 style A / 201 style B, with ``X-Job-Token``) leaves at
  once. The record is written and the job launched by the ``on_paid`` hook, i.e. only once the payment settled.
* **status / cancel** (free, payer only, else 404 ``Job not found``): read from the store, so any instance
  answers; a record whose runner is lost or whose deadline passed is settled on read (:meth:`JobRunner.reconcile`).
  Cancel is idempotent, aborts the upstream call, and answers 400 ``Job already completed`` / ``failed``.
* **list** (free, wallet signature): the caller's jobs, newest first, ``?status=&limit=`` (default 50).
* **health**: counts by status and rates (:func:`gateway.jobs.wire.health`).
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any
from urllib.parse import parse_qsl

from gateway.config.jobs import JobsConfig
from gateway.http.asgi import Receive, Scope, Send, send_json
from gateway.jobs.api import Kind, Match
from gateway.jobs.auth import new_token
from gateway.jobs.layer import JobsLayer, read_body
from gateway.jobs.model import ACTIVE, Job, JobStatus, JobStoreFull, now_ms
from gateway.jobs.runner import JobRunner
from gateway.jobs.wire import (
    agent_cancelled,
    agent_submitted,
    cancel_refused,
    details,
    health,
    invalid,
    job_list,
    messaging_created,
    parse_submit,
    statuses_shown_as,
)
from gateway.storage.jobs import JobStore

__all__ = ["RunnerJobs"]

MAX_SUBMIT_BODY = 256 * 1024  # 50,000 chars of content (<= 200 KB UTF-8) + 10 KB of metadata + envelope


class RunnerJobs(JobsLayer):
    def __init__(self, config: JobsConfig, store: JobStore, runner: JobRunner, *, body_timeout: float) -> None:
        super().__init__(config, store)
        self.runner = runner
        self.style = config.wire
        self._body_timeout = body_timeout

    async def startup(self) -> None:
        await self.runner.start()
        await super().startup()

    async def shutdown(self) -> None:
        await self.runner.aclose()
        await super().shutdown()

    async def sweep(self) -> None:
        await self.runner.sweep()
        await super().sweep()

    # ------------------------------------------------------------------------------------------------ submit

    def _new_ids(self) -> tuple[str, str | None]:
        if self.style == "agent":
            return f"job_{secrets.token_hex(12)}", f"thr_{secrets.token_hex(8)}"
        return str(uuid.uuid4()), None

    async def submit(self, match: Match, scope: Scope, receive: Receive, send: Send, info: dict[str, Any]) -> None:
        body = await read_body(receive, limit=MAX_SUBMIT_BODY, chunk_timeout=self._body_timeout)
        cfg = self.config
        new = parse_submit(
            self.style, body, default_timeout_ms=cfg.default_timeout_ms, max_timeout_ms=cfg.max_timeout_ms
        )
        stats = await self.store.stats()
        if sum(stats.count(s) for s in ACTIVE) >= cfg.max_jobs:
            raise JobStoreFull("the gateway runs max_jobs jobs; try again later")
        job_id, thread_id = self._new_ids()
        token, digest = new_token()
        now = now_ms()
        job = Job(
            job_id=job_id,
            payer=str(info["payer"]).lower(),
            status=JobStatus.PENDING,
            created_at=now,
            prompt=new.prompt,
            thread_id=new.thread_id or thread_id,
            agent_id=new.agent_id,
            user_id=new.user_id,
            metadata=new.metadata,
            timeout_ms=new.timeout_ms,
            expires_at=now + new.timeout_ms,
            token_hash=digest,
            network=str(info["network"]),
            runner_lease_until=now + int(cfg.runner_lease_seconds * 1000),
        )

        async def start() -> None:  # the payment settled: record the job, then run it
            lease_until = now_ms() + int(cfg.runner_lease_seconds * 1000)
            paid = job.changed(tx_hash=info.get("tx_hash"), runner_lease_until=lease_until, runner=self.runner.instance)
            await self.store.create(paid, max_jobs=cfg.max_jobs)
            self.runner.launch(paid)

        info["on_paid"].append(start)
        info["job_id"] = job_id  # for the payment's ledger entry
        if self.style == "agent":
            await send_json(send, 202, agent_submitted(job), self.token_headers(token))
        else:
            await send_json(send, 201, messaging_created(job), self.token_headers(token))

    # ------------------------------------------------------------------------------------------ free calls

    async def free(self, match: Match, scope: Scope, receive: Receive, send: Send) -> None:
        if match.kind == Kind.HEALTH:
            await send_json(send, 200, health(await self.store.stats(), max_jobs=self.config.max_jobs, now=now_ms()))
        elif match.kind == Kind.LIST:
            await self._list(match, scope, send)
        elif match.kind == Kind.STATUS:
            job = await self.runner.reconcile(await self.owned_job(scope, match))
            await send_json(send, 200, details(self.style, job))
        else:
            await self._cancel(match, scope, send)

    async def _cancel(self, match: Match, scope: Scope, send: Send) -> None:
        job = await self.runner.reconcile(await self.owned_job(scope, match))
        now = now_ms()
        applied, current = await self.store.transition(
            job.job_id,
            when=ACTIVE,
            to=JobStatus.CANCELLED,
            changes={"cancelled_at": now, "purge_at": now + int(self.config.retention_seconds * 1000)},
        )
        if applied:
            self.runner.abort(job.job_id)  # here; elsewhere the owner's heartbeat sees the cancel
        current = current or job
        if current.status != JobStatus.CANCELLED:
            raise cancel_refused(self.style, current)
        body = agent_cancelled(current) if self.style == "agent" else details(self.style, current)
        await send_json(send, 200, body)

    async def _list(self, match: Match, scope: Scope, send: Send) -> None:
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        statuses = statuses_shown_as(self.style, params["status"]) if params.get("status") else None
        raw_limit = params.get("limit", "50")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise invalid("limit must be an integer from 1 to 1000")
        _, jobs, total = await self.list_caller(
            scope, match, lambda payer: self.store.list_for_payer(payer, statuses=statuses, limit=int(raw_limit))
        )
        now = now_ms()
        alive = self.runner.liveness()
        jobs = [await self.runner.reconcile(job, now, alive=alive) if job.active else job for job in jobs]
        await send_json(send, 200, job_list(self.style, jobs, total))
