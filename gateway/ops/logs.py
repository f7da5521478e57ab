"""Structured logs: one JSON line per request (``gateway.access``), and secrets redacted from every log record.

docs/threat-model.md T19: the relayer key, upstream API keys, RPC URLs with embedded keys and store passwords must never
reach a log. The code avoids logging them in the first place (errors carry fixed sentences, the middleware never logs
a payment header); :class:`SecretRedactor` is the second line for what a library or a future change might log.
It is a ``logging.Filter`` on *handlers* — a filter on a logger would only see records logged to that very
logger, not its children — so :func:`install_redaction` attaches it to every handler of the root logger (and of
uvicorn's non-propagating loggers) and :func:`configure_logging` builds the served process's one handler with
it. It rewrites the record itself (message with its arguments merged, ``extra`` fields, the traceback text), so
every handler after it sees the redacted record too.

Writing never holds up the event loop: :class:`BufferedHandler` (what :func:`configure_logging` installs) formats a
line on the caller's thread and appends it to a bounded buffer; its own thread writes whatever gathered with one
write. A reader that falls behind (a full pipe to a container runtime, a slow disk) blocks that thread only; once
the buffer is full, further lines are dropped and counted (``x402_gateway_log_dropped_total``), never waited for.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from gateway.config import GatewayConfig
from gateway.ops.events import RequestRecord
from gateway.ops.metrics import LOG_DROPS, effective_outcome
from gateway.secrets import Secret

ACCESS_LOGGER = "gateway.access"
MASK = "***"
_MAX_PATH = 512  # a path is client input: cap what one request can put into a log line
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
# (uvicorn adds "color_message", the same text with terminal colour codes.)
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
    "_x402_redacted",
    "_x402_access_json",
}
# A 32-byte hex value right after a key-ish word ("relayer_key=0x…", "private key: …"): a private key, whatever
# its source (tx hashes and nonces are not introduced by these words).
_KEYISH_HEX = re.compile(
    r"(?i)((?:key|secret|private|priv|pk|mnemonic|seed|signer|credential)s?[\"']?\W{1,4}(?:0x)?)[0-9a-f]{64}(?![0-9a-f])"
)
_MIN_SECRET = 6  # shorter "secrets" would mask ordinary words everywhere


class SecretRedactor(logging.Filter):
    """Masks registered secret strings and key-ish 32-byte hex in every record that passes through it."""

    def __init__(self) -> None:
        super().__init__()
        self._groups: dict[int, frozenset[str]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, secrets: Iterable[str]) -> int:
        """Register secrets; returns a handle for :meth:`remove`."""
        with self._lock:
            self._next += 1
            self._groups[self._next] = frozenset(s for s in secrets if len(s) >= _MIN_SECRET)
            self._compile()
            return self._next

    def remove(self, handle: int) -> None:
        with self._lock:
            self._groups.pop(handle, None)
            self._compile()

    def _compile(self) -> None:
        every = set().union(*self._groups.values()) if self._groups else set()
        # Longest first, so a whole URL is masked before one of its parts.
        alternatives = sorted(every, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def redact(self, text: str) -> str:
        if len(text) < _MIN_SECRET:  # most values in a record (method, status words, network names)
            return text
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        if len(text) >= 64:
            text = _KEYISH_HEX.sub(_mask_key, text)
        return text

    def _scrub(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if depth > 3:
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(v, depth + 1) for v in value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.redact(str(value))  # an object's str() could hold anything

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_x402_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what can be shown
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = self.redact(message), None
        record.__dict__.pop("color_message", None)  # uvicorn's coloured copy of msg would bypass the redaction
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD:
                record.__dict__[key] = self._scrub(value)
        record.__dict__["_x402_redacted"] = True
        return True


def _mask_key(match: re.Match[str]) -> str:
    return match.group(1) + MASK


REDACTOR = SecretRedactor()  # one per process: every handler shares it, every gateway registers its secrets


def _url_secrets(url: str, *, path: bool) -> list[str]:
    """The parts of a URL that carry credentials: userinfo always; for RPC URLs also the path and query, where
    providers put the API key (``/v2/<key>``, ``?apikey=``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    out: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        out += [userinfo, unquote(userinfo)]
        out += [p for p in (parts.username, parts.password) if p]
        out += [unquote(p) for p in (parts.username, parts.password) if p]
    if path and (parts.path not in ("", "/") or parts.query):
        out.append(url)
        if parts.path not in ("", "/"):
            out.append(parts.path)
            segments = [s for s in parts.path.split("/") if s]
            if segments and len(segments[-1]) >= 8:  # where providers put the key
                out.append(segments[-1])
            out += [s for s in segments if len(s) >= 20]
        if parts.query:
            out.append(parts.query)
            out += [v for _, v in parse_qsl(parts.query) if len(v) >= 8]
    return out


_HEX_KEY = re.compile(r"(?:0[xX])?[0-9a-fA-F]{64}")
_WORD = re.compile(r"/?[A-Za-z]+(?:[-_/][A-Za-z]+)*")
_STORE_SCHEMES = ("redis", "rediss", "unix", "sqlite", "memory", "memcached", "mongodb", "etcd")


def _config_secrets(value: Any, depth: int = 0) -> Iterator[Secret]:
    """Every :class:`Secret` anywhere in the configuration (sections, networks, tokens, ...)."""
    if isinstance(value, Secret):
        yield value
    elif depth > 8 or isinstance(value, str | bytes | int | float | bool) or value is None:
        return
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _config_secrets(getattr(value, f.name), depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _config_secrets(item, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _config_secrets(item, depth + 1)


def _store_url_secrets(url: str) -> list[str]:
    """A store URL's passwords: in the user info (however raw: a ``/``, ``?``, ``#``, ``;`` or ``@`` in a password
    moves where a URL parser splits it, so the text between ``://`` and an ``@`` counts) and in the query
    (``?password=``, ``?sentinel_password=``)."""
    out: list[str] = []
    rest = url.partition("://")[2]
    if "@" in rest:
        for userinfo in {rest.partition("@")[0], rest.rpartition("@")[0]}:
            password = userinfo.partition(":")[2]
            out += [userinfo, unquote(userinfo), password, unquote(password)]
            out += re.split(r"[/?#;@:]", password)  # the pieces a parser's error may quote on their own
    query = rest.partition("?")[2].partition("#")[0]
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "pass" in name.lower() or "secret" in name.lower() or "token" in name.lower():
            out.append(value)
    for name, raw in (p.partition("=")[::2] for p in query.split("&")):
        if "pass" in name.lower():
            out.append(raw)  # as written, percent-encoding and all
    try:
        from gateway.storage.redis_topology import parse_redis_url  # storage only when asked

        topology = parse_redis_url(url)
    except Exception:  # not a Redis URL, or one it refuses: the raw text above is what there is
        return out
    out += [p for p in (topology.password, topology.sentinel_password) if p]
    return out


def _secret_spellings(raw: str, *, rpc: bool = False) -> list[str]:
    """``raw`` (a secret value of the configuration) in the spellings a log line could show."""
    out = [raw]
    if _HEX_KEY.fullmatch(raw):  # a private key: bare, in either case
        bare = raw.removeprefix("0x").removeprefix("0X")
        out += [bare, bare.lower(), bare.upper()]
        return out
    scheme, sep, _ = raw.partition("://")
    if sep and scheme.isascii() and scheme[:1].isalpha():
        if any(part in _STORE_SCHEMES for part in scheme.lower().split("+")):
            found = _url_secrets(raw, path=False) + _store_url_secrets(raw)
            # no password: the URL itself ("memory://", a SQLite path) is no secret, and stays readable in logs
            return out + found if found else []
        else:  # RPC and facilitator endpoints: providers put API keys in the path and the query
            whole = _url_secrets(raw, path=True)
            # but a plain word of a path ("/facilitator", "/platform") is no key: masking it would mask it in every
            # line (RPC URLs keep the rule of _url_secrets, see config_secrets)
            out += whole if rpc else [s for s in whole if not _WORD.fullmatch(s)]
        return out
    kind, _, token = raw.partition(" ")  # "Bearer <token>": the token alone is the secret
    if token and kind.isalpha():
        out.append(token)
    return out


def config_secrets(config: GatewayConfig) -> list[str]:
    """Every secret string the loaded configuration holds, in the spellings a log line could show: each
    :class:`Secret` of it (keys, tokens, upstream headers, RPC, facilitator and store URLs) and the upstream URL's user
    info."""
    rpc = {url.reveal() for network in config.networks.values() for url in network.rpc_urls}
    out: list[str] = []
    for secret in _config_secrets(config):
        raw = secret.reveal()
        out += _secret_spellings(raw, rpc=raw in rpc)
    out += _url_secrets(config.upstream.url, path=False)
    return sorted({s for s in out if len(s) >= _MIN_SECRET})


def _handlers() -> list[logging.Handler]:
    # uvicorn's own loggers do not propagate to the root when uvicorn configured them (its default log config).
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    return [h for name in names for h in logging.getLogger(name).handlers]


def install_redaction(config: GatewayConfig) -> Callable[[], None]:
    """Register ``config``'s secrets and put the redactor on every handler there is now; returns the undo."""
    handle = REDACTOR.add(config_secrets(config))
    for handler in _handlers():
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    return lambda: REDACTOR.remove(handle)


# ------------------------------------------------------------------------------------------------ formatting


def access_fields(record: RequestRecord) -> dict[str, Any]:
    """The access log's fields: public facts only (no header, no body, no query string)."""
    return {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path[:_MAX_PATH],
        "route": record.route,
        "status": record.status,
        "outcome": effective_outcome(record),
        "reason": record.reason,
        "client": record.client,
        "kind": record.kind,
        "payer": record.payer,
        "network": record.network,
        "tx_hash": record.tx_hash,
        "amount": record.amount,
        "resumed": record.resumed,
        "unbound": record.unbound,
        "verify_ms": round(record.verify_seconds * 1000, 2),
        "settle_ms": round(record.settle_seconds * 1000, 2),
        "upstream_ms": round(record.upstream_seconds * 1000, 2),
        "total_ms": round(record.total_seconds * 1000, 2),
    }


class AccessLog:
    """Observer: one ``gateway.access`` INFO line per request, its fields under ``extra["access"]``.

    The hot path: the fields are redacted here and encoded as JSON once (:func:`access_json`), so neither the
    generic :class:`SecretRedactor` pass nor a per-record ``json.dumps`` of a generic dict runs for them. Why that
    keeps docs/threat-model.md T19: every field of a :class:`RequestRecord` is a public fact by construction (method,
    status, outcome and reason words, route pattern, client address, payer address, network name, tx hash, amounts,
    timings); the only ones a client controls are the path and the request id (an ``X-Request-Id`` of
    ``[A-Za-z0-9_-]{1,64}``), and those two still go through :meth:`SecretRedactor.redact` here. Every other record
    keeps the full filter.

    When the line can only go to the served process's one handler (``serve``'s :class:`BufferedHandler` with
    :class:`JsonFormatter`, reached through loggers with no filter of their own, see :func:`_sole_json_handler`), the
    finished line is handed to it directly, exactly as :meth:`JsonFormatter.format` would have written it: no
    ``logging.LogRecord`` is built. Any other set-up (a test's capture, a text format, a second handler) gets the
    record through ``logging`` as before.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger(ACCESS_LOGGER)

    def request_done(self, record: RequestRecord) -> None:
        log = self.log
        if not log.isEnabledFor(logging.INFO):
            return
        redact = REDACTOR.redact
        path = redact(record.path[:_MAX_PATH])
        request_id = redact(record.request_id)
        outcome = effective_outcome(record)
        message = f"{record.method} {path} {record.status} {outcome}"
        encoded = access_json(record, request_id, path, outcome)
        handler = _sole_json_handler(log)
        if handler is not None:
            handler.emit_line(
                f'{{"time":"{_iso_time(time.time())}","level":"info","logger":{_STRING(log.name)},'
                f'"message":{_STRING(message)},{encoded[1:]}'
            )
            return
        fields = access_fields(record)
        fields["path"], fields["request_id"] = path, request_id
        entry = logging.LogRecord(log.name, logging.INFO, "", 0, message, None, None)
        # redacted above, field by field: the handlers' SecretRedactor lets it pass untouched
        entry.__dict__.update(access=fields, _x402_access_json=encoded, _x402_redacted=True)
        log.handle(entry)


def _sole_json_handler(logger: logging.Logger) -> BufferedHandler | None:
    """The one handler an INFO record of ``logger`` would reach, when that is a :class:`BufferedHandler` formatting
    JSON whose filters are at most the redactor (which passes a pre-redacted record as it is) and no logger on the
    way filters; else None (the record goes through ``logging``: :meth:`logging.Logger.handle`)."""
    if logger.disabled or logger.filters:
        return None
    found: BufferedHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if (
                found is not None
                or type(handler) is not BufferedHandler
                or handler.level > logging.INFO
                or type(handler.formatter) is not JsonFormatter
            ):
                return None
            for f in handler.filters:
                if f is not REDACTOR:
                    return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def access_json(record: RequestRecord, request_id: str, path: str, outcome: str) -> str:
    """``access_fields(record)`` with this (redacted) request id, path and outcome, as ``_ENCODE`` writes it."""
    route, reason, client, kind = record.route, record.reason, record.client, record.kind
    payer, network, tx_hash = record.payer, record.network, record.tx_hash
    status, amount = record.status, record.amount
    return (
        f'{{"request_id":{_json(request_id)},"method":{_json(record.method)},"path":{_json(path)},'
        f'"route":{"null" if route is None else _json(route)},'
        f'"status":{int.__repr__(status) if type(status) is int else _ENCODE(status)},'
        f'"outcome":{_json(outcome)},"reason":{"null" if reason is None else _json(reason)},'
        f'"client":{"null" if client is None else _json(client)},"kind":{"null" if kind is None else _json(kind)},'
        f'"payer":{"null" if payer is None else _json(payer)},'
        f'"network":{"null" if network is None else _json(network)},'
        f'"tx_hash":{"null" if tx_hash is None else _json(tx_hash)},'
        f'"amount":{int.__repr__(amount) if type(amount) is int else _ENCODE(amount)},'
        f'"resumed":{_flag(record.resumed)},"unbound":{_flag(record.unbound)},'
        f'"verify_ms":{_ms(record.verify_seconds)},"settle_ms":{_ms(record.settle_seconds)},'
        f'"upstream_ms":{_ms(record.upstream_seconds)},"total_ms":{_ms(record.total_seconds)}}}'
    )


def _json(value: Any) -> str:
    if type(value) is str:
        return _STRING(value)
    return _ENCODE(value)


def _ms(seconds: float) -> str:
    """``round(seconds * 1000, 2)`` as the JSON encoder writes it, at a third of the cost. Format ``.2f`` rounds exactly
    as ``round(x, 2)`` does (both correctly rounded by dtoa), and the shortest repr of a value with at most 15
    significant digits is those digits, trailing zeros dropped ("1.50" -> 1.5, "2.00" -> 2.0)."""
    if type(seconds) is float:
        if seconds == 0.0 and math.copysign(1.0, seconds) > 0:
            return "0.0"  # a phase the request never had
        ms = seconds * 1000
        if -1e13 < ms < 1e13:  # finite, and at most 13 + 2 digits
            text = f"{ms:.2f}".rstrip("0")
            return text + "0" if text[-1] == "." else text
    return _ENCODE(round(seconds * 1000, 2))


def _flag(value: bool) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return _ENCODE(value)


_ENCODE = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode
_STRING: Callable[[str], str] = json.encoder.encode_basestring  # one JSON string (the C encoder)
_SECOND: list[Any] = [None, ""]  # (whole second, its ISO text): one strftime per second, not per record


def _iso_time(created: float) -> str:
    second = int(created)
    if _SECOND[0] != second:
        _SECOND[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SECOND[0] = second
    return f"{_SECOND[1]}.{int((created - second) * 1000):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD:
            continue
        if key == "access" and isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get("_x402_access_json")
        if isinstance(fields, str) and not record.exc_info and not record.stack_info and len(fields) > 2:
            # An access record: its fields were encoded once, by AccessLog (same keys and order as below).
            return (
                f'{{"time":"{_iso_time(record.created)}","level":{_STRING(record.levelname.lower())},'
                f'"logger":{_STRING(record.name)},"message":{_STRING(record.getMessage())},{fields[1:]}'
            )
        out: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return _ENCODE(out)


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items() if v not in (None, "", 0, 0.0, False))
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {extras}{sep}{tail}" if extras else line


class BufferedHandler(logging.Handler):
    """Lines formatted by the caller, written by a thread of the handler's own (see the module docstring).

    At most ``capacity`` lines wait; the writer gathers for ``linger`` seconds after the first one, so a busy
    gateway writes once per ``linger`` rather than once per request (each write to a pipe or a socket is a system
    call that also wakes its reader: a large part of a cheap request's cost). :meth:`flush` writes what waits at
    once (``logging.shutdown`` calls it at exit); lines logged in the last ``linger`` before the process is killed
    outright are lost."""

    flush_timeout = 2.0

    def __init__(self, stream: IO[str], *, capacity: int = 20_000, linger: float = 0.02) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self.linger = linger
        self._lines: collections.deque[str] = collections.deque()
        self._idle = True  # the writer sleeps until told: the first line after a write wakes it, the rest need not
        self._wake = threading.Event()
        self._writing = threading.Lock()  # the writer thread and flush() take turns at the stream
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="x402-log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: appending to a deque is atomic, and the lock is what a slow stream would hold.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.emit_line(line)

    def emit_line(self, line: str) -> None:
        """Queue one finished line (what :meth:`emit` does once the record is formatted)."""
        lines = self._lines
        if len(lines) >= self.capacity:
            LOG_DROPS.add(1)
            return
        lines.append(line)
        if self._closed:  # the writer thread is gone (a line logged during shutdown): write it here
            self.flush()
        elif self._idle:
            self._idle = False
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            if self.linger > 0:
                time.sleep(self.linger)  # let a burst gather: one write for all of it
            self._wake.clear()
            self._idle = True
            self._write_waiting()

    def _write_waiting(self, timeout: float = -1) -> None:
        if not self._writing.acquire(timeout=timeout):
            return  # the writer thread is stuck on a reader that stopped reading: not the caller's problem
        try:
            lines = self._lines
            if not lines:
                return
            batch = [lines.popleft() for _ in range(len(lines))]
            try:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()
            except Exception:  # a closed or broken stream: the lines are lost, and counted
                LOG_DROPS.add(len(batch))
        finally:
            self._writing.release()

    def flush(self) -> None:
        """Write what waits now (at most ``flush_timeout`` seconds' wait for a writer stuck on a full pipe)."""
        self._write_waiting(self.flush_timeout)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        # The last write happens on a thread of its own: on a pipe whose reader stopped reading it would block for
        # ever, and closing must not (what it had not written by then is counted lost).
        last = threading.Thread(target=self.flush, name="x402-log-close", daemon=True)
        last.start()
        last.join(self.flush_timeout)
        lost = 0
        with contextlib.suppress(IndexError):
            while True:  # the flush gave up on a stuck writer: what is left will never be written
                self._lines.popleft()
                lost += 1
        if lost:
            LOG_DROPS.add(lost)
        super().close()


def configure_logging(level: str = "info", *, json: bool = True, stream: IO[str] | None = None) -> logging.Handler:
    """The served process's logging: one stderr handler (JSON lines or text) with the redactor, at ``level``, its
    writes off the event loop (:class:`BufferedHandler`)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = BufferedHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(REDACTOR)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


__all__ = [
    "ACCESS_LOGGER",
    "REDACTOR",
    "AccessLog",
    "BufferedHandler",
    "JsonFormatter",
    "SecretRedactor",
    "TextFormatter",
    "access_fields",
    "config_secrets",
    "configure_logging",
    "install_redaction",
]
