"""Idempotency records: the life of a record and the :class:`IdempotencyStore` protocol.

One record per ``record_key`` (a digest of the ``Idempotency-Key`` and the payment headers, see
:mod:`gateway.http.idempotency`); the store never sees a raw key or a raw payment header. Life of a record::

    (absent) --begin--> IN_FLIGHT(owner, fingerprint, lease) --complete--> DONE(response, ttl)
                            '--abandon--> (absent)        (failure: the retry proceeds normally)

* ``begin`` is one atomic step (SQLite ``BEGIN IMMEDIATE``, one Redis Lua script): of N concurrent requests with
  the same record key exactly one gets ``began``; the others see ``in_flight`` (or ``mismatch`` when their request
  fingerprint differs, or ``done`` with the stored response once it is stored).
* An IN_FLIGHT record's expiry is its lease: a gateway that died mid-request leaves a record that a retry takes
  over once the lease has passed (``began`` with ``taken_over=True``). A DONE record lives ``ttl`` seconds.
* ``complete``/``abandon`` are compare-and-set on ``owner``: a request whose lease lapsed and was taken over
  cannot overwrite or delete the new owner's record.

Fail closed (a store that cannot answer cannot tell a retry from a first request): every backend failure raises
:class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Begun", "IdempotencyStore", "Outcome", "StoredResponse", "decode_headers", "encode_headers"]

Outcome = Literal["began", "in_flight", "mismatch", "done"]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Begun:
    """What ``begin`` found: ``began`` (the caller owns a fresh IN_FLIGHT record), ``in_flight`` (someone else's
    live lease, same fingerprint), ``mismatch`` (a live record with another fingerprint) or ``done`` (the stored
    ``response``, same fingerprint)."""

    outcome: Outcome
    response: StoredResponse | None = None
    taken_over: bool = False  # ``began`` over an IN_FLIGHT record whose lease had lapsed


@runtime_checkable
class IdempotencyStore(Protocol):
    """Every method raises ``StoreUnavailable`` when the backend cannot answer. ``now`` is epoch seconds."""

    async def begin(self, key: str, fingerprint: str, owner: str, *, now: float, lease: float) -> Begun: ...

    async def complete(self, key: str, owner: str, response: StoredResponse, *, now: float, ttl: float) -> bool:
        """IN_FLIGHT(owner) -> DONE(response) for ``ttl`` seconds; False if ``owner`` no longer holds it."""
        ...

    async def abandon(self, key: str, owner: str) -> None:
        """Delete ``owner``'s IN_FLIGHT record; a no-op if it lost it."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def encode_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """Stored headers as text; latin-1 maps every byte to one code point, so any header bytes round-trip."""
    return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers], separators=(",", ":"))


def decode_headers(text: str | bytes) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(text)]
