"""The relayers of a deployment: every address that settles ``exact`` payments for the gateways sharing one store.

A transaction one of them sent settled a payment some gateway of the deployment already collected (and served, or
will serve from its record). When the record is gone (expired, or lost with the last writes of a failover), the
chain still says who sent it, and only a *third party's* execution of an authorization may pay for a request then
(docs/threat-model.md T9, T27, T30). Knowing only its own relayer, one instance took another instance's settlement for
a third party's and served the payment again. So every instance records its relayer addresses in the shared store
(at start and with every heartbeat: a store that lost them gets them back, and a store that lost everything is refused
until acknowledged, T30), and asks the store again when an address it does not know might be a peer's.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.storage.receipts import ReceiptStore


class DeploymentRelayers:
    def __init__(self, store: ReceiptStore, own: Iterable[str]) -> None:
        self._store = store
        self._own = frozenset(address.lower() for address in own)
        self._known = self._own  # own, and every peer's seen in the store so far (never forgotten)

    async def register(self) -> None:
        """Make sure the store lists this instance's relayers (one read; a write only when one is missing)."""
        if not self._own:
            return
        recorded = await self._store.relayers()
        self._known |= recorded
        if not self._own <= recorded:
            await self._store.add_relayers(self._own - recorded)

    async def settled_by_us(self, address: str) -> bool:
        """Whether ``address`` is a relayer of this deployment (this instance's, or a peer's the store lists)."""
        address = address.lower()
        if address in self._known:
            return True
        self._known |= await self._store.relayers()  # a peer that started since this instance last looked
        return address in self._known


__all__ = ["DeploymentRelayers"]
