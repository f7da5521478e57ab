"""Keeping the RPC URLs the SDK is given out of the logs of the libraries it reaches them with.

web3 logs its provider's URL (``Making request HTTP. URI: …`` at DEBUG, ``Successfully disconnected from: …`` at
INFO), and httpx every request's URL at INFO; an RPC URL's user-info, path or query is often its API key, and an SDK
user who logs at INFO would see it. :func:`hide_urls` registers URLs with one :class:`logging.Filter` on those
libraries' loggers, which rewrites any record holding a registered URL, or its user-info, path or query, before any
handler sees it: the message, the traceback, the stack. A logger's filter sees only the records made on that very
logger, so the filter goes on every ``web3`` logger that exists when a URL is registered (web3 makes its loggers
when its modules are imported, before a provider can be built) and on ``httpx``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from gateway.secrets import redact_url

__all__ = ["hide_urls"]

_LIBRARIES = ("web3", "httpx")
# The loggers web3's HTTP providers write the URL to; made here too if a web3 version renamed its modules.
_KNOWN = (
    "web3.providers.AsyncHTTPProvider",
    "web3.providers.HTTPProvider",
    "web3._utils.http_session_manager.HTTPSessionManager",
    "web3.manager.RequestManager",
)
_SHORTEST = 4  # a shorter path or query ("/", "/v2") is no key, and masking it would garble unrelated text


class _UrlRedactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__("x402-client-url-redactor")
        self._lock = threading.Lock()
        self._urls: set[str] = set()
        self._replacements: tuple[tuple[str, str], ...] = ()  # longest first: a URL before its own path

    def add(self, urls: Iterable[str]) -> None:
        with self._lock:
            new = {u for u in urls if u and u not in self._urls}
            if not new:
                return
            self._urls |= new
            pairs: dict[str, str] = {}
            for url in self._urls:
                pairs[url] = redact_url(url)
                for fragment in _secret_parts(url):
                    pairs.setdefault(fragment, "…")
            self._replacements = tuple(sorted(pairs.items(), key=lambda kv: len(kv[0]), reverse=True))

    def redact(self, text: str) -> str:
        for secret, shown in self._replacements:
            if secret in text:
                text = text.replace(secret, shown)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._replacements:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: shown as its bare format string, without the arguments
            message = str(record.msg)
            record.args = None
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text = self.redact(record.exc_text)
            if text != record.exc_text:
                # The text only: a handler that formats the exception itself would print the URL again.
                record.exc_text, record.exc_info = text, None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _secret_parts(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    tail = parts.path + ("?" + parts.query if parts.query else "")
    for fragment in (userinfo, parts.password or "", tail, parts.path, parts.query, parts.fragment):
        for form in {fragment, unquote(fragment)}:
            if len(form) >= _SHORTEST:
                found.append(form)
    return found


_REDACTOR = _UrlRedactor()


def hide_urls(urls: Iterable[str]) -> None:
    """Keep ``urls`` (and their user-info, path and query) out of every web3 and httpx log record from now on."""
    _REDACTOR.add(urls)
    names = set(_KNOWN) | set(_LIBRARIES)
    names |= {n for n in list(logging.root.manager.loggerDict) if n.split(".", 1)[0] in _LIBRARIES}
    for name in names:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)
