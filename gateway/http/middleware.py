"""``PaymentMiddleware``: pure ASGI, usable in any Starlette/FastAPI app and the heart of the reverse proxy.

For a priced route: no payment -> 402 challenge; a payment -> claim and verify it, then settle before calling the
app (``settlement = "before"``) or after the app's status line says it succeeded (``"after"``). The response
start is held until the payment outcome is known, then the body streams through untouched (never buffered),
as Starlette's own GZipMiddleware holds ``http.response.start``. Guarantees:

* nothing is served unless its payment settled (a failed settlement swallows the app's body and answers 402,
  or 503 if the outcome is unknown);
* nothing is charged for a request that was not served: only a 2xx (or a WebSocket the app accepted) is
  content; a 3xx, 4xx or 5xx is not (under ``after``: no settlement; under ``before``: the paid payment stays
  usable for a retry until one request succeeds with it);
* a fault of ours (store, chain) is a 5xx, never a 402.

It is over ~400 lines because it holds the one paid-request flow end to end, read top to bottom; what is not
that flow lives beside it (``cors``: preflights; ``websocket``: handshakes in HTTP terms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

import aiohttp

from gateway.config import GatewayConfig
from gateway.engine.engine import AnyPaidRequest, PaymentEngine
from gateway.engine.ledger import Ledger, LostSettlements
from gateway.engine.sessions import SessionRequest
from gateway.errors import (
    BadRequest,
    GatewayError,
    Resynchronise,
    ServiceUnavailable,
    SettlementFailed,
    StoreUnavailable,
)
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, header, lifespan_hooks, send_error
from gateway.http.context import RequestContext, request_context, strip_method_override
from gateway.http.cors import cors_preflight, without_body
from gateway.http.metering import metering_send
from gateway.http.websocket import WebSocketSend, http_terms
from gateway.ops.events import Limiter, Observer, PaymentVerification, RequestRecord, notify
from gateway.schemes.base import Presented, PricedRoute
from gateway.schemes.txhash.scheme import TxAttempt
from gateway.storage import open_store
from gateway.storage.denylist import DenyList, open_denylist
from gateway.x402 import reasons
from gateway.x402.challenge import EXPOSE_HEADERS, Challenge
from gateway.x402.payload import HeaderName

log = logging.getLogger("gateway.middleware")


class PaymentMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        config: GatewayConfig | None = None,
        engine: PaymentEngine | None = None,
        observers: Sequence[Observer] = (),
        limiter: Limiter | None = None,
        paywall: PaywallPage | None = None,
        discovery: ChallengeExtras | None = None,
        denylist: DenyList | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        if engine is None:
            if config is None:
                raise TypeError("PaymentMiddleware needs config= or engine=")
            engine = PaymentEngine(config, open_store(config.store.url.reveal()))
        self.app = app
        self.engine = engine
        self.observers = list(observers)
        self.limiter = limiter
        self.paywall = paywall
        self.discovery = discovery
        self.config = engine.config
        # Payers the operator refused (docs/operating.md, "Admin API"), in the store every instance shares.
        self.denylist = denylist or open_denylist(engine.config.store.url.reveal())
        # Every paid-and-served request, recorded once (docs/operating.md, "Ledger"); None: [ledger] is off.
        self.ledger = ledger or Ledger.from_config(engine.config)
        # Payments whose settlement a reorg lost, marked in the ledger (never refunded; docs/operating.md, "Refunds").
        self.lost = LostSettlements(self.ledger.store) if self.ledger is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._start_lock = asyncio.Lock()

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
            try:
                await self.engine.start(self._session)
                if self.ledger is not None:
                    await self.ledger.start()
                if self.lost is not None:
                    self.lost.follow(self.engine.networks.values())
            except BaseException:
                await self.shutdown()
                raise
            self._started = True

    async def shutdown(self) -> None:
        if self.lost is not None:
            await self.lost.aclose()
        if self.ledger is not None:  # first: writes still running finish
            await self.ledger.aclose()
        await self.engine.aclose()
        await self.denylist.aclose()
        if self._session is not None:
            await self._session.close()
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, lifespan_hooks(receive, self.startup, self.shutdown), send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self._started:
            await self.startup()
        ctx = request_context(scope, self.engine, self.config.server)
        record = RequestRecord(ctx.request_id, ctx.method, ctx.path, ctx.client)

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        if scope["type"] == "websocket":
            # A handshake is a GET of its path and priced like one (docs/threat-model.md T35): the flow
            # below runs unchanged, answering in HTTP terms that WebSocketSend turns into the handshake's answer.
            observed_send = WebSocketSend(scope, send, record)

        state = scope.setdefault("state", {})  # shared by every copy of the scope made below
        try:
            await self._http(ctx, record, scope, receive, observed_send)
        finally:
            notify(self.observers, record)
            if self.ledger is not None and state.get("x402_ledger") is not None:
                await self.ledger.written(state["x402_ledger"])

    async def _http(
        self, ctx: RequestContext, record: RequestRecord, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if ctx.ambiguous is not None:
            # Upstream frameworks would route this path differently (docs/threat-model.md T33): no price is right
            # for all of them, so nothing is priced, served or forwarded.
            ambiguous = BadRequest(f"ambiguous request path: {ctx.ambiguous}", reason=reasons.AMBIGUOUS_PATH)
            record.outcome, record.reason = "refused", ambiguous.reason
            await send_error(send, ambiguous)
            return
        if self.config.upstream.strip_method_override:
            scope = strip_method_override(scope)  # the price is the request line's (docs/threat-model.md T34)
        route = ctx.route
        preflight = cors_preflight(scope)
        if preflight is not None and (route is not None or ctx.priced_for(preflight)):
            # A browser's CORS preflight carries no payment and cannot (the Fetch standard sends it without
            # credentials or custom headers): a 402 would stop every cross-origin call before it could pay. It is
            # passed on (the app or upstream owns its CORS policy) without its answer's body, never priced.
            record.outcome = "free"
            await self.app(scope, receive, without_body(send))
            return
        if route is None:
            if self.config.server.unpriced == "refuse":
                exc = GatewayError("no priced route matches this request", reason=reasons.ROUTE_NOT_FOUND)
                exc.status = 404  # type: ignore[misc]
                record.outcome, record.reason = "refused", exc.reason
                await send_error(send, exc)
                return
            record.outcome = "free"
            await self.app(scope, receive, send)
            return
        record.route = route.config.route
        if route.config.paused:
            # Paused by the operator (docs/operating.md): refused before a payment is read, so none is taken.
            paused = ServiceUnavailable("this route is paused by its operator", reason=reasons.ROUTE_PAUSED)
            record.outcome, record.reason = "refused", paused.reason
            await send_error(send, paused)
            return
        await self._priced(ctx, record, route, scope, receive, send)

    # ----------------------------------------------------------------------------------------------- requests

    def challenge(
        self,
        ctx: RequestContext,
        route: PricedRoute,
        reason: str | None = None,
        message: str = "",
        correction: Resynchronise | None = None,
    ) -> Challenge:
        """The 402 for this request, built and encoded once, with discovery's extensions when it has any."""
        extensions = resource_extra = None
        if self.discovery is not None:
            extensions, resource_extra = self.discovery.challenge_extras(route, ctx.method, ctx.params)
        return self.engine.challenge(
            route,
            ctx.resource,
            *(() if reason is None else (reason, message)),
            method=ctx.method,
            extensions=extensions,
            resource_extra=resource_extra,
            correction=correction,
        )

    async def _send_challenge(
        self,
        scope: Scope,
        route: PricedRoute,
        send: Send,
        challenge: Challenge,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        headers, body = challenge.headers + list(extra), challenge.body
        if header(scope, b"origin") is not None:
            # A cross-origin caller (a browser app paying for itself) must be able to read the challenge, and only
            # the gateway can say so: the upstream never sees this answer. It holds nothing but public terms (price,
            # recipient, networks), and paying still needs the caller's wallet (docs/threat-model.md T38).
            headers.append((b"access-control-allow-origin", b"*"))
        accept = header(scope, b"accept") or b""
        if self.paywall is not None and b"text/html" in accept:
            # A person in a browser: same status and x402 headers, but a page they can pay from.
            html = self.paywall.render(scope, route, challenge)
            if html is not None:
                body = html
                headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
                headers += [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    *self.paywall.headers,
                ]
        await send({"type": "http.response.start", "status": challenge.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _refuse(
        self,
        send: Send,
        ctx: RequestContext,
        route: PricedRoute,
        scope: Scope,
        exc: GatewayError,
        paid: AnyPaidRequest | None = None,
    ) -> None:
        """402s carry the full challenge (so the client can pay again); every other status a JSON error."""
        extra: list[tuple[bytes, bytes]] = []
        if paid is not None and isinstance(exc, SettlementFailed):
            extra.append(paid.receipt(success=False, reason=exc.reason))
        if exc.status == 402:
            correction = exc if isinstance(exc, Resynchronise) else None
            challenge = self.challenge(ctx, route, exc.reason, exc.message, correction)
            await self._send_challenge(scope, route, send, challenge, extra)
        else:
            await send_error(send, exc, [(b"access-control-expose-headers", EXPOSE_HEADERS), *extra])

    async def _limited(self, record: RequestRecord, kind: Literal["challenge", "paid"], key: str, send: Send) -> bool:
        if self.limiter is None or record.route is None:
            return False
        wait = await self.limiter.retry_after(kind, key, record.route)
        if wait is None:
            return False
        await self._send_limited(record, wait, send)
        return True

    def _verifying(self, record: RequestRecord) -> AbstractAsyncContextManager[PaymentVerification]:
        if self.limiter is None or record.route is None:
            return contextlib.nullcontext(_UNLIMITED)
        return self.limiter.verifying(f"ip:{record.client or '?'}", record.route)

    async def _denied(self, record: RequestRecord, paid: AnyPaidRequest, send: Send) -> bool:
        """A payer on the deny-list gets 403 ``payer_denied`` before anything settles: nothing is charged. Fails
        closed (503) when the store cannot say."""
        refusal: GatewayError
        try:
            if not await self.denylist.denied(paid.payer):
                return False
            refusal = GatewayError("payments from this payer are refused here", reason=reasons.PAYER_DENIED)
            refusal.status = 403  # type: ignore[misc]
        except StoreUnavailable as exc:
            refusal = exc
        record.outcome, record.reason = "refused" if refusal.status < 500 else "error", refusal.reason
        if paid.paid:  # money a transfer already moved: left unserved, usable once the payer is allowed again
            await _quietly(paid.finish(served=False))
        else:
            await paid.release_quietly()
        await send_error(send, refusal)
        return True

    @staticmethod
    async def _send_limited(record: RequestRecord, wait: float, send: Send) -> None:
        record.outcome, record.reason = "limited", reasons.RATE_LIMITED
        exc = GatewayError("too many requests; slow down", reason=reasons.RATE_LIMITED)
        exc.status = 429  # type: ignore[misc]
        await send_error(send, exc, [(b"retry-after", str(max(1, math.ceil(wait))).encode())])

    async def _priced(
        self, ctx: RequestContext, record: RequestRecord, route: PricedRoute, scope: Scope, receive: Receive, send: Send
    ) -> None:
        presented = _presented(ctx, scope)
        if presented is None:
            if await self._limited(record, "challenge", record.client or "?", send):
                return
            record.outcome, record.reason = "challenge", reasons.PAYMENT_REQUIRED
            await self._send_challenge(scope, route, send, self.challenge(ctx, route))
            return
        # Verifying a payment costs a store claim and RPC calls before the payer is known: what one client address
        # can make us do with made-up payments is bounded (docs/threat-model.md T20, T41), by payments that turned
        # out invalid only (a genuine payer behind the same address never pays for them); then per payer below.
        paid: AnyPaidRequest
        failed: GatewayError | None = None
        t0 = time.perf_counter()
        async with self._verifying(record) as verification:
            if verification.retry_after is not None:
                await self._send_limited(record, verification.retry_after, send)
                return
            try:
                scheme = self.engine.scheme_for(presented)
                record.kind = scheme.name
                paid = await self.engine.begin(route, presented, scheme)
            except GatewayError as exc:
                failed = exc
                if exc.status < 500:  # the payment's fault, not ours (store, chain)
                    await verification.invalid()
        if failed is not None:
            record.verify_seconds = time.perf_counter() - t0
            record.outcome, record.reason = "refused" if failed.status < 500 else "error", failed.reason
            await self._refuse(send, ctx, route, scope, failed)
            return
        record.verify_seconds = time.perf_counter() - t0
        record.payer, record.network, record.resumed = paid.payer, paid.requirement.network, paid.resumed
        record.unbound = (
            not isinstance(paid, SessionRequest) and isinstance(paid.payment, TxAttempt) and paid.payment.unbound
        )  # docs/threat-model.md T43
        if await self._limited(record, "paid", paid.payer, send):
            if paid.paid:  # resumed, already paid: left unserved for the retry, not locked for a lease
                await _quietly(paid.finish(served=False))
            else:
                await paid.release_quietly()
            return
        if paid.answer is None and await self._denied(record, paid, send):
            return
        if paid.answer is not None:
            # Answered by the payment itself (a session's cooperative refund): the app never runs.
            record.outcome = "refund"
            status, headers, body = paid.answer
            headers = [*headers, (b"access-control-expose-headers", EXPOSE_HEADERS)]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if route.config.settlement == "before" and not paid.paid and not paid.charges_after_serving:
            t0 = time.perf_counter()
            try:
                await paid.settle()
            except GatewayError as exc:
                record.settle_seconds = time.perf_counter() - t0
                record.outcome, record.reason = "refused" if exc.status < 500 else "error", exc.reason
                await paid.release_quietly()
                await self._refuse(send, ctx, route, scope, exc, paid)
                return
            record.settle_seconds = time.perf_counter() - t0
        await self._serve(ctx, record, route, paid, scope, receive, send)

    async def _serve(
        self,
        ctx: RequestContext,
        record: RequestRecord,
        route: PricedRoute,
        paid: AnyPaidRequest,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        state: dict[str, Any] = {"started": False, "swallow": False, "finished": False}
        upstream_t0 = time.perf_counter()
        # What the app learns about the payment. ``on_paid`` hooks (async, no arguments) run after a successful
        # response's payment is settled and before its headers leave, e.g. to record job -> payer; if one fails the
        # payment is left unserved (free retry) and the client gets a 5xx. ``job_id``, when the app sets it (the jobs
        # layer does), goes into the payment's ledger entry.
        info: dict[str, Any] = {
            "payer": paid.payer,
            "network": paid.requirement.network,
            "amount": paid.requirement.amount,
            "tx_hash": paid.tx_hash,
            "on_paid": [],
        }
        scope.setdefault("state", {})["x402"] = info

        async def finish(served: bool) -> None:
            state["finished"] = True
            if paid.paid:
                await paid.finish(served=served)
            else:
                await paid.release_quietly()

        async def wrapped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.upstream_seconds = time.perf_counter() - upstream_t0
                # Served means the priced content: a 2xx, or a WebSocket the app accepted (101). A redirect or
                # 304 is not content (docs/threat-model.md T37): like a failure, nothing is settled under
                # "after", and a "before" payment stays usable for a retry.
                status = message["status"]
                ok = 200 <= status < 300 or (status == 101 and scope["type"] == "websocket")
                # A metered price reads its charge from the answer's headers (and strips the meter's header).
                message = {**message, "headers": strip_meter(route, paid.metered(list(message.get("headers", ()))))}
                try:
                    if ok and not paid.paid:
                        t0 = time.perf_counter()
                        try:
                            await paid.settle(simulate_again=True)
                        finally:
                            record.settle_seconds = time.perf_counter() - t0
                    if ok:
                        info["tx_hash"] = paid.tx_hash
                        try:
                            for hook in info["on_paid"]:
                                await hook()
                        except GatewayError:
                            await finish(False)
                            raise
                        paid.delivered = bool(info["on_paid"])
                    await finish(ok)
                except GatewayError as exc:
                    record.outcome, record.reason = "refused" if exc.status < 500 else "error", exc.reason
                    # Settlement failed or the store cannot record the outcome: the client gets the refusal,
                    # never the content (fail closed).
                    if not paid.paid:
                        await paid.release_quietly()
                    state["swallow"] = True
                    state["started"] = True
                    log.warning("refusing a paid response", extra={"reason": exc.reason})
                    await self._refuse(send, ctx, route, scope, exc, paid)
                    return
                headers = list(message.get("headers", ()))
                record.tx_hash = paid.tx_hash
                if ok and paid.paid:
                    record.outcome = "paid"
                    if self.ledger is not None:  # committed and served: its entry is written while the body streams
                        state["ledger"] = self.ledger.served(
                            paid,
                            route=route.config.route,
                            method=ctx.method,
                            resource=ctx.resource,
                            request_id=ctx.request_id,
                            upstream_status=status,
                            job_id=info.get("job_id"),
                        )
                    headers.append(paid.receipt())
                    headers.append((b"access-control-expose-headers", EXPOSE_HEADERS))
                state["started"] = True
                await send({**message, "headers": headers})
                return
            if state["swallow"]:
                return
            await send(message)

        target: Send = wrapped_send
        if isinstance(paid, SessionRequest) and paid.reads_body:
            # the charge is in the body: hold the answer for it, and the proxy reads on until it is known, the
            # client gone or not (an endless stream: until the meter gives up on it, MAX_METERED_BODY)
            info["charge_at_end"] = True
            target = metering_send(paid, wrapped_send, lambda: info.__setitem__("charge_at_end", False))
            # ...which must be readable: a client asking for gzip must not make its usage unreadable (and its
            # charge the fallback), so the upstream is asked for the identity encoding.
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
            scope["headers"].append((b"accept-encoding", b"identity"))
        try:
            await self._call_app(scope, receive, target, state, finish, send)
        finally:
            if record.outcome == "free":
                record.outcome = "unserved"  # verified, but the request failed: nothing charged or a free retry
            if paid.paid and not paid.resumed:
                # revenue: the money moved during this request (a session: the charge committed)
                record.amount = paid.charge if isinstance(paid, SessionRequest) else paid.requirement.amount
            record.tx_hash = paid.tx_hash
            if self.ledger is not None:
                # awaited once the request is over and observed (metrics and the access line do not wait for it),
                # and before its handler returns: recorded before the request ends (made durable at once, or by the
                # next payment's synced commit: docs/operating.md, "Ledger")
                scope.setdefault("state", {})["x402_ledger"] = state.get("ledger")

    async def _call_app(
        self, scope: Scope, receive: Receive, wrapped_send: Send, state: dict[str, Any], finish: Any, send: Send
    ) -> None:
        try:
            await self.app(scope, receive, http_terms(scope, wrapped_send))
        except Exception:
            log.exception("application error on a paid route")
            if not state["finished"]:
                await _quietly(finish(False))
            if not state["started"]:
                await send_error(send, GatewayError("the application failed", reason=reasons.INTERNAL_ERROR))
                return
            raise
        if not state["finished"]:
            # The app returned without a response: nothing was served.
            await _quietly(finish(False))
            if not state["started"]:
                await send_error(send, GatewayError("the application sent no response", reason=reasons.INTERNAL_ERROR))


def strip_meter(route: PricedRoute, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The meter's header is the gateway's, whoever paid (an ``exact`` payer on a metered route too)."""
    meter = route.config.meter
    if meter is None or meter.header is None:
        return headers
    name = meter.header.encode("latin-1")
    return [(k, v) for k, v in headers if k.lower() != name]


class _Unlimited:
    """No limiter: every verification is admitted and nothing is counted."""

    retry_after: float | None = None

    async def invalid(self) -> None:
        return None


_UNLIMITED = _Unlimited()


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except (GatewayError, StoreUnavailable):
        log.warning("could not record a failed request's outcome; it is recorded when the store is back")


def _presented(ctx: RequestContext, scope: Scope) -> Presented | None:
    """The payment this request carries, if any: x402 v2 ``PAYMENT-SIGNATURE`` first, then ``X-PAYMENT``."""
    name: HeaderName
    value = header(scope, b"payment-signature")
    if value is not None:
        name = "payment-signature"
    else:
        value = header(scope, b"x-payment")
        if value is None:
            return None
        name = "x-payment"
    return Presented(
        header=name,
        value=value,
        network=header(scope, b"x-payment-network"),
        binding=header(scope, b"x-payment-binding"),
        method=ctx.method,
        resource=ctx.resource,
    )


class PaywallPage(Protocol):
    """The browser paywall (:class:`gateway.http.paywall.Paywall`): an HTML 402 and the headers it needs."""

    headers: list[tuple[bytes, bytes]]

    def render(self, scope: Scope, route: PricedRoute, challenge: Challenge) -> bytes | None: ...


class ChallengeExtras(Protocol):
    """Discovery (:class:`gateway.http.discovery.Discovery`): what a route's 402 declares besides the offers."""

    def challenge_extras(
        self, route: PricedRoute, method: str, params: dict[str, str]
    ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]: ...


__all__ = ["ChallengeExtras", "PaymentMiddleware", "PaywallPage"]
