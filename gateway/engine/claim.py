"""The claim handle: one claimed payment on its way to being settled and served, whatever its scheme.

It is the only thing that writes a claim's state to the receipt store (:mod:`gateway.storage.receipts` draws the
state machine). The scheme tells it what happened to the money (:class:`gateway.schemes.base.Claim`); the HTTP
layer tells it whether the request was served. When the store is down at that moment, the outcome is deferred
(:mod:`gateway.engine.deferred`) and applied as soon as the store answers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Generic

from gateway.engine.deferred import DeferredOutcomes, Step
from gateway.errors import GatewayError, PaymentInFlight, PaymentReplayed, SettlementFailed, StoreUnavailable
from gateway.schemes.base import P, Scheme
from gateway.storage.receipts import ClaimRecord, Effect, ReceiptStore
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.receipt import receipt_header

log = logging.getLogger("gateway.payments")


@dataclass(slots=True)
class Claims:
    """The receipt store as the engine uses it: claims with one lease, outcomes deferred through one queue, and
    owners named ``<process>.<request>`` so that a claim whose process died is taken over at once."""

    store: ReceiptStore
    lease: float
    deferred: DeferredOutcomes
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # this gateway process

    def new_owner(self) -> str:
        return f"{self.instance}.{uuid.uuid4().hex}"

    async def claim(self, key: str, owner: str, *, now: float, expires_at: float | None) -> ClaimRecord:
        try:
            return await self.store.claim(key, owner, now=now, lease=self.lease, expires_at=expires_at)
        except PaymentInFlight as exc:
            # Held by one of our own requests that a store outage cut short? Then settle its claim now and retry.
            if await self.deferred.flush(key):
                return await self.store.claim(key, owner, now=time.time(), lease=self.lease, expires_at=expires_at)
            holder = exc.holder
            if holder is None or not await self._holder_is_gone(holder):
                raise
        # The process holding it was killed (or lost the store): nothing of it will ever finish this claim. Take it
        # over now, as after a lapsed lease: the new owner reconciles by the recorded transaction hash
        # (docs/threat-model.md T31).
        log.warning("taking over a claim whose gateway process is gone", extra={"key": key})
        return await self.store.claim(
            key, owner, now=time.time(), lease=self.lease, expires_at=expires_at, take_over_from=holder
        )

    async def _holder_is_gone(self, holder: str) -> bool:
        instance, dot, _request = holder.partition(".")
        if not dot or instance == self.instance:
            return False  # one of our own requests is still at it (or an owner from before process names)
        return not await self.store.alive(instance, now=time.time())


class PaidRequest(Generic[P]):
    """One claimed payment on its way to being settled and served."""

    charges_after_serving = False  # settled before the app under ``settlement = "before"``
    answer: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None  # never answered without the app

    def __init__(
        self, claims: Claims, scheme: Scheme[P], payment: P, key: str, owner: str, expires_at: float | None
    ) -> None:
        self._claims = claims
        self._scheme = scheme
        self.payment = payment
        self.key = key
        self._owner = owner
        self._expires_at = expires_at
        self._broadcast = False
        self._money_moved = False  # seen on chain, whether or not the store heard it: the claim is never released
        self.delivered = False  # the app acted on the payment (its on_paid hooks ran): a failed finish consumes it
        self.paid = False
        self.resumed = False
        self.tx_hash: str | None = None

    @property
    def scheme(self) -> str:
        return self._scheme.name

    @property
    def requirement(self) -> Requirement:
        return self.payment.requirement

    @property
    def payer(self) -> str:
        return self.payment.payer

    @property
    def version(self) -> int:
        return self.payment.version

    def in_flight(self, value: bool) -> None:
        self._broadcast = value

    def mark_resumed(self, tx_hash: str | None) -> None:
        self.paid = True
        self.resumed = True
        self.tx_hash = tx_hash

    async def mark_paid(self, tx_hash: str, *, effects: tuple[Effect, ...] = ()) -> None:
        self._money_moved = True
        try:
            await self._mark_paid(tx_hash, effects)
        except StoreUnavailable:
            # The money moved but the store did not hear it, and this request fails closed: once the store is
            # back, record the payment as paid-but-unserved, so the same payment is served without paying again.
            async def paid_unless_lost() -> None:
                # already PAID (the write landed), no longer ours, or the transfer already paid for something else
                with contextlib.suppress(PaymentInFlight, PaymentReplayed):
                    await self._mark_paid(tx_hash, effects)

            self._defer(paid_unless_lost, functools.partial(self._finish, served=False))
            raise
        self.paid = True
        self.tx_hash = tx_hash

    async def _mark_paid(self, tx_hash: str, effects: tuple[Effect, ...]) -> None:
        claims = self._claims
        await claims.store.mark_paid(
            self.key, self._owner, tx_hash, now=time.time(), lease=claims.lease, effects=effects
        )

    async def record_tx(self, tx_hash: str) -> None:
        claims = self._claims
        await claims.store.record_tx(self.key, self._owner, tx_hash, now=time.time(), lease=claims.lease)

    async def settle(self, *, simulate_again: bool = False) -> str:
        """Make the money move (no-op when already paid). Raises SettlementFailed / PaymentRequired."""
        if self.paid:
            return self.tx_hash or ""
        try:
            return await self._scheme.settle(self, simulate_again=simulate_again)
        except GatewayError as exc:
            # Unknown outcome, or any fault of ours (the chain did not answer a re-check): this request ends with a
            # 5xx, and a settlement hash it holds must not keep the payer's retry out for the claim's whole lease.
            if exc.status >= 500 or (isinstance(exc, SettlementFailed) and exc.unknown):
                await self.hand_over()
            raise

    async def hand_over(self) -> None:
        """This request ends with its settlement broadcast and recorded by hash but its outcome unknown (503 or
        409 ``settlement_pending``). The retry should not wait out the lease to learn it: end the lease now, so the
        next presentation takes the claim and reconciles by the recorded hash (docs/threat-model.md T31)."""
        if not self._broadcast or self.paid:
            return
        with contextlib.suppress(GatewayError):
            await self._claims.store.lapse(self.key, self._owner, now=time.time())

    async def finish(self, *, served: bool) -> None:
        """Record the outcome: a served request consumes the payment (for ever, or until an authorization could not
        execute anyway); a failed one leaves it paid-but-unserved for a free retry (docs/threat-model.md T11)."""
        try:
            held = await self._finish(served=served)
        except StoreUnavailable:
            # A finish that fails leaves the client refused (fail closed): the payment stays usable for a retry,
            # unless the app already acted on it (a job was created and bound to the payer, who can find it).
            self._defer(functools.partial(self._finish, served=served and self.delivered))
            raise
        if served and not held:
            # Another request took this claim over (our lease lapsed, or our process was taken for dead): that
            # request is the one the payment pays for. Serving this one too would serve one payment twice.
            raise PaymentInFlight("this payment was taken over by another request", reason=reasons.PAYMENT_IN_FLIGHT)

    async def _finish(self, *, served: bool) -> bool:
        return await self._claims.store.finish(
            self.key, self._owner, served=served, now=time.time(), expires_at=self._expires_at, delivered=self.delivered
        )

    def _defer(self, *steps: Step) -> None:
        self._claims.deferred.add(self.key, self._owner, steps, within=self._claims.lease)

    async def release_quietly(self) -> None:
        """Give the claim back when no money moved and nothing is in flight; keep it otherwise."""
        if self.paid or self._broadcast or self._money_moved:
            return
        store = self._claims.store
        try:
            await store.release(self.key, self._owner)
        except GatewayError:
            log.warning("could not release a claim; will retry when the store is back", extra={"key": self.key})
            self._defer(lambda: store.release(self.key, self._owner))

    def metered(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return headers  # a fixed price: the answer does not change it

    def receipt(self, *, success: bool = True, reason: str | None = None) -> tuple[bytes, bytes]:
        return receipt_header(
            self.version,
            self.requirement,
            success=success,
            transaction=self.tx_hash or "",
            payer=self.payer,
            reason=reason,
        )


__all__ = ["Claims", "PaidRequest"]
