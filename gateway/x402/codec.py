"""Header encoding: standard base64 (with padding) over compact UTF-8 JSON, as every x402 client does."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

RawHeaders = list[tuple[bytes, bytes]]


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding every x402 implementation produces and expects."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_header(obj: Any) -> str:
    return base64.b64encode(dumps(obj)).decode("ascii")


def decode_header(value: bytes | str) -> Any:
    """Decode a base64 JSON header. Accepts missing padding and the URL-safe alphabet (some clients send it);
    raises ``ValueError`` for anything that is not base64 of a JSON document."""
    raw = value.encode("latin-1") if isinstance(value, str) else value
    raw = raw.strip()
    if not raw:
        raise ValueError("empty header")
    raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw += b"=" * (-len(raw) % 4)
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    try:
        return json.loads(decoded.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("not JSON") from None
