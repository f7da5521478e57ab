"""The admin API as one pure ASGI app, served on ``[admin].listen`` beside the public listener (never on it).

Every request, in order: the bearer token (401 ``admin_token_required`` without a valid one, whatever the path, so a
scanner learns nothing), a browser's ``Host`` (400 ``invalid_host`` unless an IP address, ``localhost`` or the listen
host or a ``browser_hosts`` name: DNS rebinding), the route (404 ``not_found``, 405), the token's access (403
``admin_token_read_only`` for a read token on anything but ``GET``), the handler, and one line in the audit log, written
before the answer leaves.
Answers are JSON (exports: CSV or JSON Lines, streamed) and never cached; no CORS header is ever sent, so no web page
of another origin can read them. Routes and what they answer: docs/operating.md ("Admin API").
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, unquote

from gateway.config import AdminConfig, GatewayConfig
from gateway.errors import BadRequest, GatewayError
from gateway.http.admin.actions import Actions, Reloader
from gateway.http.admin.audit import AuditLog
from gateway.http.admin.auth import authenticate, may
from gateway.http.admin.calls import Answer, Call, admin_error
from gateway.http.admin.queries import Queries
from gateway.http.admin.refunds import Refunds
from gateway.http.admin.stores import AdminStores
from gateway.http.app import Gateway
from gateway.http.asgi import Message, Receive, Scope, Send, error_body, header
from gateway.ops.logs import REDACTOR
from gateway.x402 import reasons
from gateway.x402.codec import dumps, loads

__all__ = ["AdminApp"]

log = logging.getLogger("gateway.admin")

MAX_BODY_BYTES = 64 * 1024  # an action's JSON arguments: a few fields
_NO_STORE = (b"cache-control", b"no-store")
Handler = Callable[[Call], Awaitable[Answer]]


class AdminApp:
    """The admin API of ``gateway`` (its configuration, engine, networks and reloader); ``reloader`` replaces the
    gateway's own for the reload, price and pause actions."""

    def __init__(self, gateway: Gateway, *, reloader: Reloader | None = None) -> None:
        if gateway.config.admin is None:
            raise ValueError("the configuration has no [admin] section")
        self.gateway = gateway
        self.config: GatewayConfig = gateway.config
        self.admin: AdminConfig = gateway.config.admin
        self.reloader = reloader if reloader is not None else gateway.reloader  # SIGHUP's and the admin API's
        self.audit = AuditLog(self.admin.audit_log)
        self.stores: AdminStores | None = None
        self.refunds: Refunds | None = None
        self._routes: dict[tuple[str, str], Handler] = {}
        self._prefixed: list[tuple[str, re.Pattern[str], Handler]] = []
        self._undo_redaction: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        # The tokens and the refund key join the secrets every log line is scrubbed of.
        secrets = [t.value.reveal() for t in self.admin.tokens]
        if self.admin.refund_key is not None:
            key = self.admin.refund_key.reveal()
            bare = key.removeprefix("0x").removeprefix("0X")
            secrets += [key, bare, bare.lower(), bare.upper()]
        handle = REDACTOR.add(secrets)
        self._undo_redaction = lambda: REDACTOR.remove(handle)
        await self.audit.record({"event": "start", "listen": f"{self.admin.listen_host}:{self.admin.listen_port}"})
        stores = self.stores = AdminStores.open(self.config)
        await stores.ping()
        engine = self.gateway.payments.engine
        if self.admin.refund_key is not None:
            self.refunds = Refunds(
                self.admin.refund_key,
                ledger=stores.ledger,
                claims=engine.claims,
                networks=engine.networks,
                validity=self.admin.refund_validity,
                settle_timeout=self.config.payment.settle_timeout,
            )
        queries = Queries(self.config, stores, self.gateway)
        actions = Actions(self.config, stores, self.refunds, self.reloader)
        self._routes = {
            ("GET", "/admin/payments"): queries.payments,
            ("GET", "/admin/payments.csv"): queries.export_csv,
            ("GET", "/admin/payments.jsonl"): queries.export_jsonl,
            ("GET", "/admin/revenue"): queries.revenue,
            ("GET", "/admin/pending"): queries.pending,
            ("GET", "/admin/jobs"): queries.jobs,
            ("GET", "/admin/config"): queries.live_config,
            ("GET", "/admin/routes"): queries.routes,
            ("GET", "/admin/store"): queries.store,
            ("GET", "/admin/"): queries.dashboard,
            ("GET", "/admin"): queries.dashboard,
            ("GET", "/admin/deny"): queries.denied,
            ("POST", "/admin/deny"): actions.deny,
            ("POST", "/admin/refund"): actions.refund,
            ("POST", "/admin/reload"): actions.reload,
            ("POST", "/admin/routes/price"): actions.set_price,
            ("POST", "/admin/routes/pause"): actions.pause,
        }
        self._prefixed = [("DELETE", re.compile(r"/admin/deny/(?P<payer>[^/]+)"), actions.allow)]

    async def shutdown(self) -> None:
        await self._close()
        self._stop_redaction()

    async def _close(self) -> None:
        if self.refunds is not None:
            await self.refunds.aclose()
        if self.stores is not None:
            await self.stores.aclose()
        await self.audit.aclose()

    def _stop_redaction(self) -> None:
        if self._undo_redaction is not None:
            self._undo_redaction()
            self._undo_redaction = None

    # -- requests ----------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        entry: dict[str, Any] = {
            "token": None,
            "client": (scope.get("client") or ("?",))[0],
            "method": method,
            "path": path[:_AUDITED_CHARS],  # bounded: anyone who reaches the port writes this line, token or not
            "query": query[:_AUDITED_CHARS] or None,
        }
        caller = authenticate(header(scope, b"authorization"), self.admin.tokens)
        call: Call | None = None
        try:
            if caller is None:
                raise admin_error(401, reasons.ADMIN_TOKEN_REQUIRED, "send Authorization: Bearer <admin token>")
            entry["token"], entry["access"] = caller.name, caller.access
            if _rebound(scope, (self.admin.listen_host, *self.admin.browser_hosts)):
                # A page under a name of its own re-resolved to this address (DNS rebinding) is same-origin here:
                # it could read every answer and act (docs/operating.md, "Admin API").
                raise admin_error(
                    400,
                    reasons.INVALID_HOST,
                    "a browser reaches the admin API by its IP address, localhost or a name in [admin] browser_hosts",
                )
            if method not in ("GET", "HEAD") and _cross_site(scope):
                # A page of another origin in the operator's browser, which adds the token to every request to this
                # address (the dashboard's documented way in): it may not act (docs/operating.md).
                raise admin_error(403, reasons.ADMIN_CROSS_SITE, "actions are not taken from another site's page")
            call = Call(caller=caller, method=method, path=path, query=_query(query))
            handler = self._route(call)
            if method in ("POST", "PUT", "DELETE"):
                call.body = await _json_body(receive)
                call.args = dict(call.body)  # what was asked (refused or not); the handler puts what it read
            if not may(caller, method):
                raise admin_error(403, reasons.ADMIN_TOKEN_READ_ONLY, f"{caller.name} is a read-only token")
            answer = await handler(call)
            if call.args:
                entry["args"] = call.args
        except GatewayError as exc:
            answer = Answer(exc.status, error_body(exc), reason=exc.reason)
            if call is not None and call.args:
                entry["args"] = call.args
        except Exception:
            log.exception("admin call failed", extra={"path": path})
            failure = {"error": reasons.INTERNAL_ERROR, "message": "the admin call failed"}
            answer = Answer(500, failure, reason=reasons.INTERNAL_ERROR)
            if call is not None and call.args:
                entry["args"] = call.args
        entry["status"] = answer.status
        if answer.reason:
            entry["reason"] = answer.reason
        entry["ms"] = round((time.perf_counter() - started) * 1000, 2)
        await self._audit(entry)
        await _send(send, answer, unauthorized=caller is None)

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No WebSocket here: audited like any call, then refused (403)."""
        message = await receive()
        entry = {
            "token": None,
            "client": (scope.get("client") or ("?",))[0],
            "method": "WEBSOCKET",
            "path": str(scope.get("path", ""))[:_AUDITED_CHARS],
            "status": 403,
            "reason": reasons.ADMIN_CROSS_SITE if _cross_site(scope) else reasons.BAD_REQUEST,
        }
        await self._audit(entry)
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})

    def _route(self, call: Call) -> Handler:
        handler = self._routes.get((call.method, call.path))
        if handler is not None:
            return handler
        for method, pattern, prefixed in self._prefixed:
            match = pattern.fullmatch(call.path)
            if match and method == call.method:
                call.params = {k: unquote(v) for k, v in match.groupdict().items()}
                return prefixed
        known = {m for m, p in self._routes if p == call.path} | {
            m for m, pattern, _ in self._prefixed if pattern.fullmatch(call.path)
        }
        if known:
            exc = GatewayError(f"use {', '.join(sorted(known))}", reason=reasons.METHOD_NOT_ALLOWED)
            exc.status = 405  # type: ignore[misc]
            raise exc
        raise admin_error(404, reasons.NOT_FOUND, f"no admin call {call.method} {call.path}")

    async def _audit(self, entry: dict[str, Any]) -> None:
        try:
            await self.audit.record(entry)
        except OSError:
            # The call already happened: say so in the process log rather than hide its outcome from the caller.
            log.error("could not write the admin audit log", extra={"audit": entry})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    # The redaction stays until the server has logged the failure (while it takes the message).
                    await self._close()
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    self._stop_redaction()
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _query(raw: str) -> dict[str, str]:
    pairs = parse_qsl(raw, keep_blank_values=True)
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            raise BadRequest(f"query parameter {name!r} given twice")
        out[name] = value
    return out


async def _json_body(receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks).strip()
    if not raw:
        return {}
    try:
        body = loads(raw)
    except ValueError:  # (also: nested too deep to read, gateway/x402/codec.py)
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        # A "\ud800" escape is valid JSON but no character: no store can encode it (UTF-8), so refuse it here.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        raise BadRequest("the request body holds a string that is not Unicode text (a lone surrogate)") from None
    return body


_AUDITED_CHARS = 2048  # of a call's path and query in its audit line


def _rebound(scope: Scope, names: tuple[str, ...]) -> bool:
    """Sent by a browser (``Origin`` or ``Sec-Fetch-Site``, which scripts and the CLI do not send) under a ``Host`` that
    is neither an IP address, ``localhost`` nor one of ``names`` (listen's host, ``browser_hosts``): a page whose own
    name was made to resolve to this address (DNS rebinding), which the browser treats as that page's origin."""
    # Origin or Sec-Fetch-Site: every current browser sends the latter; Node's fetch (undici) sends Sec-Fetch-Mode
    # on every request, so that one alone is no browser.
    if not any(name in (b"origin", b"sec-fetch-site") for name, _ in scope.get("headers", ())):
        return False
    host = (header(scope, b"host") or b"").decode("latin-1").strip().lower()
    if host.startswith("["):  # an IPv6 address, with or without a port
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.removesuffix(".")
    if name == "localhost" or name in (n.lower() for n in names):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def _cross_site(scope: Scope) -> bool:
    """Sent by a browser on behalf of a page of another origin: ``Sec-Fetch-Site`` says so, or an ``Origin`` that
    is not this listener's own (``Host``). The CLI and scripts send neither."""
    site = header(scope, b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return True
    origin = header(scope, b"origin")
    if origin is None:
        return False
    host = header(scope, b"host") or b""
    return origin.split(b"://", 1)[-1].rstrip(b"/").lower() != host.lower()


async def _send(send: Send, answer: Answer, *, unauthorized: bool) -> None:
    headers: list[tuple[bytes, bytes]] = [_NO_STORE, (b"x-content-type-options", b"nosniff")]
    if unauthorized:
        headers.append((b"www-authenticate", b'Bearer realm="x402-gateway admin"'))
    if answer.page is not None:
        own = {name for name, _ in answer.headers}  # a page's own fields stand once, not beside ours
        headers = [*(h for h in headers if h[0] not in own), *answer.headers]
        headers.append((b"content-length", str(len(answer.page)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.page})
        return
    if answer.stream is None:
        payload = dumps(answer.body)
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    headers.append((b"content-type", answer.content_type.encode()))
    if answer.filename:
        headers.append((b"content-disposition", f'attachment; filename="{answer.filename}"'.encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    async for chunk in answer.stream:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
