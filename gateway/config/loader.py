"""The whole file: every section parsed in order into one frozen :class:`GatewayConfig`, and the checks that
span sections (a relayer key for local verification, an idempotency lease longer than a paid request)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.admin import AdminConfig, parse_admin
from gateway.config.discovery import DiscoveryConfig, PaywallConfig, parse_discovery, parse_paywall
from gateway.config.idempotency import IdempotencyConfig, parse_idempotency
from gateway.config.jobs import JobsConfig, parse_jobs
from gateway.config.ledger import LedgerConfig, parse_ledger
from gateway.config.networks import NetworkConfig, parse_networks
from gateway.config.payment import PaymentConfig, parse_payment
from gateway.config.ratelimits import RateLimitConfig, parse_rate_limits
from gateway.config.routes import RouteConfig, parse_routes
from gateway.config.server import ServerConfig, parse_server
from gateway.config.sessions import SessionsConfig, parse_sessions
from gateway.config.store import StoreConfig, parse_store
from gateway.config.table import Table
from gateway.config.upstream import UpstreamConfig, parse_upstream
from gateway.errors import ConfigError
from gateway.secrets import NOT_AN_ENV_NAME, env_var, is_env_name

__all__ = ["GatewayConfig", "load_config", "parse_config"]


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
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    paywall: PaywallConfig = field(default_factory=PaywallConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)  # [sessions]: batch-settlement channels
    ledger: LedgerConfig = field(default_factory=LedgerConfig)  # [ledger]: every paid-and-served request
    admin: AdminConfig | None = None  # [admin]: the operator's API on its own listener (off unless configured)


def parse_config(
    data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> GatewayConfig:
    """Validate a parsed TOML document. ``env`` defaults to ``os.environ``; relative SQLite paths resolve
    against ``base_dir`` (the config file's folder)."""
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    root = Table(dict(data), "")
    server = parse_server(root.table("server"))
    upstream = parse_upstream(root.required_table("upstream"), env)
    store = parse_store(root.table("store"), env, base_dir)
    rate_limits = parse_rate_limits(root.table("rate_limits"), env)
    payment, key_env = parse_payment(root.required_table("payment"), env)
    networks = parse_networks(root.required_table("networks"), env)
    if payment.relayer_key is None and any(n.verifier == "local" for n in networks.values()):
        # Local verification settles with the relayer's own transactions: without the key it could verify a
        # payment and then never collect it.
        if not is_env_name(key_env):  # the key itself, pasted where its variable's name belongs?
            raise ConfigError("payment.relayer_key_env", NOT_AN_ENV_NAME)
        raise ConfigError("payment.relayer_key_env", f"{env_var(key_env)} must hold the relayer's private key")
    routes = parse_routes(root, networks, payment, base_dir=base_dir)
    raw_jobs = root.get("jobs", dict, None)
    jobs = None if raw_jobs is None else parse_jobs(Table(raw_jobs, "jobs"), routes)
    idempotency = parse_idempotency(
        root.table("idempotency"), env, base_dir, upstream.read_timeout + payment.settle_timeout
    )
    discovery = parse_discovery(root.table("discovery"), server)
    paywall = parse_paywall(root.table("paywall"))
    sessions = parse_sessions(root.table("sessions"), env, relayer_key=payment.relayer_key)
    _check_sessions(routes, networks, sessions)
    ledger = parse_ledger(root.table("ledger"), env, base_dir)
    raw_admin = root.get("admin", dict, None)
    admin = None
    if raw_admin is not None:
        public = (server.listen_host, server.listen_port)
        admin = parse_admin(Table(raw_admin, "admin"), env, base_dir, public=public)
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
        sessions=sessions,
        ledger=ledger,
        admin=admin,
    )


def _check_sessions(
    routes: tuple[RouteConfig, ...], networks: Mapping[str, NetworkConfig], sessions: SessionsConfig
) -> None:
    """A route offering sessions needs the receiver authorizer's key and networks the gateway settles itself
    (deposits and claims are the relayer's transactions; no facilitator takes part)."""
    for i, r in enumerate(routes):
        if "batch-settlement" not in r.schemes:
            continue
        if sessions.authorizer_key is None:
            raise ConfigError(
                "sessions.authorizer_key_env",
                f"routes[{i}] offers batch-settlement: set the receiver authorizer's key in the environment",
            )
        for name in r.networks:
            if networks[name].verifier != "local":
                raise ConfigError(
                    f"routes[{i}].schemes", f"batch-settlement needs local verification on network {name!r}"
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
