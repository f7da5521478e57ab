"""Who is calling the admin API: a bearer token from the environment, compared in constant time.

``Authorization: Bearer <token>`` is compared with every configured token by :func:`hmac.compare_digest`, all of
them every time (no early exit), so the answer's timing tells nothing about how much of a guess was right or which
token it was close to. The SHA-256 digests are compared, not the strings: equal lengths, so not even a token's
length shows. No token, or a wrong one: 401. A ``read`` token asking for anything but ``GET``: 403. The
caller is known by its token's name (the environment variable), which is what the audit log records.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway.config import AdminToken
from gateway.config.admin import Access

__all__ = ["Caller", "authenticate", "may"]

_BEARER = b"bearer "


@dataclass(frozen=True, slots=True)
class Caller:
    name: str  # the token's environment variable: never the token
    access: Access


def authenticate(authorization: bytes | None, tokens: tuple[AdminToken, ...]) -> Caller | None:
    """The caller whose token ``authorization`` (the header's value) carries; None for no token or a wrong one."""
    if authorization is None or authorization[: len(_BEARER)].lower() != _BEARER:
        return None
    presented = hashlib.sha256(authorization[len(_BEARER) :].strip()).digest()
    found: Caller | None = None
    for token in tokens:
        expected = hashlib.sha256(token.value.reveal().encode()).digest()
        if hmac.compare_digest(presented, expected) and found is None:
            found = Caller(token.name, token.access)
    return found


def may(caller: Caller, method: str) -> bool:
    """Whether ``caller`` may make a ``method`` call: reads for every token, anything else for write tokens."""
    return method in ("GET", "HEAD") or caller.access == "write"
