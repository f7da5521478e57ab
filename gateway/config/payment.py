"""``[payment]``: who is paid, the relayer key that settles, and the time windows of an authorization."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.table import Defaults, Table
from gateway.config.values import address
from gateway.errors import ConfigError
from gateway.secrets import Secret, env_var

__all__ = ["RELAYER_KEY_ENV", "PaymentConfig", "parse_payment"]

RELAYER_KEY_ENV = "X402_RELAYER_KEY"  # default name of the variable holding the relayer's private key
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class PaymentConfig:
    pay_to: str
    relayer_key: Secret | None  # read from the environment, never from the file
    max_timeout_seconds: int = 300
    min_validity_seconds: int = 6
    clock_skew_seconds: int = 60
    settle_timeout: float = 60.0
    tx_max_age_seconds: int = 3600


_DEFAULT = Defaults(PaymentConfig)


def parse_payment(t: Table, env: Mapping[str, str]) -> tuple[PaymentConfig, str]:
    """The section, and the name of the environment variable that holds (or should hold) the relayer key."""
    pay_to = address(t.require("pay_to", str), t.key("pay_to"))
    key_env: str = t.get("relayer_key_env", str, RELAYER_KEY_ENV)
    raw_key = env.get(key_env)
    relayer_key = None
    if raw_key:
        if not _PRIVATE_KEY.fullmatch(raw_key.strip()):
            raise ConfigError(t.key("relayer_key_env"), f"{env_var(key_env)} is not a 32-byte hex key")
        relayer_key = Secret(raw_key.strip(), f"${key_env}")
    cfg = PaymentConfig(
        pay_to=pay_to,
        relayer_key=relayer_key,
        max_timeout_seconds=t.integer("max_timeout_seconds", _DEFAULT.max_timeout_seconds, minimum=10),
        min_validity_seconds=t.integer("min_validity_seconds", _DEFAULT.min_validity_seconds, minimum=0),
        clock_skew_seconds=t.integer("clock_skew_seconds", _DEFAULT.clock_skew_seconds, minimum=0),
        settle_timeout=t.number("settle_timeout", _DEFAULT.settle_timeout, minimum=1.0),
        tx_max_age_seconds=t.integer("tx_max_age_seconds", _DEFAULT.tx_max_age_seconds, minimum=10),
    )
    t.done()
    return cfg, key_env
