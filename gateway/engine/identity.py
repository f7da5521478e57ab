"""The receipt store's identity: notice a store that lost its records, and take no payment from it until an operator
says so (docs/threat-model.md T30).

A wiped Redis or a replaced SQLite file forgets every consumed payment; served from as if nothing happened, it
would accept each of them again. The store carries an identity marker, written once. A gateway remembers the
marker it saw (in memory while it runs, and in ``store.identity_file`` across restarts), checks it with every
heartbeat, and when the marker is gone or replaced it writes ``lost:<old marker>`` into the store: every instance
sharing the store then refuses payments (503 ``store_identity_lost``; free routes and 402 challenges still work)
until ``x402-gateway store acknowledge`` writes a new marker. What stays refused even after an acknowledgement is
what the chain itself shows: authorizations and transfers this gateway's own relayer settled (T27).
"""

from __future__ import annotations

import contextlib
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


async def acknowledge(store: ReceiptStore) -> tuple[str | None, str]:
    """The operator's word that the store's loss is understood: a new marker; instances take payments again."""
    before = await store.identity()
    after = await store.set_identity(new_identity(), only_if_absent=False)
    return before, after


__all__ = ["LOST", "StoreIdentity", "acknowledge"]
