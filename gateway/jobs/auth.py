"""How a caller proves it is the wallet that paid for a job (sans-IO: bytes in, decisions out).

Status, cancel and list are free, so the proof cannot be a payment; without one, anyone who learns a job id
(logs, a shared link, a guess at a sequential upstream id) could read or cancel someone else's job. Two proofs:

**Job access token** (one job, no wallet needed). The paid submit answers with a header (``X-Job-Token`` by
default, ``[jobs].token_header``) holding 32 random bytes, base64url without padding. The gateway stores only its
SHA-256, so a leaked store does not leak live tokens. The caller sends it back on that job's status and cancel
calls as ``Authorization: Bearer <token>`` (or in the token header itself). It opens that one job only.

**Wallet signature** (every job of a wallet, e.g. after losing the token, and the only proof ``list`` accepts):
an ``X-Payer-Auth`` header, a personal_sign of the method, path and time (wire format in
:mod:`gateway.x402.payer_auth`). The gateway compares the path after resolving dot segments, as route matching
does. The timestamp must be within ±300 s of the gateway's clock. The recovered address must be the job's payer
(for list: whose jobs are listed). Such a header can be replayed by whoever sees
it, for that method and path, until it goes stale: it grants a read (or a cancel) of the signer's own job, never
a payment. Smart-contract wallets (EIP-1271) cannot produce it; they use the token.

Every failed proof (missing, malformed, stale, another wallet, unknown job) is answered exactly like an unknown
job (404 ``Job not found``), so a caller learns nothing about other people's jobs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from gateway.x402.eip712 import recover_signer
from gateway.x402.payer_auth import (  # the header's wire format, re-exported with the rules that use it
    MAX_SKEW_SECONDS,
    PAYER_AUTH_HEADER,
    parse_payer_auth,
    payer_auth_digest,
    payer_auth_message,
)

__all__ = [
    "MAX_SKEW_SECONDS",
    "PAYER_AUTH_HEADER",
    "bearer_token",
    "new_token",
    "payer_auth_message",
    "token_hash",
    "token_matches",
    "verify_payer_auth",
]

TOKEN_BYTES = 32
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 bytes, base64url, no padding


def new_token() -> tuple[str, str]:
    """(token for the caller, hex SHA-256 for the store)."""
    token = base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode("ascii")
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def bearer_token(authorization: bytes | None, token_header: bytes | None) -> str | None:
    """The job token from ``Authorization: Bearer <t>`` or from the token header, if well formed."""
    candidates: list[bytes] = []
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            candidates.append(value.strip())
    if token_header is not None:
        candidates.append(token_header.strip())
    for raw in candidates:
        text = raw.decode("latin-1")
        if _TOKEN.match(text):
            return text
    return None


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    if token is None or not stored_hash:
        return False
    return hmac.compare_digest(token_hash(token), stored_hash)


def verify_payer_auth(
    value: bytes | None, method: str, path: str, *, now: int, max_skew: int = MAX_SKEW_SECONDS
) -> str | None:
    """The lowercase address that signed ``X-Payer-Auth`` for this request, or None for any failure."""
    parsed = None if value is None else parse_payer_auth(value)
    if parsed is None:
        return None
    timestamp, signature = parsed
    if abs(now - timestamp) > max_skew:
        return None
    signer = recover_signer(payer_auth_digest(method, path, timestamp), signature)
    return signer.lower() if signer else None
