"""``[[routes]]``: the priced routes, each with its price in atomic USDC units and the networks it is paid on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from gateway.config.discovery import RouteDocs, parse_route_docs
from gateway.config.networks import NetworkConfig
from gateway.config.payment import PaymentConfig
from gateway.config.sessions import MeterConfig, parse_meter
from gateway.config.table import Defaults, Table
from gateway.config.values import rate
from gateway.errors import ConfigError
from gateway.money import parse_usd
from gateway.routes import RoutePattern

__all__ = ["RouteConfig", "Settlement", "TxHashBinding", "parse_routes"]

Settlement = Literal["before", "after"]
SCHEMES = ("exact", "batch-settlement")  # what ``schemes`` may list
TxHashBinding = Literal["required", "optional"]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    pattern: RoutePattern
    price: int  # atomic USDC units
    networks: tuple[str, ...]
    description: str = ""
    mime_type: str = "application/json"
    settlement: Settlement = "after"  # "after": no charge when the upstream fails
    max_timeout_seconds: int = Defaults(PaymentConfig).max_timeout_seconds  # in a file: payment.max_timeout_seconds
    tx_hash: bool = True  # also accept tx-hash proofs (x-payment: 0x<hash> + x-payment-network)
    # "optional": a tx-hash proof without X-PAYMENT-BINDING is served to its first presenter, whoever that is
    # (docs/threat-model.md T43); "required": refused with payment_binding_required
    tx_hash_binding: TxHashBinding = "required"
    rate_limit_challenge: str | None = None  # None: rate_limits.challenge
    rate_limit_paid: str | None = None  # None: rate_limits.paid
    docs: RouteDocs = field(default_factory=RouteDocs)  # discovery and paywall metadata
    schemes: tuple[str, ...] = ("exact",)  # x402 schemes offered; "batch-settlement": sessions (docs/sessions.md)
    meter: MeterConfig | None = None  # sessions only: the charge comes from the answer, up to ``price``
    paused: bool = False  # answered 503 route_paused before any payment is taken (docs/operating.md)

    @property
    def route(self) -> str:
        return self.pattern.text


_DEFAULT = Defaults(RouteConfig)


def parse_routes(
    root: Table, networks: Mapping[str, NetworkConfig], payment: PaymentConfig, *, base_dir: Path
) -> tuple[RouteConfig, ...]:
    raw_routes = root.get("routes", list, [])
    return tuple(
        _route(Table(r, f"routes[{i}]"), networks, payment, base_dir=base_dir) for i, r in enumerate(raw_routes)
    )


def _route(t: Table, networks: Mapping[str, NetworkConfig], payment: PaymentConfig, *, base_dir: Path) -> RouteConfig:
    text = t.require("route", str)
    try:
        pattern = RoutePattern.parse(text)
    except ValueError as exc:
        raise ConfigError(t.key("route"), str(exc)) from None
    raw_price = t.require("price", (str, int))
    try:
        price = parse_usd(raw_price)
    except ValueError as exc:
        raise ConfigError(t.key("price"), str(exc)) from None
    if price <= 0:
        raise ConfigError(t.key("price"), "must be greater than zero (leave free routes out of [[routes]])")
    names = t.get("networks", list, list(networks))  # default: every configured network; the client picks
    for i, n in enumerate(names):
        if n not in networks:
            raise ConfigError(f"{t.key('networks')}[{i}]", f"network {n!r} is not configured under [networks]")
    if not names:
        raise ConfigError(t.key("networks"), "needs at least one network")
    settlement = t.get("settlement", str, _DEFAULT.settlement)
    if settlement not in ("before", "after"):
        raise ConfigError(t.key("settlement"), 'must be "before" or "after"')
    tx_hash = t.get("tx_hash", bool, _DEFAULT.tx_hash)
    tx_hash_binding = t.choice("tx_hash_binding", get_args(TxHashBinding), _DEFAULT.tx_hash_binding)
    if tx_hash_binding == "optional" and not tx_hash:
        raise ConfigError(t.key("tx_hash_binding"), '"optional" needs tx_hash = true (no tx-hash proofs here)')
    schemes = tuple(t.get("schemes", list, list(_DEFAULT.schemes)))
    for i, name in enumerate(schemes):
        if name not in SCHEMES:
            raise ConfigError(f"{t.key('schemes')}[{i}]", f"unknown scheme {name!r} (known: {', '.join(SCHEMES)})")
    if not schemes or len(set(schemes)) != len(schemes):
        raise ConfigError(t.key("schemes"), "needs at least one scheme, each once")
    raw_meter = t.get("meter", dict, None)
    meter = None if raw_meter is None else parse_meter(raw_meter, t.key("meter"))
    if meter is not None and "batch-settlement" not in schemes:
        raise ConfigError(t.key("meter"), 'a metered price needs schemes = [..., "batch-settlement"]')
    cfg = RouteConfig(
        pattern=pattern,
        price=price,
        networks=tuple(names),
        description=t.get("description", str, _DEFAULT.description),
        mime_type=t.get("mime_type", str, _DEFAULT.mime_type),
        settlement=settlement,
        max_timeout_seconds=t.integer("max_timeout_seconds", payment.max_timeout_seconds, minimum=10),
        tx_hash=tx_hash,
        tx_hash_binding=tx_hash_binding,
        rate_limit_challenge=rate(t, "rate_limit_challenge", _DEFAULT.rate_limit_challenge),
        rate_limit_paid=rate(t, "rate_limit_paid", _DEFAULT.rate_limit_paid),
        docs=parse_route_docs(t, pattern, base_dir),
        schemes=schemes,
        meter=meter,
        paused=t.get("paused", bool, _DEFAULT.paused),
    )
    t.done()
    return cfg
