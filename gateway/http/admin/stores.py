"""The stores the admin API reads and writes, each its own connection on the gateway's storage.

The ledger (``[ledger].store_url``, by default ``[store].url``), and on the receipt store's storage: the deny-list,
the settlement journal (settlements not final yet), the session channels (charges not claimed yet) and the jobs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.storage.backend import open_backend
from gateway.storage.channels import ChannelStore, channel_store_on
from gateway.storage.denylist import DenyList, denylist_on
from gateway.storage.jobs import JobStore, job_store_on
from gateway.storage.ledger import LedgerStore, open_ledger_store
from gateway.storage.settlements import SettlementJournal, settlement_journal_on

__all__ = ["AdminStores"]


@dataclass(frozen=True, slots=True)
class AdminStores:
    ledger: LedgerStore
    denylist: DenyList
    journal: SettlementJournal
    channels: ChannelStore
    jobs: JobStore

    @classmethod
    def open(cls, config: GatewayConfig) -> AdminStores:
        """Nothing is connected here (see :meth:`ping`)."""
        backend = open_backend(config.store.url.reveal(), config_key="store.url")
        return cls(
            ledger=open_ledger_store((config.ledger.store_url or config.store.url).reveal()),
            denylist=denylist_on(backend),
            journal=settlement_journal_on(backend),
            channels=channel_store_on(backend),
            jobs=job_store_on(backend),
        )

    async def ping(self) -> None:
        """Fail at start, not on the operator's first question, if the storage does not answer."""
        await self.ledger.ping()
        await self.denylist.ping()

    async def aclose(self) -> None:
        for store in (self.ledger, self.denylist, self.journal, self.channels, self.jobs):
            with contextlib.suppress(GatewayError):
                await store.aclose()
