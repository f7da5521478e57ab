"""An attacker's and a chaos tester's review of the operator's side: what two operators, two gateway instances or a
store fault at the wrong moment do to the store's identity marker, the admin API's answers and the ledger's exports.

Each test names the property it protects; each failed before the fix it comes with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain, RedisServer
from gateway.engine.identity import LOST, StoreIdentity, acknowledge
from gateway.storage import open_store
from gateway.storage.receipts import ReceiptStore
from tests.admin.conftest import READ_TOKEN, running_admin
from tests.support.gateway import sqlite_url

# ------------------------------------------------------------------------------------------- store acknowledge


async def _wipe(url: str, store: ReceiptStore) -> None:
    """The store loses its records (Redis flushed, SQLite file replaced): here, its identity marker."""
    if url.startswith("redis"):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
    else:
        db = store._db  # type: ignore[attr-defined]  # the real SQLite file's connection
        await db.run(lambda: db.transaction(lambda conn: conn.execute("DELETE FROM meta WHERE name = 'identity'")))


class _ReadThenWait:
    """One operator's connection to the real store: its read of the marker returns, then it waits for ``go`` before
    anything else reaches the store (both operators read the lost marker before either writes)."""

    def __init__(self, store: ReceiptStore, read: asyncio.Event, go: asyncio.Event) -> None:
        self._store, self._read, self._go = store, read, go

    async def identity(self) -> str | None:
        value = await self._store.identity()
        self._read.set()
        await self._go.wait()
        return value

    async def set_identity(self, value: str, *, only_if_absent: bool) -> str:
        return await self._store.set_identity(value, only_if_absent=only_if_absent)


@contextlib.asynccontextmanager
async def _stores(url: str, n: int) -> AsyncIterator[list[ReceiptStore]]:
    stores = [open_store(url) for _ in range(n)]
    try:
        yield stores
    finally:
        for s in stores:
            await s.aclose()


async def test_two_operators_acknowledging_one_loss_at_once_leave_the_gateways_taking_payments(
    store_url: str,
) -> None:
    """Two operators run ``store acknowledge`` at the same moment: both read ``lost:<marker>``, then both write. A
    gateway whose heartbeat came round between the two writes took the first one; the second must not read to it as
    another loss (503 ``store_identity_lost`` on every instance until someone acknowledges once more)."""
    async with _stores(store_url, 3) as (gateway_conn, first_conn, second_conn):
        gateway = StoreIdentity(gateway_conn, None)
        await gateway.start()
        await _wipe(store_url, gateway_conn)
        await gateway.check()
        assert gateway.lost and (await gateway_conn.identity() or "").startswith(LOST)

        read_one, read_two, go_one, go_two = (asyncio.Event() for _ in range(4))
        one = asyncio.create_task(acknowledge(_ReadThenWait(first_conn, read_one, go_one)))  # type: ignore[arg-type]
        two = asyncio.create_task(acknowledge(_ReadThenWait(second_conn, read_two, go_two)))  # type: ignore[arg-type]
        await read_one.wait()
        await read_two.wait()  # both saw the store marked lost
        go_one.set()
        await one
        await gateway.check()  # the gateway takes the first acknowledgement
        assert not gateway.lost
        go_two.set()
        await two
        await gateway.check()  # ... and reads the second

        gateway.require()  # takes payments (raises store_identity_lost otherwise)
        marker = await gateway_conn.identity()
        assert marker is not None and not marker.startswith(LOST)


async def test_a_gateway_that_never_saw_the_loss_marked_takes_its_acknowledgement(store_url: str) -> None:
    """Gateway one's heartbeat marks the loss and an operator acknowledges it before gateway two's heartbeat comes
    round (heartbeats are 15 s apart by default). Gateway two then finds a marker it never saw, where its own was:
    the acknowledgement of the loss of its own marker, not another loss that takes every instance down again."""
    async with _stores(store_url, 3) as (one_conn, two_conn, operator):
        one, two = StoreIdentity(one_conn, None), StoreIdentity(two_conn, None)
        await one.start()
        await two.start()
        await _wipe(store_url, one_conn)
        await one.check()  # marks the loss
        assert one.lost
        before, after = await acknowledge(operator)
        assert before is not None and before.startswith(LOST) and after is not None

        await two.check()  # its first look since the loss
        await one.check()

        assert not two.lost and not one.lost
        assert await operator.identity() == after


async def test_acknowledging_a_store_already_acknowledged_changes_nothing(store_url: str) -> None:
    """``acknowledge`` itself (not only the CLI around it) leaves a healthy marker alone: whoever calls it late, the
    gateways that took the first acknowledgement keep taking payments."""
    async with _stores(store_url, 2) as (gateway_conn, operator):
        gateway = StoreIdentity(gateway_conn, None)
        await gateway.start()
        healthy = await operator.identity()
        assert await acknowledge(operator) == (healthy, None)
        await gateway.check()
        assert not gateway.lost and await operator.identity() == healthy


# ------------------------------------------------------------------------------------------------- exports


def test_an_export_the_ledger_cannot_answer_is_a_503_not_a_broken_200(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """A fault of ours is a 5xx with its reason: an export asked while the ledger's store is down answers 503
    ``store_unavailable`` (and says so in the audit log), not a 200 whose body then breaks off with nothing in it."""
    with running_admin(base_chain, redis_url, tmp_path, admin_env) as admin, admin.client(READ_TOKEN) as api:
        redis_server.stop()
        try:
            for path in ("/admin/payments.csv", "/admin/payments.jsonl"):
                try:
                    answer = api.get(path)
                    status, body = answer.status_code, answer.json() if answer.status_code >= 400 else None
                except httpx.HTTPError as exc:  # the 200 was sent, then the body broke off
                    status, body = 200, {"broken": type(exc).__name__}
                assert (status, body and body.get("error")) == (503, "store_unavailable"), (path, status, body)
        finally:
            redis_server.start()
        exports = [line for line in admin.audit() if line.get("path", "").startswith("/admin/payments.")]
        audited = [(line["path"], line["status"]) for line in exports]
        assert audited == [("/admin/payments.csv", 503), ("/admin/payments.jsonl", 503)]


def test_the_dashboards_security_fields_stand_once_each(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """The page's own fields (its policy, nosniff, no-store) are not sent a second time beside the API's defaults:
    a field twice is at best noise, and for some (a second policy) browsers combine the values."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client(READ_TOKEN) as api:
        page = api.get("/admin/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    names = [name.lower() for name, _ in page.headers.raw]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert repeated == []
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-store"
