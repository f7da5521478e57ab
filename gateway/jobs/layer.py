"""What both jobs modes share: two ASGI faces around the payment middleware, the payer check, the sweeper.

The gateway composes ``Health -> outer -> PaymentMiddleware -> inner -> UpstreamProxy``:

* ``outer`` answers the free calls (status, cancel, list, health) *before* the payment middleware, so they can
  never be priced and ``server.unpriced = "refuse"`` does not hide them;
* ``inner`` takes the priced submit *after* the middleware has verified the payment, where
  ``scope["state"]["x402"]`` says who paid and its ``on_paid`` hooks run once the payment settled.

A path inside the job API that no template matches exactly (another letter case, another method, a sub-path of
a job) gets a 404 from ``outer`` (:meth:`JobRoutes.shadowed`): it must not reach the upstream with its API key
and without the payer check. Everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from gateway.config.jobs import JobsConfig
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, StoreUnavailable
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, header, send_error, send_json
from gateway.http.context import request_id_of
from gateway.http.cors import cors_preflight
from gateway.jobs.api import FREE_KINDS, Kind, Match
from gateway.jobs.auth import (
    PAYER_AUTH_HEADER,
    SignedRequest,
    bearer_token,
    header_problem,
    mistaken_signers,
    payer_auth_signers,
    token_matches,
    wrong_message,
)
from gateway.jobs.model import Job, now_ms
from gateway.jobs.wire import WireError, authentication_required, job_id_required, not_found, payer_auth_refused
from gateway.ops.events import Observer, RequestRecord, notify
from gateway.storage.jobs import JobStore
from gateway.tasks import stop
from gateway.x402 import reasons

log = logging.getLogger("gateway.jobs")

_PAYER_AUTH = PAYER_AUTH_HEADER.lower().encode("latin-1")
_MAX_CACHED = 16_384  # verified X-Payer-Auth headers (and, in front mode, payer bindings) kept in memory


class _Expiring:
    """A bounded map whose entries lapse at their own deadline (oldest inserted dropped first when full)."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._items: dict[Any, tuple[Any, float]] = {}

    def get(self, key: Any, now: float) -> Any:
        hit = self._items.get(key)
        if hit is None:
            return None
        if now > hit[1]:
            del self._items[key]
            return None
        return hit[0]

    def put(self, key: Any, value: Any, until: float) -> None:
        items = self._items
        if key not in items and len(items) >= self._limit:
            del items[next(iter(items))]
        items[key] = (value, until)

    def pop(self, key: Any) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class _ClientGone(Exception):
    pass


class JobsLayer:
    """Base of :class:`~gateway.jobs.front.FrontJobs` and :class:`~gateway.jobs.serve.RunnerJobs`."""

    def __init__(self, config: JobsConfig, store: JobStore) -> None:
        self.config = config
        self.store = store
        self.routes = config.routes
        self._token_header = config.token_header.lower().encode("latin-1")
        self._sweeper: asyncio.Task[None] | None = None
        # (header value, method, path) -> the address that signed it, until the header goes stale. Recovering a
        # signature is deterministic, so a hit answers exactly what verify_payer_auth would (it is re-checked
        # against the clock on every use); failures are never kept.
        self._signers = _Expiring(_MAX_CACHED)
        # Told about the free job calls this layer answers itself (the gateway passes its access log and metrics).
        self.observers: Sequence[Observer] = ()

    # ------------------------------------------------------------------------------------------- ASGI faces

    def outer(self, app: ASGIApp) -> ASGIApp:
        async def outer(scope: Scope, receive: Receive, send: Send) -> None:
            match = self.routes.match(scope["method"], scope["path"]) if scope["type"] == "http" else None
            if match is None and cors_preflight(scope) is not None:
                # A browser's CORS preflight of a job call is no job call: it goes on like any preflight (passed to
                # the upstream unpriced and bodiless, docs/threat-model.md T38), never refused as one not offered.
                await app(scope, receive, send)
                return
            if match is None and scope["type"] == "http" and self.routes.shadowed(scope["path"]):
                refused = RequestRecord.of_scope(
                    scope, request_id_of(scope), status=404, outcome="refused", reason=reasons.JOB_CALL_NOT_OFFERED
                )
                await send_json(
                    send,
                    404,
                    {
                        "error": "Not found",
                        "message": "This job API call is not offered",
                        "reason": reasons.JOB_CALL_NOT_OFFERED,
                    },
                )
                notify(self.observers, refused)
                return
            if match is None or match.kind not in FREE_KINDS:
                await app(scope, receive, send)
                return
            # Answered before the payment layer, so told to the observers (access log, metrics) from here.
            record = RequestRecord.of_scope(scope, request_id_of(scope)) if self.observers else None
            try:
                await self._answer(self.free, match, scope, receive, send, record)
            finally:
                if record is not None:
                    notify(self.observers, record)

        return outer

    def inner(self, app: ASGIApp) -> ASGIApp:
        async def inner(scope: Scope, receive: Receive, send: Send) -> None:
            match = self.routes.match(scope["method"], scope["path"]) if scope["type"] == "http" else None
            if match is None or match.kind != Kind.SUBMIT:
                await app(scope, receive, send)
                return
            info = scope.get("state", {}).get("x402")
            if not isinstance(info, dict) or "on_paid" not in info:
                # Fail closed: a submit that reached us without a verified payment must not start a job.
                log.error("jobs submit reached without a payment: is the submit route priced?")
                await send_error(
                    send, GatewayError("the job submit route is not priced", reason=reasons.INTERNAL_ERROR)
                )
                return
            await self._answer(lambda m, s, r, se: self.submit(m, s, r, se, info), match, scope, receive, send)

        return inner

    async def _answer(
        self,
        handler: Any,
        match: Match,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord | None = None,
    ) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if record is not None:
                    record.status = message["status"]
            await send(message)

        try:
            if match.kind in (Kind.STATUS, Kind.CANCEL) and not match.job_id:
                raise job_id_required()
            await handler(match, scope, receive, tracking_send)
        except WireError as exc:
            if not started:
                if record is not None and isinstance(exc.body.get("reason"), str):
                    record.reason = exc.body["reason"]
                await send_json(tracking_send, exc.status, exc.body)
        except GatewayError as exc:
            if started:
                log.warning("jobs %s failed after its answer started: %s", match.kind.value, exc.reason)
            else:
                if record is not None:
                    record.reason = exc.reason
                await send_error(tracking_send, exc)
        except _ClientGone:
            return

    async def submit(self, match: Match, scope: Scope, receive: Receive, send: Send, info: dict[str, Any]) -> None:
        raise NotImplementedError

    async def free(self, match: Match, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- payer checks

    def payer_proof(self, scope: Scope, match: Match) -> str | None:
        """The address whose signature (X-Payer-Auth) this request carries, or None."""
        signers = self.payer_signers(scope, match)
        return signers[0] if signers else None

    def payer_signers(self, scope: Scope, match: Match) -> tuple[str, ...]:
        """Who signed X-Payer-Auth for this request: one address per accepted spelling of the path (as sent, and
        decoded with dot segments resolved; usually the same, so one), or () if the header is missing,
        malformed or stale."""
        value = header(scope, _PAYER_AUTH)
        if value is None:
            return ()
        now = int(time.time())
        skew = self.config.auth_max_skew_seconds
        raw = _raw_path(scope, match)
        key = (value, scope["method"], match.path, raw)
        cached = self._signers.get(key, now)
        if cached is not None:
            signers, timestamp = cached
            if abs(now - timestamp) <= skew:  # the clock may also have stepped back
                return tuple(signers)
            self._signers.pop(key)
        found = payer_auth_signers(value, scope["method"], (raw, match.path), now=now, max_skew=skew)
        if found:
            timestamp = int(value.decode("latin-1").strip().partition(".")[0])  # well formed: it verified
            self._signers.put(key, (found, timestamp), timestamp + skew)
        return found

    def opens(self, job: Job, scope: Scope, match: Match) -> bool:
        """Does this request prove it comes from ``job``'s payer (its token, or its wallet's signature)?"""
        token = bearer_token(header(scope, b"authorization"), header(scope, self._token_header))
        if token_matches(token, job.token_hash):
            return True
        return job.payer in self.payer_signers(scope, match)

    async def owned_job(self, scope: Scope, match: Match) -> Job:
        """The job named by the request if the caller proves it paid for it; else the upstream's own 404, or a
        401 saying what is wrong with an X-Payer-Auth header (:meth:`payer_auth_refusal`)."""
        assert match.job_id
        job = await self.load_job(match.job_id)
        if job is not None and self.opens(job, scope, match):
            return job
        refusal = self.payer_auth_refusal(scope, match, job.payer if job is not None else None)
        raise refusal if refusal is not None else not_found(match.job_id)

    def payer_auth_refusal(self, scope: Scope, match: Match, payer: str | None) -> WireError | None:
        """A 401 for an X-Payer-Auth header that proves nothing for a reason that says nothing about any job: it
        is malformed or stale (whoever sent it, whatever the job), or ``payer``'s own key signed a recognisably
        wrong text (only the payer can make that signature). None: answer as for an unknown job."""
        value = header(scope, _PAYER_AUTH)
        if value is None:
            return None
        problem = header_problem(value, now=int(time.time()), max_skew=self.config.auth_max_skew_seconds)
        if problem is None and payer is not None:
            request = _signed_request(scope, match)
            what = next((w for signer, w in mistaken_signers(value, request) if signer == payer), None)
            problem = wrong_message(value, request, what) if what is not None else None
        return payer_auth_refused(problem) if problem is not None else None

    async def list_caller(
        self, scope: Scope, match: Match, fetch: Callable[[str], Awaitable[tuple[list[Job], int]]]
    ) -> tuple[str, list[Job], int]:
        """(the wallet a list call proves, ``fetch(wallet)``). A header that proves no wallet is a 401 that says
        why; one whose wallet has no jobs at all, but that recovers a wallet with jobs when read as a common
        mistake (the path with its query string...), is a 401 naming the mistake, not a silent empty list."""
        value = header(scope, _PAYER_AUTH)
        signers = self.payer_signers(scope, match)
        if value is None or not signers:
            problem = None if value is None else self.payer_auth_refusal(scope, match, None)
            raise problem or authentication_required()
        jobs, total = await fetch(signers[0])
        if total:
            return signers[0], jobs, total
        for other in signers[1:]:
            found = await fetch(other)
            if found[1]:
                return other, *found
        request = _signed_request(scope, match)
        for signer, what in mistaken_signers(value, request):
            if (await self.store.list_for_payer(signer, statuses=None, limit=1))[1]:
                raise payer_auth_refused(wrong_message(value, request, what))
        return signers[0], jobs, total

    async def load_job(self, job_id: str) -> Job | None:
        """The job record to check a caller against (front mode keeps its immutable bindings in memory)."""
        return await self.store.get(job_id)

    def proof_headers(self) -> frozenset[bytes]:
        """Request headers that carry our proofs: never forwarded to the upstream."""
        return frozenset({b"authorization", _PAYER_AUTH, self._token_header})

    def token_headers(self, token: str) -> list[tuple[bytes, bytes]]:
        name = self.config.token_header.encode("latin-1")
        return [(name.lower(), token.encode("ascii")), (b"access-control-expose-headers", name)]

    # ------------------------------------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        await self.store.ping()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="x402-jobs-sweeper")

    async def shutdown(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        await stop(sweeper)
        await self.store.aclose()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_seconds)
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("job sweep skipped: %s", exc.message)
            except Exception:
                log.exception("job sweep failed")

    async def sweep(self) -> None:
        """Delete the records whose ``purge_at`` passed (the runner also fails lost jobs first)."""
        await self.store.purge(now_ms())


async def read_body(receive: Receive, *, limit: int, chunk_timeout: float) -> bytes:
    """The whole request body, at most ``limit`` bytes (413 beyond), each chunk within ``chunk_timeout``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(chunk_timeout):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout("request body not received in time") from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("request body exceeds the limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _raw_path(scope: Scope, match: Match) -> str:
    """The request path as sent (escapes intact, no query string), as a client signs it."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) and raw else match.path


def _signed_request(scope: Scope, match: Match) -> SignedRequest:
    host = header(scope, b"host")
    scheme = scope.get("scheme", "http")
    origin = f"{scheme}://{host.decode('latin-1')}" if host else None
    query = scope.get("query_string", b"").decode("latin-1")
    return SignedRequest(scope["method"], _raw_path(scope, match), query, origin)


def without_headers(scope: Scope, drop: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    dropped = frozenset(drop)
    return [(k, v) for k, v in scope["headers"] if k.lower() not in dropped]
