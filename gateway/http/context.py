"""What the gateway decides about one HTTP request, decided once: the priced route it matches (with its path
values), the resource URL a 402 advertises for it, the client address and the request id.

The outermost layer that needs it builds it (:func:`request_context`) and leaves it in the ASGI scope; every layer
after it (idempotency, payment middleware, jobs) reads the same object instead of matching the route or building
the URL again. A layer that changed the method or path in between would get a fresh one.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from gateway.config import ServerConfig
from gateway.http.asgi import Scope, header
from gateway.routes import RouteTable, normalise_path
from gateway.schemes.base import PricedRoute

CONTEXT_KEY = "gateway.context"


def origin(scope: Scope, server: ServerConfig) -> str:
    """``scheme://host`` of this gateway as its clients see it: ``server.public_url`` when set, else the request's
    own scheme and Host; behind a TLS-terminating proxy the scheme we see is http, so only a trusted proxy's
    ``X-Forwarded-Proto`` / ``-Host`` may say otherwise."""
    if server.public_url:
        return server.public_url
    scheme = str(scope.get("scheme", "http"))
    host = (header(scope, b"host") or b"localhost").decode("latin-1")
    if server.trust_forwarded_headers:
        scheme = (header(scope, b"x-forwarded-proto") or scheme.encode()).decode("latin-1").split(",")[0].strip()
        host = (header(scope, b"x-forwarded-host") or host.encode()).decode("latin-1").split(",")[0].strip()
    return f"{scheme}://{host}"


@dataclass(slots=True)
class RequestContext:
    method: str
    path: str  # as the request carried it (scope["path"], decoded)
    route: PricedRoute | None  # the priced route it matches, or None (free / refused)
    params: dict[str, str]  # the route's path values
    client: str | None
    request_id: str
    routes: RouteTable[PricedRoute] = field(repr=False)
    _scope: Scope = field(repr=False)
    _server: ServerConfig = field(repr=False)
    _resource: str | None = field(default=None, repr=False)

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


def request_context(scope: Scope, routes: RouteTable[PricedRoute], server: ServerConfig) -> RequestContext:
    """The request's context, built on first use and kept in the scope."""
    ctx = scope.get(CONTEXT_KEY)
    method, path = scope["method"], scope["path"]
    if isinstance(ctx, RequestContext) and ctx.routes is routes and ctx.method == method and ctx.path == path:
        return ctx
    matched = routes.match(method, normalise_path(path))
    client = scope.get("client")
    ctx = RequestContext(
        method=method,
        path=path,
        route=matched[0] if matched else None,
        params=matched[1] if matched else {},
        client=client[0] if client else None,
        request_id=ctx.request_id if isinstance(ctx, RequestContext) else request_id_of(scope),
        routes=routes,
        _scope=scope,
        _server=server,
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


__all__ = ["CONTEXT_KEY", "RequestContext", "new_request_id", "origin", "request_context", "request_id_of"]
