"""``[admin]``: the operator's API on a listener of its own (docs/operating.md, "Admin API").

Off unless the section is present. It never shares the public listener: a path on the public port would be one
misconfigured proxy away from the internet. Every token comes from the environment (never the file) and is held in a
:class:`Secret`; a token is named by its variable, which is what the audit log records. A ``read`` token may call
every ``GET``; a ``write`` token may also act (deny-list, refunds, prices, reload).

Refunds are paid from their own key (``refund_key_env``): a wallet holding the USDC float for refunds, so a leaked
write token can at most spend that float, and only to payers of recorded payments. It signs an EIP-3009
authorization that the relayer sends (it needs no ETH where the gateway settles itself; on a facilitator network it
sends the transaction itself and needs gas money).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.config.table import Table
from gateway.errors import ConfigError
from gateway.secrets import NOT_AN_ENV_NAME, Secret, env_var, is_env_name

__all__ = ["REFUND_KEY_ENV", "AdminConfig", "AdminToken", "parse_admin"]

REFUND_KEY_ENV = "X402_REFUND_KEY"  # default name of the variable holding the refund wallet's private key
Access = Literal["read", "write"]
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
MIN_TOKEN_CHARS = 16  # a shorter bearer token is guessable over a network


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str  # the environment variable it came from: what the audit log shows
    value: Secret
    access: Access


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9402
    # Names a browser may reach the listener under besides an IP address, localhost and listen's host (a name the
    # operator's reverse proxy or tunnel uses); any other name in a browser's request is refused (DNS rebinding).
    browser_hosts: tuple[str, ...] = ()
    tokens: tuple[AdminToken, ...] = ()
    audit_log: Path = Path("admin-audit.jsonl")  # JSON Lines, appended; relative to the config file's folder
    refund_key: Secret | None = None  # None: POST /admin/refund answers 501
    refund_validity: int = 3600  # seconds a refund's signed authorization stays valid on chain
    max_page: int = 1000  # the most entries one GET /admin/payments answers

    def __repr__(self) -> str:
        names = ", ".join(f"{t.name}:{t.access}" for t in self.tokens)
        refund = "set" if self.refund_key is not None else "unset"
        return f"AdminConfig(listen={self.listen_host}:{self.listen_port}, tokens=[{names}], refund_key=<{refund}>)"


_DEFAULT = AdminConfig()


def parse_admin(t: Table, env: Mapping[str, str], base_dir: Path, *, public: tuple[str, int]) -> AdminConfig:
    """``public``: the public listener's (host, port), which the admin listener must not be."""
    listen = t.get("listen", str, f"{_DEFAULT.listen_host}:{_DEFAULT.listen_port}")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ConfigError(t.key("listen"), "must be HOST:PORT")
    host = host.strip("[]")
    wildcard = ("0.0.0.0", "::")  # noqa: S104 - compared with, never bound here
    if int(port) == public[1] and (host == public[0] or host in wildcard or public[0] in wildcard):
        raise ConfigError(t.key("listen"), "must differ from server.listen: the admin API has a listener of its own")
    tokens = _tokens(t, env)
    audit = t.get("audit_log", str, str(_DEFAULT.audit_log))
    if not audit:
        raise ConfigError(t.key("audit_log"), "is required: every admin call is recorded")
    key_env: str = t.get("refund_key_env", str, REFUND_KEY_ENV)
    raw_key = env.get(key_env, "").strip()
    refund_key = None
    if raw_key:
        if not _PRIVATE_KEY.fullmatch(raw_key):
            raise ConfigError(t.key("refund_key_env"), f"{env_var(key_env)} is not a 32-byte hex key")
        refund_key = Secret(raw_key, f"${key_env}")
    hosts = t.get("browser_hosts", list, list(_DEFAULT.browser_hosts))
    if not all(isinstance(h, str) and h.strip() and ":" not in h and "/" not in h for h in hosts):
        raise ConfigError(t.key("browser_hosts"), 'must be a list of host names without port, e.g. ["admin.example"]')
    cfg = AdminConfig(
        listen_host=host,
        listen_port=int(port),
        browser_hosts=tuple(h.strip().lower().removesuffix(".") for h in hosts),
        tokens=tokens,
        audit_log=(base_dir / audit).resolve(),
        refund_key=refund_key,
        refund_validity=t.integer("refund_validity", _DEFAULT.refund_validity, minimum=60),
        max_page=t.integer("max_page", _DEFAULT.max_page, minimum=1),
    )
    t.done()
    return cfg


def _tokens(t: Table, env: Mapping[str, str]) -> tuple[AdminToken, ...]:
    raw = t.require("tokens", list)
    if not raw:
        raise ConfigError(t.key("tokens"), 'needs at least one { env = "NAME", access = "read" | "write" }')
    tokens: list[AdminToken] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        entry = Table(item, f"{t.key('tokens')}[{i}]")
        name: str = entry.require("env", str)
        if not is_env_name(name):  # never quoted: it may be the token itself, pasted where its name belongs
            raise ConfigError(entry.key("env"), NOT_AN_ENV_NAME)
        access: Access = entry.choice("access", ("read", "write"), "read")
        entry.done()
        # Trimmed as a presented token is (a value read from a file often ends in a newline and would never match).
        value = env.get(name, "").strip()
        if not value:
            # A token the operator listed but did not set would be a door they believe is open (or closed).
            raise ConfigError(entry.key("env"), f"{env_var(name)} is not set")
        if len(value) < MIN_TOKEN_CHARS:
            raise ConfigError(
                entry.key("env"), f"the token in {env_var(name)} is shorter than {MIN_TOKEN_CHARS} characters"
            )
        if value in seen:
            raise ConfigError(entry.key("env"), f"the token in {env_var(name)} is the same as another token's")
        seen.add(value)
        tokens.append(AdminToken(name=name, value=Secret(value, f"${name}"), access=access))
    return tuple(tokens)
