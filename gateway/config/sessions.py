"""``[sessions]``: the ``batch-settlement`` scheme (payment channels), and a route's metered price.

A route offers sessions with ``schemes = ["exact", "batch-settlement"]``; this section says how the gateway runs
them (docs/sessions.md): the receiver-authorizer key that signs claims and refunds (from the environment, and never
the relayer's key), the withdrawal delay every channel must carry, the smallest deposit, and the claimer's policy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.config.table import Defaults, Table
from gateway.errors import ConfigError
from gateway.money import parse_usd
from gateway.secrets import Secret, env_var

__all__ = ["AUTHORIZER_KEY_ENV", "MeterConfig", "SessionsConfig", "parse_meter", "parse_sessions", "sessions_warnings"]

AUTHORIZER_KEY_ENV = "X402_AUTHORIZER_KEY"  # default name of the variable holding the receiver authorizer's key
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
_JSON_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    authorizer_key: Secret | None = None  # receiverAuthorizer: signs claim batches and refunds
    withdraw_delay: int = 86_400  # seconds every channel must declare (the contract allows 900 .. 30 days)
    min_deposit: int | None = None  # atomic units; None: 10 x the route's price
    claim_interval: float = 30.0  # seconds between the claimer's passes
    claim_after: float = 3600.0  # a voucher is claimed at the latest this long after it was first unclaimed
    max_unclaimed_per_channel: int = 5_000_000  # atomic: a channel owing us more is claimed on the next pass
    max_unclaimed_total: int = 100_000_000  # atomic: over this, every channel with something unclaimed is
    settle_interval: float = 300.0  # seconds between sweeps of claimed funds to pay_to
    withdraw_margin: float = 600.0  # seconds before a pending withdrawal ends: no new charge, claim by then
    claim_gas_per_voucher: int = 40_000  # upper bound used to size claim batches until measured
    max_claim_gas: int = 8_000_000  # a claim transaction's gas limit never goes above this

    def __repr__(self) -> str:
        key = "set" if self.authorizer_key is not None else "unset"
        return f"SessionsConfig(authorizer_key=<{key}>, withdraw_delay={self.withdraw_delay})"


MeterUnit = Literal["usd", "atomic"]
MeterMissing = Literal["ceiling", "zero"]


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """A metered price: the charge of a session request comes from the upstream's answer, never above the route's
    price (the voucher's ceiling)."""

    header: str | None = None  # response header carrying the charge (stripped before the client sees it)
    unit: MeterUnit = "usd"  # the header's unit: dollars ("0.0042") or atomic units ("4200")
    json: str | None = None  # or a dotted path to a number in a JSON answer (or the last SSE / NDJSON event)
    unit_price: int = 0  # atomic units per unit of that number (e.g. per token)
    missing: MeterMissing = "ceiling"  # no usage reported: charge the ceiling, or nothing


_DEFAULT = Defaults(SessionsConfig)
_METER = Defaults(MeterConfig)


def parse_sessions(t: Table, env: Mapping[str, str], *, relayer_key: Secret | None) -> SessionsConfig:
    key_env: str = t.get("authorizer_key_env", str, AUTHORIZER_KEY_ENV)
    raw = env.get(key_env, "").strip()
    key = None
    if raw:
        if not _PRIVATE_KEY.fullmatch(raw):
            raise ConfigError(t.key("authorizer_key_env"), f"{env_var(key_env)} is not a 32-byte hex key")
        key = Secret(raw, f"${key_env}")
        if relayer_key is not None and _same_key(raw, relayer_key.reveal()):
            raise ConfigError(
                t.key("authorizer_key_env"), "the receiver authorizer must not use the relayer's key (docs/sessions.md)"
            )
    delay = t.integer("withdraw_delay", _DEFAULT.withdraw_delay, minimum=900)
    if delay > 30 * 24 * 3600:
        raise ConfigError(t.key("withdraw_delay"), "must be at most 2592000 seconds (30 days)")
    min_deposit = t.get("min_deposit", (str, int), None)
    cfg = SessionsConfig(
        authorizer_key=key,
        withdraw_delay=delay,
        min_deposit=None if min_deposit is None else _usd(t, "min_deposit", min_deposit),
        claim_interval=t.number("claim_interval", _DEFAULT.claim_interval, minimum=0.05),
        claim_after=t.number("claim_after", _DEFAULT.claim_after, minimum=1.0),
        max_unclaimed_per_channel=_usd(
            t, "max_unclaimed_per_channel", t.get("max_unclaimed_per_channel", (str, int), "$5")
        ),
        max_unclaimed_total=_usd(t, "max_unclaimed_total", t.get("max_unclaimed_total", (str, int), "$100")),
        settle_interval=t.number("settle_interval", _DEFAULT.settle_interval, minimum=0.05),
        withdraw_margin=t.number("withdraw_margin", _DEFAULT.withdraw_margin, minimum=0.0),
        claim_gas_per_voucher=t.integer("claim_gas_per_voucher", _DEFAULT.claim_gas_per_voucher, minimum=1),
        max_claim_gas=t.integer("max_claim_gas", _DEFAULT.max_claim_gas, minimum=100_000),
    )
    t.done()
    return cfg


def sessions_warnings(cfg: SessionsConfig) -> list[str]:
    """Settings that are valid but put session charges at risk (``check`` prints them, ``serve`` logs them)."""
    if cfg.claim_interval >= cfg.withdraw_margin:
        return [
            f"sessions.claim_interval ({cfg.claim_interval:g} s) is not shorter than sessions.withdraw_margin "
            f"({cfg.withdraw_margin:g} s): a charge taken just before a withdrawal's last {cfg.withdraw_margin:g} s "
            "may still be unclaimed when the withdrawal ends, and the payer takes it back; keep claim_interval well "
            'below withdraw_margin (docs/sessions.md, "Withdrawals")'
        ]
    return []


def _same_key(a: str, b: str) -> bool:
    return a.lower().removeprefix("0x") == b.lower().removeprefix("0x")


def _usd(t: Table, name: str, value: str | int) -> int:
    try:
        return parse_usd(value)
    except ValueError as exc:
        raise ConfigError(t.key(name), str(exc)) from None


def parse_meter(raw: object, key: str) -> MeterConfig:
    """A route's ``meter = { header = "x-cost", unit = "usd" }`` or ``{ json = "usage.total_tokens",
    unit_price = "$0.000002" }``."""
    if not isinstance(raw, dict):
        raise ConfigError(key, 'must be a table, e.g. { header = "x-usage-cost" }')
    t = Table(raw, key)
    header = t.get("header", str, None)
    path = t.get("json", str, None)
    if (header is None) == (path is None):
        raise ConfigError(key, 'needs exactly one of header = "..." or json = "path.to.number"')
    if header is not None and not _HEADER.fullmatch(header):
        raise ConfigError(t.key("header"), f"{header!r} is not a header name")
    if path is not None and not _JSON_PATH.fullmatch(path):
        raise ConfigError(t.key("json"), f"{path!r} is not a dotted path of names")
    unit_price = 0
    if path is not None:
        unit_price = _usd(t, "unit_price", t.require("unit_price", (str, int)))
    cfg = MeterConfig(
        header=None if header is None else header.lower(),
        unit=t.choice("unit", ("usd", "atomic"), _METER.unit),
        json=path,
        unit_price=unit_price,
        missing=t.choice("missing", ("ceiling", "zero"), _METER.missing),
    )
    t.done()
    return cfg
