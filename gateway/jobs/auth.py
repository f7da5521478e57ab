"""How a caller proves it is the wallet that paid for a job (sans-IO: bytes in, decisions out).

Status, cancel and list are free, so the proof cannot be a payment; without one, anyone who learns a job id
(logs, a shared link, a guess at a sequential upstream id) could read or cancel someone else's job. Two proofs:

**Job access token** (one job, no wallet needed). The paid submit answers with a header (``X-Job-Token`` by
default, ``[jobs].token_header``) holding 32 random bytes, base64url without padding. The gateway stores only its
SHA-256, so a leaked store does not leak live tokens. The caller sends it back on that job's status and cancel
calls as ``Authorization: Bearer <token>`` (or in the token header itself). It opens that one job only.

**Wallet signature** (every job of a wallet, e.g. after losing the token, and the only proof ``list`` accepts):
an ``X-Payer-Auth`` header, a personal_sign of the method, path and time (wire format in
:mod:`gateway.x402.payer_auth`; the exact text, with an example, in docs/jobs.md). ``<path>`` is the path as sent
(escapes intact, no query string); its decoded form with dot segments resolved, as route matching sees it, is
accepted too. The signature may be written with or without ``0x``. The timestamp must be within ±300 s of the
gateway's clock. The recovered address must be the job's payer (for list: whose jobs are listed). Such a header
can be replayed by whoever sees it, for that method and path, until it goes stale: it grants a read (or a cancel)
of the signer's own job, never a payment. Smart-contract wallets (EIP-1271) cannot produce it; they use the token.

A failed proof is answered like an unknown job (404 ``Job not found``) whenever the answer could say something
about a job: another wallet, a foreign token, no proof. What is wrong with the header itself is said (401, with
a ``reason``), because it says nothing about any job: a malformed header, a stale timestamp; and so is a
signature by the job's own payer (or, for list, by a wallet that has jobs) over a recognisably wrong text, such
as the path with its query string (:func:`mistaken_signers`): only the payer's key can make that one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

from gateway.x402 import reasons
from gateway.x402.digests import eip191_digest
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
    "PAYER_AUTH_EXPIRED",
    "PAYER_AUTH_HEADER",
    "PAYER_AUTH_MALFORMED",
    "PAYER_AUTH_REQUIRED",
    "PAYER_AUTH_WRONG_MESSAGE",
    "AuthProblem",
    "SignedRequest",
    "bearer_token",
    "header_problem",
    "mistaken_signers",
    "new_token",
    "payer_auth_message",
    "read_payer_auth",
    "token_hash",
    "token_matches",
    "verify_payer_auth",
    "wrong_message",
]

# Machine-readable reasons of the 401s below (the ``reason`` of the answer, and of its access-log line).
PAYER_AUTH_REQUIRED = reasons.PAYER_AUTH_REQUIRED
PAYER_AUTH_MALFORMED = reasons.PAYER_AUTH_MALFORMED
PAYER_AUTH_EXPIRED = reasons.PAYER_AUTH_EXPIRED
PAYER_AUTH_WRONG_MESSAGE = reasons.PAYER_AUTH_WRONG_MESSAGE

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


def read_payer_auth(value: bytes) -> tuple[int, bytes] | None:
    """(timestamp, 65-byte signature) of an ``X-Payer-Auth`` value, the signature written with or without its
    ``0x`` (wallets and libraries print both), else None."""
    return parse_payer_auth(value)


def verify_payer_auth(
    value: bytes | None,
    method: str,
    path: str,
    *,
    now: int,
    max_skew: int = MAX_SKEW_SECONDS,
    also: tuple[str, ...] = (),
) -> str | None:
    """The lowercase address that signed ``X-Payer-Auth`` for ``method path`` (or for one of the ``also``
    spellings of the same path: the first that recovers), or None for a malformed or stale header."""
    return next(iter(payer_auth_signers(value, method, (path, *also), now=now, max_skew=max_skew)), None)


def payer_auth_signers(
    value: bytes | None, method: str, paths: tuple[str, ...], *, now: int, max_skew: int = MAX_SKEW_SECONDS
) -> tuple[str, ...]:
    """The address that signed the header for each distinct spelling in ``paths`` (any signature recovers to
    *some* address; which one is the caller's is for the job to say), or () for a malformed or stale header."""
    parsed = None if value is None else read_payer_auth(value)
    if parsed is None:
        return ()
    timestamp, signature = parsed
    if abs(now - timestamp) > max_skew:
        return ()
    out: list[str] = []
    for path in dict.fromkeys(paths):
        signer = recover_signer(payer_auth_digest(method, path, timestamp), signature)
        if signer is not None and signer.lower() not in out:
            out.append(signer.lower())
    return tuple(out)


# ------------------------------------------------------------------------------------ saying what went wrong


@dataclass(frozen=True, slots=True)
class AuthProblem:
    """Why ``X-Payer-Auth`` proves nothing, in words that reveal nothing about any job."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What the caller should have signed, and what it may have signed by mistake."""

    method: str
    path: str  # as sent: escapes intact, no query string
    query: str = ""
    origin: str | None = None  # scheme://host as the request named it, for "signed the full URL"


_FORMAT = (
    "X-Payer-Auth must be <unix-seconds>.<signature>: the time in seconds, a dot, and the 65-byte EIP-191 "
    "(personal_sign) signature as 130 hex digits, 0x optional"
)


def header_problem(value: bytes, *, now: int, max_skew: int = MAX_SKEW_SECONDS) -> AuthProblem | None:
    """A malformed or stale header, else None (whether the signature fits the request is not looked at)."""
    parsed = read_payer_auth(value)
    if parsed is None:
        seconds = value.decode("latin-1").strip().partition(".")[0]
        hint = f" ({seconds} looks like milliseconds)" if seconds.isdigit() and len(seconds) >= 13 else ""
        return AuthProblem(PAYER_AUTH_MALFORMED, _FORMAT + hint)
    timestamp, signature = parsed
    if recover_signer(payer_auth_digest("GET", "/", timestamp), signature) is None:
        # Unrecoverable whatever was signed (a bad v, a high s, r off the curve): a fault of the header itself.
        return AuthProblem(PAYER_AUTH_MALFORMED, "X-Payer-Auth's signature is not a valid secp256k1 signature")
    if abs(now - timestamp) > max_skew:
        side = "before" if timestamp < now else "ahead of"
        return AuthProblem(
            PAYER_AUTH_EXPIRED,
            f"X-Payer-Auth was signed for {timestamp}, {abs(now - timestamp)} s {side} the gateway's clock "
            f"({now}); at most {max_skew} s are accepted: sign again with the current unix time in seconds",
        )
    return None


def mistaken_signers(value: bytes, request: SignedRequest) -> list[tuple[str, str]]:
    """(address, what was signed) for each text a client commonly signs by mistake instead of the message:
    the path with its query string, the full URL, a lowercase method, a trailing newline. Called only once the
    right text proved nothing, so the common case pays one recovery, not five."""
    parsed = read_payer_auth(value)
    if parsed is None:
        return []
    timestamp, signature = parsed
    method, path = request.method.upper(), request.path
    texts: list[tuple[str, str]] = []
    if request.query:
        texts.append(("the path with its query string", _text(method, f"{path}?{request.query}", timestamp)))
    if request.origin:
        texts.append(("the full URL", _text(method, request.origin + path, timestamp)))
    texts.append(("a lowercase method", _text(method.lower(), path, timestamp)))
    texts.append(("the message with a trailing newline", _text(method, path, timestamp) + "\n"))
    out: list[tuple[str, str]] = []
    for what, text in texts:
        signer = recover_signer(eip191_digest(text), signature)
        if signer is not None:
            out.append((signer.lower(), what))
    return out


def wrong_message(value: bytes, request: SignedRequest, what: str) -> AuthProblem:
    parsed = read_payer_auth(value)
    timestamp = parsed[0] if parsed is not None else 0
    expected = payer_auth_message(request.method, request.path, timestamp)
    return AuthProblem(
        PAYER_AUTH_WRONG_MESSAGE,
        f"X-Payer-Auth is a signature over {what}, not over the request's message; sign exactly "
        f"{json.dumps(expected)} (three lines: the method and the path as sent, without the query string)",
    )


def _text(method: str, path: str, timestamp: int) -> str:
    # payer_auth_message upper-cases the method; the mistakes must be spelt as the client spelt them.
    return f"x402 jobs\n{method} {path}\n{timestamp}"
