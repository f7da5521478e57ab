"""``[rate_limits]``: per-IP limits on unpaid requests (402 challenges) and on payments that turned out invalid, and
per-payer limits on verified ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.store import REDIS_SCHEMES
from gateway.config.table import Table
from gateway.config.values import expand_env, rate
from gateway.errors import ConfigError
from gateway.secrets import Secret, redact_url

__all__ = ["RateLimitConfig", "parse_rate_limits"]

_DEFAULT_STORAGE = "memory://"


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``limits`` rate strings ("60/minute", "10/second;500/hour"), validated at load time."""

    enabled: bool = True
    challenge: str = "60/minute"  # per client IP and route: unpaid requests answered with a 402 challenge
    paid: str = "600/minute"  # per payer address and route: requests carrying a verified payment
    # per client IP and route: payments that turned out invalid (verified ones never count here); over it, that
    # address's payments are verified one at a time instead of all at once (docs/threat-model.md T41)
    invalid_payments: str = "60/minute"
    # counters per process; a Redis URL (which may hold a password) shares them between instances
    storage_url: Secret = field(default_factory=lambda: Secret(_DEFAULT_STORAGE, _DEFAULT_STORAGE))


_DEFAULT = RateLimitConfig()


def parse_rate_limits(t: Table, env: Mapping[str, str]) -> RateLimitConfig:
    url = expand_env(t.get("storage_url", str, _DEFAULT.storage_url.reveal()), t.key("storage_url"), env)
    scheme = url.partition("://")[0]
    if scheme != "memory" and scheme not in REDIS_SCHEMES:
        raise ConfigError(
            t.key("storage_url"),
            "must be memory:// or a Redis URL (redis://, rediss://, unix://, redis+sentinel://, redis+cluster://)",
        )
    cfg = RateLimitConfig(
        enabled=t.get("enabled", bool, _DEFAULT.enabled),
        challenge=rate(t, "challenge", _DEFAULT.challenge),
        paid=rate(t, "paid", _DEFAULT.paid),
        invalid_payments=rate(t, "invalid_payments", _DEFAULT.invalid_payments),
        storage_url=Secret(url, redact_url(url)),
    )
    t.done()
    return cfg
