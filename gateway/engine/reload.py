"""Prices and routes changed without a restart (docs/operating.md, "Prices and routes at run time").

Two ways in, one way to apply:

* **The file** (``SIGHUP`` on ``x402-gateway serve``, or the admin reload): :meth:`Reloader.reload` reads the file
  the gateway was started with and validates all of it first. A bad file changes nothing and the result says why
  (the :class:`~gateway.errors.ConfigError` message). A file that changes anything only a restart can apply (the
  store, networks, keys, pay-to, listeners, a route's rate limits...) is refused as a whole, naming those keys:
  nothing is half-applied. Each instance reloads its own file.
* **The shared store** (the admin price and pause actions): :meth:`Reloader.set_price` and :meth:`Reloader.pause`
  write an override into the store (:mod:`gateway.storage.overrides`), so every instance on it applies the change,
  whatever its own file says. Every instance polls the store's version counter every :data:`POLL_SECONDS` (one
  small read; nothing on the request path) and reads the overrides when it moved; the instance that made the change
  applies it at once. An override stands until cleared (``price=None`` / ``paused=None``), across reloads; a reload
  reports the routes whose file values an override shadows.

Applying is one assignment: the engine's route table is replaced (:meth:`PaymentEngine.swap_routes`), and a request
keeps the table it started with (gateway/http/context.py). The money rule: a payment answering a 402 from before a
change pays at the price that 402 showed, for as long as that 402's payments can be valid (the route's
``max_timeout_seconds``, plus the clock skew the window check allows, plus one poll interval for an instance that
learned of the change late). The engine keeps each route's earlier prices with that deadline
(:mod:`gateway.schemes.prices`); new 402s show only the new price. The history is kept in memory: a restarted
instance honours only the prices in force.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, RouteConfig, load_config
from gateway.engine.engine import PaymentEngine
from gateway.errors import BadRequest, ConfigError, StoreUnavailable
from gateway.money import MAX_ATOMIC, format_usd
from gateway.schemes.prices import EarlierPrice
from gateway.storage.overrides import Overrides, OverrideStore, RouteOverride, open_override_store
from gateway.tasks import stop
from gateway.x402 import reasons

__all__ = ["HISTORY_LIMIT", "POLL_SECONDS", "ReloadResult", "Reloader", "RouteState", "needs_restart"]

log = logging.getLogger("gateway.reload")

POLL_SECONDS = 1.0  # how often an instance checks the shared store's override version
HISTORY_LIMIT = 8  # earlier prices kept per route (each for one payment window at most)
# A route's keys that only a restart applies: the rate limiter is built from them at start.
RESTART_ROUTE_KEYS = ("rate_limit_challenge", "rate_limit_paid")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did, or why it did nothing."""

    ok: bool
    message: str  # one line for a log or a terminal
    changed: tuple[str, ...] = ()  # "GET /report: price $0.01 -> $0.02", "POST /new: added", ...
    needs_restart: tuple[str, ...] = ()  # dotted keys only a restart applies (nothing was applied)
    overridden: tuple[str, ...] = ()  # routes whose file price or pause an admin override shadows
    error: str | None = None  # the file's ConfigError, when it is invalid

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "changed": list(self.changed),
            "needs_restart": list(self.needs_restart),
            "overridden": list(self.overridden),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RouteState:
    """One route as it is served now, and where that comes from."""

    route: str
    price: int  # atomic units, in force
    paused: bool  # in force
    file_price: int
    file_paused: bool
    override: RouteOverride | None
    earlier: tuple[EarlierPrice, ...]  # earlier prices still honoured

    def as_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "price": str(self.price),
            "price_usd": format_usd(self.price),
            "paused": self.paused,
            "file_price": str(self.file_price),
            "file_paused": self.file_paused,
            "override": None
            if self.override is None
            else {
                "price": None if self.override.price is None else str(self.override.price),
                "paused": self.override.paused,
                "updated_at": self.override.updated_at,
            },
            "earlier": [{"price": str(p.amount), "until": p.until} for p in self.earlier],
        }


class Reloader:
    """Changes the engine's routes and prices at run time (see the module docstring). ``path``: the config file the
    gateway was started with (None: no file to reload; overrides still work). ``env``: what the file's ``*_env``
    keys are read from (default ``os.environ``, as at start)."""

    def __init__(
        self,
        engine: PaymentEngine,
        path: str | os.PathLike[str] | None = None,
        *,
        overrides: OverrideStore | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.path = None if path is None else Path(path)
        self.env = env
        self.store = overrides or open_override_store(engine.config.store.url.reveal())
        self.clock = clock
        self.file = engine.config  # the config as the file says it (no overrides)
        self.overrides = Overrides(version=-1)  # as last read from the store; -1: not read yet
        self.history: dict[str, tuple[EarlierPrice, ...]] = {}
        # Called after every swap with the config now in force (discovery documents, the paywall's view).
        self.listeners: list[Callable[[GatewayConfig], None]] = []
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._poll_failing = False
        self._started = False  # before: overrides apply as the prices in force, with no earlier price to honour

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Apply the store's overrides before the first request, then follow them."""
        await self.store.ping()
        await self.refresh()
        self._started = True
        self._poller = asyncio.create_task(self._poll(), name="x402-route-overrides")

    async def aclose(self) -> None:
        await stop(self._poller)
        self._poller = None
        await self.store.aclose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.refresh()
            except StoreUnavailable as exc:  # keep the prices in force; say so once per outage
                if not self._poll_failing:
                    log.warning("cannot read route overrides; keeping the prices in force", extra={"error": str(exc)})
                self._poll_failing = True
                continue
            except Exception:
                log.exception("applying route overrides failed; keeping the prices in force")
                continue
            if self._poll_failing:
                log.info("route overrides readable again")
            self._poll_failing = False

    # ------------------------------------------------------------------------------------------------ actions

    async def refresh(self) -> bool:
        """Apply the store's overrides if they changed since last read; whether anything was read."""
        if await self.store.version() == self.overrides.version:
            return False
        async with self._lock:
            overrides = await self.store.read()
            if overrides.version == self.overrides.version:
                return False
            changed = self._apply(self.file, overrides)
        if changed:
            log.info("route overrides applied", extra={"changed": list(changed), "version": overrides.version})
        return True

    async def reload(self) -> ReloadResult:
        """Re-read the config file; apply it whole, or nothing (see the module docstring)."""
        if self.path is None:
            return ReloadResult(False, "this gateway was not started from a config file: nothing to reload")
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_config, self.path, env=self.env)
            except ConfigError as exc:
                result = ReloadResult(False, f"config error, nothing changed: {exc.message}", error=exc.message)
                log.warning("reload refused", extra={"error": exc.message})
                return result
            restart = needs_restart(self.file, new, sessions=self.engine.sessions is not None)
            if restart:
                message = "nothing changed: these keys need a restart: " + ", ".join(restart)
                log.warning("reload refused", extra={"needs_restart": restart})
                return ReloadResult(False, message, needs_restart=tuple(restart))
            changed = self._apply(new, self.overrides)
            self.file = new
        overridden = tuple(
            r.route for r in new.routes if (o := self.overrides.routes.get(r.route)) is not None and _shadows(o, r)
        )
        message = f"reloaded {self.path.name}: " + ("; ".join(changed) if changed else "no change")
        if overridden:
            message += f" (admin overrides in force on {', '.join(overridden)})"
        log.info("config reloaded", extra={"changed": list(changed), "overridden": list(overridden)})
        return ReloadResult(True, message, changed=tuple(changed), overridden=overridden)

    async def set_price(self, route: str, price: int | None) -> RouteState | None:
        """Set ``route``'s price (atomic units) on every instance of the store; ``None``: back to the file's.
        Raises ``BadRequest`` (``route_not_found``, or a price that is not positive or beyond what the stores keep
        exactly) and ``StoreUnavailable``. Clearing works for a route the file no longer has (its override would
        otherwise come back with it); the answer is then None."""
        self._configured(route, clearing=price is None)
        if price is not None and (isinstance(price, bool) or not isinstance(price, int) or not 0 < price <= MAX_ATOMIC):
            raise BadRequest(
                f"a price is a whole number of atomic units from 1 to {MAX_ATOMIC}", reason=reasons.BAD_REQUEST
            )
        await self.store.set_price(route, price, now=self.clock())
        await self.refresh()
        return self._state_if_configured(route)

    async def pause(self, route: str, paused: bool | None = True) -> RouteState | None:
        """Pause (or resume: ``False``) ``route`` on every instance of the store; ``None``: back to the file's
        (also for a route the file no longer has: the answer is then None)."""
        self._configured(route, clearing=paused is None)
        await self.store.set_paused(route, paused, now=self.clock())
        await self.refresh()
        return self._state_if_configured(route)

    def _state_if_configured(self, route: str) -> RouteState | None:
        return next((s for s in self.states() if s.route == route), None)

    # -------------------------------------------------------------------------------------------------- views

    def states(self) -> list[RouteState]:
        """Every configured route as served now (the admin API's and the dashboard's view)."""
        in_force = {r.route: r for r in self.engine.config.routes}
        out: list[RouteState] = []
        for r in self.file.routes:
            now = in_force.get(r.route, r)
            out.append(
                RouteState(
                    route=r.route,
                    price=now.price,
                    paused=now.paused,
                    file_price=r.price,
                    file_paused=r.paused,
                    override=self.overrides.routes.get(r.route),
                    earlier=self.history.get(r.route, ()),
                )
            )
        return out

    def state(self, route: str) -> RouteState:
        return next(s for s in self.states() if s.route == route)

    def _configured(self, route: str, *, clearing: bool = False) -> None:
        if clearing and route in self.overrides.routes:
            return  # an override left by a route since removed from the file: clearing it is always allowed
        if not any(r.route == route for r in self.file.routes):
            raise BadRequest(f"no configured route {route!r}", reason=reasons.ROUTE_NOT_FOUND)

    # ------------------------------------------------------------------------------------------------ applying

    def _apply(self, file: GatewayConfig, overrides: Overrides) -> list[str]:
        """Make ``file``'s routes with ``overrides`` the routes in force; returns what changed, for people."""
        now = self.clock()
        before = {r.route: r for r in self.engine.config.routes}
        routes = tuple(_overridden(r, overrides.routes.get(r.route)) for r in file.routes)
        skew = file.payment.clock_skew_seconds
        history: dict[str, tuple[EarlierPrice, ...]] = {}
        for r in routes:
            kept = [p for p in self.history.get(r.route, ()) if p.until >= now and p.amount != r.price]
            old = before.get(r.route)
            if self._started and old is not None and old.price != r.price:
                # Payments answering a 402 at the old price can be valid until then (gateway/schemes/prices.py).
                until = now + old.max_timeout_seconds + skew + POLL_SECONDS
                kept = [p for p in kept if p.amount != old.price] + [EarlierPrice(old.price, until)]
            if kept:
                history[r.route] = tuple(kept[-HISTORY_LIMIT:])
        self.engine.swap_routes(routes, history)
        self.history = history
        self.overrides = overrides
        config = self.engine.config
        for listener in self.listeners:
            try:
                listener(config)
            except Exception:  # a view that could not follow must not undo the prices in force
                log.exception("a reload listener failed")
        return describe_changes(before, routes)


def _overridden(route: RouteConfig, override: RouteOverride | None) -> RouteConfig:
    if override is None:
        return route
    price = route.price if override.price is None else override.price
    paused = route.paused if override.paused is None else override.paused
    return route if (price, paused) == (route.price, route.paused) else replace(route, price=price, paused=paused)


def _shadows(override: RouteOverride, route: RouteConfig) -> bool:
    return (override.price is not None and override.price != route.price) or (
        override.paused is not None and override.paused != route.paused
    )


def describe_changes(before: Mapping[str, RouteConfig], after: Sequence[RouteConfig]) -> list[str]:
    """What changed between two sets of routes, one line per route, for logs and the admin's answer."""
    out: list[str] = []
    names = [r.route for r in after]
    for r in after:
        old = before.get(r.route)
        if old is None:
            out.append(f"{r.route}: added at ${format_usd(r.price)}")
            continue
        parts = []
        if old.price != r.price:
            parts.append(f"price ${format_usd(old.price)} -> ${format_usd(r.price)}")
        if old.paused != r.paused:
            parts.append("paused" if r.paused else "resumed")
        others = [
            f.name
            for f in dataclasses.fields(RouteConfig)
            if f.name not in ("price", "paused") and getattr(old, f.name) != getattr(r, f.name)
        ]
        parts.extend(others)
        if parts:
            out.append(f"{r.route}: {', '.join(parts)}")
    out.extend(f"{name}: removed" for name in before if name not in names)
    return out


def needs_restart(old: GatewayConfig, new: GatewayConfig, *, sessions: bool) -> list[str]:
    """The dotted keys whose change only a restart can apply: every section but ``[[routes]]``, a route's rate
    limits, and sessions on a gateway that started without them. Values are never named (they may be secrets)."""
    out: list[str] = []
    for f in dataclasses.fields(GatewayConfig):
        if f.name != "routes":
            out.extend(_differences(getattr(old, f.name), getattr(new, f.name), f.name))
    before = {r.route: r for r in old.routes}
    for i, r in enumerate(new.routes):
        prior = before.get(r.route)
        for key in RESTART_ROUTE_KEYS:
            if getattr(r, key) != (getattr(prior, key) if prior is not None else None):
                out.append(f"routes[{i}].{key}")
        if "batch-settlement" in r.schemes and not sessions:
            out.append(f"routes[{i}].schemes (sessions were not offered at start)")
    return out


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            out.extend(_differences(getattr(old, f.name), getattr(new, f.name), f"{path}.{f.name}"))
        return out or [path]
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            if key not in old or key not in new:
                out.append(f"{path}.{key}")
            else:
                out.extend(_differences(old[key], new[key], f"{path}.{key}"))
        return out or [path]
    return [path]
