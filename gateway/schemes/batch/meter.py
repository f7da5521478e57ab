"""Metered prices: a session request's charge read from the upstream's answer, never above its ceiling.

Sans-IO. The upstream reports what a request cost in a response header (dollars or atomic units), which the
gateway strips before the client sees it, or as a number in its JSON answer (``usage.total_tokens``) times a
per-unit price. A report that cannot be read, is negative, or is missing charges what the route configures
(``missing``: the ceiling, or nothing); one above the ceiling charges the ceiling (the voucher covers no more),
and both are logged (docs/sessions.md).
"""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.config import MeterConfig
from gateway.networks import USDC_DECIMALS
from gateway.x402.codec import RawHeaders, loads

log = logging.getLogger("gateway.sessions")

__all__ = ["Meter"]

MAX_METERED_BODY = 1024 * 1024  # a JSON answer larger than this is not read for usage (the fallback applies)


class Meter:
    def __init__(self, config: MeterConfig | None, ceiling: int) -> None:
        self.config = config
        self.ceiling = ceiling

    @property
    def reads_body(self) -> bool:
        return self.config is not None and self.config.json is not None

    def fallback(self) -> int:
        assert self.config is not None
        return self.ceiling if self.config.missing == "ceiling" else 0

    def _bounded(self, charge: int | None) -> int:
        if charge is None or charge < 0:
            log.warning("the upstream's usage report is missing or unreadable; charging the configured fallback")
            return self.fallback()
        if charge > self.ceiling:
            log.warning("the upstream reported a charge above the route's price; charging the price")
            return self.ceiling
        return charge

    def from_headers(self, headers: RawHeaders) -> tuple[int | None, RawHeaders]:
        """``(charge, headers without the meter's)``; charge None when this route's charge is not in a header."""
        cfg = self.config
        if cfg is None or cfg.header is None:
            return None, headers
        name = cfg.header.encode("latin-1")
        values = [v for k, v in headers if k.lower() == name]
        kept = [(k, v) for k, v in headers if k.lower() != name]
        charge = None
        if len(values) == 1:  # two reports of one charge are no report
            charge = _amount(values[0].decode("latin-1").strip(), cfg.unit)
        return self._bounded(charge), kept

    def from_json(self, body: bytes) -> int:
        """The charge from a JSON answer (or from the last JSON line / SSE ``data:`` event of a stream)."""
        cfg = self.config
        assert cfg is not None and cfg.json is not None
        doc = _last_json(body)
        value: Any = doc
        for part in cfg.json.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return self._bounded(None)
        if isinstance(value, float) and not math.isfinite(value):  # (an int is never: JSON's have no bound)
            return self._bounded(None)
        return self._bounded(math.ceil(Decimal(value if isinstance(value, int) else str(value)) * cfg.unit_price))


_PLAIN_NUMBER = re.compile(r"\$?[0-9]{1,30}(\.[0-9]{1,30})?")  # no exponent: "1e7000000" would take seconds


def _amount(text: str, unit: str) -> int | None:
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text.removeprefix("$"))
    except InvalidOperation:
        return None
    if not value.is_finite() or value < 0:
        return None
    if unit == "usd":
        value = value.scaleb(USDC_DECIMALS)
    if value != value.to_integral_value():
        value = value.to_integral_value(rounding="ROUND_CEILING")  # a fraction of a unit is a whole unit
    return int(value)


def _last_json(body: bytes) -> Any:
    """The whole body as JSON, or else the last line (SSE ``data:`` prefix removed) that parses as JSON."""
    try:
        return loads(body)
    except ValueError:
        pass
    for line in reversed(body.splitlines()):
        text = line.strip()
        if text.startswith(b"data:"):
            text = text[5:].strip()
        if not text or text == b"[DONE]":
            continue
        try:
            return loads(text)
        except ValueError:
            continue
    return None
