"""Client side of the jobs payer proof: sign ``X-Payer-Auth`` with the wallet that paid (see
:mod:`gateway.jobs.auth` for the message and its rules)."""

from __future__ import annotations

import time

from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from gateway.jobs.auth import PAYER_AUTH_HEADER, payer_auth_message


def payer_auth_headers(account: LocalAccount, method: str, path: str, *, now: int | None = None) -> dict[str, str]:
    """``{"X-Payer-Auth": ...}`` proving ``account`` sends ``method path`` (path without the query string)."""
    timestamp = int(time.time()) if now is None else now
    signed = account.sign_message(encode_defunct(text=payer_auth_message(method, path, timestamp)))
    return {PAYER_AUTH_HEADER: f"{timestamp}.0x{bytes(signed.signature).hex()}"}


def job_token_headers(token: str) -> dict[str, str]:
    """The header that presents a job access token (returned by the paid submit in ``X-Job-Token``)."""
    return {"Authorization": f"Bearer {token}"}
