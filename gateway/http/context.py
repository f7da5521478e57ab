"""What the gateway decides about one HTTP request, decided once: the priced route it matches (with its path
values), the resource URL a 402 advertises for it, the client address and the request id.

The route is matched on every reading an upstream framework may make of the raw path
(:meth:`gateway.routes.RouteTable.match_request`); a path without one meaning is marked ``ambiguous`` and the
payment middleware refuses it (400 ``ambiguous_path``). A WebSocket handshake is a GET of its path and is priced
like one; its resource URL is the http(s) URL of that path.

The outermost layer that needs it builds it (:func:`request_context`) and leaves it in the ASGI scope; every layer
after it (idempotency, payment middleware, jobs) reads the same object instead of matching the route or building
the URL again. A layer that changed the method or path in between would get a fresh one.

The route table is read from its source (the payment engine) once, when the context is built: routes and prices
change at run time by replacing the engine's table (gateway/engine/reload.py), and a request keeps the table it
started with for its whole life, whichever layer asks again.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, unquote_plus

from gateway.config import ServerConfig
from gateway.http.asgi import Scope, header
from gateway.routes import AmbiguousPath, RouteTable
from gateway.schemes.base import PricedRoute

CONTEXT_KEY = "gateway.context"


def origin(scope: Scope, server: ServerConfig) -> str:
    """``scheme://host`` of this gateway as its clients see it: ``server.public_url`` when set, else the request's
    own scheme and Host; behind a TLS-terminating proxy the scheme we see is http, so only a trusted proxy's
    ``X-Forwarded-Proto`` / ``-Host`` may say otherwise."""
    if server.public_url:
        return server.public_url
    scheme = str(scope.get("scheme", "http"))
    scheme = _HTTP_SCHEME.get(scheme, scheme)
    host = (header(scope, b"host") or b"localhost").decode("latin-1")
    if server.trust_forwarded_headers:
        scheme = (header(scope, b"x-forwarded-proto") or scheme.encode()).decode("latin-1").split(",")[0].strip()
        host = (header(scope, b"x-forwarded-host") or host.encode()).decode("latin-1").split(",")[0].strip()
    return f"{scheme}://{host}"


class RouteSource(Protocol):
    """Where the priced routes in force come from (:class:`gateway.engine.engine.PaymentEngine`)."""

    @property
    def routes(self) -> RouteTable[PricedRoute]: ...


_HTTP_SCHEME = {"ws": "http", "wss": "https"}  # a WebSocket handshake is an HTTP request to the same URL
# Characters a request line carries as they are; any other byte (raw UTF-8 from a lax server) is percent-encoded
# before the path is read, as the client should have sent it.
_RAW_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass(slots=True)
class RequestContext:
    method: str
    path: str  # as the request carried it (scope["path"], decoded)
    route: PricedRoute | None  # the priced route it matches, or None (free / refused)
    params: dict[str, str]  # the route's path values
    ambiguous: str | None  # why the path has no single meaning (refused before anything else), or None
    client: str | None
    request_id: str
    routes: RouteTable[PricedRoute] = field(repr=False)  # the table in force when the request arrived
    source: RouteSource = field(repr=False)
    _scope: Scope = field(repr=False)
    _server: ServerConfig = field(repr=False)
    _raw_path: str = field(default="/", repr=False)  # the path as received, escapes intact (ASCII)
    _resource: str | None = field(default=None, repr=False)

    def priced_for(self, method: str) -> bool:
        """Whether this path is priced for ``method`` (a CORS preflight asks about the method it announces)."""
        try:
            return self.routes.match_request(method, self._raw_path) is not None
        except AmbiguousPath:
            return True

    @property
    def resource(self) -> str:
        """The absolute URL of this request as a 402 advertises it (the raw path, as received, plus the query)."""
        if self._resource is None:
            scope = self._scope
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
            query: bytes = scope.get("query_string", b"")
            tail = raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
            self._resource = origin(scope, self._server) + tail
        return self._resource


def request_context(scope: Scope, source: RouteSource, server: ServerConfig) -> RequestContext:
    """The request's context, built on first use (with the routes ``source`` has in force then) and kept in the
    scope."""
    ctx = scope.get(CONTEXT_KEY)
    method, path = scope.get("method", "GET"), scope["path"]  # a "websocket" scope has no method: a GET
    if isinstance(ctx, RequestContext) and ctx.source is source and ctx.method == method and ctx.path == path:
        return ctx
    routes = source.routes
    raw: bytes | None = scope.get("raw_path")
    if raw:
        raw_path = raw.decode("latin-1")
        if not raw_path.isascii():
            raw_path = quote(raw, safe=_RAW_SAFE)
    else:
        raw_path = quote(path, safe=_RAW_SAFE.replace("%", ""))
    ambiguous = None
    try:
        matched = routes.match_request(method, raw_path)
    except AmbiguousPath as exc:
        matched, ambiguous = None, str(exc)
    client = scope.get("client")
    ctx = RequestContext(  # positional (the fields' order): half the cost of keywords, once per request
        method,
        path,
        matched[0] if matched else None,  # route
        matched[1] if matched else {},  # params
        ambiguous,
        client[0] if client else None,
        ctx.request_id if isinstance(ctx, RequestContext) else request_id_of(scope),
        routes,
        source,
        scope,
        server,
        raw_path,
    )
    scope[CONTEXT_KEY] = ctx
    return ctx


def request_id_of(scope: Scope) -> str:
    """The client's own X-Request-Id when it is a plausible id, else a new one."""
    given = header(scope, b"x-request-id")
    if given and len(given) <= 64 and given.replace(b"-", b"").replace(b"_", b"").isalnum():
        return given.decode("ascii")
    return new_request_id()


# A request id is 32 hex characters like a uuid4's, but costs a counter step instead of 16 random bytes: a random
# 64-bit prefix per process (drawn again in a forked child), then a 64-bit sequence number. Unique within a
# process by construction, across processes and restarts by the prefix. It is an id, not a secret.
_ID_PREFIX = os.urandom(8).hex()
_ID_SEQUENCE = itertools.count(1)


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_SEQUENCE
    _ID_PREFIX, _ID_SEQUENCE = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_SEQUENCE):016x}"


# ------------------------------------------------------------------------------------------ request-line overrides

# Headers some frameworks read as the request's "real" method or URL (Express method-override, Rack, Laravel,
# Symfony, ASP.NET, IIS URL Rewrite): the gateway priced the request line, so an upstream must route on it too
# (docs/threat-model.md T34). Compared after '_' -> '-': CGI-style servers map X_HTTP_METHOD_OVERRIDE
# to the same variable as X-HTTP-Method-Override.
METHOD_OVERRIDE_HEADERS = frozenset(
    b"x-http-method-override x-method-override x-http-method x-original-url x-rewrite-url".split()
)
_QUERY_SEPARATOR = re.compile(rb"([&;])")  # ';' too: older Rack and Python split query pairs on it


def header_name(name: bytes) -> bytes:
    """A header name as upstreams match it: lowercase, '_' read as '-'."""
    return name.lower().replace(b"_", b"-")


def _overrides_method(pair: bytes) -> bool:
    name = unquote_plus(pair.partition(b"=")[0].decode("latin-1")).strip().lower()
    return name.partition("[")[0] == "_method"  # also _method[]= (qs arrays) and %5Fmethod


def without_method_override(query: bytes) -> bytes:
    """``query`` without its ``_method`` parameters (every other byte as it was)."""
    if b"method" not in query.lower():  # fast path; also catches the escaped spellings
        return query
    tokens = _QUERY_SEPARATOR.split(query)
    out: list[bytes] = []
    for i in range(0, len(tokens), 2):
        if _overrides_method(tokens[i]):
            continue
        if out:
            out.append(tokens[i - 1])
        out.append(tokens[i])
    return query if len(out) == len(tokens) else b"".join(out)


def strip_method_override(scope: Scope) -> Scope:
    """``scope`` itself when it carries no method or URL override, else a copy without them."""
    headers = scope.get("headers") or ()
    query: bytes = scope.get("query_string", b"")
    stripped = without_method_override(query) if query else query
    overridden = False
    for name, _ in headers:  # servers hand over lowercase names: only one with '_' needs spelling out
        if name in METHOD_OVERRIDE_HEADERS or ((b"_" in name or not name.islower()) and _override_name(name)):
            overridden = True
            break
    if not overridden and stripped is query:
        return scope
    kept = [(k, v) for k, v in headers if not _override_name(k)]
    return {**scope, "headers": kept, "query_string": stripped}


def _override_name(name: bytes) -> bool:
    return header_name(name) in METHOD_OVERRIDE_HEADERS


__all__ = [
    "CONTEXT_KEY",
    "METHOD_OVERRIDE_HEADERS",
    "RequestContext",
    "RouteSource",
    "header_name",
    "new_request_id",
    "origin",
    "request_context",
    "request_id_of",
    "strip_method_override",
    "without_method_override",
]
