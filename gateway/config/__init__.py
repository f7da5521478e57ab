"""Configuration: a TOML file validated into frozen objects, every value with a default.

``gateway.example.toml`` documents each key. A bad file fails at start with a :class:`ConfigError` naming the
key (``routes[2].price: ...``); the CLI turns that into exit code 2. Secrets (relayer key, upstream header
values, RPC URLs that embed API keys) are held in :class:`Secret` so that no ``repr`` or log line shows them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from limits import parse_many

from gateway.errors import ConfigError
from gateway.money import parse_usd
from gateway.networks import KNOWN_NETWORKS
from gateway.routes import RoutePattern, normalise_path

if TYPE_CHECKING:  # [jobs] (issue 4): defined in gateway/jobs/settings.py, parsed by _jobs below
    from gateway.jobs.settings import JobsConfig

Settlement = Literal["before", "after"]
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Secret:
    """A string that never shows itself in ``repr``/``str``; call :meth:`reveal` where it is really used."""

    __slots__ = ("_label", "_value")

    def __init__(self, value: str, label: str = "***") -> None:
        self._value = value
        self._label = label

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self._label})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact_url(url: str) -> str:
    """``https://user:pw@host:8545/v2/KEY?x=1`` -> ``https://host:8545/…``: keys hide in userinfo, path and query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8402
    public_url: str | None = None
    trust_forwarded_headers: bool = False
    unpriced: Literal["pass", "refuse"] = "pass"
    max_body_bytes: int = 10 * 1024 * 1024
    body_read_timeout: float = 30.0
    max_header_bytes: int = 16 * 1024  # request line path + all header names and values; above -> 431
    health_path: str = "/healthz"  # "" disables; answered before route matching, never priced
    ready_path: str = "/readyz"
    metrics_path: str = "/metrics"
    ready_timeout: float = 2.0  # seconds each readiness check may take


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:9000"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 256
    headers: tuple[tuple[str, Secret], ...] = ()
    health_path: str | None = None  # readiness: GET this path (< 500 is up); None: a TCP connect to the origin


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: Secret = field(default_factory=lambda: Secret("sqlite:///x402-gateway.db", "sqlite:///x402-gateway.db"))
    lease_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``limits`` rate strings ("60/minute", "10/second;500/hour"), validated at load time."""

    enabled: bool = True
    challenge: str = "60/minute"  # per client IP and route: unpaid requests answered with a 402 challenge
    paid: str = "600/minute"  # per payer address and route: requests carrying a verified payment
    storage_url: Secret = field(default_factory=lambda: Secret("memory://", "memory://"))


@dataclass(frozen=True, slots=True)
class FacilitatorConfig:
    url: Secret
    timeout: float = 30.0  # a facilitator's /settle waits for the receipt: allow for a block or two
    auth: Literal["none", "cdp"] = "none"
    cdp_key_id_env: str = "CDP_API_KEY_ID"
    cdp_key_secret_env: str = "CDP_API_KEY_SECRET"  # noqa: S105 - the NAME of an environment variable


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    name: str
    chain_id: int
    rpc_urls: tuple[Secret, ...]
    usdc: str
    eip712_name: str
    eip712_version: str
    confirmations: int = 1
    receipt_poll_interval: float = 0.1
    rpc_timeout: float = 10.0
    finality: Literal["latest", "safe", "finalized"] = "latest"  # tx-hash proofs: block tag they must be under
    verifier: Literal["local", "facilitator"] = "local"  # who verifies and settles x402 exact payments
    facilitator: FacilitatorConfig | None = None
    # Up to this many settlements share one transaction through Multicall3 when the chain has it (1: one each).
    settlement_batch: int = 50

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"


@dataclass(frozen=True, slots=True)
class PaymentConfig:
    pay_to: str
    relayer_key: Secret | None
    max_timeout_seconds: int = 300
    min_validity_seconds: int = 6
    clock_skew_seconds: int = 60
    settle_timeout: float = 60.0
    tx_max_age_seconds: int = 3600


BodyType = Literal["json", "form-data", "text"]


@dataclass(frozen=True, slots=True)
class RouteDocs:
    """What discovery publishes about a priced route (issue 6: OpenAPI operation, bazaar extension, paywall).

    Schemas are JSON Schema objects, loaded at start from inline TOML tables or JSON files; treat them as read-only.
    """

    input_schema: dict[str, Any] | None = field(default=None, compare=False)  # query params or request body
    output_schema: dict[str, Any] | None = field(default=None, compare=False)  # the upstream's success answer
    input_example: Any = field(default=None, compare=False)  # must validate against input_schema
    output_example: Any = field(default=None, compare=False)
    body_type: BodyType = "json"  # POST/PUT/PATCH bodies: how input_schema/input_example travel
    example_path: str | None = None  # a concrete path of a parametrised route, listed in /.well-known/x402
    discoverable: bool = True  # false: left out of /.well-known/x402, /openapi.json and the bazaar extension


@dataclass(frozen=True, slots=True)
class RouteConfig:
    pattern: RoutePattern
    price: int  # atomic USDC units
    networks: tuple[str, ...]
    description: str = ""
    mime_type: str = "application/json"
    settlement: Settlement = "after"
    max_timeout_seconds: int = 300
    tx_hash: bool = True  # also accept tx-hash proofs (x-payment: 0x<hash> + x-payment-network)
    rate_limit_challenge: str | None = None  # None: rate_limits.challenge
    rate_limit_paid: str | None = None  # None: rate_limits.paid
    docs: RouteDocs = field(default_factory=RouteDocs)  # discovery and paywall metadata (issue 6)

    @property
    def route(self) -> str:
        return self.pattern.text


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """``Idempotency-Key`` on paid requests: a retry of a paid request whose answer was lost gets that answer."""

    enabled: bool = True
    store_url: Secret | None = None  # None: the receipt store's URL (separate table / key prefix)
    ttl: float = 86_400.0
    lease: float = 600.0
    max_stored_body_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """``[discovery]``: how x402scan, bazaar facilitators and agents find the priced routes (issue 6)."""

    enabled: bool = True
    well_known_path: str = "/.well-known/x402"  # "" turns it off; answered before route matching, never priced
    openapi_path: str = "/openapi.json"
    bazaar: bool = True  # put the v2 ``extensions.bazaar`` declaration into every 402 of a discoverable route
    service_name: str = ""  # v2 resource.serviceName and OpenAPI info.title (<= 32 printable ASCII)
    description: str = ""  # OpenAPI info.description
    version: str = "1.0.0"  # OpenAPI info.version: the version of YOUR API
    tags: tuple[str, ...] = ()  # v2 resource.tags (<= 5, each <= 32 printable ASCII)
    icon_url: str = ""  # v2 resource.iconUrl: an absolute https URL on a public host name


@dataclass(frozen=True, slots=True)
class PaywallConfig:
    """``[paywall]``: the HTML 402 page shown to browsers (Accept: text/html) (issue 6)."""

    enabled: bool = True


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    payment: PaymentConfig
    networks: Mapping[str, NetworkConfig]
    routes: tuple[RouteConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    jobs: JobsConfig | None = None  # [jobs]: job-aware billing / the built-in job runner (gateway.jobs)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # issue 6
    paywall: PaywallConfig = field(default_factory=PaywallConfig)  # issue 6


# --------------------------------------------------------------------------------------------- parsing


class _Table:
    """A TOML table read key by key, so that every error names its dotted path and unknown keys are refused."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.data: dict[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
        if not ok:
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def require(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            raise ConfigError(self.key(name), "is required")
        return self.get(name, kind, None)

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = float(self.get(name, (int, float), default))
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value: int = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _choice(t: _Table, name: str, allowed: tuple[str, ...], default: str) -> Any:
    value = t.get(name, str, default)
    if value not in allowed:
        raise ConfigError(t.key(name), "must be one of " + ", ".join(f'"{a}"' for a in allowed))
    return value


def _expand_env(value: str, key: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return env[name]

    return _ENV_REF.sub(sub, value)


def _address(value: str, key: str) -> str:
    if not _ADDRESS.match(value):
        raise ConfigError(key, "must be a 0x-prefixed 20-byte hex address")
    return value


def _http_url(value: str, key: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, "must be an absolute http(s) URL")
    return value


def _local_path(t: _Table, name: str, default: str) -> str:
    """A path the gateway answers itself ("" turns it off)."""
    value: str = t.get(name, str, default)
    if value and (not value.startswith("/") or "?" in value or "#" in value):
        raise ConfigError(t.key(name), 'must be an absolute path such as "/healthz", or "" to turn it off')
    return value


def _rate(t: _Table, name: str, default: str | None) -> str | None:
    """A ``limits`` rate string; a typo here would otherwise surface as a crash on the first request."""
    value: str | None = t.get(name, str, default)
    if value is None:
        return None
    try:
        parsed = parse_many(value)
    except ValueError:
        parsed = []
    if not parsed or any(item.amount < 1 for item in parsed):
        raise ConfigError(t.key(name), 'must be a rate such as "60/minute" or "10/second;500/hour"')
    return value


def _server(t: _Table) -> ServerConfig:
    listen = t.get("listen", str, "127.0.0.1:8402")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(t.key("listen"), "must be HOST:PORT")
    public_url = t.get("public_url", str, "") or None
    if public_url:
        _http_url(public_url, t.key("public_url"))
        public_url = public_url.rstrip("/")
    unpriced = t.get("unpriced", str, "pass")
    if unpriced not in ("pass", "refuse"):
        raise ConfigError(t.key("unpriced"), 'must be "pass" or "refuse"')
    cfg = ServerConfig(
        listen_host=host.strip("[]"),
        listen_port=int(port),
        public_url=public_url,
        trust_forwarded_headers=t.get("trust_forwarded_headers", bool, False),
        unpriced=unpriced,
        max_body_bytes=t.integer("max_body_bytes", 10 * 1024 * 1024, minimum=1),
        body_read_timeout=t.number("body_read_timeout", 30.0, minimum=0.1),
        max_header_bytes=t.integer("max_header_bytes", 16 * 1024, minimum=1024),
        health_path=_local_path(t, "health_path", "/healthz"),
        ready_path=_local_path(t, "ready_path", "/readyz"),
        metrics_path=_local_path(t, "metrics_path", "/metrics"),
        ready_timeout=t.number("ready_timeout", 2.0, minimum=0.05),
    )
    paths = [p for p in (cfg.health_path, cfg.ready_path, cfg.metrics_path) if p]
    if len(set(paths)) != len(paths):
        raise ConfigError(t.key("health_path"), "health_path, ready_path and metrics_path must differ")
    t.done()
    return cfg


def _upstream(t: _Table, env: Mapping[str, str]) -> UpstreamConfig:
    url = _http_url(t.require("url", str), t.key("url")).rstrip("/")
    headers_table = _Table(t.get("headers", dict, {}), t.key("headers"))
    headers: list[tuple[str, Secret]] = []
    for name in list(headers_table.data):
        raw = headers_table.get(name, str, "")
        headers.append((name, Secret(_expand_env(raw, headers_table.key(name), env), f"{name}=***")))
    headers_table.done()
    cfg = UpstreamConfig(
        url=url,
        connect_timeout=t.number("connect_timeout", 5.0, minimum=0.01),
        read_timeout=t.number("read_timeout", 60.0, minimum=0.01),
        max_connections=t.integer("max_connections", 256, minimum=1),
        headers=tuple(headers),
        health_path=_local_path(t, "health_path", "") or None,
    )
    t.done()
    return cfg


def _store(t: _Table, env: Mapping[str, str], base_dir: Path) -> StoreConfig:
    url = _expand_env(t.get("url", str, "sqlite:///x402-gateway.db"), t.key("url"), env)
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        rel = url.removeprefix("sqlite:///")
        if not rel.startswith("/") and rel != ":memory:":
            url = f"sqlite:///{(base_dir / rel).resolve()}"
        label = url
    elif scheme in ("redis", "rediss", "unix"):
        label = redact_url(url) if "@" in url else url
    else:
        raise ConfigError(t.key("url"), "must start with sqlite:///, redis://, rediss:// or unix://")
    cfg = StoreConfig(url=Secret(url, label), lease_seconds=t.number("lease_seconds", 120.0, minimum=1.0))
    t.done()
    return cfg


def _idempotency(t: _Table, env: Mapping[str, str], base_dir: Path, min_lease: float) -> IdempotencyConfig:
    raw_url = t.get("store_url", str, "")
    store_url = _store(_Table({"url": raw_url}, t.path), env, base_dir).url if raw_url else None
    cfg = IdempotencyConfig(
        enabled=t.get("enabled", bool, True),
        store_url=store_url,
        ttl=t.number("ttl", 86_400.0, minimum=1.0),
        lease=t.number("lease", 600.0, minimum=1.0),
        max_stored_body_bytes=t.integer("max_stored_body_bytes", 1024 * 1024, minimum=0),
    )
    if cfg.lease < min_lease:
        # A retry must not take over a request that is still settling or waiting for the upstream.
        raise ConfigError(
            t.key("lease"), f"must be at least upstream.read_timeout + payment.settle_timeout ({min_lease:g})"
        )
    t.done()
    return cfg


def _rate_limits(t: _Table, env: Mapping[str, str]) -> RateLimitConfig:
    url = _expand_env(t.get("storage_url", str, "memory://"), t.key("storage_url"), env)
    scheme = url.partition("://")[0]
    if scheme not in ("memory", "redis", "rediss", "unix"):
        raise ConfigError(t.key("storage_url"), "must be memory://, redis://, rediss:// or unix://")
    cfg = RateLimitConfig(
        enabled=t.get("enabled", bool, True),
        challenge=_rate(t, "challenge", "60/minute") or "60/minute",
        paid=_rate(t, "paid", "600/minute") or "600/minute",
        storage_url=Secret(url, redact_url(url) if "@" in url else url),
    )
    t.done()
    return cfg


def _network(name: str, t: _Table, env: Mapping[str, str]) -> NetworkConfig:
    known = KNOWN_NETWORKS.get(name)
    raw_urls = t.require("rpc_urls", list)
    if not raw_urls:
        raise ConfigError(t.key("rpc_urls"), "needs at least one URL")
    urls = []
    for i, raw in enumerate(raw_urls):
        key = f"{t.key('rpc_urls')}[{i}]"
        if not isinstance(raw, str):
            raise ConfigError(key, "expected a string")
        url = _http_url(_expand_env(raw, key, env), key)
        urls.append(Secret(url, redact_url(url)))
    chain_id = t.get("chain_id", int, known.chain_id if known else None)
    usdc = t.get("usdc", str, known.usdc if known else None)
    eip712_name = t.get("eip712_name", str, known.eip712_name if known else None)
    eip712_version = t.get("eip712_version", str, known.eip712_version if known else None)
    for key, value in (("chain_id", chain_id), ("usdc", usdc), ("eip712_name", eip712_name)):
        if value is None:
            raise ConfigError(t.key(key), f"is required for a network the gateway does not know ({name!r})")
    cfg = NetworkConfig(
        name=name,
        chain_id=chain_id,
        rpc_urls=tuple(urls),
        usdc=_address(usdc, t.key("usdc")),
        eip712_name=eip712_name,
        eip712_version=eip712_version or "2",
        confirmations=t.integer("confirmations", 1, minimum=0),
        receipt_poll_interval=t.number("receipt_poll_interval", 0.1, minimum=0.01),
        rpc_timeout=t.number("rpc_timeout", 10.0, minimum=0.1),
        finality=_choice(t, "finality", ("latest", "safe", "finalized"), "latest"),
        verifier=_choice(t, "verifier", ("local", "facilitator"), "local"),
        facilitator=_facilitator(t, env),
        settlement_batch=max(1, min(t.integer("settlement_batch", 50, minimum=1), 200)),
    )
    if cfg.verifier == "facilitator" and cfg.facilitator is None:
        raise ConfigError(t.key("facilitator"), 'verifier = "facilitator" needs a [networks.NAME.facilitator] table')
    t.done()
    return cfg


def _facilitator(parent: _Table, env: Mapping[str, str]) -> FacilitatorConfig | None:
    raw = parent.get("facilitator", dict, None)
    if raw is None:
        return None
    t = _Table(raw, parent.key("facilitator"))
    url = _http_url(_expand_env(t.require("url", str), t.key("url"), env), t.key("url")).rstrip("/")
    cfg = FacilitatorConfig(
        url=Secret(url, redact_url(url)),
        timeout=t.number("timeout", 30.0, minimum=0.5),
        auth=_choice(t, "auth", ("none", "cdp"), "none"),
        cdp_key_id_env=t.get("cdp_key_id_env", str, "CDP_API_KEY_ID"),
        cdp_key_secret_env=t.get("cdp_key_secret_env", str, "CDP_API_KEY_SECRET"),
    )
    t.done()
    return cfg


def _route(t: _Table, networks: Mapping[str, NetworkConfig], payment: PaymentConfig, *, base_dir: Path) -> RouteConfig:
    text = t.require("route", str)
    try:
        pattern = RoutePattern.parse(text)
    except ValueError as exc:
        raise ConfigError(t.key("route"), str(exc)) from None
    raw_price = t.require("price", (str, int))
    try:
        price = parse_usd(raw_price)
    except ValueError as exc:
        raise ConfigError(t.key("price"), str(exc)) from None
    if price <= 0:
        raise ConfigError(t.key("price"), "must be greater than zero (leave free routes out of [[routes]])")
    names = t.get("networks", list, list(networks))
    for i, n in enumerate(names):
        if n not in networks:
            raise ConfigError(f"{t.key('networks')}[{i}]", f"network {n!r} is not configured under [networks]")
    if not names:
        raise ConfigError(t.key("networks"), "needs at least one network")
    settlement = t.get("settlement", str, "after")
    if settlement not in ("before", "after"):
        raise ConfigError(t.key("settlement"), 'must be "before" or "after"')
    cfg = RouteConfig(
        pattern=pattern,
        price=price,
        networks=tuple(names),
        description=t.get("description", str, ""),
        mime_type=t.get("mime_type", str, "application/json"),
        settlement=settlement,
        max_timeout_seconds=t.integer("max_timeout_seconds", payment.max_timeout_seconds, minimum=10),
        tx_hash=t.get("tx_hash", bool, True),
        rate_limit_challenge=_rate(t, "rate_limit_challenge", None),
        rate_limit_paid=_rate(t, "rate_limit_paid", None),
        docs=_route_docs(t, pattern, base_dir),
    )
    t.done()
    return cfg


# ------------------------------------------------------------------------------ discovery and paywall (issue 6)

_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]{1,32}\Z")


def _route_docs(t: _Table, pattern: RoutePattern, base_dir: Path) -> RouteDocs:
    """The per-route discovery keys of a ``[[routes]]`` entry."""
    example_path = t.get("example_path", str, "") or None
    if example_path is not None and not (
        example_path.startswith("/") and pattern.regex.match(normalise_path(example_path))
    ):
        raise ConfigError(t.key("example_path"), f"must be a concrete path that {pattern.text!r} matches")
    return RouteDocs(
        input_schema=_json_schema(t, "input_schema", base_dir),
        output_schema=_json_schema(t, "output_schema", base_dir),
        input_example=t.get("input_example", (dict, list, str, int, float, bool), None),
        output_example=t.get("output_example", (dict, list, str, int, float, bool), None),
        body_type=_choice(t, "body_type", ("json", "form-data", "text"), "json"),
        example_path=example_path,
        discoverable=t.get("discoverable", bool, True),
    )


def _json_schema(t: _Table, name: str, base_dir: Path) -> dict[str, Any] | None:
    """A JSON Schema as an inline table, or a path (relative to the config file) to a ``.json`` file."""
    raw = t.get(name, (dict, str), None)
    if raw is None:
        return None
    if isinstance(raw, str):
        path = base_dir / raw
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(t.key(name), f"cannot read {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(t.key(name), f"{path} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(t.key(name), f"{path} must hold a JSON object (a JSON Schema)")
    if _external_reference(raw):
        # Facilitators refuse schemas that point outside themselves (a $ref is a fetch: SSRF), and so would
        # every listing built from them.
        raise ConfigError(t.key(name), 'may only use same-document references ("$ref": "#/...")')
    schema: dict[str, Any] = raw
    return schema


def _external_reference(node: Any) -> bool:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$id") and not (isinstance(value, str) and value.startswith("#")):
                return True
            if _external_reference(value):
                return True
    elif isinstance(node, list):
        return any(_external_reference(item) for item in node)
    return False


def _discovery(t: _Table, server: ServerConfig) -> DiscoveryConfig:
    service_name = t.get("service_name", str, "")
    if service_name and not _PRINTABLE_ASCII.match(service_name):
        raise ConfigError(t.key("service_name"), "must be 1 to 32 printable ASCII characters")
    tags = t.get("tags", list, [])
    if len(tags) > 5:
        raise ConfigError(t.key("tags"), "at most 5 tags")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not _PRINTABLE_ASCII.match(tag):
            raise ConfigError(f"{t.key('tags')}[{i}]", "must be 1 to 32 printable ASCII characters")
    icon_url = t.get("icon_url", str, "")
    if icon_url:
        parts = urlsplit(icon_url)
        # Facilitators drop icons on http, IP literals, localhost or with userinfo: say so at start instead.
        if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc or len(icon_url) > 2048:
            raise ConfigError(t.key("icon_url"), "must be an absolute https:// URL without user info")
    cfg = DiscoveryConfig(
        enabled=t.get("enabled", bool, True),
        well_known_path=_local_path(t, "well_known_path", "/.well-known/x402"),
        openapi_path=_local_path(t, "openapi_path", "/openapi.json"),
        bazaar=t.get("bazaar", bool, True),
        service_name=service_name,
        description=t.get("description", str, ""),
        version=t.get("version", str, "1.0.0") or "1.0.0",
        tags=tuple(tags),
        icon_url=icon_url,
    )
    taken = {server.health_path, server.ready_path, server.metrics_path} - {""}
    for name in ("well_known_path", "openapi_path"):
        path = getattr(cfg, name)
        if path and path in taken:
            raise ConfigError(t.key(name), "must differ from the health, ready and metrics paths")
        taken.add(path)
    t.done()
    return cfg


def _paywall(t: _Table) -> PaywallConfig:
    cfg = PaywallConfig(enabled=t.get("enabled", bool, True))
    t.done()
    return cfg


def _jobs(root: _Table, routes: tuple[RouteConfig, ...]) -> JobsConfig | None:
    """``[jobs]`` (issue 4), validated against the priced routes; None when the section is absent."""
    from gateway.jobs.settings import parse_jobs  # lazy: gateway.jobs imports this module

    raw = root.get("jobs", dict, None)
    return None if raw is None else parse_jobs(_Table(raw, "jobs"), routes)


def parse_config(
    data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> GatewayConfig:
    """Validate a parsed TOML document. ``env`` defaults to ``os.environ``; relative SQLite paths resolve
    against ``base_dir`` (the config file's folder)."""
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    root = _Table(dict(data), "")
    server = _server(_Table(root.get("server", dict, {}), "server"))
    upstream = _upstream(_Table(root.require("upstream", dict), "upstream"), env)
    store = _store(_Table(root.get("store", dict, {}), "store"), env, base_dir)
    rate_limits = _rate_limits(_Table(root.get("rate_limits", dict, {}), "rate_limits"), env)

    pt = _Table(root.require("payment", dict), "payment")
    pay_to = _address(pt.require("pay_to", str), pt.key("pay_to"))
    key_env = pt.get("relayer_key_env", str, "X402_RELAYER_KEY")
    raw_key = env.get(key_env)
    relayer_key = None
    if raw_key:
        if not re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", raw_key.strip()):
            raise ConfigError(pt.key("relayer_key_env"), f"environment variable {key_env} is not a 32-byte hex key")
        relayer_key = Secret(raw_key.strip(), f"${key_env}")
    payment = PaymentConfig(
        pay_to=pay_to,
        relayer_key=relayer_key,
        max_timeout_seconds=pt.integer("max_timeout_seconds", 300, minimum=10),
        min_validity_seconds=pt.integer("min_validity_seconds", 6, minimum=0),
        clock_skew_seconds=pt.integer("clock_skew_seconds", 60, minimum=0),
        settle_timeout=pt.number("settle_timeout", 60.0, minimum=1.0),
        tx_max_age_seconds=pt.integer("tx_max_age_seconds", 3600, minimum=10),
    )
    pt.done()

    nt = _Table(root.require("networks", dict), "networks")
    networks = {name: _network(name, _Table(nt.get(name, dict, {}), nt.key(name)), env) for name in list(nt.data)}
    nt.done()
    if not networks:
        raise ConfigError("networks", "configure at least one network")
    chain_ids = [n.chain_id for n in networks.values()]
    if len(set(chain_ids)) != len(chain_ids):
        raise ConfigError("networks", "two networks share one chain_id")
    if payment.relayer_key is None and any(n.verifier == "local" for n in networks.values()):
        raise ConfigError(
            "payment.relayer_key_env", f"environment variable {key_env} must hold the relayer's private key"
        )

    raw_routes = root.get("routes", list, [])
    routes = tuple(
        _route(_Table(r, f"routes[{i}]"), networks, payment, base_dir=base_dir) for i, r in enumerate(raw_routes)
    )
    jobs = _jobs(root, routes)
    idempotency = _idempotency(
        _Table(root.get("idempotency", dict, {}), "idempotency"),
        env,
        base_dir,
        upstream.read_timeout + payment.settle_timeout,
    )
    discovery = _discovery(_Table(root.get("discovery", dict, {}), "discovery"), server)
    paywall = _paywall(_Table(root.get("paywall", dict, {}), "paywall"))
    root.done()
    return GatewayConfig(
        payment=payment,
        networks=networks,
        routes=routes,
        server=server,
        upstream=upstream,
        store=store,
        rate_limits=rate_limits,
        jobs=jobs,
        idempotency=idempotency,
        discovery=discovery,
        paywall=paywall,
    )


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p} is not valid TOML: {exc}") from None
    return parse_config(data, env=env, base_dir=p.resolve().parent)
