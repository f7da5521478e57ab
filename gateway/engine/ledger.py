"""The ledger recorder: one entry for every paid-and-served request, written beside the request, never in its way.

The HTTP layer calls :meth:`Ledger.served` once the payment is committed (the claim consumed, or the session
charge committed) and the answer's status line is known, then awaits :meth:`Ledger.written` when the request
ends. The write starts at once and runs while the answer's body streams, so it costs the answer no latency; it
is durable before the request handler returns. One store write per paid request.

A failed write never turns a served answer into an error: it is logged, counted (:class:`LedgerStats`) and kept
in memory (up to :data:`BACKLOG` entries) to be written again every :data:`RETRY_SECONDS` until the store takes
it; the entry's key makes a second write of the same payment a no-op. The same background task deletes entries
older than ``[ledger].retention_days`` every ``purge_interval`` seconds. What each kind of payment records, and
the crash window: docs/operating.md ("Ledger").

:class:`LostSettlements` marks in the ledger the payments whose settlement the finality tracker counted lost, so that
none of them is ever refunded (docs/operating.md, "Refunds").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.chain.network import Network
from gateway.config import GatewayConfig
from gateway.config.ledger import LedgerConfig
from gateway.engine.claim import PaidRequest
from gateway.engine.sessions import SessionRequest
from gateway.errors import StoreUnavailable
from gateway.schemes.exact.scheme import ExactAttempt
from gateway.schemes.txhash.scheme import TxAttempt
from gateway.storage.ledger import LedgerEntry, LedgerStore, open_ledger_store
from gateway.storage.ledger.contract import DAY, REFUND_PREFIX, Kind
from gateway.tasks import stop, stop_all

__all__ = ["BACKLOG", "RETRY_SECONDS", "Ledger", "LedgerStats", "LostSettlements", "served_entry"]

log = logging.getLogger("gateway.ledger")

RETRY_SECONDS = 5.0  # how often entries a failed write kept in memory are written again
BACKLOG = 10_000  # entries kept for a retry at most (a store down for long: the oldest are dropped, and counted)

_KINDS: dict[str, Kind] = {"exact": "exact", "txhash": "txhash", "batch-settlement": "batch-settlement"}


@dataclass(slots=True)
class LedgerStats:
    written: int = 0  # entries the store took
    unrecordable: int = 0  # served payments no entry could be made of, or the store refused (a bug: logged)
    duplicates: int = 0  # writes of a payment already recorded (a retry after a write that did land)
    failed: int = 0  # writes that failed (each is retried from the backlog)
    dropped: int = 0  # entries given up: the backlog was full, or the gateway stopped with them unwritten
    purged: int = 0  # entries deleted by the retention purge


def served_entry(
    paid: PaidRequest[Any] | SessionRequest,
    *,
    route: str,
    method: str,
    resource: str,
    request_id: str,
    upstream_status: int,
    job_id: str | None = None,
    at: float | None = None,
) -> LedgerEntry | None:
    """The entry for a served request whose payment ``paid`` is committed; None when it charged nothing (a
    metered session answer that cost 0 is not a payment)."""
    req = paid.requirement
    block: int | None = None
    if isinstance(paid, SessionRequest):
        if paid.charge <= 0:
            return None
        # The cumulative after this charge names it: one channel never charges the same cumulative twice.
        key = f"session:{paid.channel_id}:{paid.channel.charged}"
        amount = paid.charge
    else:
        key = paid.key
        amount = req.amount
        payment = paid.payment
        if isinstance(payment, TxAttempt) and payment.found is not None:
            # The payer sent this transfer itself: all of it is what it paid (a transfer above the price included).
            amount, block = payment.found.value, payment.found.block_number
        elif isinstance(payment, ExactAttempt):
            block = payment.block_number  # None when resumed: the settlement was seen by an earlier request
    return LedgerEntry(
        key=key,
        at=time.time() if at is None else at,
        route=route,
        method=method,
        resource=resource,
        amount=amount,
        network=req.network,
        asset=req.asset,
        payer=paid.payer.lower(),
        pay_to=req.pay_to,
        kind=_KINDS[paid.scheme],
        tx_hash=(paid.tx_hash or "").lower(),
        block=block,
        request_id=request_id,
        job_id=job_id,
        upstream_status=upstream_status,
    )


class Ledger:
    """Writes served payments to a :class:`LedgerStore` and keeps it within its retention (module docstring)."""

    def __init__(self, store: LedgerStore, config: LedgerConfig | None = None) -> None:
        self.store = store
        self.config = config or LedgerConfig()
        self.stats = LedgerStats()
        self._writes: set[asyncio.Task[None]] = set()
        self._backlog: dict[str, LedgerEntry] = {}
        self._task: asyncio.Task[None] | None = None
        self._next_purge = 0.0

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Ledger | None:
        """The ledger ``[ledger]`` configures (None when it is off). Nothing is connected here."""
        cfg = config.ledger
        if not cfg.enabled:
            return None
        url = (cfg.store_url or config.store.url).reveal()
        key = "ledger.store_url" if cfg.store_url else "store.url"
        # In the receipt store's storage, the payments' own synced writes make the entries durable.
        shared = url == config.store.url.reveal()
        return cls(open_ledger_store(url, config_key=key, synced_by_payments=shared), cfg)

    def __repr__(self) -> str:
        return f"Ledger(store={self.store!r})"

    async def start(self) -> None:
        """Fail fast when the store cannot answer; then retry and purge in the background."""
        await self.store.ping()
        if self._task is None:
            self._next_purge = time.monotonic()  # the first pass purges what accumulated while we were down
            self._task = asyncio.create_task(self._maintain(), name="x402-ledger")

    async def aclose(self) -> None:
        await stop(self._task)
        self._task = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._retry()  # a last try for what failed before
        if self._backlog:
            self.stats.dropped += len(self._backlog)
            log.error(
                "ledger entries not recorded: the store did not take them before shutdown",
                extra={"count": len(self._backlog), "keys": sorted(self._backlog)[:20]},
            )
            self._backlog.clear()
        await self.store.aclose()

    # ------------------------------------------------------------------------------------------------ requests

    def served(
        self,
        paid: PaidRequest[Any] | SessionRequest,
        *,
        route: str,
        method: str,
        resource: str,
        request_id: str,
        upstream_status: int,
        job_id: str | None = None,
    ) -> asyncio.Task[None] | None:
        """Start writing the entry of a served request whose payment is committed (:func:`served_entry`); await
        :meth:`written` on the result before the request ends. Never raises: the answer is served either way."""
        try:
            entry = served_entry(
                paid,
                route=route,
                method=method,
                resource=resource,
                request_id=request_id,
                upstream_status=upstream_status,
                job_id=job_id,
            )
        except Exception:
            self.stats.unrecordable += 1
            log.exception("could not make a ledger entry of a served payment")
            return None
        if entry is None:
            return None
        task = asyncio.create_task(self._write(entry), name="x402-ledger-write")
        self._writes.add(task)  # a strong reference until it is done (and for aclose to wait on)
        task.add_done_callback(self._writes.discard)
        return task

    @staticmethod
    async def written(task: asyncio.Task[None] | None) -> None:
        """Wait for a write :meth:`served` started. A cancelled request stops waiting; the write goes on."""
        if task is not None:
            await asyncio.shield(task)

    async def _write(self, entry: LedgerEntry) -> None:
        try:
            new = await self.store.record(entry)
        except StoreUnavailable as exc:
            self.stats.failed += 1
            log.warning(
                "could not record a payment in the ledger; kept for a retry",
                extra={"key": entry.key, "error": exc.message},
            )
            self._keep(entry)
            return
        except Exception:  # an entry the store refuses (a bug): a retry would be refused again
            self.stats.unrecordable += 1
            log.exception("the ledger refused a served payment's entry", extra={"key": entry.key})
            return
        self._count(new)

    def _count(self, new: bool) -> None:
        if new:
            self.stats.written += 1
        else:
            self.stats.duplicates += 1

    def _keep(self, entry: LedgerEntry) -> None:
        self._backlog.pop(entry.key, None)
        self._backlog[entry.key] = entry
        while len(self._backlog) > BACKLOG:
            oldest = next(iter(self._backlog))
            del self._backlog[oldest]
            self.stats.dropped += 1
            log.error("ledger backlog full: an entry was dropped unrecorded", extra={"key": oldest})

    # ---------------------------------------------------------------------------------------------- background

    async def _maintain(self) -> None:
        while True:
            try:
                await self._retry()
                if self.config.retention_days and time.monotonic() >= self._next_purge:
                    self._next_purge = time.monotonic() + self.config.purge_interval
                    await self.purge()
            except Exception:  # the next pass tries again; a ledger problem never stops the gateway
                log.warning("ledger maintenance failed", exc_info=True)
            await asyncio.sleep(RETRY_SECONDS)

    async def _retry(self) -> None:
        for key, entry in list(self._backlog.items()):
            try:
                new = await self.store.record(entry)
            except StoreUnavailable:
                return  # still down: the rest waits for the next pass
            except Exception:
                self._backlog.pop(key, None)
                self.stats.unrecordable += 1
                log.exception("the ledger refused a served payment's entry", extra={"key": key})
                continue
            self._backlog.pop(key, None)
            self._count(new)

    async def purge(self, *, now: float | None = None) -> int:
        """Delete the entries older than the retention (none when ``retention_days`` is 0)."""
        if not self.config.retention_days:
            return 0
        cutoff = (time.time() if now is None else now) - self.config.retention_days * DAY
        n = await self.store.purge(older_than=cutoff)
        self.stats.purged += n
        if n:
            log.info("ledger retention purge", extra={"deleted": n, "retention_days": self.config.retention_days})
        return n


class LostSettlements:
    """Marks in the ledger each payment whose settlement a network's finality tracker counted lost: a reorg dropped
    it and it could not be settled again (docs/threat-model.md T28), so the merchant never received that money and
    a refund of it would pay out money that never came in. The refund reads the mark and refuses.

    Fed by each followed network's ``settlement_lost`` hooks, which are called on the tracker's task and must not
    wait: each mark is written by a task of its own, again every :data:`RETRY_SECONDS` while the store does not
    answer, until it is taken or :meth:`aclose` gives up on it (logged as an error with the key)."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.marked = 0  # marks the store took (a mark made before by another instance counts too)
        self._networks: list[Network] = []
        self._writes: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"LostSettlements(store={self.store!r})"

    def follow(self, networks: Iterable[Network]) -> None:
        for net in networks:
            if net not in self._networks:
                net.settlement_lost.append(self.lost)
                self._networks.append(net)

    def lost(self, network: str, key: str) -> None:
        """``network``'s tracker counted the settlement of the payment ``key`` lost: mark it. Never raises."""
        if key in self._writes:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._mark(key), name="x402-ledger-lost")
        except RuntimeError:  # no loop (the tracker runs on one: a caller outside it is a bug, not worth a crash)
            log.error("a lost settlement could not be marked in the ledger", extra={"key": key})
            return
        self._writes[key] = task
        task.add_done_callback(lambda _: self._writes.pop(key, None))

    async def _mark(self, key: str) -> None:
        while True:
            try:
                await self.store.mark_settlement_lost(key, at=time.time())
                refunded = await self.store.get(REFUND_PREFIX + key)
                break
            except StoreUnavailable as exc:
                log.warning(
                    "could not mark a lost settlement in the ledger; trying again",
                    extra={"key": key, "error": exc.message},
                )
            except Exception:
                log.exception("could not mark a lost settlement in the ledger", extra={"key": key})
                return
            await asyncio.sleep(RETRY_SECONDS)
        self.marked += 1
        if refunded is not None:
            # Refunded while its settlement was not final yet, then lost: the refund paid out money that never came.
            log.error(
                "settlement lost of a payment already refunded: the refund was paid from money never received",
                extra={"key": key, "refund_tx_hash": refunded.tx_hash},
            )

    async def aclose(self) -> None:
        for net in self._networks:
            with contextlib.suppress(ValueError):
                net.settlement_lost.remove(self.lost)
        self._networks.clear()
        pending = list(self._writes.items())
        if pending:
            await asyncio.wait([task for _, task in pending], timeout=2.0)  # a last chance for a slow write
        for key, task in pending:
            if not task.done():
                log.error("a lost settlement was not marked in the ledger before shutdown", extra={"key": key})
        await stop_all(task for _, task in pending)
