"""The admin API's actions: the deny-list, refunds, and (through the :class:`Reloader`) reload, price and pause.

Each action puts what it was asked into ``call.args``, which the audit log records with the call's outcome.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from gateway.config import GatewayConfig
from gateway.errors import BadRequest, ConfigError
from gateway.http.admin.calls import Answer, Call, admin_error
from gateway.http.admin.masked import plain
from gateway.http.admin.queries import entry_doc
from gateway.http.admin.refunds import Refunds
from gateway.http.admin.stores import AdminStores
from gateway.money import parse_usd
from gateway.storage.denylist import DeniedPayer
from gateway.x402 import reasons

__all__ = ["Actions", "Reloader"]

MAX_NOTE = 500  # characters of a deny-list note


class Reloader(Protocol):
    """Prices and routes at run time (:class:`gateway.engine.reload.Reloader`): a bad file or a bad value raises
    ``ConfigError`` / ``BadRequest`` (or the reload's result says why), and nothing changes."""

    async def reload(self) -> Any: ...

    async def set_price(self, route: str, price: int | None) -> Any: ...

    async def pause(self, route: str, paused: bool | None = True) -> Any: ...

    def states(self) -> Any: ...


class Actions:
    def __init__(
        self, config: GatewayConfig, stores: AdminStores, refunds: Refunds | None, reloader: Reloader | None
    ) -> None:
        self._config = config
        self._stores = stores
        self._refunds = refunds
        self._reloader = reloader

    # -- the deny-list ----------------------------------------------------------------------------------------

    async def deny(self, call: Call) -> Answer:
        """``POST /admin/deny {"payer": "0x...", "note": "..."}``: every instance refuses the payer's payments."""
        call.only(("payer", "note"))
        payer = call.payer(required=True)
        note = call.text("note") or ""
        call.args = {"payer": payer, "note": note}
        if len(note) > MAX_NOTE:
            raise BadRequest(f"note is longer than {MAX_NOTE} characters")
        assert payer is not None
        added = await self._stores.denylist.deny(DeniedPayer(payer, time.time(), note, call.caller.name))
        return Answer(200, {"payer": payer, "denied": True, "added": added})

    async def allow(self, call: Call) -> Answer:
        """``DELETE /admin/deny/{payer}``: the payer's payments are taken again."""
        call.only(())
        payer = call.payer(required=True)
        call.args = {"payer": payer}
        assert payer is not None
        removed = await self._stores.denylist.allow(payer)
        return Answer(200, {"payer": payer, "denied": False, "removed": removed})

    # -- refunds ----------------------------------------------------------------------------------------------

    async def refund(self, call: Call) -> Answer:
        """``POST /admin/refund {"key": "<ledger key>"}``: 200 with the refund's entry when this call completed it
        (``sent``: false when it found an earlier attempt's transfer on chain), 409 ``payment_already_refunded``
        (with the entry) when it had been refunded before."""
        call.only(("key",))
        key = call.text("key", required=True)
        call.args = {"key": key}
        assert key is not None
        if self._refunds is None:
            raise admin_error(501, reasons.NOT_CONFIGURED, "no refund key: set [admin].refund_key_env's variable")
        outcome = await self._refunds.refund(key, by=call.caller.name)
        doc = entry_doc(outcome.entry) if outcome.entry is not None else None
        if outcome.entry is not None:
            call.args["tx_hash"] = outcome.entry.tx_hash
        if outcome.done_now:  # sent now, or an earlier attempt's transfer found on chain and recorded now
            return Answer(200, {"refund": doc, "sent": outcome.sent})
        body = {"error": reasons.PAYMENT_ALREADY_REFUNDED, "message": "this payment was refunded before", "refund": doc}
        return Answer(409, body, reason=reasons.PAYMENT_ALREADY_REFUNDED)

    # -- prices and routes at run time ------------------------------------------------------------------------

    def _reloading(self) -> Reloader:
        if self._reloader is None:
            raise admin_error(501, reasons.NOT_CONFIGURED, "this gateway changes prices and routes only on restart")
        return self._reloader

    async def reload(self, call: Call) -> Answer:
        """``POST /admin/reload``: re-read the configuration file; a bad file changes nothing and says why (400)."""
        call.only(())
        reloader = self._reloading()
        try:
            result = await reloader.reload()
        except ConfigError as exc:
            raise BadRequest(exc.message, reason=reasons.INVALID_CONFIG) from None
        doc = _doc(result)
        call.args = {"result": doc.get("message") if isinstance(doc, dict) else doc}
        if getattr(result, "ok", True):
            return Answer(200, {"reloaded": True, "result": doc})
        message = str(getattr(result, "message", "nothing changed"))
        body = {"error": reasons.INVALID_CONFIG, "message": message, "reloaded": False, "result": doc}
        return Answer(400, body, reason=reasons.INVALID_CONFIG)

    async def set_price(self, call: Call) -> Answer:
        """``POST /admin/routes/price {"route": "GET /x", "price": "0.25"}``: dollars, as in the file; ``null`` goes
        back to the file's price. Every instance on the store applies it."""
        call.only(("route", "price"))
        route = call.text("route", required=True)
        if "price" not in call.body:
            raise BadRequest('price is required: dollars as a string ("0.25"), or null for the file\'s price')
        raw = call.body["price"]
        call.args = {"route": route, "price": raw}
        price: int | None = None
        if raw is not None:
            if isinstance(raw, bool | float):
                raise BadRequest('price must be dollars as a string, e.g. "0.25" (never a float)')
            try:
                price = parse_usd(raw)
            except ValueError as exc:
                raise BadRequest(f"price: {exc}") from None
            except ArithmeticError:  # decimal.Overflow: an exponent beyond Decimal's range ("1e999999999")
                raise BadRequest("price: not an amount the gateway can hold") from None
            call.args["atomic"] = price
        assert route is not None
        reloader = self._reloading()
        try:
            state = await reloader.set_price(route, price)
        except ConfigError as exc:
            raise BadRequest(exc.message, reason=reasons.INVALID_CONFIG) from None
        return Answer(200, {"route": route, "state": _doc(state)})

    async def pause(self, call: Call) -> Answer:
        """``POST /admin/routes/pause {"route": "GET /x", "paused": true}``: ``false`` resumes it, ``null`` goes
        back to the file's setting. A paused route answers 503 before any payment is taken."""
        call.only(("route", "paused"))
        route = call.text("route", required=True)
        if "paused" in call.query:
            # Only the JSON body says true, false or null; read from nowhere, ?paused=false would pause the route.
            raise BadRequest("paused goes in the JSON body: true, false or null")
        paused = call.body.get("paused", True)
        call.args = {"route": route, "paused": paused}
        if paused is not None and not isinstance(paused, bool):
            raise BadRequest("paused must be true, false or null")
        assert route is not None
        reloader = self._reloading()
        try:
            state = await reloader.pause(route, paused)
        except ConfigError as exc:
            raise BadRequest(exc.message, reason=reasons.INVALID_CONFIG) from None
        return Answer(200, {"route": route, "state": _doc(state)})


def _doc(value: Any) -> Any:
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else plain(value)
