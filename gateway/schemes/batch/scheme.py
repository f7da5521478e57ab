"""The ``batch-settlement`` scheme's part of the 402 and its claim on a presented header (docs/sessions.md).

A session payment does not follow the one-payment-one-claim steps of :class:`gateway.schemes.base.Scheme`: its
money is a channel's balance, paid request by request with cumulative vouchers. So this scheme only offers and
recognises; :class:`gateway.engine.sessions.Sessions` takes a recognised payment from there (channel lock,
deposit, charge).
"""

from __future__ import annotations

from gateway.schemes.base import Offer, Presented, PricedRoute
from gateway.x402.sessions import SCHEME, is_session_payment

__all__ = ["BatchSettlementScheme"]


class BatchSettlementScheme:
    name = SCHEME

    def accepts(self, presented: Presented) -> bool:
        return presented.header == "payment-signature" and is_session_payment(presented.value)

    def offer(self, route: PricedRoute, resource: str, method: str) -> Offer | None:
        return Offer(accepts=route.sessions) if route.sessions else None
