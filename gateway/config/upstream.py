"""``[upstream]``: the API behind the gateway, the headers the gateway adds to requests to it (and on which
requests), and what of the client's request may change how the upstream routes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal
from urllib.parse import urlsplit

from gateway.config.table import Table
from gateway.config.values import expand_env, http_url, local_path
from gateway.errors import ConfigError
from gateway.routes import RoutePattern
from gateway.secrets import Secret

__all__ = ["InjectHeadersOn", "UpstreamConfig", "parse_upstream", "without_userinfo"]

# "priced": paid requests on [[routes]] and the gateway's own job calls; "all": every request, free ones too;
# a tuple of patterns: those free routes as well as the priced ones.
InjectHeadersOn = Literal["priced", "all"] | tuple[RoutePattern, ...]


@dataclass(frozen=True, slots=True, repr=False)
class UpstreamConfig:
    # May hold user info, which the proxy sends as ``Authorization: Basic``: the repr masks it.
    url: str = "http://127.0.0.1:9000"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 256
    # Slow clients never starve paying ones (docs/threat-model.md T39): this share of max_connections is kept for
    # requests with a verified payment, and one client may have at most max_uploads_per_client bodies streaming up
    # at once (a body is read before a connection is taken up to 64 KiB; only larger ones stream).
    reserved_for_paid: float = 0.25
    max_uploads_per_client: int = 16
    headers: tuple[tuple[str, Secret], ...] = ()  # values are API keys for the upstream: never shown
    health_path: str | None = None  # readiness: GET this path (< 500 is up); None: a TCP connect to the origin
    # Where ``headers`` go (docs/threat-model.md T36): the upstream's API key on a free
    # path would let anyone use the upstream's own paid API through the gateway for nothing.
    inject_headers_on: InjectHeadersOn = "priced"
    # Drop X-HTTP-Method-Override & co. and ``_method=`` (an unpaid POST must not become a priced GET upstream).
    strip_method_override: bool = True

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["url"] = without_userinfo(self.url, "***@")
        return f"UpstreamConfig({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    __str__ = __repr__


def without_userinfo(url: str, mask: str = "") -> str:
    """``url`` with its user info (``user:password@``) replaced by ``mask``."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return "<invalid url>"
    scheme, sep, rest = url.partition("://")
    if "@" in netloc:
        return f"{scheme}{sep}{mask}{rest[len(netloc.rpartition('@')[0]) + 1 :]}"
    # A password with a raw "/" ends the netloc early ("u:pa/ss@host"): what seems to be a port is no number.
    head = rest.partition("?")[0].partition("#")[0]
    port = netloc.rpartition(":")[2] if ":" in netloc.rpartition("]")[2] else ""
    if "@" in head and port and not port.isdigit():
        return f"{scheme}{sep}{mask}{head.rpartition('@')[2]}{rest[len(head) :]}"
    return url


_DEFAULT = UpstreamConfig()


def parse_upstream(t: Table, env: Mapping[str, str]) -> UpstreamConfig:
    url = http_url(t.require("url", str), t.key("url")).rstrip("/")
    headers_table = t.table("headers")
    headers: list[tuple[str, Secret]] = []
    for name in list(headers_table.data):
        raw = headers_table.require(name, str)
        headers.append((name, Secret(expand_env(raw, headers_table.key(name), env), f"{name}=***")))
    headers_table.done()
    cfg = UpstreamConfig(
        url=url,
        connect_timeout=t.number("connect_timeout", _DEFAULT.connect_timeout, minimum=0.01),
        read_timeout=t.number("read_timeout", _DEFAULT.read_timeout, minimum=0.01),
        max_connections=t.integer("max_connections", _DEFAULT.max_connections, minimum=1),
        reserved_for_paid=_share(t, "reserved_for_paid", _DEFAULT.reserved_for_paid),
        max_uploads_per_client=t.integer("max_uploads_per_client", _DEFAULT.max_uploads_per_client, minimum=1),
        headers=tuple(headers),
        health_path=local_path(t, "health_path", _DEFAULT.health_path) or None,
        inject_headers_on=_inject_headers_on(t),
        strip_method_override=t.get("strip_method_override", bool, _DEFAULT.strip_method_override),
    )
    t.done()
    return cfg


def _inject_headers_on(t: Table) -> InjectHeadersOn:
    value = t.get("inject_headers_on", (str, list), _DEFAULT.inject_headers_on)
    if isinstance(value, str):
        if value not in ("priced", "all"):
            raise ConfigError(t.key("inject_headers_on"), 'must be "priced", "all" or a list of route patterns')
        return "priced" if value == "priced" else "all"
    patterns: list[RoutePattern] = []
    for i, text in enumerate(value):
        key = f"{t.key('inject_headers_on')}[{i}]"
        if not isinstance(text, str):
            raise ConfigError(key, "expected a route pattern string")
        try:
            patterns.append(RoutePattern.parse(text))
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
    return tuple(patterns)


def _share(t: Table, name: str, default: float) -> float:
    value = t.number(name, default)
    if value > 0.9:  # free requests keep at least a tenth (and at least one connection)
        raise ConfigError(t.key(name), "must be between 0 and 0.9")
    return value
