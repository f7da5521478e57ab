"""``X-Payer-Auth`` on the wire: a wallet's proof that it sends this request (sans-IO).

What a client and the gateway must agree on; who may use the proof, and for what, is decided in
:mod:`gateway.jobs.auth`::

    X-Payer-Auth: <unix-seconds>.<EIP-191 personal_sign signature of the message below, 0x optional>

    x402 jobs
    <METHOD> <path>
    <unix-seconds>

``<path>`` is the request path without its query string, as sent. The timestamp must be within
``MAX_SKEW_SECONDS`` of the gateway's clock, which bounds how long a captured header can be replayed.
"""

from __future__ import annotations

import re

from gateway.x402.digests import eip191_digest

PAYER_AUTH_HEADER = "X-Payer-Auth"
MAX_SKEW_SECONDS = 300
_MAX_HEADER_BYTES = 200  # a valid header is ~145 bytes; refuse longer ones before running a regex over them
_PAYER_AUTH = re.compile(r"^([0-9]{1,12})\.(?:0x)?([0-9a-fA-F]{130})$")  # wallets print signatures both ways


def payer_auth_message(method: str, path: str, timestamp: int) -> str:
    return f"x402 jobs\n{method.upper()} {path}\n{timestamp}"


def payer_auth_digest(method: str, path: str, timestamp: int) -> bytes:
    """What the wallet signed for ``method path`` at ``timestamp``."""
    return eip191_digest(payer_auth_message(method, path, timestamp))


def format_payer_auth(timestamp: int, signature: bytes) -> str:
    """The header value for a 65-byte signature made at ``timestamp``."""
    return f"{timestamp}.0x{signature.hex()}"


def parse_payer_auth(value: bytes) -> tuple[int, bytes] | None:
    """(timestamp, 65-byte signature) of a well-formed header value, else None."""
    if len(value) > _MAX_HEADER_BYTES:
        return None
    m = _PAYER_AUTH.match(value.decode("latin-1").strip())
    if m is None:
        return None
    return int(m.group(1)), bytes.fromhex(m.group(2))
