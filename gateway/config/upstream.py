"""``[upstream]``: the API behind the gateway, and the headers the gateway adds on every request to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.table import Table
from gateway.config.values import expand_env, http_url, local_path
from gateway.secrets import Secret

__all__ = ["UpstreamConfig", "parse_upstream"]


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "http://127.0.0.1:9000"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 256
    headers: tuple[tuple[str, Secret], ...] = ()  # values are API keys for the upstream: never shown
    health_path: str | None = None  # readiness: GET this path (< 500 is up); None: a TCP connect to the origin


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
        headers=tuple(headers),
        health_path=local_path(t, "health_path", _DEFAULT.health_path) or None,
    )
    t.done()
    return cfg
