"""Ledger exports: CSV (RFC 4180) and JSON Lines, and the CSV reader that reads an export back (pure functions).

Both formats carry every field of :class:`LedgerEntry` under its own name, plus ``time`` (``at`` as an ISO 8601
UTC timestamp, for people; readers use ``at``, which round-trips exactly). Amounts are integers in atomic units
(1 USDC = 1000000), refunds negative. An absent value (``block``, ``job_id``, ``refund_of``) is empty in CSV and
``null`` in JSON.

CSV is opened by spreadsheets, which run a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula, and
some of these texts come from clients (the request id, the resource's path). Every text cell that starts with
one of those (or with a tab, a carriage return or a quote) gets a leading ``'``, which spreadsheets show as text;
:func:`read_csv` takes it off again, so the export still round-trips. Numbers are written as numbers.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from gateway.storage.ledger.contract import KINDS, LedgerEntry

__all__ = [
    "COLUMNS",
    "csv_header",
    "csv_row",
    "entry_from_record",
    "entry_record",
    "jsonl_line",
    "read_csv",
    "to_csv",
    "to_jsonl",
]

COLUMNS = (
    "at",
    "time",
    "key",
    "kind",
    "route",
    "method",
    "resource",
    "amount",
    "network",
    "asset",
    "payer",
    "pay_to",
    "tx_hash",
    "block",
    "request_id",
    "job_id",
    "upstream_status",
    "refund_of",
)
_NUMBERS = frozenset({"at", "amount", "block", "upstream_status"})
_FORMULA = ("=", "+", "-", "@", "\t", "\r", "'")


def iso_time(at: float) -> str:
    """``at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    whole = int(at // 1)
    micros = round((at - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def entry_record(entry: LedgerEntry) -> dict[str, Any]:
    """The entry as a JSON-ready mapping (the JSON Lines object, in :data:`COLUMNS` order)."""
    return {
        "at": entry.at,
        "time": iso_time(entry.at),
        "key": entry.key,
        "kind": entry.kind,
        "route": entry.route,
        "method": entry.method,
        "resource": entry.resource,
        "amount": entry.amount,
        "network": entry.network,
        "asset": entry.asset,
        "payer": entry.payer,
        "pay_to": entry.pay_to,
        "tx_hash": entry.tx_hash,
        "block": entry.block,
        "request_id": entry.request_id,
        "job_id": entry.job_id,
        "upstream_status": entry.upstream_status,
        "refund_of": entry.refund_of,
    }


def entry_from_record(record: Mapping[str, Any]) -> LedgerEntry:
    """The inverse of :func:`entry_record` (``time`` is ignored); ``ValueError`` for a malformed record."""
    kind = next((k for k in KINDS if k == record.get("kind")), None)
    if kind is None:
        raise ValueError(f"ledger export: unknown kind {record.get('kind')!r}")
    try:
        block = record.get("block")
        return LedgerEntry(
            key=str(record["key"]),
            at=float(record["at"]),
            route=str(record["route"]),
            method=str(record["method"]),
            resource=str(record["resource"]),
            amount=_integer(record["amount"]),
            network=str(record["network"]),
            asset=str(record["asset"]),
            payer=str(record["payer"]),
            pay_to=str(record["pay_to"]),
            kind=kind,
            tx_hash=str(record["tx_hash"]),
            block=None if block is None else _integer(block),
            request_id=str(record["request_id"]),
            job_id=_text_or_none(record.get("job_id")),
            upstream_status=_integer(record["upstream_status"]),
            refund_of=_text_or_none(record.get("refund_of")),
        )
    except KeyError as exc:
        raise ValueError(f"ledger export: missing field {exc.args[0]!r}") from None


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"ledger export: expected an integer, got {value!r}")
    return int(value)


def _text_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# -- JSON Lines ---------------------------------------------------------------------------------------------------


def jsonl_line(entry: LedgerEntry) -> str:
    """One JSON object and a newline."""
    return json.dumps(entry_record(entry), separators=(",", ":")) + "\n"


def to_jsonl(entries: Iterable[LedgerEntry]) -> Iterator[str]:
    for entry in entries:
        yield jsonl_line(entry)


# -- CSV ----------------------------------------------------------------------------------------------------------


def _cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name in _NUMBERS:
        return repr(value) if isinstance(value, float) else str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA) else text


def _line(cells: Iterable[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(list(cells))
    return out.getvalue()


def csv_header() -> str:
    return _line(COLUMNS)


def csv_row(entry: LedgerEntry) -> str:
    """One CSV record (``\\r\\n``-terminated), in :data:`COLUMNS` order."""
    record = entry_record(entry)
    return _line(_cell(name, record[name]) for name in COLUMNS)


def to_csv(entries: Iterable[LedgerEntry]) -> Iterator[str]:
    """The header, then one record per entry: stream it as it comes (nothing is held)."""
    yield csv_header()
    for entry in entries:
        yield csv_row(entry)


def read_csv(lines: Iterable[str]) -> Iterator[LedgerEntry]:
    """Entries back from an export made by :func:`to_csv` (its header first); ``ValueError`` for anything else."""
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
        raise ValueError("ledger export: not a ledger CSV (unexpected header)")
    for row in reader:
        record: dict[str, Any] = {}
        for name in COLUMNS:
            value = row[name]
            if name in _NUMBERS:
                record[name] = None if value == "" else value
            else:
                record[name] = value[1:] if value.startswith("'") else value
        yield entry_from_record(record)
