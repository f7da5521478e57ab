"""A gateway stopped and started again on the same store (SQLite file, Redis) resumes its channels: the client's
next voucher continues the cumulative with no corrective 402 and no second deposit, and the charges made before
and after the restart are all claimed, exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402 import x402Client

from gateway.dev.chain import DevChain
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import cumulative, fresh_client, pay
from tests.sessions.test_official_client_sessions import FAST_CLAIMS, ROUTES, relayer_nonce, wait_for
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url

PRICE = 1_000
QUIET = {**SESSIONS, "min_deposit": "0.05", "claim_interval": 3600}


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_restarted_gateway_resumes_the_channel_where_it_was(
    base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    store_url = sqlite_url(tmp_path) if store == "sqlite" else str(request.getfixturevalue("redis_url"))
    payer = base_chain.new_payer(5_000_000)
    client: x402Client = fresh_client(payer, base_chain.url)  # keeps its channel records across the restart
    seen: list[httpx.Response] = []

    def session(sessions: dict[str, Any], pay_to: str | None, n: int) -> tuple[str, list[httpx.Response], int]:
        with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=sessions, pay_to=pay_to) as gw:
            before = len(gw.upstream.requests)
            out = asyncio.run(pay(client, gw.url + "/session", n, seen))
            return gw.pay_to, out, len(gw.upstream.requests) - before

    pay_to, first, served = session(QUIET, None, 3)
    assert [cumulative(r) for r in first] == [PRICE, 2 * PRICE, 3 * PRICE] and served == 3
    deposited = base_chain.balance(payer.address)
    txs = relayer_nonce(base_chain)
    _, second, served = session(QUIET, pay_to, 3)
    assert [r.status_code for r in second] == [200] * 3
    assert [cumulative(r) for r in second] == [4 * PRICE, 5 * PRICE, 6 * PRICE] and served == 3
    assert [r.status_code for r in seen] == [200] * 6  # no corrective 402: the store kept the channel as it was
    assert base_chain.balance(payer.address) == deposited and relayer_nonce(base_chain) == txs  # no new deposit
    paid_before = base_chain.balance(pay_to)
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=FAST_CLAIMS, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == 6 * PRICE)
        assert gw.app.payments.engine.claimer.stats.vouchers_claimed == 1  # one claim covers both lives


def test_a_debt_older_than_claim_after_is_claimed_by_a_restarted_gateway_at_once(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """``claim_after`` bounds how long a charge waits for its claim, whatever restarts happen meanwhile: since when
    a channel owes is the store's record, not the process's memory (a gateway restarted more often than
    ``claim_after`` would otherwise never claim by age). The debt's age is set in the store: an hour and a half."""
    store_url = sqlite_url(tmp_path)
    payer = base_chain.new_payer(5_000_000)
    client: x402Client = fresh_client(payer, base_chain.url)
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=QUIET) as gw:
        pay_to = gw.pay_to
        served = asyncio.run(pay(client, gw.url + "/session", 2, []))
    assert [cumulative(r) for r in served] == [PRICE, 2 * PRICE]
    with sqlite3.connect(tmp_path / "receipts.db") as db:
        aged = db.execute("UPDATE channels SET unclaimed_since = unclaimed_since - 5400").rowcount
    assert aged == 1
    hourly = {**QUIET, "claim_interval": 0.2, "claim_after": 3600, "settle_interval": 0.2}
    paid_before = base_chain.balance(pay_to)
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=hourly, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == 2 * PRICE)
