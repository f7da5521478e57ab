"""Configuration: a TOML file validated into frozen objects, every value with a default.

``gateway.example.toml`` documents each key. A bad file fails at start with a :class:`ConfigError` naming the
key (``routes[2].price: ...``); the CLI turns that into exit code 2. Secrets (relayer key, upstream header
values, RPC URLs that embed API keys, store passwords) are held in :class:`Secret` so that no ``repr`` or log line
shows them.

One module per section, each holding its frozen dataclass (where every default is written, once) and its parser:
``server``, ``upstream``, ``store``, ``idempotency``, ``ratelimits``, ``payment``, ``networks``, ``routes``,
``discovery`` (with ``[paywall]`` and the routes' documentation keys),
``jobs``, ``sessions``, ``ledger`` and ``admin``; ``table`` reads a TOML table
key by key, ``values`` checks the values several sections share, ``loader`` assembles :class:`GatewayConfig`.
"""

from gateway.config.admin import AdminConfig, AdminToken
from gateway.config.discovery import BodyType, DiscoveryConfig, PaywallConfig, RouteDocs
from gateway.config.idempotency import IdempotencyConfig
from gateway.config.jobs import JobsConfig
from gateway.config.ledger import LedgerConfig
from gateway.config.loader import GatewayConfig, load_config, parse_config
from gateway.config.networks import FacilitatorConfig, NetworkConfig
from gateway.config.payment import PaymentConfig
from gateway.config.ratelimits import RateLimitConfig
from gateway.config.routes import RouteConfig, Settlement
from gateway.config.server import ServerConfig
from gateway.config.sessions import MeterConfig, SessionsConfig
from gateway.config.store import StoreConfig
from gateway.config.upstream import UpstreamConfig
from gateway.errors import ConfigError
from gateway.secrets import Secret, redact_url

__all__ = [
    "AdminConfig",
    "AdminToken",
    "BodyType",
    "ConfigError",
    "DiscoveryConfig",
    "FacilitatorConfig",
    "GatewayConfig",
    "IdempotencyConfig",
    "JobsConfig",
    "LedgerConfig",
    "MeterConfig",
    "NetworkConfig",
    "PaymentConfig",
    "PaywallConfig",
    "RateLimitConfig",
    "RouteConfig",
    "RouteDocs",
    "Secret",
    "ServerConfig",
    "SessionsConfig",
    "Settlement",
    "StoreConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "redact_url",
]
