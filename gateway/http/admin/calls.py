"""What an admin handler is given (:class:`Call`) and gives back (:class:`Answer`), and the readers of its inputs.

Inputs are checked strictly: an unknown query parameter or body field is a 400, because a typo silently ignored
(``?payr=0x...``) would answer another question than the one asked (every payment instead of one payer's).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import BadRequest, GatewayError
from gateway.http.admin.auth import Caller
from gateway.storage.denylist import payer_address

__all__ = ["Answer", "Call", "admin_error", "tx_hash"]

_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def admin_error(status: int, reason: str, message: str) -> GatewayError:
    """A refusal with its own status (the error tree's classes cover the public gateway's answers)."""
    exc = GatewayError(message, reason=reason)
    exc.status = status  # type: ignore[misc]
    return exc


@dataclass(slots=True)
class Call:
    caller: Caller
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)  # an action's JSON object
    params: dict[str, str] = field(default_factory=dict)  # from the path (DELETE /admin/deny/{payer})
    args: dict[str, Any] = field(default_factory=dict)  # what the audit log records of an action's arguments

    def only(self, allowed: Iterable[str]) -> None:
        """Refuse query parameters and body fields other than ``allowed``."""
        allowed = set(allowed)
        for name in (*self.query, *self.body):
            if name not in allowed:
                raise BadRequest(f"unknown parameter {name!r} (expected: {', '.join(sorted(allowed)) or 'none'})")
        both = sorted(self.query.keys() & self.body.keys())
        if both:  # two values for one argument: acting on either would be acting on something not asked for
            raise BadRequest(f"{both[0]!r} is given in both the query and the JSON body")

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self.query.get(name, self.body.get(name))
        if value is None or value == "":
            if required:
                raise BadRequest(f"{name} is required")
            return None
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        return value

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self.query.get(name, self.body.get(name))
        if raw is None or raw == "":
            return default
        try:
            value = int(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or not minimum <= value <= maximum:
            raise BadRequest(f"{name} must be an integer from {minimum} to {maximum}")
        return value

    def time(self, name: str) -> float | None:
        """Epoch seconds, or an ISO 8601 date or time (UTC unless it says otherwise): ``2025-06-01``."""
        raw = self.text(name)
        if raw is None:
            return None
        try:
            epoch = float(raw)
        except ValueError:
            pass
        else:
            if not math.isfinite(epoch):  # "nan" and "inf" parse, match nothing, and are not JSON to echo back
                raise BadRequest(f"{name} must be a finite number of epoch seconds or an ISO 8601 date/time")
            return epoch
        try:
            moment = datetime.datetime.fromisoformat(raw)
        except ValueError:
            raise BadRequest(f"{name} must be epoch seconds or an ISO 8601 date/time, e.g. 2025-06-01") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()

    def payer(self, name: str = "payer", *, required: bool = False) -> str | None:
        raw = self.params.get(name) or self.text(name, required=required)
        if raw is None:
            return None
        try:
            return payer_address(raw)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from None


def tx_hash(value: str | None) -> str | None:
    if value is None:
        return None
    if not _TX_HASH.fullmatch(value):
        raise BadRequest("tx must be a 0x-prefixed 32-byte hex transaction hash")
    return value.lower()


@dataclass(slots=True)
class Answer:
    status: int
    body: Any = None  # JSON
    stream: AsyncIterator[bytes] | None = None  # or a streamed body of ``content_type``
    content_type: str = "application/json"
    filename: str | None = None  # a download's name (Content-Disposition)
    page: bytes | None = None  # or a whole body (the dashboard's HTML) with its own ``headers``
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reason: str | None = None  # an error's reason, for the audit log
