"""The payment engine: from a presented payment to money that is verifiably ours, exactly once.

:meth:`PaymentEngine.begin` drives the payment's scheme (:mod:`gateway.schemes.base` draws the steps): sans-IO
checks first, so garbage costs no I/O; then the one atomic claim of the money in the receipt store (the point where
concurrent presentations are decided); then what the claim's state means on chain. The returned
:class:`~gateway.engine.claim.PaidRequest` is then ``settle``-d (before or after the upstream answers, per route)
and ``finish``-ed with whether the request was served. Adapters (middleware, CLI) never touch the store or the
chain directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from gateway.chain.network import Network, open_networks
from gateway.config import GatewayConfig, RouteConfig
from gateway.engine.claim import Claims, PaidRequest
from gateway.engine.claimer import Claimer
from gateway.engine.deferred import DeferredOutcomes
from gateway.engine.identity import StoreIdentity
from gateway.engine.relayers import DeploymentRelayers
from gateway.engine.sessions import SessionRequest, Sessions
from gateway.errors import PaymentRequired, Resynchronise
from gateway.routes import RouteTable
from gateway.schemes import build_schemes
from gateway.schemes.base import Offering, Presented, PricedRoute, Scheme, requirements_for
from gateway.schemes.batch.check import session_requirements
from gateway.schemes.batch.scheme import BatchSettlementScheme
from gateway.schemes.prices import EarlierPrice
from gateway.storage.channels import open_channel_store
from gateway.storage.receipts import ClaimState, ReceiptStore
from gateway.storage.settlements import open_settlement_journal
from gateway.tasks import stop
from gateway.x402 import reasons
from gateway.x402.challenge import Challenge, Requirement, build_challenge

log = logging.getLogger("gateway.payments")

# The handle the HTTP layer gets for any payment: one claimed payment, or one session request on its channel.
AnyPaidRequest = PaidRequest[Any] | SessionRequest


class PaymentEngine:
    def __init__(self, config: GatewayConfig, store: ReceiptStore) -> None:
        self.config = config
        self.store = store
        # Served settlements are watched until final in a journal on the receipt store's storage (T28).
        journal_url = config.store.url.reveal()
        self.networks: dict[str, Network] = open_networks(config, lambda: open_settlement_journal(journal_url))
        self.schemes: tuple[Offering, ...] = build_schemes(config, self.networks)
        pay = config.payment
        # A claim must outlive everything its owner may still do with it (settle, then wait for the upstream);
        # a shorter lease would let a second presentation resume a payment that is still being served.
        lease = max(config.store.lease_seconds, pay.settle_timeout + config.upstream.read_timeout + 30.0)
        self.claims = Claims(store, lease, DeferredOutcomes())
        self.identity = StoreIdentity(store, config.store.identity_file)
        # Every instance sharing the store records its relayers there: a peer's settlement is never a third party's.
        self.relayers = DeploymentRelayers(store, {n.relayer.address for n in self.networks.values() if n.relayer})
        for net in self.networks.values():
            net.deployment_relayers = self.relayers.settled_by_us
        self._store_may_forget = store.may_forget
        self._watch: asyncio.Task[None] | None = None
        # Sessions (batch-settlement channels) when a route offers them: a channel store beside the receipts.
        self.sessions: Sessions | None = None
        self.claimer: Claimer | None = None
        if any(SessionRequest.scheme in r.schemes for r in config.routes):
            self.sessions = Sessions(
                config,
                open_channel_store(journal_url),
                self.networks,
                instance=self.claims.instance,
                lease=lease,
                alive=lambda instance: store.alive(instance, now=time.time()),
            )
            self.claimer = Claimer(self.sessions, config.sessions)
        authorizer = self.sessions.authorizer if self.sessions is not None else ""
        self.routes: RouteTable[PricedRoute] = RouteTable(
            [(r.pattern, self._priced(r, authorizer)) for r in config.routes]
        )

    def _priced(self, route: RouteConfig, authorizer: str, earlier: tuple[EarlierPrice, ...] = ()) -> PricedRoute:
        base = requirements_for(self.config, route)
        return PricedRoute(route, base, session_requirements(self.config, route, base, authorizer), earlier)

    def swap_routes(
        self, routes: tuple[RouteConfig, ...], earlier: Mapping[str, tuple[EarlierPrice, ...]]
    ) -> RouteTable[PricedRoute]:
        """Price ``routes`` and make them the table new requests match, in one assignment. A request reads
        ``self.routes`` once (gateway/http/context.py) and keeps that table for its whole life, so it never sees
        half a change. ``earlier``: per route pattern, the prices it had a moment ago that are still honoured
        (gateway/schemes/prices.py). Only :mod:`gateway.engine.reload` calls this (it checks what may change)."""
        authorizer = self.sessions.authorizer if self.sessions is not None else ""
        table = RouteTable([(r.pattern, self._priced(r, authorizer, earlier.get(r.route, ()))) for r in routes])
        self.config = replace(self.config, routes=routes)
        self.routes = table
        return table

    @property
    def lease(self) -> float:
        return self.claims.lease

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.claims.deferred = DeferredOutcomes()  # bound to this event loop; a restarted engine gets a fresh one
        for net in self.networks.values():
            await net.start(session, self.config)
        await self.store.ping()
        if self.sessions is not None:
            await self.sessions.store.ping()
        await self.identity.start()
        await self._beat()
        self._watch = asyncio.create_task(self._watch_store(), name="x402-store-watch")
        if self.claimer is not None:
            self.claimer.start()

    async def aclose(self) -> None:
        await stop(self._watch)
        self._watch = None
        if self.claimer is not None:
            await self.claimer.aclose()  # before the networks: a last pass may still send a claim
        if self.sessions is not None:
            await self.sessions.store.aclose()
        for net in self.networks.values():
            await net.aclose()
        await self.claims.deferred.aclose()
        await self.store.aclose()

    async def _beat(self) -> None:
        await self.store.heartbeat(self.claims.instance, now=time.time(), ttl=self.config.store.heartbeat_seconds)
        await self.relayers.register()

    async def _watch_store(self) -> None:
        """Every third of ``store.heartbeat_seconds``: prove this process alive (docs/threat-model.md T31) and
        check that the store is still the one whose records it trusts (T30)."""
        while True:
            await asyncio.sleep(self.config.store.heartbeat_seconds / 3)
            try:
                await self._beat()
                await self.identity.check()
            except Exception:  # never let one failure end the heartbeats: others would take our claims over
                log.warning("could not renew the heartbeat or check the store's identity", exc_info=True)

    def challenge(
        self,
        route: PricedRoute,
        resource: str,
        reason: str = reasons.PAYMENT_REQUIRED,
        message: str = "",
        *,
        method: str = "GET",
        extensions: Mapping[str, Any] | None = None,
        resource_extra: Mapping[str, Any] | None = None,
        correction: Resynchronise | None = None,
    ) -> Challenge:
        """The 402 for ``route``: every scheme's offer, then ``extensions`` the HTTP layer adds (discovery's
        ``bazaar``) and ``resource_extra`` (service metadata), built and encoded once. A ``correction`` adds the
        channel state a session client resynchronises from to its offer."""
        accepts: list[Requirement] = []
        merged: dict[str, Any] = {}
        v1_extra: dict[str, Any] = {}
        for scheme in self.schemes:
            offer = scheme.offer(route, resource, method)
            if offer is not None:
                accepts.extend(offer.accepts)
                merged.update(offer.extensions)
                v1_extra.update(offer.v1_extra)
        merged.update(extensions or {})
        if correction is not None:
            accepts = [
                replace(r, more=(*r.more, *correction.extra.items()))
                if r.scheme == correction.scheme and r.caip2 == correction.network
                else r
                for r in accepts
            ]
        return build_challenge(
            tuple(accepts),
            resource=resource,
            description=route.config.description,
            mime_type=route.config.mime_type,
            reason=reason,
            message=message,
            extensions=merged,
            v1_extra=v1_extra,
            resource_extra=resource_extra,
        )

    def scheme_for(self, presented: Presented) -> Offering:
        """The scheme a presented payment belongs to (the first that accepts it)."""
        for scheme in self.schemes:
            if scheme.accepts(presented):
                return scheme
        raise AssertionError("the last scheme accepts every payment")  # build_schemes ends with exact

    async def begin(self, route: PricedRoute, presented: Presented, offering: Offering | None = None) -> AnyPaidRequest:
        """Check, claim and confirm a payment for ``route``; raises the refusal (400/402/409/5xx) otherwise."""
        self.identity.require()
        offering = offering or self.scheme_for(presented)
        if isinstance(offering, BatchSettlementScheme):
            if self.sessions is None or not route.sessions:
                raise PaymentRequired("this route is not paid with sessions", reason=reasons.UNSUPPORTED_SCHEME)
            return await self.sessions.begin(route, presented)
        scheme: Scheme[Any] = offering  # type: ignore[assignment]  # every other scheme claims its money
        payment = scheme.parse(route, presented)
        await scheme.verify(payment)
        now = time.time()
        key, expires_at = scheme.claim_key(payment, now=now)
        owner = self.claims.new_owner()
        record = await self.claims.claim(key, owner, now=now, expires_at=expires_at)
        paid = PaidRequest(self.claims, scheme, payment, key, owner, expires_at)
        try:
            if self._store_may_forget and record.state is ClaimState.PENDING and not record.resumed:
                # A fresh claim: new money, or money a store that restarted empty has forgotten. The heartbeat's
                # identity check would notice that only at its next beat; a payment presented again in between
                # must not be taken for new (docs/threat-model.md T30).
                await self.identity.check()
                self.identity.require()
            await scheme.confirm(paid, record, now=now)
        except Exception:
            await paid.release_quietly()
            # Kept because a settlement of it is recorded (found pending, or the chain could not be asked): this
            # request is over, so the next retry takes the claim at once and reconciles by hash.
            await paid.hand_over()
            raise
        except BaseException:
            await paid.release_quietly()
            raise
        return paid


__all__ = ["AnyPaidRequest", "PaymentEngine"]
