"""The deny-list: payer addresses whose payments the gateway refuses, and the :class:`DenyList` protocol.

An operator denies a payer through the admin API (docs/operating.md, "Admin API"); the entry lives in the shared
store, so every gateway instance on it refuses that payer's next payment. The payment middleware asks once per paid
request, after the payment named its payer and before anything settles: a denied payer's payment is refused with
403 ``payer_denied`` and nothing is charged (an authorization is never executed; money a transfer already moved stays
unserved, usable once the payer is allowed again).

Fail closed: any backend failure raises :class:`gateway.errors.StoreUnavailable` (a deny-list that cannot answer
cannot tell a denied payer from another one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["DeniedPayer", "DenyList", "payer_address"]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def payer_address(value: str) -> str:
    """``value`` as the deny-list keys it (lowercase 0x address); ``ValueError`` for anything else."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError("a payer is a 0x-prefixed 20-byte hex address")
    return value.lower()


@dataclass(frozen=True, slots=True)
class DeniedPayer:
    payer: str  # lowercase 0x address
    at: float  # epoch seconds when it was denied
    note: str = ""  # the operator's reason, free text
    by: str = ""  # who denied it: the admin token's name (its environment variable), never the token


@runtime_checkable
class DenyList(Protocol):
    async def deny(self, entry: DeniedPayer) -> bool:
        """Deny ``entry.payer``; True if it was not denied yet (an existing entry is kept as it is)."""
        ...

    async def allow(self, payer: str) -> bool:
        """Take ``payer`` off the list; True if it was on it."""
        ...

    async def denied(self, payer: str) -> bool:
        """Whether ``payer`` (any hex case) is denied. On every paid request: one point read."""
        ...

    async def entries(self, *, limit: int) -> list[DeniedPayer]:
        """Up to ``limit`` denied payers, most recently denied first."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
