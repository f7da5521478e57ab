"""The request head the upstream hop writes, built and checked in one place.

Framing is ours, never the caller's: the ``host`` line is the pool's origin, and the body's framing is derived from
what the caller knows (a known ``content-length`` is kept, an unknown length goes chunked, a body-less
POST/PUT/PATCH says ``content-length: 0``). The finished head is checked for line breaks or a NUL that did not come
from here: a CR or LF smuggled into a header value or the target would otherwise write a header, or a whole
request, of its own upstream (request smuggling).
"""

from __future__ import annotations

from gateway.http.upstream.errors import ProtocolFailure

__all__ = ["request_head"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_head(
    method: str,
    target: str,
    authority: bytes,
    headers: list[tuple[bytes, bytes]],
    has_body: bool,
    content_length: int | None,
) -> tuple[bytes, bool]:
    """The head of ``method target`` (request line, ``host``, ``headers``, body framing, blank line) and whether
    the body goes chunked. Raises ``ProtocolFailure`` (nothing written) when a header would break the framing."""
    lines = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), authority, b"\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    chunked = has_body and content_length is None
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        lines.append(b"content-length: %d\r\n" % content_length)
    elif method in _BODY_METHODS:
        lines.append(b"content-length: 0\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    # Exactly the line breaks written above (request line, host, each header, framing, blank line), and no
    # NUL: a CR or LF inside a header (or the target) would let it write a header or a request of its own.
    breaks = len(headers) + (4 if (chunked or content_length is not None or method in _BODY_METHODS) else 3)
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
        raise ProtocolFailure("a header would break the request's framing")  # never written upstream
    return head, chunked
