"""Checks of single values that several sections share: ``${ENV}`` references, addresses, URLs, paths, rates."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import overload
from urllib.parse import urlsplit

from limits import parse_many

from gateway.config.table import Table
from gateway.errors import ConfigError
from gateway.secrets import env_var

__all__ = ["address", "expand_env", "http_url", "local_path", "rate"]

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, key: str, env: Mapping[str, str]) -> str:
    """``${NAME}`` -> ``env["NAME"]``: keys and passwords stay out of the config file. A missing variable is an
    error, never an empty string (an empty API key would fail later and less clearly)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(key, f"{env_var(name)} is not set")
        return env[name]

    return _ENV_REF.sub(sub, value)


def address(value: str, key: str) -> str:
    if not _ADDRESS.match(value):
        raise ConfigError(key, "must be a 0x-prefixed 20-byte hex address")
    return value


def http_url(value: str, key: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, "must be an absolute http(s) URL")
    return value


@overload
def local_path(t: Table, name: str, default: str) -> str: ...
@overload
def local_path(t: Table, name: str, default: None) -> str | None: ...
def local_path(t: Table, name: str, default: str | None) -> str | None:
    """A path the gateway answers itself ("" turns it off)."""
    value: str | None = t.get(name, str, default)
    if value and (not value.startswith("/") or "?" in value or "#" in value):
        raise ConfigError(t.key(name), 'must be an absolute path such as "/healthz", or "" to turn it off')
    return value


@overload
def rate(t: Table, name: str, default: str) -> str: ...
@overload
def rate(t: Table, name: str, default: None) -> str | None: ...
def rate(t: Table, name: str, default: str | None) -> str | None:
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
