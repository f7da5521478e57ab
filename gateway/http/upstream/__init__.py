"""The upstream hop's HTTP/1.1 client: a keep-alive pool of asyncio protocols with the ``httptools`` parser.

Why our own: forwarding is the whole cost of a free request, and a general-purpose client spends most of its time
on what a proxy to one fixed origin never needs (URL objects, cookie jars, header multidicts, tracing hooks,
redirects). Measured on the benchmark's free route: aiohttp's request path was about a third of the gateway's
CPU. What remains here is the protocol itself, written against the same parser uvicorn uses (llhttp, via
``httptools``).

What it does, and the rules it keeps:

* One origin (host, port, optional TLS) per pool, at most ``max_connections`` open; a request that finds none free
  waits up to ``connect_timeout`` for one, then fails as unreachable (a saturated pool answers 502, not a queue).
* Who holds a connection is a :class:`Lease`: a share of the pool is reserved for paid requests, and a client may
  have only so many bodies streaming up at once; a complete answer frees its connection before the client has
  read it (``pool``: slow clients never starve paying ones).
* Idle connections are reused newest first and dropped after ``idle_timeout`` (below the common 5 s keep-alive
  of upstream servers, so we rarely reuse one the server is closing). A request on a reused connection that
  fails before any byte of an answer came back is sent once more on a fresh connection only if it is replayable
  (GET, HEAD or OPTIONS without a body: the rule Go's ``net/http`` uses).
* Request framing: the caller's ``content-length`` is kept and the body is streamed as is; a body of unknown
  length goes ``Transfer-Encoding: chunked``; a body-less POST/PUT/PATCH says ``content-length: 0``. The head and
  the first body chunk leave in one write.
* Response framing is llhttp's (Content-Length, chunked, or until close); a HEAD answer has no body whatever it
  declares; 1xx interim answers are skipped; an upgrade (101), a status outside 200-599 and a transfer coding
  besides ``chunked`` are refused; trailer fields are dropped (never merged into the headers). A connection goes
  back to the pool only after a complete answer the server did not mark ``Connection: close``, and never after a
  HEAD answer or a 204 or 304 that declares a body (the upstream may write that body all the same: it would answer
  the next request, docs/threat-model.md T14); anything else closes it.
* Read timeout: the final head must arrive within ``read_timeout`` of the request's last byte (interim answers and
  a trickled head do not extend it) and within 1 MiB; then the body may not go ``read_timeout`` without a byte
  while we wait for one (time spent with reading paused because the client is slow to take the body does not
  count). Reading pauses above 1 MiB buffered.
* Errors are :class:`UpstreamError` subclasses whose messages never name the origin.

The package: ``errors`` (the exception tree the proxy maps to its own), ``framing`` (the request head, checked
for injected line breaks before anything is written), ``connection`` (one asyncio protocol: an exchange, its
answer's framing, read timeout and back-pressure) and ``pool`` (keep-alive reuse, the connection cap, replay of
a stale reused connection).
"""

from gateway.http.upstream.connection import UpstreamResponse
from gateway.http.upstream.errors import ClientBusy, ConnectFailed, ProtocolFailure, ReadTimeout, UpstreamError
from gateway.http.upstream.pool import Lease, UpstreamPool

__all__ = [
    "ClientBusy",
    "ConnectFailed",
    "Lease",
    "ProtocolFailure",
    "ReadTimeout",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]
