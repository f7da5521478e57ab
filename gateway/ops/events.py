"""Seams for operations code: what the middleware reports about each request, and the hooks it consults.

The middleware fills one :class:`RequestRecord` per HTTP request and hands it to every :class:`Observer` when
the request ends (metrics, structured logs). It never contains a secret or a raw payment header: only decoded,
public facts (payer address, network, tx hash, reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger("gateway.events")

Outcome = Literal["free", "challenge", "paid", "unserved", "refused", "error", "limited", "refund"]


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    client: str | None
    route: str | None = None  # the priced route's pattern, None for unpriced requests
    status: int = 0
    outcome: Outcome = "free"
    reason: str | None = None  # machine-readable reason of a refusal
    kind: str | None = None  # the payment scheme's name (gateway.schemes), e.g. "exact" or "txhash"
    payer: str | None = None
    network: str | None = None
    amount: int = 0  # atomic units actually collected (0 unless paid and served)
    tx_hash: str | None = None
    resumed: bool = False
    unbound: bool = False  # paid by a tx-hash proof without a payer binding (tx_hash_binding = "optional")
    started: float = field(default_factory=time.perf_counter)
    verify_seconds: float = 0.0
    settle_seconds: float = 0.0
    upstream_seconds: float = 0.0
    total_seconds: float = 0.0

    @classmethod
    def of_scope(cls, scope: Mapping[str, Any], request_id: str, **fields: Any) -> RequestRecord:
        """A record for an ASGI HTTP scope: method, path and client address from the scope."""
        client = scope.get("client")
        return cls(
            request_id=request_id,
            method=scope["method"],
            path=scope["path"],
            client=client[0] if client else None,
            **fields,
        )


class Observer(Protocol):
    def request_done(self, record: RequestRecord) -> None:
        """Called once per HTTP request, after the response was sent. Must not raise or block."""
        ...


def notify(observers: Iterable[Observer], record: RequestRecord) -> None:
    """The request is over: stamp its total time and hand the record to every observer (one failing observer
    neither stops the others nor the request)."""
    record.total_seconds = time.perf_counter() - record.started
    for observer in observers:
        try:
            observer.request_done(record)
        except Exception:
            log.exception("observer failed")


class Limiter(Protocol):
    async def retry_after(self, kind: Literal["challenge", "paid"], key: str, route: str) -> float | None:
        """None to let the request through, else the seconds the client should wait (429 Retry-After)."""
        ...

    def verifying(self, key: str, route: str) -> AbstractAsyncContextManager[PaymentVerification]:
        """Around one payment's verification for client address ``key``: admitted, or refused with
        ``retry_after`` (gateway/ops/ratelimit.py: only invalid payments spend the address's budget)."""
        ...


class PaymentVerification(Protocol):
    retry_after: float | None  # not None: refuse with 429

    async def invalid(self) -> None:
        """The payment turned out invalid: count it against the client address."""
        ...
