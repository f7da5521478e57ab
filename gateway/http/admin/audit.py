"""The admin audit log: one JSON line per admin call, appended to ``[admin].audit_log``.

Every call is recorded, refused ones too (no token, a wrong token, a read-only token on a write): when it happened,
who (the token's name, i.e. its environment variable; ``null`` without a valid token, never the token), from where,
the method, the path and query, the answer's status and reason, and for actions the arguments they were given. Each
line passes the log redactor (gateway/ops/logs.py), which knows the admin tokens: no token reaches the file, even
one pasted into an argument.

Lines are written by one worker thread in the order the calls ended, each flushed and fsynced before the call's
answer is sent: an action the operator was told about is on disk. The event loop (which the public listener shares)
never waits on the file; the call does.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote_plus, unquote_plus

from gateway.ops.logs import MASK, REDACTOR

__all__ = ["AuditLog"]


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return REDACTOR.redact(value)
    if depth > 8:
        return value
    if isinstance(value, dict):
        return {_scrub(k, depth + 1): _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def _scrub_query(query: str) -> str:
    """``query`` (percent-encoded, as received) with every name or value whose decoded form holds a secret the log
    redactor knows replaced by its redacted form."""
    pairs = []
    for pair in query.split("&"):
        pieces = []
        for piece in pair.split("="):
            decoded = unquote_plus(piece)
            redacted = REDACTOR.redact(decoded)
            pieces.append(piece if redacted == decoded else quote_plus(redacted, safe="*"))
        pairs.append("=".join(pieces))
    scrubbed = "&".join(pairs)
    # A secret across the separators (a raw "&" or "=" in it): mask the whole query rather than show it.
    decoded = unquote_plus(scrubbed)
    return scrubbed if REDACTOR.redact(decoded) == decoded else MASK


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x402-admin-audit")
        self._file: IO[str] | None = None  # opened on the worker thread

    def _write(self, line: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def record(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` (with ``time``, ISO 8601 UTC, first) and return once it is on disk."""
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        # Scrubbed like a log line: no token or key, even one a caller pasted into an argument.
        # Each value before it is JSON-escaped (a token holding '"' or '\\' is spelled otherwise in the line), the
        # query string decoded (it is recorded percent-encoded, as received: "+" as %2B, "/" as %2F), then the line.
        entry = {k: _scrub_query(v) if k == "query" and isinstance(v, str) else _scrub(v) for k, v in entry.items()}
        line = REDACTOR.redact(json.dumps({"time": stamp, **entry}, separators=(",", ":"), default=str)) + "\n"
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, line)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)
