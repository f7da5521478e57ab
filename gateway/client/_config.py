"""The client's small settings objects: retries, job API paths, tx-hash payments, sessions. Keyword-only, with a
default for everything and a readable ``repr``."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal
from urllib.parse import quote

from gateway.client._spend import atomic_amount
from gateway.money import format_usd
from gateway.secrets import redact_url as _redacted  # RPC URLs: the origin only (API keys)

__all__ = ["JobPaths", "RetryPolicy", "SessionSettings", "TxHashPayments"]

Style = Literal["agent", "messaging"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient failures.

    Retried: network errors (connect, read, timeouts, a dropped connection), the ``statuses`` (429 honouring
    ``Retry-After``, 5xx) and 409 ``idempotency_key_in_flight`` / ``payment_in_flight`` (our own earlier attempt is
    still being served). Never any other 4xx. A retry of a paid request resends the same payment and the same
    ``Idempotency-Key``, so it cannot pay twice.
    """

    attempts: int = 4  # tries of one request in all (1 = no retries)
    backoff: float = 0.5  # seconds; attempt n waits up to backoff * 2**n
    max_backoff: float = 10.0
    max_retry_after: float = 60.0  # a longer Retry-After is not waited for: the error is raised instead
    statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})

    def delay(self, attempt: int, retry_after: str | None = None) -> float | None:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0), or None: give up."""
        if attempt + 1 >= self.attempts:
            return None
        wanted = _retry_after_seconds(retry_after)
        if wanted is not None:
            return wanted if wanted <= self.max_retry_after else None
        cap = min(self.max_backoff, self.backoff * 2**attempt)
        return random.uniform(cap / 2, cap)  # "equal jitter": never a zero wait, never in lock-step


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_PRESETS: dict[str, tuple[str, str, str, str, str | None]] = {
    # submit, status, cancel, list, health. Style A's list is not one of the seeds' calls: the gateway offers it
    # when configured (``[jobs] list = "GET /agent/jobs"``). Style B's cancel is the runner's addition: a fronted
    # style B API has none (docs/jobs.md).
    "agent": ("/agent/prompt", "/agent/job/{id}", "/agent/job/{id}/cancel", "/agent/jobs", None),
    "messaging": (
        "/api/messaging/jobs",
        "/api/messaging/jobs/{id}",
        "/api/messaging/jobs/{id}/cancel",
        "/api/messaging/jobs",
        "/api/messaging/jobs/health",
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPaths:
    """Where the job calls live, relative to the client's ``base_url``; ``{id}`` stands for the job id."""

    submit: str
    status: str
    cancel: str | None
    list: str | None
    health: str | None = None

    @classmethod
    def for_style(cls, style: Style, *, prefix: str = "") -> JobPaths:
        """The seeds' paths for ``style`` ("agent": ``/agent/prompt``…; "messaging": ``/api/messaging/jobs``…),
        under ``prefix`` (e.g. ``"/v1"``)."""
        try:
            submit, status, cancel, listing, health = _PRESETS[style]
        except KeyError:
            raise ValueError(f"style must be 'agent' or 'messaging', not {style!r}") from None
        base = prefix.rstrip("/")
        return cls(
            submit=base + submit,
            status=base + status,
            cancel=base + cancel,
            list=base + listing,
            health=base + health if health else None,
        )

    def job(self, template: str, job_id: str) -> str:
        return template.replace("{id}", quote(job_id, safe=""))


@dataclass(frozen=True, slots=True, kw_only=True)
class TxHashPayments:
    """Paying by on-chain USDC ``transfer`` and presenting the hash (the gateway's tx-hash proofs).

    * ``rpc_urls``: network (name or CAIP-2) -> JSON-RPC URL; the payer needs ETH there for gas. The RPC's chain id
      is checked against the 402's before anything is sent. Shown redacted (URLs often hold API keys).
    * ``confirmations``: blocks the transfer must have before it is presented (the 402 does not say how many the
      gateway wants; it answers ``transaction_not_final`` while it wants more, and the client then waits
      ``poll_interval`` and presents it again, up to ``timeout`` seconds after sending).
    """

    rpc_urls: Mapping[str, str] = field(default_factory=dict)
    confirmations: int = 1
    timeout: float = 180.0
    poll_interval: float = 1.0

    def __repr__(self) -> str:
        urls = {k: _redacted(v) for k, v in self.rpc_urls.items()}
        return (
            f"TxHashPayments(rpc_urls={urls}, confirmations={self.confirmations}, timeout={self.timeout}, "
            f"poll_interval={self.poll_interval})"
        )


@dataclass(frozen=True, slots=True, init=False)
class SessionSettings:
    """Paying through ``batch-settlement`` channels (``pay_with="session"``, docs/sessions.md).

    * ``deposit``: what one deposit puts in a channel (an int of atomic units, or a Decimal/str of dollars);
      ``None``: the offer's ``minDeposit``. Never less than ``minDeposit`` nor than the next voucher needs. A
      deposit is a payment of its amount: ``SpendControls.max_per_payment`` and the budget apply to it.
    * ``rpc_urls``: network (name or CAIP-2) -> JSON-RPC URL, optional. With one, a corrective 402 is checked
      against the chain (never resynchronise below what was claimed on chain) and the channel's balance is read
      from it. Without one, only a voucher this wallet signed is believed (the ``voucherState`` of the 402).
    * ``busy_retries`` / ``busy_backoff``: another request holds the channel (another process paying from the
      same wallet and store): wait ``busy_backoff`` s, doubling, at most ``busy_retries`` times.
    """

    deposit: int | None
    rpc_urls: Mapping[str, str]
    busy_retries: int
    busy_backoff: float

    def __init__(
        self,
        *,
        deposit: int | Decimal | str | None = None,
        rpc_urls: Mapping[str, str] | None = None,
        busy_retries: int = 5,
        busy_backoff: float = 0.05,
    ) -> None:
        if busy_retries < 0 or busy_backoff < 0:
            raise ValueError("busy_retries and busy_backoff must not be negative")
        object.__setattr__(self, "deposit", atomic_amount(deposit, "deposit"))
        object.__setattr__(self, "rpc_urls", dict(rpc_urls or {}))
        object.__setattr__(self, "busy_retries", busy_retries)
        object.__setattr__(self, "busy_backoff", busy_backoff)

    def __repr__(self) -> str:
        deposit = "minDeposit" if self.deposit is None else f"${format_usd(self.deposit)}"
        urls = {k: _redacted(v) for k, v in self.rpc_urls.items()}
        return (
            f"SessionSettings(deposit={deposit}, rpc_urls={urls}, busy_retries={self.busy_retries}, "
            f"busy_backoff={self.busy_backoff})"
        )
