"""The receipt store's identity: notice a store that lost its records, and take no payment from it until an operator
says so (docs/threat-model.md T30).

A wiped Redis or a replaced SQLite file forgets every consumed payment; served from as if nothing happened, it
would accept each of them again. The store carries an identity marker, written once. A gateway remembers the
marker it saw (in memory while it runs, and in ``store.identity_file`` across restarts), checks it with every
heartbeat, and when the marker is gone or replaced it writes ``lost:<old marker>`` into the store: every instance
sharing the store then refuses payments (503 ``store_identity_lost``; free routes and 402 challenges still work)
until ``x402-gateway store acknowledge`` writes a new marker. What stays refused even after an acknowledgement is
what the chain itself shows: authorizations and transfers this gateway's own relayer settled (T27).

The marker an acknowledgement writes is derived from the loss it acknowledges (:func:`acknowledged_identity` of
``lost:<old marker>``), never drawn at random. The store offers no compare-and-set of the marker, only "set" and "set
unless there is one", so two operators acknowledging one loss at the same moment both write: with random markers a
gateway that took the first one read the second as a replaced marker, a new loss, and every instance refused payments
again. Derived, both write the same marker. And a gateway whose heartbeat did not come round between the loss being
marked and its acknowledgement (it never saw ``lost:``) recognises the acknowledgement of the loss of its own marker
instead of reading it as another loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from pathlib import Path

from gateway.errors import StoreUnavailable
from gateway.storage.receipts import ReceiptStore
from gateway.x402 import reasons

log = logging.getLogger("gateway.payments")

LOST = "lost:"


def new_identity() -> str:
    return uuid.uuid4().hex


def acknowledged_identity(lost: str) -> str:
    """The marker that acknowledges the loss marked ``lost`` (``lost:<old marker>``): the same for every operator
    acknowledging that loss, a new one for every loss (module docstring)."""
    return hashlib.sha256(b"x402-gateway store acknowledged\n" + lost.encode()).hexdigest()[:32]


class StoreIdentity:
    def __init__(self, store: ReceiptStore, memory: Path | None) -> None:
        self.store = store
        self.memory = memory
        self.known: str | None = None  # the healthy marker this process accepted
        self.lost = False

    async def start(self) -> None:
        value = await self.store.identity()
        if value is None:
            remembered = self._remembered()
            # Missing while we remember one: the store lost its records since we last ran. Missing and nothing
            # remembered: a new store (or a loss nobody could notice: see the module docstring).
            marker = LOST + remembered if remembered else new_identity()
            value = await self.store.set_identity(marker, only_if_absent=True)
        self._adopt(value)

    async def check(self) -> None:
        """Called with every heartbeat: the marker must still be the one this process accepted."""
        value = await self.store.identity()
        if self.lost:
            if value is not None and not value.startswith(LOST):
                log.warning("the receipt store's loss was acknowledged: taking payments again")
                self._adopt(value)
            elif value is None:
                await self.store.set_identity(LOST + (self.known or "unknown"), only_if_absent=True)
            return
        if value == self.known:
            return
        if self.known is not None and value == acknowledged_identity(LOST + self.known):
            # Marked lost and acknowledged between two of our heartbeats: the loss of our own marker, acknowledged.
            log.warning("the receipt store lost its records and an operator acknowledged it: taking payments again")
            self._adopt(value)
            return
        if value is None or not value.startswith(LOST):
            # Gone, or replaced by a marker this process never saw being acknowledged: the records went with it.
            value = await self.store.set_identity(LOST + (self.known or "unknown"), only_if_absent=value is None)
        self._adopt(value)

    def require(self) -> None:
        if self.lost:
            raise StoreUnavailable(
                "the receipt store lost its records; an operator must run `x402-gateway store acknowledge`",
                reason=reasons.STORE_IDENTITY_LOST,
            )

    def _adopt(self, value: str) -> None:
        if value.startswith(LOST):
            if not self.lost:
                log.error("the receipt store lost its identity: refusing payments until acknowledged")
            self.lost = True
            return
        self.lost = False
        self.known = value
        self._remember(value)

    def _remembered(self) -> str | None:
        if self.memory is None:
            return None
        with contextlib.suppress(OSError):
            text = self.memory.read_text().strip()
            return text or None
        return None

    def _remember(self, value: str) -> None:
        if self.memory is None:
            return
        try:
            tmp = self.memory.with_name(self.memory.name + ".tmp")
            tmp.write_text(value + "\n")
            os.replace(tmp, self.memory)
        except OSError:
            log.warning("could not write store.identity_file; a wiped store is then noticed only while running")


async def acknowledge(store: ReceiptStore) -> tuple[str | None, str | None]:
    """The operator's word that the store's loss is understood: ``(marker before, marker now)``; instances take
    payments again. A healthy marker is left alone (``None`` after it): a new one would read as another loss to every
    running gateway. A missing one is written only if still missing; a loss gets the marker derived from it, so that
    operators acknowledging it at the same moment write one marker (module docstring)."""
    before = await store.identity()
    if before is not None and not before.startswith(LOST):
        return before, None
    if before is None:
        return before, await store.set_identity(new_identity(), only_if_absent=True)
    return before, await store.set_identity(acknowledged_identity(before), only_if_absent=False)


__all__ = ["LOST", "StoreIdentity", "acknowledge", "acknowledged_identity"]
