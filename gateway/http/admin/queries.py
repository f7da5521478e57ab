"""The admin API's reads: payments, revenue, exports, pending settlements, jobs, the deny-list, the live config.

Amounts are integers of atomic units (refunds negative), each with its dollar reading beside it (``usd``), for
people. Pages of payments are newest first; ``next`` holds the ``before`` / ``before_key`` of the next page.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import BadRequest
from gateway.http.admin.calls import Answer, Call, tx_hash
from gateway.http.admin.dashboard import HEADERS, gather_dashboard, render_dashboard
from gateway.http.admin.masked import masked_config
from gateway.http.admin.stores import AdminStores
from gateway.http.app import Gateway
from gateway.money import format_usd
from gateway.storage.ledger import LedgerEntry, LedgerQuery
from gateway.storage.ledger.export import csv_header, csv_row, entry_record, jsonl_line
from gateway.storage.redis_client import RedisStore

__all__ = ["Queries", "entry_doc"]

_FILTERS = ("payer", "route", "tx", "since", "until")
_CHUNK = 64 * 1024  # export bytes gathered per body message


def entry_doc(entry: LedgerEntry) -> dict[str, Any]:
    return {**entry_record(entry), "usd": format_usd(entry.amount)}


class Queries:
    def __init__(self, config: GatewayConfig, stores: AdminStores, gateway: Gateway) -> None:
        self._config = config
        self._stores = stores
        self._gateway = gateway
        self._max_page = config.admin.max_page if config.admin else 1000

    def _query(self, call: Call, *, limit: int = 0) -> LedgerQuery:
        since, until = call.time("since"), call.time("until")
        if since is not None and until is not None and until <= since:
            raise BadRequest("until must be after since")
        return LedgerQuery(
            payer=call.payer(),
            route=call.text("route"),
            tx_hash=tx_hash(call.text("tx")),
            since=since,
            until=until,
            before=call.time("before"),
            before_key=call.text("before_key"),
            limit=limit,
        )

    async def payments(self, call: Call) -> Answer:
        """``GET /admin/payments?payer=&route=&tx=&since=&until=&before=&before_key=&limit=``"""
        call.only((*_FILTERS, "before", "before_key", "limit"))
        limit = call.integer("limit", 100, minimum=1, maximum=self._max_page)
        found = await self._stores.ledger.find(self._query(call, limit=limit))
        page = None
        if len(found) == limit:
            page = {"before": found[-1].at, "before_key": found[-1].key}
        return Answer(200, {"payments": [entry_doc(e) for e in found], "next": page})

    async def revenue(self, call: Call) -> Answer:
        """``GET /admin/revenue?by=route|network|day&since=&until=``: net of refunds."""
        call.only(("by", "since", "until"))
        by = call.text("by") or "route"
        if by not in ("route", "network", "day"):
            raise BadRequest('by must be "route", "network" or "day"')
        since, until = call.time("since"), call.time("until")
        rows = await self._stores.ledger.revenue(by, since=since, until=until)  # type: ignore[arg-type]
        total = sum(r.amount for r in rows)
        return Answer(
            200,
            {
                "by": by,
                "since": since,
                "until": until,
                "groups": [
                    {"group": r.group, "amount": r.amount, "usd": format_usd(r.amount), "payments": r.payments}
                    for r in rows
                ],
                "total": {"amount": total, "usd": format_usd(total), "payments": sum(r.payments for r in rows)},
            },
        )

    async def export_csv(self, call: Call) -> Answer:
        """``GET /admin/payments.csv?payer=&route=&tx=&since=&until=``: every match, oldest first."""
        return await self._export(call, "text/csv; charset=utf-8", "payments.csv", csv_header(), csv_row)

    async def export_jsonl(self, call: Call) -> Answer:
        """``GET /admin/payments.jsonl?...``: one JSON object per line, oldest first."""
        return await self._export(call, "application/jsonl; charset=utf-8", "payments.jsonl", "", jsonl_line)

    async def _export(
        self, call: Call, content_type: str, filename: str, head: str, line: Callable[[LedgerEntry], str]
    ) -> Answer:
        call.only(_FILTERS)
        entries = aiter(self._stores.ledger.export(self._query(call)))
        # The first read is made before the answer's status: a ledger that cannot answer is a 503 with its reason
        # (and so in the audit log), not a 200 whose body breaks off. A failure later on can only cut the body short.
        first: list[LedgerEntry] = []
        with contextlib.suppress(StopAsyncIteration):
            first.append(await anext(entries))

        async def chunks() -> AsyncIterator[bytes]:
            pending = [text for text in (head, *map(line, first)) if text]
            size = sum(map(len, pending))
            async for entry in entries:
                text = line(entry)
                pending.append(text)
                size += len(text)
                if size >= _CHUNK:
                    yield "".join(pending).encode()
                    pending, size = [], 0
            if pending:
                yield "".join(pending).encode()

        return Answer(200, stream=chunks(), content_type=content_type, filename=filename)

    async def pending(self, call: Call) -> Answer:
        """``GET /admin/pending?limit=``: journal entries not final yet (our settlements; payers' transfers behind
        tx-hash proofs and session deposits, watched only), and session charges not claimed yet."""
        call.only(("limit",))
        limit = call.integer("limit", 100, minimum=1, maximum=self._max_page)
        now = time.time()
        settlements: list[dict[str, Any]] = []
        for name in self._config.networks:  # a facilitator's network too: transfers behind tx-hash proofs are watched
            for e in await self._stores.journal.pending(name, limit=limit):
                if e.block_number is not None:
                    status = "mined"  # watched until final (docs/threat-model.md T28)
                elif e.valid_before < now:
                    # not seen mined: its authorization can no longer be executed (a watched transfer or deposit:
                    # past the hour it is waited for)
                    status = "expired"
                else:
                    status = "unconfirmed"  # sent (or sent again after a reorganisation), not seen mined yet
                settlements.append(
                    {
                        "key": e.key,
                        "kind": e.kind,
                        "network": e.network,
                        "tx_hash": e.tx_hash,
                        "block": e.block_number,
                        "status": status,
                        "valid_before": e.valid_before,
                        "created_at": e.created_at,
                        "updated_at": e.updated_at,
                    }
                )
        channels: list[dict[str, Any]] = []
        if any("batch-settlement" in r.schemes for r in self._config.routes):
            for name, net in self._config.networks.items():
                for ch in await self._stores.channels.unclaimed(net.chain_id, now=now, limit=limit):
                    channels.append(
                        {
                            "channel_id": ch.channel_id,
                            "network": name,
                            "payer": ch.payer.lower(),
                            "unclaimed": ch.unclaimed,
                            "usd": format_usd(ch.unclaimed),
                            "charged": ch.charged,
                            "total_claimed": ch.total_claimed,
                            "balance": ch.balance,
                            "withdraw_requested_at": ch.withdraw_requested_at,
                            "updated_at": ch.updated_at,
                        }
                    )
        owed = sum(c["unclaimed"] for c in channels)
        return Answer(
            200,
            {"settlements": settlements, "channels": channels, "unclaimed": {"amount": owed, "usd": format_usd(owed)}},
        )

    async def jobs(self, call: Call) -> Answer:
        """``GET /admin/jobs?payer=&limit=``: a payer's jobs, newest first."""
        call.only(("payer", "limit"))
        payer = call.payer(required=True)
        assert payer is not None
        limit = call.integer("limit", 50, minimum=1, maximum=self._max_page)
        found, total = await self._stores.jobs.list_for_payer(payer, statuses=None, limit=limit)
        keep = ("job_id", "status", "created_at", "started_at", "completed_at", "cancelled_at", "tx_hash", "network")
        docs = []
        for job in found:
            full = job.to_doc()  # not the prompt, the result or the token's hash: the operator's view of the billing
            docs.append({**{k: full[k] for k in keep}, "error": job.error})
        return Answer(200, {"payer": payer, "jobs": docs, "total": total})

    async def denied(self, call: Call) -> Answer:
        """``GET /admin/deny``: the deny-list, most recent first."""
        call.only(("limit",))
        limit = call.integer("limit", 1000, minimum=1, maximum=100_000)
        entries = await self._stores.denylist.entries(limit=limit)
        return Answer(200, {"denied": [{"payer": e.payer, "at": e.at, "note": e.note, "by": e.by} for e in entries]})

    async def routes(self, call: Call) -> Answer:
        """``GET /admin/routes``: every configured route as served now (price and pause in force, and why)."""
        call.only(())
        return Answer(200, {"routes": [state.as_dict() for state in self._gateway.reloader.states()]})

    async def store(self, call: Call) -> Answer:
        """``GET /admin/store``: the receipt store's topology (docs/scaling.md), with the master's address."""
        call.only(())
        store = self._gateway.payments.engine.store
        if isinstance(store, RedisStore):
            return Answer(200, store.topology().as_json(with_address=True))
        return Answer(200, {"topology": "sqlite"})

    async def dashboard(self, call: Call) -> Answer:
        """``GET /admin/``: the dashboard page (gateway/http/admin/dashboard.py)."""
        call.only(())
        data = await gather_dashboard(self._stores.ledger, gateway=self._gateway, journal=self._stores.journal)
        page = render_dashboard(data)
        return Answer(200, page=page, headers=[h for h in HEADERS if h[0] != b"cache-control"])

    async def live_config(self, call: Call) -> Answer:
        """``GET /admin/config``: the configuration in force, every secret masked."""
        call.only(())
        admin = self._config.admin
        extra = tuple(t.value.reveal() for t in admin.tokens) if admin else ()
        if admin is not None and admin.refund_key is not None:
            extra += (admin.refund_key.reveal(),)
        in_force = self._gateway.payments.engine.config  # a reload or an admin override swaps it
        return Answer(200, masked_config(in_force, more_secrets=extra))
