"""What crosses the upstream hop besides the body: the request line and headers sent up, and the answer's URLs.

Split from :mod:`gateway.http.proxy` (which owns the connection, streaming and failure handling) so the rules
about *what* is forwarded read in one place (docs/threat-model.md T14-T16, T34, T36, T37): the path never climbs
above the base path; hop-by-hop, payment and client-sent forwarding headers never go upstream and the gateway
*sets* ``X-Forwarded-*``; method-override headers and ``_method`` query parameters are dropped when
``strip_method_override`` is on; ``inject_headers`` go only where :meth:`Forwarding.with_credentials` says; and a
``Location`` or ``Content-Location`` naming the upstream's origin is rewritten to the gateway's public URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote, urlsplit

from gateway.config.upstream import InjectHeadersOn
from gateway.errors import BadRequest
from gateway.http.asgi import Scope
from gateway.http.context import METHOD_OVERRIDE_HEADERS, header_name, without_method_override
from gateway.routes import AmbiguousPath, RouteTable, path_readings
from gateway.x402 import reasons

# RFC 9110 7.6.1; Proxy-Connection is the pre-standard spelling. Expect is answered by our own server (uvicorn
# sends 100 Continue), so forwarding it would make the upstream wait for a continue that we never await.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer transfer-encoding upgrade "
    b"proxy-connection expect".split()
)
# Stamped by a server that writes its own (plain uvicorn, embedded): the upstream's copy would be a second Date /
# Server field in the answer (Date is a singleton, RFC 9110 6.6.1), which strict clients refuse. So both are dropped,
# unless the scope carries SERVER_KEEPS_DATE: the server ``x402-gateway serve`` runs (gateway/http/server.py) stamps
# no Date of its own and adds one only to an answer that has none, so there the upstream's Date is relayed as the
# end-to-end field it is (a cache downstream computes ages from the origin's Date). Dropped under a server that
# stamps nothing, an answer went out with no Date at all (RFC 9110 6.6.1: MUST). The upstream's Server is dropped
# either way, as nginx does: it names the software behind the gateway to anyone who asks.
UPSTREAM_OWN = frozenset({b"date", b"server"})
SERVER_KEEPS_DATE = "gateway.server_keeps_date"
PAYMENT_HEADERS = frozenset(b"x-payment payment-signature x-payment-network x-payment-auth x-payment-binding".split())
# A host as DNS and IP addresses spell it (letters, digits, '-', '.', '_'; an IPv6 literal in brackets) and a port:
# RFC 3986 also allows sub-delimiters (quotes, parentheses, ...) in a name, which no real host has and an upstream
# building a link from X-Forwarded-Host would put into its markup.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]*)(?::([0-9]{1,5}))?")

# A client must not be able to claim an address, scheme or host: upstreams use these for auth and links.
FORWARDING_HEADERS = frozenset(
    b"forwarded x-forwarded-for x-forwarded-proto x-forwarded-host x-forwarded-port x-real-ip".split()
)
RESPONSE_DROP = HOP_BY_HOP | UPSTREAM_OWN
_RESPONSE_DROP_KEEPING_DATE = HOP_BY_HOP | {b"server"}
# Everything that may appear unescaped in a path (or a query, below); anything else (raw non-ASCII, '#', '\\', space) is
# percent-encoded so no upstream parser can re-read or truncate it. '%' is safe: existing escapes pass untouched.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# A query is not priced (its path is): every visible ASCII character but '#' goes up as the client sent it, so an
# upstream reads the query the client wrote, byte for byte (``ids[]=1``, ``where={"a":1}``, ``a|b``: signatures over
# the raw URL, and parsers that treat ``%5B`` and ``[`` apart, see what was sent). Control characters, a space and
# raw non-ASCII bytes (which only a lax client sends) are still percent-encoded, and '#' would end the target.
_QUERY_SAFE = _PATH_SAFE + '?"<>[\\]^`{|}'
_DOT_SEGMENTS = frozenset({".", ".."})
# A path that upstream_path returns as it is (after the base): only characters quote() keeps with _PATH_SAFE, no '%'.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/:@!$&'()*+,;=._~-]*")
# Answer headers that carry a URL the upstream may build from its own origin (RFC 9110 10.2.2, 8.7).
_URL_HEADERS = frozenset({b"location", b"content-location"})
# Set by :meth:`UpstreamProxy.credentialed`: a call the gateway itself makes (the jobs layer), headers injected.
CREDENTIALS_KEY = "gateway.upstream_credentials"


def upstream_path(base: str, raw_path: str) -> str:
    """``base`` + the request path with dot segments (also ``%2e`` forms) resolved and empty segments merged.

    Resolution happens on the request path alone, so ``..`` can at most reach ``base``. Empty segments are merged
    so ``//evil/x`` cannot be read as a network-path reference by an upstream. A segment hiding ``..`` behind an
    encoded ``/`` or ``\\`` (``..%2F..``) is refused: an upstream that decodes before resolving would climb.
    """
    if _PLAIN_PATH.fullmatch(raw_path) and "//" not in raw_path and "/." not in raw_path:
        # Nothing to escape, resolve or merge (the common case): what the loop below would return.
        return base.rstrip("/") + raw_path
    out: list[str] = []
    trailing = ""
    for seg in quote(raw_path, safe=_PATH_SAFE).split("/"):
        decoded = unquote(seg) if "%" in seg else seg
        trailing = "/" if not seg or decoded in _DOT_SEGMENTS else ""
        if decoded in _DOT_SEGMENTS:
            if decoded == ".." and out:
                out.pop()
        elif "%" in seg and ".." in decoded.replace("\\", "/").split("/"):
            raise BadRequest("encoded path traversal", reason=reasons.INVALID_PATH)
        elif seg:
            out.append(seg)
    if not out:
        return base.rstrip("/") + "/"
    return f"{base.rstrip('/')}/{'/'.join(out)}{trailing}"


def _host_and_port(value: bytes) -> bool:
    match = _HOST.fullmatch(value)
    return match is not None and (match[2] is None or int(match[2]) <= 65535)


class Forwarding:
    """The forwarding rules of one upstream origin (``scheme://host:port`` under ``base``), fixed at construction."""

    def __init__(
        self,
        *,
        scheme: str,
        host: str,
        port: int,
        base: str,
        inject: Mapping[str, str],
        strip_headers: Iterable[str],
        inject_on: InjectHeadersOn,
        strip_method_override: bool,
        public_scheme: str | None,
        public_url: str | None,
    ) -> None:
        self._scheme = scheme
        self._host = host
        self._port = port
        self._base = base
        # Compared as header_name() spells them: a CGI-style upstream reads X_Payment as X-Payment.
        self._drop = (
            HOP_BY_HOP
            | PAYMENT_HEADERS
            | FORWARDING_HEADERS
            | {b"host"}
            | {header_name(k.encode("latin-1")) for k in inject}
            | {header_name(h.encode("latin-1")) for h in strip_headers}
            | {b"content-length"}  # framing is the pool's: it writes the length (or chunks) it sends
            | (METHOD_OVERRIDE_HEADERS if strip_method_override else frozenset())
        )
        self._strip_override = strip_method_override
        self._inject_all = inject_on == "all"
        self._inject_routes: RouteTable[bool] | None = (
            RouteTable([(pattern, True) for pattern in inject_on]) if isinstance(inject_on, tuple) else None
        )
        self._public_url = public_url.rstrip("/") if public_url else ""
        self._inject_raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in inject.items()]
        self._public_scheme = public_scheme

    def with_credentials(self, scope: Scope) -> bool:
        """Whether ``inject_headers`` go on this request (docs/threat-model.md T36)."""
        if self._inject_all or scope.get(CREDENTIALS_KEY) is True:
            return True
        state = scope.get("state")
        paid = state.get("x402") if isinstance(state, dict) else None
        if isinstance(paid, dict) and "payer" in paid:  # PaymentMiddleware verified a payment for this request
            return True
        if self._inject_routes is None:
            return False
        raw = scope.get("raw_path")
        try:  # every reading an upstream may make of the path must be a route the operator named
            readings = path_readings(raw.decode("latin-1") if raw else quote(scope["path"], safe=_PATH_SAFE))
        except AmbiguousPath:
            return False
        return all(self._inject_routes.match(scope["method"], path) for path in readings)

    def request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        named: set[bytes] = set()
        hosts: list[bytes] = []
        drop = self._drop
        out: list[tuple[bytes, bytes]] = []
        for k, v in raw:
            name = k.lower()
            if name == b"connection":  # the headers it names are hop-by-hop too (RFC 9110 7.6.1)
                named.update(t.strip().lower() for t in v.split(b","))
            elif name == b"host":
                hosts.append(v)
            if name.replace(b"_", b"-") not in drop:  # header_name(k)
                out.append((name, v))
        if len(hosts) > 1:  # which one the upstream would trust in X-Forwarded-Host is anyone's guess
            raise BadRequest("repeated Host header", reason=reasons.INVALID_HOST)
        if hosts and not _host_and_port(hosts[0]):
            # The upstream trusts X-Forwarded-Host (the gateway sets it): only a host and port go there, never
            # user-info, a path or anything else an upstream could build a link or a decision on (RFC 9110 7.2).
            raise BadRequest("malformed Host header", reason=reasons.INVALID_HOST)
        if named:
            listed = {header_name(n) for n in named}
            out = [(k, v) for k, v in out if header_name(k) not in listed]
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
        out.append((b"x-forwarded-proto", (self._public_scheme or str(scope.get("scheme", "http"))).encode("latin-1")))
        if hosts:
            out.append((b"x-forwarded-host", hosts[0]))
        if self._inject_raw and self.with_credentials(scope):
            out.extend(self._inject_raw)
        return out

    def target(self, scope: Scope) -> str:
        """The request target sent upstream: the base path plus the resolved path, and the query."""
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope["path"], safe=_PATH_SAFE)
        query_string: bytes = scope.get("query_string", b"")
        if self._strip_override:
            query_string = without_method_override(query_string)
        query = quote(query_string.decode("latin-1"), safe=_QUERY_SAFE)
        target = upstream_path(self._base, path)
        return f"{target}?{query}" if query else target

    def response_headers(
        self, headers: Iterable[tuple[bytes, bytes]], *, keep_date: bool = False
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The upstream's answer headers as relayed (hop-by-hop and Server dropped, and Date unless ``keep_date``:
        the server keeps an answer's own, see SERVER_KEEPS_DATE; URLs on the upstream's origin made public), and
        whether a URL was rewritten."""
        headers = list(headers)
        drop = _RESPONSE_DROP_KEEPING_DATE if keep_date else RESPONSE_DROP
        for k, v in headers:
            if k.lower() == b"connection":
                drop = drop | {t.strip().lower() for t in v.split(b",")}
        out: list[tuple[bytes, bytes]] = []
        rewritten = False
        for k, v in headers:
            name = k.lower()
            if name in drop:
                continue
            value = self.public_location(v) if name in _URL_HEADERS else v
            rewritten = rewritten or value is not v
            out.append((name, value))
        return out, rewritten

    def public_location(self, value: bytes) -> bytes:
        """A URL on the upstream's own origin (its scheme, host and port, under its base path) as the gateway's
        clients reach it: ``public_url`` + the path below the base, or a bare path when no public URL is set
        (the client resolves it against the URL it called; a Host header never makes it into the answer).
        Any other URL passes unchanged: a redirect elsewhere is the upstream's business, and relayed as is."""
        text = value.decode("latin-1").strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            return value
        if parts.netloc:
            default = 443 if (parts.scheme.lower() or self._scheme) == "https" else 80
            if (parts.hostname or "") != self._host.lower() or (port or default) != self._port:
                return value
        elif parts.scheme or not text.startswith("/"):
            return value  # another scheme (mailto:), or a relative reference: resolved by the client as it is
        path = parts.path or "/"
        base = self._base.rstrip("/")
        if base and (path == base or path.startswith(base + "/")):
            path = path[len(base) :] or "/"
        elif base and not parts.netloc:
            return value  # a path outside the base path: the upstream's, not one the gateway serves
        out = self._public_url + path
        if parts.query:
            out += "?" + parts.query
        if parts.fragment:
            out += "#" + parts.fragment
        return value if out == text else out.encode("latin-1")


__all__ = [
    "CREDENTIALS_KEY",
    "FORWARDING_HEADERS",
    "HOP_BY_HOP",
    "PAYMENT_HEADERS",
    "RESPONSE_DROP",
    "SERVER_KEEPS_DATE",
    "UPSTREAM_OWN",
    "Forwarding",
    "upstream_path",
]
