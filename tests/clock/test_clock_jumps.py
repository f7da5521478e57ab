"""Wall-clock jumps: what an NTP step, a VM resumed from suspend or an operator fixing a wrong clock does to the
money invariant (a served request is paid exactly once; nothing is served for free; nothing is charged twice).

A "jump" is made by replacing the ``time`` module inside the gateway modules that read it (``_SteppedClock``): the
gateway process sees ``time.time()`` moved by an offset, while everything else (the Redis server, anvil, the test's
own clock) keeps the host's clock. A gateway whose clock is behind is the same as a chain and a Redis whose clocks
are ahead of it, which is how a few tests below get a large skew without waiting for it.

Each test is named for the property it protects; its docstring says how the gateway failed it before it was
fixed. One known limit (a SQLite heartbeat written before a step back) is an expected failure:
docs/threat-model.md T31 says why it is left.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import types
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from eth_account import Account

import gateway.chain.finality
import gateway.engine.claim
import gateway.engine.engine
import gateway.engine.sessions
import gateway.jobs.model
import gateway.schemes.txhash.onchain
import gateway.schemes.txhash.scheme
from gateway.chain.finality import FinalityTracker
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.watcher import ReceiptWatcher
from gateway.config import Secret
from gateway.dev.chain import (
    BASE_USDC,
    Anvil,
    DevChain,
    deploy_test_usdc,
    find_anvil,
    set_eth_balance,
)
from gateway.engine.claim import Claims
from gateway.engine.deferred import DeferredOutcomes
from gateway.schemes.base import RECORD_MARGIN
from gateway.schemes.exact.check import payment_key
from gateway.schemes.exact.onchain import settlement_calldata
from gateway.storage import RedisReceiptStore, SQLiteReceiptStore
from gateway.storage.receipts import ClaimState, ReceiptStore
from gateway.storage.redis_client import GC_SLACK
from gateway.storage.settlements import SQLiteSettlementJournal
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.jobs.helpers import bearer, jobs_gateway, poll
from tests.jobs.helpers import pay as pay_job
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.support.facilitator import make_payment, requirement
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url
from tests.support.jobs_upstreams import SlowAgent, wait_until
from tests.support.processes import python_process
from tests.txhash.helpers import assert_served, error_of, proof
from tests.txhash.helpers import pay as pay_on_chain
from tests.unit.test_settlement_batches import exact

_HOST_TIME = time.time
HOUR = 3600.0


class _SteppedClock:
    """Stands in for the ``time`` module inside a gateway module: ``time()`` is the host's clock plus ``offset``
    (which a test may change while the gateway runs: a step); every other attribute is the real module's."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return _HOST_TIME() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def step_clock(monkeypatch: pytest.MonkeyPatch, offset: float, *modules: types.ModuleType) -> _SteppedClock:
    clock = _SteppedClock(offset)
    for module in modules:
        monkeypatch.setattr(module, "time", clock)
    return clock


def store_on(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> ReceiptStore:
    if backend == "sqlite":
        return SQLiteReceiptStore(str(tmp_path / "receipts.db"))
    return RedisReceiptStore(request.getfixturevalue("redis_url"))


def store_url_on(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sqlite":
        return sqlite_url(tmp_path)
    url: str = request.getfixturevalue("redis_url")
    return url


BACKENDS = ["sqlite", "redis"]


# ------------------------------------------------------------------------------------ receipts: Redis GC vs clock


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_consumed_payment_stays_spent_until_its_expiry_by_the_gateways_clock(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The receipt store's expiry is the caller's clock (``now``), and Redis's own TTL is documented as garbage
    collection only, "so that clock skew between a gateway and Redis cannot delete a record that the gateway still
    considers live" (gateway/storage/receipts/redis.py). It is set GC_SLACK (300 s) after the logical expiry by the
    gateway's clock, and Redis applies it by its own: a gateway more than GC_SLACK behind the Redis host loses
    records it still considers live. Here the consumed record should live another hour by the gateway's clock;
    Redis deleted it two seconds after it was written, before every store gave Redis keys relative lifetimes
    (gateway/storage/redis_client.py ``gc_expire``); SQLite keeps it."""
    store = store_on(backend, request, tmp_path)
    keep = HOUR  # what the scheme asked for: the record outlives the last moment its payment could pay
    behind = keep + GC_SLACK - 2.0  # the gateway's clock is this far behind the Redis host's (~1 h 05 min)
    try:
        now = _HOST_TIME() - behind
        await store.claim("tx:8453:0xabc:0", "gw.req1", now=now, lease=150.0, expires_at=now + keep)
        await store.mark_paid("tx:8453:0xabc:0", "gw.req1", "0xabc", now=now, lease=150.0)
        assert await store.finish("tx:8453:0xabc:0", "gw.req1", served=True, now=now, expires_at=now + keep)
        await asyncio.sleep(3.0)
        later = _HOST_TIME() - behind  # three seconds later by the gateway's clock: 57 minutes before the expiry
        record = await store.get("tx:8453:0xabc:0", now=later)
        assert record is not None and record.state is ClaimState.CONSUMED, "the spent payment's record is gone"
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_spent_tx_hash_proof_is_not_served_again_when_the_gateway_clock_is_behind_the_stores(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The money invariant, end to end, for the store defect above. The gateway's clock is ~2 h 05 min behind the
    Redis host and the chain (an operator set it to the wrong time zone, or stepped it back); the payer's transfer is
    10 minutes old by the gateway's clock, so the tx-hash proof is accepted, served and recorded CONSUMED until
    now + tx_max_age + RECORD_MARGIN by the gateway's clock. Redis deletes that record by its own clock, and the same
    proof, presented again a few seconds later, is served again: one transfer, two answers. (With a skew of exactly
    2 h the record goes GC_SLACK = 300 s after it was written, and the proof can be replayed every 5 minutes for
    about an hour; 2 h 05 min makes it go within seconds.) Failed on Redis before relative lifetimes."""
    tx_max_age = 3600  # the default payment.tx_max_age_seconds
    grace = 3.0  # seconds the record lives on Redis, enough to serve the first request
    behind = tx_max_age + RECORD_MARGIN + GC_SLACK - grace  # 7497 s
    chain = _chain_dated(tmp_path, age=int(behind) + 600)  # its blocks: 10 min old by the gateway's clock
    url = store_url_on(backend, request, tmp_path)
    clock = step_clock(
        monkeypatch,
        -behind,
        gateway.engine.engine,
        gateway.engine.claim,
        gateway.schemes.txhash.onchain,
        gateway.schemes.txhash.scheme,
    )
    try:
        recipient = Account.create().address
        with running_gateway(chain, store_url=url, payment={"pay_to": recipient}) as gw:
            payer, tx = pay_on_chain(chain, gw)
            mined = chain.rpc("eth_getTransactionReceipt", [tx])["blockNumber"]
            block = chain.rpc("eth_getBlockByNumber", [mined, False])
            assert 0 < clock.time() - int(block["timestamp"], 16) < tx_max_age  # fresh by the gateway's clock
            headers = proof(gw, payer, tx)
            assert_served(_post(gw, headers), tx)
            time.sleep(grace + 1.5)
            again = _post(gw, headers)
            assert again.status_code == 402, f"one transfer served twice: {again.status_code} {again.text[:200]}"
            assert error_of(again) == reasons.PAYMENT_ALREADY_USED
            assert len(gw.upstream.requests) == 1
    finally:
        chain.stop()


def _post(gw: Any, headers: dict[str, str]) -> httpx.Response:
    with gw.client() as client:
        return client.post("/paid", headers=headers, json={"q": 1})


def _chain_dated(tmp_path: Path, *, age: int) -> DevChain:
    """A private Base (chain id 8453, TestUSDC at Base's address) whose clock runs ``age`` seconds behind the host's
    (anvil's ``--timestamp`` through a wrapper script, as tests/txhash/conftest.py does)."""
    wrapper = tmp_path / "anvil-dated"
    wrapper.write_text(f'#!/bin/sh\nexec "{find_anvil()}" "$@" --timestamp {int(_HOST_TIME()) - age}\n')
    wrapper.chmod(0o755)
    anvil = Anvil(chain_id=8453, binary=str(wrapper)).start()
    try:
        usdc = deploy_test_usdc(anvil, at=BASE_USDC)
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, usdc=usdc)


# ------------------------------------------------------------------------------------ claims, heartbeats: stepping back


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_handed_over_claim_is_taken_at_once_even_after_the_clock_stepped_back(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """docs/threat-model.md T31: a request whose settlement was broadcast but not confirmed hands its claim over
    (``lapse``) so that "the very next retry reconciles". ``lapse`` wrote ``lease_until = now``; after the host's
    clock steps back one hour, that lease reads as live for another hour, and the holder is this very process
    (never "gone"): the paying client's every retry was 409 ``payment_in_flight`` for an hour, on both backends.
    ``lapse`` now ends the lease outright (0)."""
    store = store_on(backend, request, tmp_path)
    claims = Claims(store, 150.0, DeferredOutcomes())
    key = "exact:8453:0xusdc:0xpayer:0x01"
    try:
        t = _HOST_TIME()
        first = claims.new_owner()
        await claims.claim(key, first, now=t, expires_at=t + 2 * HOUR)
        await store.record_tx(key, first, "0xsettlement", now=t, lease=claims.lease)
        await store.lapse(key, first, now=t)  # PaidRequest.hand_over(): 503 settlement_pending, retry at once
        stepped_back = _HOST_TIME() - HOUR  # NTP steps the host's clock back one hour before the retry
        record = await claims.claim(key, claims.new_owner(), now=stepped_back, expires_at=stepped_back + 2 * HOUR)
        assert record.resumed and record.tx_hash == "0xsettlement"
    finally:
        await store.aclose()


_HEARTBEATING_PROCESS = """
import asyncio, sys, time
from gateway.storage import RedisReceiptStore, SQLiteReceiptStore

async def main() -> None:
    kind, where, instance = sys.argv[1:4]
    store = SQLiteReceiptStore(where) if kind == "sqlite" else RedisReceiptStore(where)
    await store.heartbeat(instance, now=time.time(), ttl=1.0)
    print("beating", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _heartbeating_process(backend: str, where: str, instance: str) -> subprocess.Popen[str]:
    """A process that heartbeats ``instance`` on the store once (ttl 1 s) and then lives on until killed."""
    return python_process(_HEARTBEATING_PROCESS, backend, where, instance, ready="beating")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_killed_gateway_process_is_found_dead_after_the_clock_stepped_back(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """T31's fast take-over of a killed process's claims relies on ``alive``. Redis keeps heartbeats with a
    server-side TTL, so no gateway clock matters. SQLite stored ``alive_until`` by the writer's clock and compared
    it with the reader's: after a kill -9 and a step back of one hour the dead process stayed "alive" for an hour
    and every claim it held (paid, unanswered) answered 409 until then. Each process now also holds a lock file
    the kernel lets go when it dies (gateway/storage/liveness.py): gone is gone, whatever the clock says."""
    where = str(tmp_path / "receipts.db") if backend == "sqlite" else request.getfixturevalue("redis_url")
    store = store_on(backend, request, tmp_path)
    proc = _heartbeating_process(backend, where, "crashed")
    try:
        assert await store.alive("crashed", now=_HOST_TIME())
        proc.kill()  # kill -9: no clean shutdown, no last word
        proc.wait(timeout=10)
        await asyncio.sleep(1.5)  # its last heartbeat lapsed as well
        assert not await store.alive("crashed", now=_HOST_TIME() - HOUR)  # the clock stepped back meanwhile
    finally:
        proc.kill()
        await store.aclose()


async def test_a_live_process_on_sqlite_stays_alive_when_the_clock_steps_back(tmp_path: Path) -> None:
    """The lock file only ever proves death: a live process whose heartbeat is current by the (stepped-back)
    clock is alive, and its lock file is left in place for it."""
    where = str(tmp_path / "receipts.db")
    store = SQLiteReceiptStore(where)
    proc = _heartbeating_process("sqlite", where, "running")
    try:
        assert await store.alive("running", now=_HOST_TIME() - HOUR)
        assert list((tmp_path / "receipts.db.instances").glob("running.*.lock"))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        await store.aclose()


# ------------------------------------------------------------------------------------------ sessions: withdrawals


SESSION_PRICE = 1_000
DEPOSIT = 100_000
SESSION_ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
WATCHING = {
    **SESSIONS,  # withdraw_delay 900 s
    "min_deposit": "0.10",
    "claim_interval": 0.2,
    "claim_after": 3600,
    "settle_interval": 0.2,
    "withdraw_margin": 600,
}


@pytest.mark.parametrize("gateway_clock", ["behind_the_chain", "in_line_with_the_chain"])
def test_no_voucher_is_served_on_money_the_payer_already_withdrew(
    gateway_clock: str, private_chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payer starts a withdrawal; the contract lets it finalize once *the chain's* clock passes the delay. The
    gateway stops charging new vouchers ``withdraw_margin`` before that, by *its own* clock
    (gateway/engine/sessions.py ``_cover``), and only re-reads the chain when that check refuses. A gateway clock
    behind the chain's by more than the margin (here 901 s: the chain moved past the delay; a step back of the host
    clock does the same) keeps serving vouchers on the stale mirror after the payer has taken the money back: each
    is content served for a charge that can never be claimed. "behind_the_chain" was served (200) before a
    withdrawing channel's vouchers were checked on the chain's state and clock; "in_line_with_the_chain" (the
    gateway's clock moved with the chain) is refused too."""
    chain = private_chain
    pay_to = Account.create().address
    payer = chain.new_payer(1_000_000)
    with running_gateway(
        chain, store_url=sqlite_url(tmp_path), routes=SESSION_ROUTES, sessions=WATCHING, pay_to=pay_to
    ) as gw:
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=SESSION_PRICE))).status_code == 200
        ch.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
        _wait(lambda: ch.onchain(chain).total_claimed == SESSION_PRICE)  # the claimer saw it and claimed in time

        chain.advance_time(901)  # the delay (900 s) is over by the chain's clock
        before = chain.balance(payer.address)
        ch.call_as_payer(chain, "finalizeWithdraw")
        assert chain.balance(payer.address) - before == DEPOSIT - SESSION_PRICE  # the rest is the payer's again
        if gateway_clock == "in_line_with_the_chain":
            step_clock(monkeypatch, 901, gateway.engine.sessions)

        r = httpx.get(url, headers=ch.header(ch.paying(2 * SESSION_PRICE)))
        assert r.status_code == 402, f"served on withdrawn money: {r.status_code}"
        assert decode_header(r.headers["payment-required"])["error"] in (
            reasons.SESSION_WITHDRAWING,
            reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE,
        )
        assert len(gw.upstream.requests) == 1


def _wait(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


# ----------------------------------------------------------------------------------------------- jobs: stepping ahead


def test_a_paid_job_whose_runner_is_alive_survives_a_forward_clock_step(
    base_chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job is charged once at submission "whatever its final status" (docs/jobs.md). Whether its runner is alive
    is judged by comparing ``runner_lease_until`` (the runner's clock + 15 s) and the job's deadline with the
    reader's wall clock (gateway/jobs/model.py ``overdue``), on every status read and sweep. A forward step of the
    host clock (or a peer instance whose clock is ~15 s ahead) declares the live job "runner lost" (or timed out):
    the upstream call is cut and the payer has paid for nothing. Failed before the running instance stopped
    judging its own jobs by the wall clock."""
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent(step_delay=0.05)
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
        ) as gw,
        gw.client() as c,
    ):
        r = pay_job(gw, c, payer, "POST", "/api/messaging/jobs", json={"userId": "u", "content": "sleep 2"})
        assert r.status_code == 201, r.text
        job_id = r.json()["jobId"]
        assert wait_until(lambda: len(agent.calls) == 1)  # the runner is calling the upstream
        step_clock(monkeypatch, HOUR, gateway.jobs.model)  # NTP steps the host clock forward one hour
        doc = poll(c, f"/api/messaging/jobs/{job_id}", bearer(r), timeout=20.0)
        assert doc["status"] == "completed", doc
        assert job_id not in agent.aborted


# ------------------------------------------------------------------------------------- finality: stepping ahead


async def test_a_reorged_settlement_is_settled_again_when_the_gateway_clock_is_ahead(
    private_chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/threat-model.md T28: a settlement a reorg dropped after its request was served is settled again while
    its authorization is valid. The tracker calls it expired by ``max(chain time, wall clock) + 10 s >=
    validBefore`` (gateway/chain/finality.py ``_look_up``), so with the host clock one hour ahead it writes the
    dropped settlement off as lost although the chain would still execute it (the tracker simulates it on the
    pending block anyway): served, never paid. Here the relayer that sent it is gone (a restart), as in
    tests/chain/test_reorged_settlements.py, so only the tracker can recover it (within 15 minutes of the
    settlement, a live relayer's nonce keeper resends the transaction by itself). Failed before expiry was judged
    by the chain's clock only."""
    chain = private_chain
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(chain.url)])
        await rpc.start(session)
        key = "0x" + os.urandom(32).hex()
        set_eth_balance(chain.anvil, Account.from_key(key).address, 10**20)
        journal = SQLiteSettlementJournal(str(tmp_path / "journal.db"))
        watcher = ReceiptWatcher(rpc, interval=0.02)
        first = Relayer(rpc, Secret(key))
        payment = make_payment(chain)
        wire = exact(payment)
        calldata = settlement_calldata(wire)

        async def record(tx_hash: str) -> None:
            return None

        tx_hash = await first.submit(chain.usdc, calldata, 120_000, record)
        await watcher.wait(tx_hash, timeout=20)
        await first.aclose()  # a restart: the new relayer knows nothing of the settlement
        relayer = Relayer(rpc, Secret(key))
        tracker = FinalityTracker(
            "base", rpc, relayer, lambda: relayer, journal, finality="depth", depth=3, interval=0.1
        )
        try:
            req = requirement(chain, amount=payment.amount, pay_to=payment.pay_to)
            claim_key = payment_key(req, wire.authorization)
            tracker.track(claim_key, chain.usdc, calldata, wire.authorization.valid_before, tx_hash)
            await _passes(tracker, 1)
            step_clock(monkeypatch, HOUR, gateway.chain.finality)  # the host clock steps forward one hour
            chain.rpc("anvil_reorg", [1, []])
            assert chain.balance(payment.pay_to) == 0  # served, and the chain no longer pays for it
            await _passes(tracker, tracker.missing_passes)
            assert (tracker.lost, tracker.resubmitted) == (0, 1), "written off although still valid on chain"
            (entry,) = await journal.take("base", tracker.owner, now=0, lease=0, limit=5)
            await watcher.wait(entry.tx_hash, timeout=20)
            assert chain.balance(payment.pay_to) == payment.amount
        finally:
            await tracker.aclose()
            await relayer.aclose()
            await watcher.aclose()
            await journal.aclose()


async def _passes(tracker: FinalityTracker, n: int) -> None:
    for _ in range(n):
        await tracker.check()
        await asyncio.gather(*list(tracker._busy.values()))  # a re-submission started by this pass
