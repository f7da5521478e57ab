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
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.config.jobs import JobsConfig
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, StoreUnavailable
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, header, send_error, send_json
from gateway.http.context import request_id_of
from gateway.jobs.api import FREE_KINDS, Kind, Match
from gateway.jobs.auth import PAYER_AUTH_HEADER, bearer_token, token_matches, verify_payer_auth
from gateway.jobs.model import Job, now_ms
from gateway.jobs.wire import WireError, job_id_required, not_found
from gateway.ops.events import Observer, RequestRecord, notify
from gateway.storage.jobs import JobStore
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
            if match is None and scope["type"] == "http" and self.routes.shadowed(scope["path"]):
                refused = RequestRecord.of_scope(
                    scope, request_id_of(scope), status=404, outcome="refused", reason=reasons.JOB_CALL_NOT_OFFERED
                )
                await send_json(send, 404, {"error": "Not found", "message": "This job API call is not offered"})
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
        value = header(scope, _PAYER_AUTH)
        if value is None:
            return None
        now = int(time.time())
        skew = self.config.auth_max_skew_seconds
        key = (value, scope["method"], match.path)
        cached = self._signers.get(key, now)
        if cached is not None:
            signer, timestamp = cached
            if abs(now - timestamp) <= skew:  # the clock may also have stepped back
                return str(signer)
            self._signers.pop(key)
        signer = verify_payer_auth(value, scope["method"], match.path, now=now, max_skew=skew)
        if signer is not None:
            timestamp = int(value.decode("latin-1").strip().partition(".")[0])  # well formed: it verified
            self._signers.put(key, (signer, timestamp), timestamp + skew)
        return signer

    def opens(self, job: Job, scope: Scope, match: Match) -> bool:
        """Does this request prove it comes from ``job``'s payer (its token, or its wallet's signature)?"""
        token = bearer_token(header(scope, b"authorization"), header(scope, self._token_header))
        if token_matches(token, job.token_hash):
            return True
        return self.payer_proof(scope, match) == job.payer

    async def owned_job(self, scope: Scope, match: Match) -> Job:
        """The job named by the request if the caller proves it paid for it; else the upstream's own 404."""
        assert match.job_id
        job = await self.load_job(match.job_id)
        if job is None or not self.opens(job, scope, match):
            raise not_found(match.job_id)
        return job

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
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
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


def without_headers(scope: Scope, drop: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    dropped = frozenset(drop)
    return [(k, v) for k, v in scope["headers"] if k.lower() not in dropped]
