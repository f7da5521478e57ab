"""``[server]``: where the gateway listens, request size limits, and the paths it answers itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config.table import Table
from gateway.config.values import http_url, local_path
from gateway.errors import ConfigError

__all__ = ["ServerConfig", "parse_server"]


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
    header_read_timeout: float = 10.0  # seconds from a connection's start (or a request's first byte) to its head's end
    health_path: str = "/healthz"  # "" disables; answered before route matching, never priced
    ready_path: str = "/readyz"
    metrics_path: str = "/metrics"
    ready_timeout: float = 2.0  # seconds each readiness check may take


_DEFAULT = ServerConfig()


def parse_server(t: Table) -> ServerConfig:
    listen = t.get("listen", str, f"{_DEFAULT.listen_host}:{_DEFAULT.listen_port}")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(t.key("listen"), "must be HOST:PORT")
    public_url = t.get("public_url", str, _DEFAULT.public_url) or None
    if public_url:
        http_url(public_url, t.key("public_url"))
        public_url = public_url.rstrip("/")
    unpriced = t.get("unpriced", str, _DEFAULT.unpriced)
    if unpriced not in ("pass", "refuse"):
        raise ConfigError(t.key("unpriced"), 'must be "pass" or "refuse"')
    cfg = ServerConfig(
        listen_host=host.strip("[]"),
        listen_port=int(port),
        public_url=public_url,
        trust_forwarded_headers=t.get("trust_forwarded_headers", bool, _DEFAULT.trust_forwarded_headers),
        unpriced=unpriced,
        max_body_bytes=t.integer("max_body_bytes", _DEFAULT.max_body_bytes, minimum=1),
        body_read_timeout=t.number("body_read_timeout", _DEFAULT.body_read_timeout, minimum=0.1),
        max_header_bytes=t.integer("max_header_bytes", _DEFAULT.max_header_bytes, minimum=1024),
        header_read_timeout=t.number("header_read_timeout", _DEFAULT.header_read_timeout, minimum=0.1),
        health_path=local_path(t, "health_path", _DEFAULT.health_path),
        ready_path=local_path(t, "ready_path", _DEFAULT.ready_path),
        metrics_path=local_path(t, "metrics_path", _DEFAULT.metrics_path),
        ready_timeout=t.number("ready_timeout", _DEFAULT.ready_timeout, minimum=0.05),
    )
    paths = [p for p in (cfg.health_path, cfg.ready_path, cfg.metrics_path) if p]
    if len(set(paths)) != len(paths):
        raise ConfigError(t.key("health_path"), "health_path, ready_path and metrics_path must differ")
    t.done()
    return cfg
