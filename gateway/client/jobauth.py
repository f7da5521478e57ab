"""Client side of the jobs payer proof: sign ``X-Payer-Auth`` with the wallet that paid (see
:mod:`gateway.x402.payer_auth` for the message and :mod:`gateway.jobs.auth` for its rules)."""

from __future__ import annotations

import time

from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from gateway.x402.payer_auth import PAYER_AUTH_HEADER, format_payer_auth, payer_auth_message


def payer_auth_headers(account: LocalAccount, method: str, path: str, *, now: int | None = None) -> dict[str, str]:
    """``{"X-Payer-Auth": ...}`` proving ``account`` sends ``method path`` (path without the query string)."""
    timestamp = int(time.time()) if now is None else now
    signed = account.sign_message(encode_defunct(text=payer_auth_message(method, path, timestamp)))
    return {PAYER_AUTH_HEADER: format_payer_auth(timestamp, bytes(signed.signature))}


def job_token_headers(token: str) -> dict[str, str]:
    """The header that presents a job access token (returned by the paid submit in ``X-Job-Token``)."""
    return {"Authorization": f"Bearer {token}"}
