"""Secrets that must never reach a ``repr``, a log line or an error message, URLs made fit to show, and other
parties' text made fit for a terminal.

Core vocabulary: the gateway's configuration, its stores and the client SDK all use it, so it imports nothing
but the standard library. (Absolute imports keep ``import secrets`` elsewhere meaning the standard library's.)
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["NOT_AN_ENV_NAME", "Secret", "env_var", "is_env_name", "json_for_terminal", "redact_url", "terminal_text"]

# Control characters another party's text may carry (ESC starts terminal commands, CR overwrites a line, U+009B is a
# one-character ESC [): shown as escapes, never obeyed by the terminal. Newline and tab stay.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}
# In JSON the C0 controls are escaped already (json.dumps); DEL and the C1 controls are not, with ensure_ascii=False.
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0))}


def terminal_text(value: object) -> str:
    """``value`` as text for a terminal (a server's answer, message or id, a client's path in an operator's table),
    its control characters escaped: it can never command the terminal."""
    return str(value).translate(_CONTROLS)


def json_for_terminal(text: str) -> str:
    """JSON text (from ``json.dumps(..., ensure_ascii=False)``) with DEL and the C1 controls escaped as well: still
    JSON that reads back to the same document."""
    return text.translate(_JSON_CONTROLS)


class Secret:
    """A string that never shows itself in ``repr``/``str``; call :meth:`reveal` where it is really used.

    ``label`` is what ``repr`` shows instead, e.g. a :func:`redact_url` of the URL or ``"$X402_RELAYER_KEY"``.
    """

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


# Store URLs (Redis, a SQLite file, in-memory counters) carry a secret only as a password; the rest (host, database
# number, socket path) tells an operator which store is meant, so only the password is masked.
_PASSWORD_ONLY_SCHEMES = frozenset(
    {
        "redis",
        "rediss",
        "unix",
        "sqlite",
        "memory",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    }
)
# scheme://user:PASSWORD@host (greedy to the last "@": a raw "/" or "@" in a password must not leak it)
# and ?password=... / &password=... (redis-py reads the password from the query string too)
_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*:).*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_|ssl_)?password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` as logs and reprs may show it.

    * Store URLs (``redis``, ``rediss``, ``unix``, ``sqlite``, ``memory``, ``redis+sentinel``, ``redis+cluster``
      and their ``rediss+`` forms): the whole URL with its password (and ``sentinel_password``)
      masked: ``redis://user:***@host:6379/0``, ``unix:///run/redis.sock?db=1&password=***``.
    * Any other URL (RPC and facilitator endpoints): the origin only, ``https://user:pw@host:8545/v2/KEY?x=1`` ->
      ``https://host:8545/…``, because providers put API keys in the userinfo, the path and the query.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in _PASSWORD_ONLY_SCHEMES:
        # String surgery rather than urlsplit/urlunsplit, which would rewrite ``unix:///path`` as ``unix:/path``.
        url = _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)
        return _QUERY_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


# ------------------------------------------------------------------------------ environment variables' names

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# What an error says when the text where a variable's name belongs is no name: it is likely the secret itself.
NOT_AN_ENV_NAME = "is not an environment variable name (a secret pasted here?)"


def is_env_name(name: str) -> bool:
    """``name`` could name an environment variable: ``[A-Za-z_][A-Za-z0-9_]{0,63}``."""
    return _ENV_NAME.fullmatch(name) is not None


def _reads_as_a_name(name: str) -> bool:
    # A token such as "Adm1nT0kenPastedHere123456" or 64 hex digits is a valid name too; names people choose are in
    # one case, made of words (X402_RELAYER_KEY, CDP_API_KEY_ID), and mix letters with digits only in short parts.
    if not is_env_name(name) or name not in (name.upper(), name.lower()):
        return False
    for part in name.split("_"):
        mixed = any(c.isdigit() for c in part) and any(c.isalpha() for c in part)
        if len(part) > 24 or (mixed and len(part) > 8):
            return False
    return True


def env_var(name: str) -> str:
    """How an error message names the environment variable ``name``: ``environment variable NAME`` when ``name``
    reads as a variable's name, else a fixed phrase, for the text where a name belongs may be a secret pasted there
    (``relayer_key_env = "0x<key>"``, ``tokens = [{ env = "<token>" }]``)."""
    if _reads_as_a_name(name):
        return f"environment variable {name}"
    return "the environment variable named here (name not shown: a secret pasted where its name belongs?)"
