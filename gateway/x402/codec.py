"""Header encoding: standard base64 (with padding) over compact UTF-8 JSON, as every x402 client does; and the one
way JSON from the other side (a client, an upstream, a server, a facilitator, an RPC) is read: :func:`loads`.

Why a JSON reader of our own: the parser recurses once per nesting level on the C stack, and the process's recursion
limit is no guard, because a dependency (py_ecc, imported by eth_account) raises it to 100,000 for the whole
process. A document a few hundred kilobytes long, nested that deep, would overflow the stack and kill the process
outright (no ``RecursionError``). :func:`loads` refuses anything nested deeper than :data:`MAX_NESTING` before
parsing it, at C speed (docs/threat-model.md T16).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from itertools import accumulate
from typing import Any

RawHeaders = list[tuple[bytes, bytes]]


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding every x402 implementation produces and expects. A string holding an
    unpaired UTF-16 surrogate (which JSON read from the other side may escape, ``"\\ud83d"``: half an emoji) has
    no UTF-8 form: such a document is written with ``\\u`` escapes instead, valid JSON that reads back the same."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


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
        return loads(decoded)
    except ValueError:
        raise ValueError("not JSON") from None


# How deep a JSON document from the other side may nest (see the module docstring). No document of the protocols we
# speak comes near it.
MAX_NESTING = 512
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.DOTALL)  # a JSON string (unterminated: to the end)
_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # an opening bracket +1, a closing one -1 (signed bytes)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _shallow(text: bytes) -> bool:
    """``text`` nests no deeper than :data:`MAX_NESTING` outside its strings (at C speed: one count for almost
    every document; else the brackets outside strings, as +1/-1 steps, whose running sum is the depth)."""
    if text.count(b"[") + text.count(b"{") <= MAX_NESTING:
        return True
    steps = _STRING.sub(b"", text).translate(_STEPS, _NOT_BRACKETS)
    return max(accumulate(memoryview(steps).cast("b")), default=0) <= MAX_NESTING


def loads(data: bytes | str) -> Any:
    """``data`` as JSON; ``ValueError`` if it is not JSON (``UnicodeDecodeError`` is one), or nests deeper than
    :data:`MAX_NESTING` (see the module docstring)."""
    if isinstance(data, str):
        shallow = data.count("[") + data.count("{") <= MAX_NESTING or _shallow(data.encode("utf-8", "surrogatepass"))
    else:
        shallow = _shallow(data)
    if not shallow:
        raise ValueError("JSON nested too deep")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
