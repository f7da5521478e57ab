"""The x402 client SDK: pay 402s automatically (x402 ``exact`` or a USDC transfer), within spend controls, and
drive job APIs (submit, poll with live status updates, cancel, list, batch) with retries that never pay twice.

    from eth_account import Account
    from gateway.client import X402Client, SpendControls

    with X402Client("https://api.example.com", account=Account.from_key(key),
                    spend=SpendControls(max_per_payment="0.10", budget="5.00")) as client:
        job = client.prompt_and_wait("What is the price of ETH?", on_update=lambda u: print(u.message))
        print(job.response, job.submission.tx_hash)

The public names are re-exported here (the modules starting with ``_`` are private); ``exact``, ``txhash`` and
``jobauth`` are the low-level signers the SDK is built on. The exception tree is drawn in ``_errors``.
"""

from gateway.client._client import AsyncX402Client
from gateway.client._config import JobPaths, RetryPolicy, TxHashPayments
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
from gateway.client._models import Job, JobList, PaymentReceipt, StatusUpdate, SubmitResult, payment_receipt
from gateway.client._spend import SpendControls
from gateway.client._sync import X402Client
from gateway.client._tokens import FileTokenStore, MemoryTokenStore, TokenStore
from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment

__all__ = [
    "ApiError",
    "AsyncX402Client",
    "FileTokenStore",
    "Job",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobList",
    "JobPaths",
    "JobTimedOut",
    "MemoryTokenStore",
    "PaymentFailed",
    "PaymentReceipt",
    "PaymentRefused",
    "RetryPolicy",
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
