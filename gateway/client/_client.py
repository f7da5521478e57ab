"""``AsyncX402Client``: the paying client (:mod:`._paying`) plus the jobs calls of the seeds, in Python.

    async with AsyncX402Client("https://api.example.com", account=Account.from_key(key)) as client:
        job = await client.prompt_and_wait("What is the price of ETH?", on_update=lambda u: print(u.message))
        print(job.response, job.submission.tx_hash)

Job results: ``prompt_and_wait`` and ``poll_job`` **raise** for a job that ends ``failed`` / ``cancelled`` /
``timeout`` (:class:`JobFailed`, :class:`JobCancelled`, :class:`JobTimedOut`, the final :class:`Job` attached),
like the seeds' ``pollForCompletion``, so the happy path is a plain return value; ``get_job_status`` and
``cancel_job`` return the :class:`Job` whatever its status. Status, cancel and list are free calls: the client
never pays for them (a 402 there is an :class:`ApiError`). They open the job with its ``X-Job-Token`` (given, or
kept by ``tokens`` from the submit), else with the wallet's signature (``X-Payer-Auth``); list always signs.
``get_jobs_health`` reads style B's ``/jobs/health`` (no proof: counts only). A call the gateway does not offer
(style A's list without a ``[jobs] list``, a fronted style B API's cancel) is an :class:`ApiError` with reason
``not_supported`` that says what is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from gateway.client._channels import SessionStore
from gateway.client._config import JobPaths, RetryPolicy, SessionSettings, Style, TxHashPayments
from gateway.client._errors import ApiError, JobCancelled, JobFailed, JobTimedOut, TransientError, X402ClientError
from gateway.client._models import Job, JobList, JobsHealth, StatusUpdate, SubmitResult, payment_receipt
from gateway.client._paying import PayingClient, PayWith, error_of, json_doc
from gateway.client._spend import SpendControls
from gateway.client._tokens import MemoryTokenStore, TokenStore
from gateway.client.jobauth import job_token_headers, payer_auth_headers

__all__ = ["AsyncX402Client"]

OnUpdate = Callable[[StatusUpdate], Any]
OnPoll = Callable[[Job], Any]

_NOT_OFFERED = "job_call_not_offered"  # the gateway's 404 for a call its [jobs] section does not offer
_NO_LIST = {
    "agent": "style agent's API has no list call: a gateway offers one only when its [jobs] section names it "
    '(list = "GET /agent/jobs"), and in front mode only if the upstream itself has a list',
    "messaging": "the gateway's [jobs] section offers no list call, or its upstream has none",
}


async def _call(callback: Callable[[Any], Any] | None, value: Any) -> None:
    if callback is None:
        return
    result = callback(value)
    if inspect.isawaitable(result):
        await result


class AsyncX402Client(PayingClient):
    """An ``httpx.AsyncClient`` that pays 402s with ``account`` within ``spend``, plus the jobs calls.

    * ``base_url``: the gateway (``request()`` also takes absolute URLs, e.g. any other x402 server).
    * ``account``: an ``eth_account`` ``LocalAccount``; without one a 402 is :class:`PaymentRefused`.
    * ``spend``: :class:`SpendControls` (default: at most $1.00 per payment, no budget).
    * ``pay_with``: ``"exact"`` (x402 EIP-3009 signatures, the default), ``"txhash"`` (USDC transfers, needs
      ``tx_hash`` settings), ``"auto"`` (exact, else a transfer where a tx-hash option is allowed) or
      ``"session"`` (a ``batch-settlement`` channel where offered: one deposit, then a voucher per request; else
      exact).
    * ``sessions``: :class:`SessionSettings` (deposit size, optional RPC URLs, busy retries); ``session_store``:
      where channels are kept (:class:`MemorySessionStore` by default; :class:`FileSessionStore` to reuse them in a
      later process).
    * ``retry``: :class:`RetryPolicy` (4 tries, jittered exponential backoff from 0.5 s).
    * ``style`` / ``paths``: the job API (``"agent"``: ``/agent/prompt``…, ``"messaging"``:
      ``/api/messaging/jobs``…), or explicit :class:`JobPaths`.
    * ``tokens``: where job access tokens are kept (:class:`MemoryTokenStore` by default); ``token_header``: the
      submit's token header; ``user_id``: style B's ``userId`` (default: a UUID derived from the wallet address,
      the same for every job of that wallet: seed 004's API types ``userId`` as a UUID).
    * ``transport``: an httpx transport (tests: ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        account: LocalAccount | None = None,
        spend: SpendControls | None = None,
        pay_with: PayWith = "exact",
        tx_hash: TxHashPayments | None = None,
        sessions: SessionSettings | None = None,
        session_store: SessionStore | None = None,
        style: Style = "agent",
        paths: JobPaths | None = None,
        retry: RetryPolicy | None = None,
        tokens: TokenStore | None = None,
        token_header: str = "X-Job-Token",  # noqa: S107 - a header name
        user_id: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            account=account,
            spend=spend,
            pay_with=pay_with,
            tx_hash=tx_hash,
            retry=retry,
            sessions=sessions,
            session_store=session_store,
            timeout=timeout,
            headers=headers,
            transport=transport,
        )
        self.style: Style = style
        self.paths = paths or JobPaths.for_style(style)
        self.tokens: TokenStore = tokens if tokens is not None else MemoryTokenStore()
        self.token_header = token_header
        self.user_id = user_id
        self._base_path = httpx.URL(self.base_url).path.rstrip("/") if self.base_url else ""

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", style={self.style!r})"

    # ------------------------------------------------------------------------------------------------- jobs

    def _raise_for(self, response: httpx.Response, job_id: str | None = None) -> None:
        if response.status_code < 400:
            return
        reason, message = error_of(response)
        # The gateway's own job-call refusals name their reason beside the seeds' short ``error``.
        specific = (json_doc(response) or {}).get("reason")
        reason = specific if isinstance(specific, str) else reason
        if self._retryable(response):
            raise TransientError(message, status=response.status_code, reason=reason, job_id=job_id)
        raise ApiError(message, status=response.status_code, reason=reason, job_id=job_id)

    def _document(self, response: httpx.Response, job_id: str | None = None) -> dict[str, Any]:
        self._raise_for(response, job_id)
        doc = json_doc(response)
        if doc is None:
            raise ApiError(
                "the server answered something other than a JSON object",
                status=response.status_code,
                reason="invalid_response",
                job_id=job_id,
            )
        return doc

    def _submit_body(
        self,
        text: str,
        *,
        thread_id: str | None,
        user_id: str | None,
        agent_id: str | None,
        metadata: Mapping[str, Any] | None,
        timeout_ms: int | None,
    ) -> dict[str, Any]:
        if self.style == "agent":
            body: dict[str, Any] = {"prompt": text}
            if thread_id is not None:
                body["threadId"] = thread_id
        else:
            who = user_id or self.user_id or wallet_user_id(self.account)
            body = {"userId": who, "content": text}
            if agent_id is not None:
                body["agentId"] = agent_id
            if metadata is not None:
                body["metadata"] = dict(metadata)
        if timeout_ms is not None:
            body["timeoutMs"] = timeout_ms
        return body

    async def prompt(
        self,
        text: str,
        *,
        thread_id: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        timeout_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> SubmitResult:
        """Submit (and pay for) a job; returns at once with its id, access token and payment."""
        body = self._submit_body(
            text, thread_id=thread_id, user_id=user_id, agent_id=agent_id, metadata=metadata, timeout_ms=timeout_ms
        )
        response = await self.request("POST", self.paths.submit, json=body, idempotency_key=idempotency_key)
        doc = self._document(response)
        token = response.headers.get(self.token_header)
        result = SubmitResult.parse(doc, token=token, receipt=payment_receipt(response.headers))
        if not result.job_id:
            raise ApiError("the submit answer has no jobId", status=response.status_code, reason="invalid_response")
        if token:
            self.tokens.put(self.base_url, result.job_id, token)
        return result

    def _auth(self, method: str, path: str, job_id: str | None, token: str | None) -> dict[str, str]:
        token = token or (self.tokens.get(self.base_url, job_id) if job_id else None)
        if token:
            return job_token_headers(token)
        if self.account is not None:
            return payer_auth_headers(self.account, method, self._base_path + path.split("?", 1)[0])
        raise X402ClientError(
            "no job token for this job and no wallet to sign with", reason="job_credentials_missing", job_id=job_id
        )

    async def get_job_status(self, job_id: str, *, token: str | None = None) -> Job:
        """The job as it is now (any status, no exception for failed/cancelled)."""
        path = self.paths.job(self.paths.status, job_id)
        response, _ = await self._send("GET", path, headers=self._auth("GET", path, job_id, token))
        return Job.parse(self._document(response, job_id), job_id=job_id)

    async def cancel_job(self, job_id: str, *, token: str | None = None) -> Job:
        """Cancel a pending or processing job; cancelling a cancelled job succeeds again. A finished job is an
        :class:`ApiError` (400 ``Job already completed`` / ``Job already failed``)."""
        if not self.paths.cancel:
            raise X402ClientError("this job API has no cancel call", reason="not_supported", job_id=job_id)
        path = self.paths.job(self.paths.cancel, job_id)
        response, _ = await self._send("POST", path, headers=self._auth("POST", path, job_id, token))
        if response.status_code == 404 and (json_doc(response) or {}).get("reason") == _NOT_OFFERED:
            missing = (
                "a fronted style messaging API has none (the seeds' messaging API cannot cancel; the gateway's "
                "runner mode adds POST /api/messaging/jobs/{id}/cancel)"
                if self.style == "messaging"
                else "the gateway's [jobs] section names no cancel call"
            )
            raise ApiError(
                f"the gateway offers no cancel call at POST {path}: {missing}",
                status=404,
                reason="not_supported",
                job_id=job_id,
            )
        return Job.parse(self._document(response, job_id), job_id=job_id)

    async def list_jobs(self, *, status: str | None = None, limit: int | None = None) -> JobList:
        """This wallet's jobs, newest first (needs the wallet: the list is proven by its signature)."""
        if not self.paths.list:
            raise X402ClientError("this job API has no list call", reason="not_supported")
        if self.account is None:
            raise X402ClientError("listing jobs needs the wallet that paid for them", reason="wallet_required")
        params: dict[str, str | int] = {}
        if status is not None:
            params["status"] = status
        if limit is not None:
            params["limit"] = limit
        path = self.paths.list
        headers = payer_auth_headers(self.account, "GET", self._base_path + path)
        response, _ = await self._send("GET", path, params=params or None, headers=headers)
        if _no_such_call(response):
            raise ApiError(
                f"the gateway offers no job list at GET {path}: {_NO_LIST[self.style]}",
                status=response.status_code,
                reason="not_supported",
            )
        return JobList.parse(self._document(response))

    async def get_jobs_health(self) -> JobsHealth:
        """The job service's counts by status and its rates (style B's ``GET /api/messaging/jobs/health``; free,
        no proof needed: it shows no job)."""
        if not self.paths.health:
            raise X402ClientError("this job API has no health call", reason="not_supported")
        response, _ = await self._send("GET", self.paths.health)
        if response.status_code == 404:
            raise ApiError(
                f"the gateway offers no jobs health call at GET {self.paths.health}",
                status=404,
                reason="not_supported",
            )
        return JobsHealth.parse(self._document(response))

    async def poll_job(
        self,
        job_id: str,
        *,
        interval: float = 2.0,
        max_attempts: int = 150,
        timeout: float = 300.0,
        backoff: float = 1.0,
        max_interval: float | None = None,
        on_update: OnUpdate | None = None,
        on_poll: OnPoll | None = None,
        token: str | None = None,
    ) -> Job:
        """Poll until the job is final: the first wait is ``interval`` s, each next one ``backoff`` times longer,
        at most ``max_interval`` s (default: no cap). ``backoff=1`` (the default) polls at a fixed interval, as
        seeds 000-003 do (every 2 s); ``interval=0.5, backoff=1.5, max_interval=5`` is seed 004's exponential
        strategy. ``on_update`` (sync or async) is called once per new status update, in order; ``on_poll`` with
        every Job read. Returns the completed :class:`Job`; raises :class:`JobFailed` / :class:`JobCancelled` /
        :class:`JobTimedOut` (``reason="poll_timeout"`` when ``max_attempts`` or ``timeout`` run out first)."""
        return await self._poll(
            job_id,
            interval=interval,
            max_attempts=max_attempts,
            timeout=timeout,
            backoff=backoff,
            max_interval=max_interval,
            on_update=on_update,
            on_poll=on_poll,
            token=token,
            submission=None,
        )

    async def _poll(
        self,
        job_id: str,
        *,
        interval: float,
        max_attempts: int,
        timeout: float,
        on_update: OnUpdate | None,
        on_poll: OnPoll | None,
        token: str | None,
        submission: SubmitResult | None,
        backoff: float = 1.0,
        max_interval: float | None = None,
    ) -> Job:
        waits = poll_waits(interval, backoff, max_interval)
        deadline = time.monotonic() + timeout
        seen: Counter[tuple[str, Any]] = Counter()
        job: Job | None = None
        for _ in range(max(1, max_attempts)):
            job = await self.get_job_status(job_id, token=token)
            if submission is not None:
                job = dataclasses.replace(job, submission=submission)
            # Each update once: count occurrences, so a repeated message with its own timestamp is still new.
            current: Counter[tuple[str, Any]] = Counter()
            for update in job.status_updates:
                key = update.key()
                current[key] += 1
                if current[key] > seen[key]:
                    seen[key] = current[key]
                    await _call(on_update, update)
            await _call(on_poll, job)
            if job.terminal:
                return _final(job)
            wait = next(waits)
            if time.monotonic() + wait > deadline:
                break
            await asyncio.sleep(wait)
        assert job is not None
        raise JobTimedOut(
            f"job {job_id} is still {job.status}: gave up waiting after {timeout:g} s / {max_attempts} polls",
            job=job,
            reason="poll_timeout",
        )

    async def prompt_and_wait(
        self,
        text: str,
        *,
        interval: float = 2.0,
        max_attempts: int = 150,
        timeout: float = 300.0,
        backoff: float = 1.0,
        max_interval: float | None = None,
        on_update: OnUpdate | None = None,
        on_poll: OnPoll | None = None,
        thread_id: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        timeout_ms: int | None = None,
    ) -> Job:
        """Submit, pay, and poll until the job completes (polling as :meth:`poll_job`). The returned Job (and the
        ``job`` of a raised :class:`JobError`) carries ``submission``: the job token and the payment's tx hash."""
        submitted = await self.prompt(
            text, thread_id=thread_id, user_id=user_id, agent_id=agent_id, metadata=metadata, timeout_ms=timeout_ms
        )
        return await self._poll(
            submitted.job_id,
            interval=interval,
            max_attempts=max_attempts,
            timeout=timeout,
            backoff=backoff,
            max_interval=max_interval,
            on_update=on_update,
            on_poll=on_poll,
            token=submitted.token,
            submission=submitted,
        )

    async def batch_prompts(
        self,
        prompts: Iterable[str],
        *,
        concurrency: int = 5,
        interval: float = 2.0,
        max_attempts: int = 150,
        timeout: float = 300.0,
        backoff: float = 1.0,
        max_interval: float | None = None,
    ) -> list[Job | X402ClientError]:
        """Submit every prompt (at most ``concurrency`` submits at once) and wait for all of them. Returns, in the
        prompts' order, the completed Job or the :class:`X402ClientError` that prompt ended with."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        gate = asyncio.Semaphore(concurrency)

        async def one(text: str) -> Job | X402ClientError:
            try:
                async with gate:
                    submitted = await self.prompt(text)
                return await self._poll(
                    submitted.job_id,
                    interval=interval,
                    max_attempts=max_attempts,
                    timeout=timeout,
                    backoff=backoff,
                    max_interval=max_interval,
                    on_update=None,
                    on_poll=None,
                    token=submitted.token,
                    submission=submitted,
                )
            except X402ClientError as exc:
                return exc

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def wallet_user_id(account: LocalAccount | None) -> str:
    """Style B's default ``userId``: a UUID (seed 004's API types it ``UUID``, and one that checks refuses an
    address), derived from the wallet's address so that every job of a wallet names the same user."""
    if account is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "x402-gateway:wallet:" + account.address.lower()))


def _no_such_call(response: httpx.Response) -> bool:
    """Is this the answer to a list call the gateway does not offer? The gateway's own list answers 401 only with
    a ``payer_auth_*`` reason; a 404 (there is no job id to be unknown), or a 401 without one (the request went on
    to an upstream that has no such call and wants its API key), means there is no list here at all."""
    if response.status_code not in (401, 404):
        return False
    reason = (json_doc(response) or {}).get("reason")
    return not (isinstance(reason, str) and reason.startswith("payer_auth_"))


def poll_waits(interval: float, backoff: float = 1.0, max_interval: float | None = None) -> Iterator[float]:
    """The waits between polls: ``interval``, then each ``backoff`` times the one before, capped at
    ``max_interval``."""
    if interval < 0 or backoff < 1.0 or (max_interval is not None and max_interval < 0):
        raise ValueError("interval and max_interval must be >= 0 and backoff >= 1")  # now, not at the first wait

    def waits() -> Iterator[float]:
        wait = interval
        while True:
            yield wait if max_interval is None else min(wait, max_interval)
            wait *= backoff

    return waits()


def _final(job: Job) -> Job:
    if job.status == "completed":
        return job
    if job.status == "cancelled":
        raise JobCancelled(f"job {job.job_id} was cancelled", job=job)
    if job.status == "timeout":
        raise JobTimedOut(f"job {job.job_id} timed out: {job.error or 'no answer in time'}", job=job)
    raise JobFailed(f"job {job.job_id} failed: {job.error or 'no reason given'}", job=job)
