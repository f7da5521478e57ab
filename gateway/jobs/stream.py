"""The parser of the runner's answers from a synchronous agent endpoint (sans-IO): NDJSON lines, server-sent
events, or one body, turned into progress, a result or a failure.

The contract itself (what the gateway sends, what the upstream may answer, limits, timeouts, cancel) is documented
for upstream authors in docs/jobs.md, "The runner's upstream contract"; :mod:`gateway.jobs.runner` makes the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from gateway.x402.codec import loads

__all__ = [
    "MAX_LINE_BYTES",
    "Failure",
    "LineSplitter",
    "Progress",
    "Result",
    "SSEParser",
    "body_answer",
    "framing",
    "http_failure",
    "interpret",
]

MAX_LINE_BYTES = 1024 * 1024
MAX_MESSAGE_CHARS = 1000
Framing = Literal["ndjson", "sse", "body"]


@dataclass(frozen=True, slots=True)
class Progress:
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    response: str
    rich_data: list[Any] | None = None
    transactions: list[Any] | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    error: str


Event = Progress | Result | Failure


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def interpret(obj: Any) -> Event | None:
    """One NDJSON line / SSE data object -> what it means for the job (None: ignore it)."""
    if not isinstance(obj, dict):
        return None
    if "response" in obj:
        response = obj["response"]
        text = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        rich = obj.get("richData")
        txs = obj.get("transactions")
        meta = obj.get("metadata")
        return Result(
            response=text,
            rich_data=rich if isinstance(rich, list) else None,
            transactions=txs if isinstance(txs, list) else None,
            metadata=meta if isinstance(meta, dict) else None,
        )
    if "error" in obj:
        error = obj["error"]
        return Failure(_short(error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)))
    status = obj.get("status")
    if isinstance(status, str) and status:
        return Progress(_short(status))
    return None


def _loads(raw: bytes | str) -> Any:
    try:
        return loads(raw)
    except ValueError:
        return None


def framing(content_type: str | None) -> Framing:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ("application/x-ndjson", "application/jsonl", "application/jsonlines", "application/ndjson"):
        return "ndjson"
    if media == "text/event-stream":
        return "sse"
    return "body"


class LineSplitter:
    """Bytes in any chunking -> complete lines (``\\n``, ``\\r\\n`` or ``\\r`` ended), without the ending."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = b""
        self._max = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        lines: list[bytes] = []
        while True:
            cut = min((i for i in (self._buf.find(b"\n"), self._buf.find(b"\r")) if i >= 0), default=-1)
            if cut < 0 or (self._buf[cut : cut + 1] == b"\r" and cut == len(self._buf) - 1):
                break  # a lone trailing \r may be the first half of \r\n
            end = cut + 2 if self._buf[cut : cut + 2] == b"\r\n" else cut + 1
            lines.append(self._buf[:cut])
            self._buf = self._buf[end:]
        if len(self._buf) > self._max:
            raise ValueError("a line of the upstream's stream exceeds the limit")
        return lines

    def flush(self) -> list[bytes]:
        rest, self._buf = self._buf.rstrip(b"\r"), b""
        return [rest] if rest else []


def ndjson_events(lines: list[bytes]) -> list[Event]:
    return [e for e in (interpret(_loads(line)) for line in lines if line.strip()) if e is not None]


class SSEParser:
    """Bytes -> the events' data payloads (``data:`` lines joined by ``\\n``), per the HTML SSE rules."""

    def __init__(self) -> None:
        self._lines = LineSplitter()
        self._data: list[str] = []

    def _line(self, raw: bytes, out: list[str]) -> None:
        line = raw.decode("utf-8", "replace")
        if not line:
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def feed(self, chunk: bytes) -> list[str]:
        out: list[str] = []
        for raw in self._lines.feed(chunk):
            self._line(raw, out)
        return out

    def flush(self) -> list[str]:
        out: list[str] = []
        for raw in self._lines.flush():
            self._line(raw, out)
        self._line(b"", out)  # a stream may end without the final blank line
        return out


def sse_events(payloads: list[str]) -> list[Event]:
    return [e for e in (interpret(_loads(p)) for p in payloads) if e is not None]


def body_answer(body: bytes) -> Result | Failure:
    """A non-streaming answer (the whole body) -> the job's result or failure."""
    doc = _loads(body)
    if isinstance(doc, dict):
        event = interpret(doc)
        if isinstance(event, Result | Failure):
            return event
        return Result(response=json.dumps(doc, ensure_ascii=False))
    if isinstance(doc, str):
        return Result(response=doc)
    return Result(response=body.decode("utf-8", "replace"))


def http_failure(status: int, body: bytes) -> Failure:
    doc = _loads(body[:65536])
    detail = ""
    if isinstance(doc, dict):
        for key in ("message", "error"):
            if isinstance(doc.get(key), str) and doc[key]:
                detail = doc[key]
                break
    return Failure(_short(f"upstream answered {status}" + (f": {detail}" if detail else "")))
