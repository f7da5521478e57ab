"""Route overrides: the operator's run-time price and pause changes, shared by every gateway instance on a store.

The config file says what each route costs and whether it is paused; an admin change (``x402-gateway admin price``,
``... pause``) is written here instead, so that every instance on the same store applies it, whatever its own file
says. An override names a route by its pattern text (``"GET /report"``) and holds a price (atomic units), a paused
flag, or both; a field left ``None`` is the file's. :meth:`OverrideStore.version` is a counter every change raises:
an instance polls it (one small read) and reads the overrides only when it moved (docs/operating.md).

Fail closed like every store: a backend that cannot answer raises :class:`gateway.errors.StoreUnavailable` (a
poller then keeps the prices it has; an admin change is refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["OverrideStore", "Overrides", "RouteOverride"]


@dataclass(frozen=True, slots=True)
class RouteOverride:
    route: str  # the route's pattern text, as the config file writes it
    price: int | None = None  # atomic units; None: the file's price
    paused: bool | None = None  # None: the file's ``paused``
    updated_at: float = 0.0  # epoch seconds of the last change


@dataclass(frozen=True, slots=True)
class Overrides:
    version: int  # 0: never changed
    routes: Mapping[str, RouteOverride] = field(default_factory=dict)


@runtime_checkable
class OverrideStore(Protocol):
    async def version(self) -> int:
        """The change counter (0 when nothing was ever set): one small read, made every second by every instance."""
        ...

    async def read(self) -> Overrides:
        """Every override and the version they are at, read together."""
        ...

    async def set_price(self, route: str, price: int | None, *, now: float) -> int:
        """Override ``route``'s price (``None``: back to the file's); returns the new version."""
        ...

    async def set_paused(self, route: str, paused: bool | None, *, now: float) -> int:
        """Override whether ``route`` is paused (``None``: back to the file's); returns the new version."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
