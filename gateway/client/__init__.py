"""The x402 client SDK: pay 402s automatically (x402 ``exact``, a USDC transfer, or a ``batch-settlement``
session: one deposit, then a signed voucher per request), within spend controls, and drive job APIs (submit,
poll with live status updates, cancel, list, batch) with retries that never pay twice.

    from eth_account import Account
    from gateway.client import X402Client, SpendControls

    with X402Client("https://api.example.com", account=Account.from_key(key),
                    spend=SpendControls(max_per_payment="0.10", budget="5.00")) as client:
        job = client.prompt_and_wait("What is the price of ETH?", on_update=lambda u: print(u.message))
        print(job.response, job.submission.tx_hash)

The public names are re-exported here (the modules starting with ``_`` are private); ``exact``, ``txhash``,
``session`` and ``jobauth`` are the low-level signers the SDK is built on. The exception tree is drawn in ``_errors``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.client._channels import FileSessionStore, MemorySessionStore, SessionChannel, SessionStore
    from gateway.client._client import AsyncX402Client
    from gateway.client._config import JobPaths, RetryPolicy, SessionSettings, TxHashPayments
    from gateway.client._errors import (
        ApiError,
        JobCancelled,
        JobError,
        JobFailed,
        JobTimedOut,
        PaymentFailed,
        PaymentRefused,
        TransientError,
        X402ClientError,
    )
    from gateway.client._models import (
        Job,
        JobList,
        JobsHealth,
        PaymentReceipt,
        StatusUpdate,
        SubmitResult,
        payment_receipt,
    )
    from gateway.client._sessions import SessionRefund
    from gateway.client._spend import SpendControls
    from gateway.client._sync import X402Client
    from gateway.client._tokens import FileTokenStore, MemoryTokenStore, TokenStore
    from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment

# Each name is loaded on first use, from the module in this table: eth_account alone takes ~0.7 s to import, which
# ``x402-gateway check`` or a usage error of a client command (both import gateway.client._arguments) should not
# cost. ``from gateway.client import X402Client`` works as with eager imports (PEP 562).
_HOME = {
    **dict.fromkeys(["AsyncX402Client"], "_client"),
    **dict.fromkeys(["FileSessionStore", "MemorySessionStore", "SessionChannel", "SessionStore"], "_channels"),
    **dict.fromkeys(["JobPaths", "RetryPolicy", "SessionSettings", "TxHashPayments"], "_config"),
    **dict.fromkeys(
        [
            "ApiError",
            "JobCancelled",
            "JobError",
            "JobFailed",
            "JobTimedOut",
            "PaymentFailed",
            "PaymentRefused",
            "TransientError",
            "X402ClientError",
        ],
        "_errors",
    ),
    **dict.fromkeys(
        ["Job", "JobList", "JobsHealth", "PaymentReceipt", "StatusUpdate", "SubmitResult", "payment_receipt"], "_models"
    ),
    **dict.fromkeys(["SessionRefund"], "_sessions"),
    **dict.fromkeys(["SpendControls"], "_spend"),
    **dict.fromkeys(["X402Client"], "_sync"),
    **dict.fromkeys(["FileTokenStore", "MemoryTokenStore", "TokenStore"], "_tokens"),
    **dict.fromkeys(["choose_requirement", "parse_challenge", "sign_exact_payment"], "exact"),
}

__all__ = [
    "ApiError",
    "AsyncX402Client",
    "FileSessionStore",
    "FileTokenStore",
    "Job",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobList",
    "JobPaths",
    "JobTimedOut",
    "JobsHealth",
    "MemorySessionStore",
    "MemoryTokenStore",
    "PaymentFailed",
    "PaymentReceipt",
    "PaymentRefused",
    "RetryPolicy",
    "SessionChannel",
    "SessionRefund",
    "SessionSettings",
    "SessionStore",
    "SpendControls",
    "StatusUpdate",
    "SubmitResult",
    "TokenStore",
    "TransientError",
    "TxHashPayments",
    "X402Client",
    "X402ClientError",
    "choose_requirement",
    "parse_challenge",
    "payment_receipt",
    "sign_exact_payment",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
