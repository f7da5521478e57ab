"""Fronting an existing jobs API: billing follows the job, and only the wallet that paid sees its job.

* **submit** (priced): the upstream's 2xx JSON answer is read (at most ``max_submit_response_bytes``), the job id
  taken from ``job_id_path``, and an ``on_paid`` hook records job -> payer (token hash, payment) once the payment
  settled, before the answer leaves with its ``X-Job-Token``. A 2xx without a readable job id becomes a 502: a
  job the payer cannot poll is not served, so under ``settlement = "after"`` it is not charged either. Any other
  status passes through untouched (a 4xx/5xx costs nothing: the middleware never settles for >= 400).
* **status / cancel** (free): only for the payer (job token or wallet signature, see :mod:`gateway.jobs.auth`);
  anyone else gets the upstream's own 404 ``Job not found``. The request is rebuilt on the canonical path of
  that job id and sent with the upstream's API key (the proxy's ``inject_headers``); the proofs are stripped.
* **list** (free, wallet signature): the upstream's list (all the gateway account's jobs) filtered to the
  caller's job ids, ``limit`` applied after filtering, ``total`` = the caller's jobs, ``filtered`` = returned.
* **health**: the upstream's, passed through (counts only).

The records kept here are bindings, not job state: the job's status lives upstream; a binding is kept for
``retention_seconds`` and is the first thing dropped when ``max_jobs`` is reached.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from gateway.config.jobs import JobsConfig
from gateway.errors import BadGateway
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from gateway.http.proxy import UpstreamAborted
from gateway.jobs.api import Kind, Match
from gateway.jobs.auth import new_token
from gateway.jobs.layer import _MAX_CACHED, JobsLayer, _Expiring, without_headers
from gateway.jobs.model import Job, JobStatus, now_ms
from gateway.storage.jobs import JobStore
from gateway.x402 import reasons
from gateway.x402.codec import loads

__all__ = ["FrontJobs", "find_job_id"]

MAX_LIST_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_JOB_ID_CHARS = 200


class _TooLarge(Exception):
    pass


class _Captured:
    """A send() that holds a 2xx answer (up to ``limit`` bytes) and lets any other status stream through."""

    def __init__(self, send: Send, limit: int) -> None:
        self._send = send
        self._limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.passing = False
        self.started = False
        self.complete = False
        self._body: list[bytes] = []
        self._size = 0

    @property
    def body(self) -> bytes:
        return b"".join(self._body)

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
            if not 200 <= self.status < 300:
                self.passing = True
                await self._send(message)
            return
        if self.passing:
            await self._send(message)
            return
        chunk: bytes = message.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit:
            raise _TooLarge
        self._body.append(chunk)
        if not message.get("more_body", False):
            self.complete = True


def find_job_id(doc: Any, path: tuple[str, ...]) -> str | None:
    """The job id at ``path`` (object keys; list indexes as digits) if it is a sane id: 1-200 printable chars."""
    node = doc
    for part in path:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, int) and not isinstance(node, bool):
        node = str(node)
    if not isinstance(node, str) or not 0 < len(node) <= MAX_JOB_ID_CHARS or not node.isprintable():
        return None
    return node


def _header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _json_answer(captured: _Captured) -> Any:
    encoding = (_header_value(captured.headers, b"content-encoding") or b"identity").strip().lower()
    if encoding not in (b"identity", b""):
        raise BadGateway("the upstream compressed its answer", reason=reasons.UPSTREAM_ANSWER_UNREADABLE)
    try:
        return loads(captured.body)
    except ValueError:
        raise BadGateway("the upstream's answer is not JSON", reason=reasons.UPSTREAM_ANSWER_UNREADABLE) from None


class FrontJobs(JobsLayer):
    def __init__(self, config: JobsConfig, store: JobStore, proxy: ASGIApp) -> None:
        super().__init__(config, store)
        self.proxy = proxy
        # job id -> its payer binding. A binding is insert-only (``create`` refuses an existing id; nothing here
        # transitions or rewrites it), so a copy is exact until the record goes: at its ``purge_at``, or earlier
        # when ``max_jobs`` evicts it, which the copy outlives by at most BINDING_CACHE_SECONDS. Absent jobs are
        # never kept: a binding written by another instance is found on the next poll.
        self._bindings = _Expiring(min(_MAX_CACHED, config.max_jobs))

    BINDING_CACHE_SECONDS = 60.0

    async def load_job(self, job_id: str) -> Job | None:
        now = now_ms()
        cached = self._bindings.get(job_id, now)
        if isinstance(cached, Job):
            return cached
        job = await self.store.get(job_id)
        if job is not None and job.purge_at is not None:
            self._bindings.put(job_id, job, min(job.purge_at, now + self.BINDING_CACHE_SECONDS * 1000))
        return job

    def _scope(self, scope: Scope, *, path: str | None = None, query: bytes | None = None, parse: bool) -> Scope:
        drop = set(self.proof_headers())
        if parse:
            drop.add(b"accept-encoding")  # we read this answer: ask for it uncompressed
        new = dict(scope)
        new["headers"] = without_headers(scope, drop)
        if path is not None:
            new["path"] = unquote(path)
            new["raw_path"] = path.encode("ascii")
        if query is not None:
            new["query_string"] = query
        return new

    async def _forward(self, scope: Scope, receive: Receive, captured: _Captured) -> None:
        try:
            await self.proxy(scope, receive, captured)
        except _TooLarge:
            raise BadGateway("the upstream's answer is too large", reason=reasons.UPSTREAM_ANSWER_TOO_LARGE) from None
        except UpstreamAborted:
            if captured.passing:
                raise
            raise BadGateway("the upstream failed while answering", reason=reasons.BAD_GATEWAY) from None
        if not captured.started:
            raise BadGateway("the upstream sent no answer", reason=reasons.BAD_GATEWAY)

    # ------------------------------------------------------------------------------------------------ submit

    async def submit(self, match: Match, scope: Scope, receive: Receive, send: Send, info: dict[str, Any]) -> None:
        captured = _Captured(send, self.config.max_submit_response_bytes)
        await self._forward(self._scope(scope, parse=True), receive, captured)
        if captured.passing:
            return  # not a 2xx: the upstream's answer went through as it was, and nothing is charged
        job_id = find_job_id(_json_answer(captured), self.config.job_id_path)
        if job_id is None:
            raise BadGateway("the upstream's answer carries no job id", reason=reasons.UPSTREAM_JOB_ID_MISSING)
        token, digest = new_token()
        now = now_ms()
        job = Job(
            job_id=job_id,
            payer=str(info["payer"]).lower(),
            status=JobStatus.PENDING,  # the binding's status; the job's own lives upstream
            created_at=now,
            token_hash=digest,
            network=str(info["network"]),
            purge_at=now + int(self.config.retention_seconds * 1000),
        )

        async def record() -> None:  # runs once the payment settled, before the answer's headers leave
            await self.store.create(job.changed(tx_hash=info.get("tx_hash")), max_jobs=self.config.max_jobs)

        info["on_paid"].append(record)
        info["job_id"] = job_id  # for the payment's ledger entry
        ours = self.config.token_header.lower().encode("latin-1")
        headers = [*(h for h in captured.headers if h[0].lower() != ours), *self.token_headers(token)]
        await send({"type": "http.response.start", "status": captured.status, "headers": headers})
        await send({"type": "http.response.body", "body": captured.body})

    # ------------------------------------------------------------------------------------------ free calls

    async def free(self, match: Match, scope: Scope, receive: Receive, send: Send) -> None:
        if match.kind == Kind.HEALTH:
            await self.proxy(self._scope(scope, parse=False), receive, send)
            return
        if match.kind == Kind.LIST:
            await self._list(match, scope, receive, send)
            return
        job = await self.owned_job(scope, match)
        path = self.routes.path_of(match.kind, job.job_id)
        await self.proxy(self._scope(scope, path=path, parse=False), receive, send)

    async def _list(self, match: Match, scope: Scope, receive: Receive, send: Send) -> None:
        _, mine, total = await self.list_caller(
            scope, match, lambda payer: self.store.list_for_payer(payer, statuses=None, limit=self.config.max_jobs)
        )
        ids = {job.job_id for job in mine}
        params = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        limit = _limit(params)
        # Ask the upstream for everything it keeps, then keep the caller's: its limit would cut before we filter.
        query = urlencode([(k, v) for k, v in params if k != "limit"] + [("limit", str(self.config.max_jobs))])
        captured = _Captured(send, MAX_LIST_RESPONSE_BYTES)
        await self._forward(self._scope(scope, query=query.encode("latin-1"), parse=True), receive, captured)
        if captured.passing:
            return
        doc = _json_answer(captured)
        items = doc.get("jobs") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise BadGateway("the upstream's job list has no jobs array", reason=reasons.UPSTREAM_ANSWER_UNREADABLE)
        path = self.config.job_id_path
        kept = [item for item in items if find_job_id(item, path) in ids][:limit]
        # (an unpaired surrogate escape in the upstream's list is written back escaped: gateway/x402/codec.py dumps)
        await send_json(send, 200, {"jobs": kept, "total": total, "filtered": len(kept)})


def _limit(params: list[tuple[str, str]], default: int = 50, maximum: int = 1000) -> int:
    for key, value in params:
        if key == "limit":
            return max(1, min(int(value), maximum)) if value.isdigit() else default
    return default
