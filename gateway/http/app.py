"""``build_app(config)``: the standalone gateway — size caps, operations endpoints, payment middleware, proxy.

Composition is plain ASGI::

    Gateway: 431 header cap -> client address -> /healthz /readyz /metrics, discovery documents -> early 413
             -> jobs (free calls) -> IdempotencyLayer -> PaymentMiddleware -> jobs (paid submit) -> UpstreamProxy

Each layer in brackets is there only when configured. The route match, resource URL and request id are decided
once per request (:mod:`gateway.http.context`) and read by every layer that needs them.

The operations paths are answered before any route matching, so they can never be priced or proxied. The early
413 looks at ``Content-Length`` before the payment layer, so an oversized request is refused before its payment
is verified or claimed (docs/threat-model.md T16) and the payment stays usable. A chunked body has no declared size: the
proxy enforces the cap while streaming, and then the request fails without being charged (``settlement = "after"``)
or leaves its payment paid-but-unserved for a retry (``"before"``).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import GatewayConfig
from gateway.engine.reload import Reloader
from gateway.errors import GatewayError, HeadersTooLarge, PayloadTooLarge
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, send_error, send_json
from gateway.http.context import new_request_id, request_context
from gateway.http.discovery import Discovery
from gateway.http.idempotency import IdempotencyLayer
from gateway.http.middleware import PaymentMiddleware
from gateway.http.paywall import Paywall
from gateway.http.proxy import UpstreamProxy
from gateway.jobs import build_jobs
from gateway.ops.events import Observer, RequestRecord, notify
from gateway.ops.health import Readiness
from gateway.ops.logs import AccessLog, install_redaction
from gateway.ops.metrics import PrometheusMetrics
from gateway.ops.ratelimit import RateLimiter
from gateway.routes import RouteTable
from gateway.schemes.base import PricedRoute
from gateway.storage.redis_client import RedisStore

log = logging.getLogger("gateway.reload")


class Gateway:
    """The standalone reverse proxy as one ASGI app (``uvicorn gateway.app:...`` via ``x402-gateway serve``)."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        observers: tuple[Observer, ...] = (),
        freeze_heap: bool = False,
        config_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        reload_on_sighup: bool = False,
    ) -> None:
        self.config = config
        self._freeze_heap = freeze_heap
        self._reload_on_sighup = reload_on_sighup
        self._reloads: set[asyncio.Task[None]] = set()
        up, server = config.upstream, config.server
        self.proxy = UpstreamProxy(
            up.url,
            inject_headers={name: value.reveal() for name, value in up.headers},
            connect_timeout=up.connect_timeout,
            read_timeout=up.read_timeout,
            max_connections=up.max_connections,
            reserved_for_paid=up.reserved_for_paid,
            max_uploads_per_client=up.max_uploads_per_client,
            max_body_bytes=server.max_body_bytes,
            body_read_timeout=server.body_read_timeout,
            public_scheme=_scheme(server.public_url),
            public_url=server.public_url,
            inject_on=up.inject_headers_on,
            strip_method_override=up.strip_method_override,
            # A client's own copy of a meter's header never reaches the upstream: one that echoes request headers
            # into its answer would let the client name its own charge (docs/sessions.md, "Metered prices").
            strip_headers=sorted({r.meter.header for r in config.routes if r.meter and r.meter.header}),
        )
        self.metrics = PrometheusMetrics()
        self.observers: list[Observer] = [self.metrics, AccessLog(), *observers]
        self.limiter = RateLimiter.from_config(config) if config.rate_limits.enabled else None
        # [jobs]: ``outer`` answers the free job calls before the payment layer, ``inner`` takes the paid
        # submit after it (gateway/jobs/layer.py). Without [jobs] both are the identity.
        # Its free calls are made for a proven payer on the job API the operator configured: with the upstream's
        # headers, whatever [upstream] inject_headers_on says about free paths.
        self.jobs = build_jobs(config, self.proxy.credentialed())
        if self.jobs is not None:
            self.jobs.observers = self.observers  # its free calls never reach the payment layer's observers
        inner: ASGIApp = self.jobs.inner(self.proxy) if self.jobs else self.proxy
        # Discovery and the browser paywall: the payment middleware builds every 402 with discovery's extensions
        # and renders the HTML 402 with the paywall's page and headers; the documents are own paths (below).
        self.paywall = Paywall(config) if config.paywall.enabled else None
        self.discovery = Discovery(config) if config.discovery.enabled else None
        self.payments = PaymentMiddleware(
            inner,
            config=config,
            observers=self.observers,
            limiter=self.limiter,
            paywall=self.paywall,
            discovery=self.discovery,
        )
        engine = self.payments.engine
        # Prices and routes change at run time (docs/operating.md): a reload of config_path (SIGHUP, the admin
        # API) or an admin override in the shared store; the views built from the routes follow each change.
        self.reloader = Reloader(engine, config_path, env=env)
        self.reloader.listeners.append(self._follow)
        for net in self.payments.engine.networks.values():  # served settlements a reorg dropped for good (T28)
            net.settlement_lost.append(self.metrics.settlement_lost)
        self.readiness = Readiness(self.payments.engine, up, timeout=server.ready_timeout)
        paid: ASGIApp = self.payments
        self.idempotency: IdempotencyLayer | None = None
        if config.idempotency.enabled:
            idem = config.idempotency
            self.idempotency = IdempotencyLayer(
                paid,
                store=(idem.store_url or config.store.url).reveal(),
                is_priced=lambda scope: request_context(scope, engine, server).route is not None,
                ttl=idem.ttl,
                lease=idem.lease,
                max_body_bytes=server.max_body_bytes,
                max_stored_body_bytes=idem.max_stored_body_bytes,
                body_read_timeout=server.body_read_timeout,
                secret_headers=(config.jobs.token_header,) if config.jobs is not None else (),
            )
            paid = self.idempotency
        self._app: ASGIApp = self.jobs.outer(paid) if self.jobs else paid
        self._own_paths: dict[str, Callable[[Send], Any]] = {
            path: handler
            for path, handler in (
                (server.health_path, self._health),
                (server.ready_path, self._ready),
                (server.metrics_path, self._metrics),
            )
            if path
        }
        self._undo_redaction: Callable[[], None] | None = None

    @property
    def routes(self) -> RouteTable[PricedRoute]:
        """The priced routes in force now (replaced as a whole by a reload)."""
        return self.payments.engine.routes

    def _follow(self, config: GatewayConfig) -> None:
        """After a reload or an override: the discovery documents show the routes and prices now in force."""
        self.config = config
        if self.discovery is not None:
            self.discovery = Discovery(config)
            self.payments.discovery = self.discovery

    async def startup(self) -> None:
        self._undo_redaction = install_redaction(self.config)
        await self.proxy.start()
        try:
            await self.payments.startup()
            await self.reloader.start()  # the store's price overrides apply before the first request
            if self.idempotency is not None:
                await self.idempotency.startup()
            if self.jobs is not None:
                await self.jobs.startup()
        except BaseException:
            # Close what did start (no session or connection outlives a failed start), but keep the redaction: the
            # server logs the failure (its message, its traceback) after this returns. _lifespan undoes it then.
            await self._close()
            raise
        if self._reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        """``kill -HUP``: reload the config file (the reloader logs what changed, or why nothing did)."""
        log.info("SIGHUP: reloading the config file")
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        try:
            await self.reloader.reload()
        except Exception:
            log.exception("reload failed; the routes in force are unchanged")

    async def shutdown(self) -> None:
        await self._close()
        self._stop_redaction()

    def _stop_redaction(self) -> None:
        if self._undo_redaction is not None:
            self._undo_redaction()
            self._undo_redaction = None

    async def _close(self) -> None:
        if self._reload_on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.jobs is not None:  # first: running jobs still write their outcome to the job store
            await self.jobs.shutdown()
        await self.reloader.aclose()
        await self.payments.shutdown()
        if self.idempotency is not None:
            await self.idempotency.aclose()
        await self.proxy.aclose()
        await self.readiness.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "http":
            server = self.config.server
            size, length = _head_size_and_length(scope)
            if size > server.max_header_bytes:
                await self._refuse(scope, send, HeadersTooLarge("request headers exceed the limit"))
                return
            if server.trust_forwarded_headers:
                forwarded = _forwarded_client(scope)
                if forwarded is not None:
                    # Behind a load balancer every client would share its address, and so one rate-limit bucket.
                    scope["client"] = (forwarded, 0)
            own = self._own_paths.get(scope["path"])
            if own is not None:
                await own(send)
                return
            if self.discovery is not None and scope["path"] in self.discovery.paths:
                await self.discovery.serve(scope, send)  # never priced, never proxied
                return
            if length is not None and length > server.max_body_bytes:
                await self._refuse(scope, send, PayloadTooLarge("request body exceeds the limit"))
                return
        await self._app(scope, receive, send)

    # ------------------------------------------------------------------------------------- own endpoints

    async def _health(self, send: Send) -> None:
        await send_json(send, 200, {"status": "ok"}, [(b"cache-control", b"no-store")])

    async def _ready(self, send: Send) -> None:
        checks = await self.readiness.check()
        self.metrics.observe_ready(checks)
        failing = sorted(name for name, result in checks.items() if result != "ok")
        body: dict[str, Any] = {"status": "unready" if failing else "ready", "checks": checks}
        if failing:
            body["failing"] = failing
        store = self.payments.engine.store
        if isinstance(store, RedisStore):
            body["store"] = store.topology().as_json(with_address=False)
        await send_json(send, 503 if failing else 200, body, [(b"cache-control", b"no-store")])

    async def _metrics(self, send: Send) -> None:
        claimer = self.payments.engine.claimer
        if claimer is not None:
            self.metrics.observe_sessions(claimer.stats)
        if self.payments.ledger is not None:
            self.metrics.observe_ledger(self.payments.ledger.stats)
        store = self.payments.engine.store
        if isinstance(store, RedisStore):
            self.metrics.observe_store(store.topology())
        payload, content_type = self.metrics.render()
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(payload)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _refuse(self, scope: Scope, send: Send, exc: GatewayError) -> None:
        """Answer before the payment layer, and still tell the observers (a flood of 431s should show)."""
        record = RequestRecord.of_scope(
            scope, new_request_id(), status=exc.status, outcome="refused", reason=exc.reason
        )
        route = request_context(scope, self.payments.engine, self.config.server).route
        record.route = route.config.route if route else None
        await send_error(send, exc, [(b"connection", b"close")])
        notify(self.observers, record)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the server prints it and exits non-zero
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    self._stop_redaction()  # only now: the server logged the failure while it sent
                    return
                if self._freeze_heap:
                    freeze_start_up_heap()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _head_size_and_length(scope: Scope) -> tuple[int, int | None]:
    """In one pass over the headers: the request line's target plus every header line, as received
    (``name: value\\r\\n``), and the declared body length: a well-formed single ``Content-Length``, or None
    (anything odd is left to the proxy, which refuses it)."""
    headers = scope.get("headers") or ()
    if not isinstance(headers, list | tuple):  # ASGI allows any iterable
        headers = list(headers)
    size = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b"")) + 4 * len(headers)
    lengths: list[bytes] = []
    for k, v in headers:
        size += len(k) + len(v)
        if k == b"content-length":
            lengths.append(v)
    if len(lengths) != 1 or not lengths[0].strip().isdigit():
        return size, None
    return size, int(lengths[0])


def _forwarded_client(scope: Scope) -> str | None:
    """The address the trusted proxy saw: the LAST ``X-Forwarded-For`` entry, the one that proxy appended.
    Earlier entries come from the client and can say anything (a fresh address per request: no rate limit)."""
    values = [v for k, v in scope.get("headers", ()) if k == b"x-forwarded-for"]
    if not values:
        return None
    last = values[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None


def _scheme(public_url: str | None) -> str | None:
    return public_url.split("://", 1)[0] if public_url else None


def freeze_start_up_heap() -> None:
    """Move everything alive now (modules, web3's and pydantic's tables, our config) out of the garbage
    collector's sight. A long-lived server allocates ~130,000 such objects at start-up; every full collection
    would walk them all again (measured: ~60 ms each, about a fifth of a free request's CPU under load). Garbage
    is collected first, so nothing unreachable is kept. The young generation is also collected less often (every
    20,000 allocations, not 700): a request's objects die by reference count, so frequent young collections only
    walk the requests in flight. Only for a process the gateway owns (``serve``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def build_app(
    config: GatewayConfig,
    *,
    freeze_heap: bool = False,
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    reload_on_sighup: bool = False,
) -> Gateway:
    """The gateway app; ``freeze_heap`` (set by ``x402-gateway serve``): see :func:`freeze_start_up_heap`.
    ``config_path``: the file ``config`` was read from, which a reload reads again (``env``: what its ``*_env`` keys
    are read from, default ``os.environ``); ``reload_on_sighup`` (``serve``): SIGHUP reloads it."""
    return Gateway(config, freeze_heap=freeze_heap, config_path=config_path, env=env, reload_on_sighup=reload_on_sighup)
