"""Our SDK pays by channel (``pay_with="session"``) against a real gateway on the anvil fixture: one deposit then
vouchers only, the channel reused from a file store by a new client, a corrective 402 after the local store was
rolled back (and a server that overstates what it charged is not believed), top-ups, spend caps on deposits, a
refund of exactly the unspent remainder, and two clients sharing one channel."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client import (
    AsyncX402Client,
    FileSessionStore,
    MemorySessionStore,
    PaymentFailed,
    PaymentRefused,
    SessionChannel,
    SessionSettings,
    SpendControls,
    TransientError,
    X402Client,
    X402ClientError,
)
from gateway.client.session import sign_voucher
from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header, encode_header
from tests.client.conftest import FAST_RETRY
from tests.client.conftest import RecordingTransport as _Recording
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import Behaviour

PRICE = 1_000  # $0.001 per request: the voucher's step
MIN_DEPOSIT = 5_000  # five requests
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]},
    {"route": "GET /exact-only", "price": "0.001"},
]
QUIET = {**SESSIONS, "min_deposit": "0.005", "claim_interval": 3600}  # nothing claimed while a test runs


@pytest.fixture
def gw(base_chain: DevChain, tmp_path: Path) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET) as gateway:
        yield gateway


class RecordingTransport(_Recording):
    """Also keeps the ``PAYMENT-REQUIRED`` header of every 402, in order."""

    def __init__(self) -> None:
        super().__init__()
        self._refusals: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if response.status_code == 402:
            self._refusals.append(response.headers.get("payment-required", ""))
        return response

    def refusals(self) -> list[str]:
        return list(self._refusals)


def relayer_nonce(chain: DevChain) -> int:
    address = Account.from_key(chain.relayer_key).address
    return int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)


def receipt(response: httpx.Response) -> dict[str, Any]:
    doc = decode_header(response.headers["payment-response"])
    assert isinstance(doc, dict)
    return doc


def cumulative(response: httpx.Response) -> int:
    return int(receipt(response)["extra"]["channelState"]["chargedCumulativeAmount"])


def session_client(
    gw: GatewayUnderTest, payer: LocalAccount, *, store: Any = None, transport: Any = None, **kwargs: Any
) -> AsyncX402Client:
    return AsyncX402Client(
        gw.url,
        account=payer,
        pay_with="session",
        session_store=store,
        transport=transport,
        retry=FAST_RETRY,
        **kwargs,
    )


async def pay(client: AsyncX402Client, n: int, path: str = "/session") -> list[httpx.Response]:
    return [await client.get(path) for _ in range(n)]


def only_channel(store: Any) -> SessionChannel:
    channels = store.channels()
    assert len(channels) == 1, channels
    channel: SessionChannel = channels[0]
    return channel


async def test_one_deposit_then_vouchers_only_one_transaction_and_one_402_in_all(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet, txs = base_chain.balance(payer.address), relayer_nonce(base_chain)
    wire, store = RecordingTransport(), MemorySessionStore()
    async with session_client(
        gw, payer, store=store, transport=wire, sessions=SessionSettings(deposit="0.05")
    ) as client:
        responses = await pay(client, 30)
        assert client.spent == 50_000  # the deposit; every charge came out of it
    assert [r.status_code for r in responses] == [200] * 30
    assert len(gw.upstream.requests) == 30
    assert receipt(responses[0])["transaction"] and receipt(responses[0])["amount"] == "50000"
    assert all(receipt(r)["transaction"] == "" for r in responses[1:])  # vouchers: no transaction each
    assert [cumulative(r) for r in responses] == [PRICE * (i + 1) for i in range(30)]
    assert relayer_nonce(base_chain) - txs == 1  # the deposit, and nothing per request
    assert base_chain.balance(payer.address) == wallet - 50_000
    # Only the very first call asked for the 402: later calls sent their voucher with the first attempt.
    assert [status for _, status, _ in wire.exchanges] == [402] + [200] * 30
    channel = only_channel(store)
    assert (channel.balance, channel.charged, channel.remaining) == (50_000, 30 * PRICE, 20_000)
    assert base_chain.channel(bytes.fromhex(channel.channel_id[2:])).balance == 50_000


async def test_a_new_client_on_the_same_file_store_pays_on_through_the_same_channel(
    gw: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    path = tmp_path / "sessions.json"
    async with session_client(gw, payer, store=FileSessionStore(path)) as first:
        assert [cumulative(r) for r in await pay(first, 2)] == [PRICE, 2 * PRICE]
    wallet, txs = base_chain.balance(payer.address), relayer_nonce(base_chain)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the salt that names the money
    async with session_client(gw, payer, store=FileSessionStore(path)) as second:
        assert [cumulative(r) for r in await pay(second, 3)] == [3 * PRICE, 4 * PRICE, 5 * PRICE]
        assert second.spent == 3 * PRICE  # another client's deposit: each charge counts here
    assert (base_chain.balance(payer.address), relayer_nonce(base_chain)) == (wallet, txs)  # no new deposit
    channel = only_channel(FileSessionStore(path))
    assert (channel.charged, channel.remaining) == (5 * PRICE, 0)


@pytest.mark.parametrize("rpc", [False, True], ids=["signed-voucher-only", "with-rpc"])
async def test_a_rolled_back_store_resynchronises_from_the_corrective_402_without_paying_twice(
    gw: GatewayUnderTest, base_chain: DevChain, tmp_path: Path, rpc: bool
) -> None:
    payer = base_chain.new_payer(1_000_000)
    path, backup = tmp_path / "sessions.json", tmp_path / "backup.json"
    settings = SessionSettings(deposit="0.05", rpc_urls={"base": base_chain.url} if rpc else None)
    async with session_client(gw, payer, store=FileSessionStore(path), sessions=settings) as client:
        await pay(client, 2)
        shutil.copy(path, backup)
        await pay(client, 3)
    shutil.copy(backup, path)  # the client's records now say 2 were charged; the server charged 5
    wallet = base_chain.balance(payer.address)
    wire = RecordingTransport()
    async with session_client(gw, payer, store=FileSessionStore(path), transport=wire, sessions=settings) as client:
        resumed = await pay(client, 2)
    assert [cumulative(r) for r in resumed] == [6 * PRICE, 7 * PRICE]
    # the 402 asking for payment, then one stale voucher answered by one corrective 402, then paid on
    assert [status for _, status, _ in wire.exchanges] == [402, 402, 200, 200]
    assert [decode_header(h)["error"] for h in wire.refusals()] == [
        reasons.PAYMENT_REQUIRED,
        reasons.SESSION_CUMULATIVE_MISMATCH,
    ]
    assert len(gw.upstream.requests) == 7  # the stale voucher bought nothing
    assert base_chain.balance(payer.address) == wallet  # resynchronised, not a new channel
    assert only_channel(FileSessionStore(path)).charged == 7 * PRICE


class Misstating:
    """Wraps a gateway: once ``active``, its corrective 402 says ``by`` more was charged than it did; ``forge``:
    with a voucherState for that amount signed by a key that is not the payer's (else the genuine one is kept)."""

    def __init__(self, by: int, *, forge: bool) -> None:
        self.by, self.forge, self.active = by, forge, False
        self.forger = Account.create()

    def tampered(self, value: bytes) -> bytes:
        doc = decode_header(value)
        if not self.active or doc["error"] != reasons.SESSION_CUMULATIVE_MISMATCH:
            return value
        for entry in doc["accepts"]:
            state = (entry.get("extra") or {}).get("channelState")
            if state:
                claimed = int(state["chargedCumulativeAmount"]) + self.by
                state["chargedCumulativeAmount"] = str(claimed)
                if self.forge:
                    signature = sign_voucher(self.forger, state["channelId"], claimed, 8453)["signature"]
                    entry["extra"]["voucherState"] = {"signedMaxClaimable": str(claimed), "signature": signature}
        return encode_header(doc).encode("ascii")

    def __call__(self, app: Any) -> Any:
        async def lying(scope: Any, receive: Any, send: Any) -> None:
            async def tamper(message: Any) -> None:
                if message["type"] == "http.response.start" and message["status"] == 402:
                    headers = [(k, self.tampered(v) if k == b"payment-required" else v) for k, v in message["headers"]]
                    message = {**message, "headers": headers}
                await send(message)

            await app(scope, receive, tamper)

        return lying


async def roll_back_after(client: AsyncX402Client, path: Path, kept: int, then: int) -> None:
    """Pay ``kept`` requests, snapshot the store file, pay ``then`` more, and put the snapshot back."""
    await pay(client, kept)
    snapshot = path.read_bytes()
    await pay(client, then)
    path.write_bytes(snapshot)


@pytest.mark.parametrize("forge", [True, False], ids=["forged-voucher", "more-than-the-voucher"])
async def test_a_corrective_402_claiming_more_than_the_wallet_signed_is_not_believed(
    base_chain: DevChain, tmp_path: Path, forge: bool
) -> None:
    payer = base_chain.new_payer(1_000_000)
    path = tmp_path / "sessions.json"
    lie = Misstating(10 * PRICE, forge=forge)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET, wrap=lie) as gw:
        async with session_client(gw, payer, store=FileSessionStore(path)) as client:
            await roll_back_after(client, path, 1, 2)  # the client's record: 1 charged; the server's: 3
            lie.active = True
            with pytest.raises(PaymentFailed) as refused:
                await client.get("/session")
            assert refused.value.reason == "session_resync"
            assert client.spent == MIN_DEPOSIT  # the deposit; the refused request cost nothing
        assert len(gw.upstream.requests) == 3
    assert only_channel(FileSessionStore(path)).charged == PRICE  # the rolled-back record, not the server's claim


async def test_with_an_rpc_a_corrective_402_below_what_the_chain_says_was_claimed_is_refused(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    path = tmp_path / "sessions.json"
    lie = Misstating(-2 * PRICE, forge=False)  # says 1 was charged where 3 were, and claimed on chain
    claims = {**QUIET, "claim_interval": 0.2, "claim_after": 1.0}
    settings = SessionSettings(rpc_urls={"eip155:8453": base_chain.url})
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=claims, wrap=lie) as gw:
        async with session_client(gw, payer, store=FileSessionStore(path), sessions=settings) as client:
            await roll_back_after(client, path, 1, 2)
            channel = bytes.fromhex(only_channel(FileSessionStore(path)).channel_id[2:])
            deadline = time.monotonic() + 30
            while base_chain.channel(channel).total_claimed < 3 * PRICE:
                assert time.monotonic() < deadline, "the claimer did not claim"
                await asyncio.sleep(0.1)
            lie.active = True
            with pytest.raises(PaymentFailed) as refused:
                await client.get("/session")
        assert refused.value.reason == "session_resync" and "claimed on chain" in refused.value.message
        assert len(gw.upstream.requests) == 3


class InflatedReceipt:
    """Wraps a gateway: the next paid answer's PAYMENT-RESPONSE says the channel's cumulative is ``by`` higher than
    its previous value plus the charge (a server whose account does not add up)."""

    def __init__(self, by: int) -> None:
        self.by, self.armed = by, False

    def inflated(self, value: bytes) -> bytes:
        doc = decode_header(value)
        doc["extra"]["channelState"]["chargedCumulativeAmount"] = str(
            int(doc["extra"]["channelState"]["chargedCumulativeAmount"]) + self.by
        )
        self.armed = False
        return encode_header(doc).encode("ascii")

    def __call__(self, app: Any) -> Any:
        async def inflating(scope: Any, receive: Any, send: Any) -> None:
            async def tamper(message: Any) -> None:
                if message["type"] == "http.response.start" and self.armed and message["status"] == 200:
                    headers = [(k, self.inflated(v) if k == b"payment-response" else v) for k, v in message["headers"]]
                    message = {**message, "headers": headers}
                await send(message)

            await app(scope, receive, tamper)

        return inflating


async def test_a_payment_response_whose_cumulative_does_not_add_up_is_not_believed_and_the_next_402_corrects(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    store, wire = MemorySessionStore(), RecordingTransport()
    inflate = InflatedReceipt(10 * PRICE)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET, wrap=inflate) as gw:
        async with session_client(gw, payer, store=store, transport=wire) as client:
            await pay(client, 1)
            inflate.armed = True
            await pay(client, 1)  # says 12 were charged after 1 + 1
            assert only_channel(store).charged == PRICE  # not believed: ours is kept
            assert [cumulative(r) for r in await pay(client, 2)] == [3 * PRICE, 4 * PRICE]
            assert only_channel(store).charged == 4 * PRICE
    # the next voucher was one short: one corrective 402 (its voucherState is ours) put the client right
    assert [status for _, status, _ in wire.exchanges] == [402, 200, 200, 402, 200, 200]
    assert [decode_header(h)["error"] for h in wire.refusals()][1] == reasons.SESSION_CUMULATIVE_MISMATCH


async def test_the_channel_is_topped_up_whenever_the_next_voucher_would_exceed_its_balance(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet, txs = base_chain.balance(payer.address), relayer_nonce(base_chain)
    store = MemorySessionStore()
    async with session_client(gw, payer, store=store, sessions=SessionSettings(deposit=6 * PRICE)) as client:
        responses = await pay(client, 13)
        assert client.spent == 3 * 6 * PRICE
    assert [r.status_code for r in responses] == [200] * 13
    deposits = [i for i, r in enumerate(responses) if receipt(r)["transaction"]]
    assert deposits == [0, 6, 12]  # six requests per deposit
    assert [cumulative(r) for r in responses] == [PRICE * (i + 1) for i in range(13)]
    assert relayer_nonce(base_chain) - txs == 3
    assert base_chain.balance(payer.address) == wallet - 18 * PRICE
    assert (only_channel(store).balance, only_channel(store).charged) == (18 * PRICE, 13 * PRICE)


async def test_a_deposit_below_the_servers_minimum_is_raised_to_it(gw: GatewayUnderTest, base_chain: DevChain) -> None:
    payer = base_chain.new_payer(1_000_000)
    store = MemorySessionStore()
    async with session_client(gw, payer, store=store, sessions=SessionSettings(deposit=PRICE)) as client:
        await pay(client, 1)
    assert only_channel(store).balance == MIN_DEPOSIT


async def test_spend_controls_refuse_a_deposit_over_the_cap_before_anything_is_signed(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet = base_chain.balance(payer.address)
    wire, store = RecordingTransport(), MemorySessionStore()
    capped = SpendControls(max_per_payment=4 * PRICE)  # the price passes; the 0.005 minimum deposit does not
    async with session_client(gw, payer, store=store, transport=wire, spend=capped) as client:
        with pytest.raises(PaymentRefused) as over:
            await client.get("/session")
        assert (over.value.status, over.value.reason) == (402, "amount_over_limit")
        assert "$0.005" in over.value.message
        assert client.spent == 0
    assert not wire.paid("payment-signature")  # nothing signed, nothing sent
    assert store.channels() == []
    assert base_chain.balance(payer.address) == wallet and gw.upstream.requests == []


async def test_the_budget_counts_deposits_and_refuses_a_top_up_it_cannot_afford(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet = base_chain.balance(payer.address)
    async with session_client(gw, payer, spend=SpendControls(budget=8 * PRICE)) as client:
        assert [r.status_code for r in await pay(client, 5)] == [200] * 5
        assert (client.spent, client.remaining_budget) == (5 * PRICE, 3 * PRICE)
        with pytest.raises(PaymentRefused) as broke:  # the sixth needs another 0.005 deposit
            await client.get("/session")
        assert broke.value.reason == "budget_exhausted"
        assert client.spent == 5 * PRICE
    assert base_chain.balance(payer.address) == wallet - 5 * PRICE
    assert len(gw.upstream.requests) == 5


async def test_a_refund_returns_exactly_the_unspent_remainder_and_the_channel_pays_on_after_it(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet = base_chain.balance(payer.address)
    store = MemorySessionStore()
    async with session_client(gw, payer, store=store, sessions=SessionSettings(deposit="0.05")) as client:
        await pay(client, 7)
        partial = await client.refund_session("/session", amount=MIN_DEPOSIT)  # the least a partial one may be
        assert partial.amount == MIN_DEPOSIT and partial.tx_hash
        assert base_chain.balance(payer.address) == wallet - 50_000 + MIN_DEPOSIT
        rest = await client.refund_session("/session")
        assert rest.amount == 50_000 - 7 * PRICE - MIN_DEPOSIT
        assert base_chain.balance(payer.address) == wallet - 7 * PRICE  # all but what was charged came back
        assert (rest.channel.remaining, client.spent) == (0, 7 * PRICE)
        with pytest.raises(X402ClientError) as empty:
            await client.refund_session("/session")
        assert empty.value.reason == reasons.SESSION_REFUND_NO_BALANCE
        # The channel stays: the next request deposits into it again and pays on from the same cumulative.
        again = await client.get("/session")
        assert again.status_code == 200 and cumulative(again) == 8 * PRICE
    assert len(store.channels()) == 1
    assert len(gw.upstream.requests) == 8


async def test_concurrent_calls_of_one_client_take_turns_on_the_channel_instead_of_colliding(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wire = RecordingTransport()
    async with session_client(gw, payer, transport=wire, sessions=SessionSettings(deposit="0.1")) as client:
        await pay(client, 1)
        results = await asyncio.gather(*(client.get("/session") for _ in range(12)))
    assert [r.status_code for r in results] == [200] * 12
    assert sorted(cumulative(r) for r in results) == [PRICE * (i + 2) for i in range(12)]
    assert [status for _, status, _ in wire.exchanges] == [402] + [200] * 13  # not one busy or stale voucher


async def test_a_channel_busy_with_another_clients_request_is_waited_for_then_paid_on_from_its_charge(
    gw: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    path = tmp_path / "sessions.json"
    settings = SessionSettings(busy_backoff=0.1)
    wire = RecordingTransport()
    async with (
        session_client(gw, payer, store=FileSessionStore(path), sessions=settings) as a,
        session_client(gw, payer, store=FileSessionStore(path), transport=wire, sessions=settings) as b,
    ):
        await pay(a, 1)
        gw.upstream.behaviour = Behaviour(delay=0.5)  # a's next request holds the channel for half a second
        slow = asyncio.create_task(a.get("/session"))
        assert await asyncio.to_thread(gw.upstream.wait_for_requests, 2)
        gw.upstream.behaviour = Behaviour()
        waited = await b.get("/session")
        first = await slow
    assert (first.status_code, cumulative(first)) == (200, 2 * PRICE)
    assert (waited.status_code, cumulative(waited)) == (200, 3 * PRICE)
    assert reasons.SESSION_CHANNEL_BUSY in [decode_header(h)["error"] for h in wire.refusals()]
    assert len(gw.upstream.requests) == 3
    assert only_channel(FileSessionStore(path)).charged == 3 * PRICE


async def test_a_route_without_sessions_is_paid_exact_and_the_sync_client_works_too(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    store = MemorySessionStore()
    with X402Client(gw.url, account=payer, pay_with="session", session_store=store, retry=FAST_RETRY) as client:
        exact = client.get("/exact-only")
        assert exact.status_code == 200 and receipt(exact)["transaction"]  # an EIP-3009 settlement
        assert store.channels() == []
        opened = client.open_session("/session", deposit="0.01")
        assert (opened.balance, opened.charged) == (10_000, PRICE)
        assert client.open_session("/session").channel_id == opened.channel_id  # room left: no request
        assert [c.channel_id for c in client.session_channels(gw.url)] == [opened.channel_id]
    assert len(gw.upstream.requests) == 2


def test_the_session_file_refuses_to_overwrite_a_damaged_file_and_settings_read_dollars(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    path.write_text("{not json")
    with pytest.raises(X402ClientError) as damaged:
        FileSessionStore(path).channels()
    assert damaged.value.reason == "session_store_unreadable"
    assert path.read_text() == "{not json"
    # A record this version cannot read is skipped, and kept: it may hold the only copy of a salt.
    payer = Account.create().address.lower()
    config = {"payer": payer, "payerAuthorizer": payer, "receiver": payer, "receiverAuthorizer": payer}
    config |= {"token": payer, "withdrawDelay": 900, "salt": "0x" + "ab" * 32}
    good = {"channelId": "0x" + "01" * 32, "origin": "http://a", "network": "eip155:8453", "chainId": 8453}
    good["channelConfig"] = config
    odd = {**good, "channelId": "0x" + "02" * 32, "channelConfig": {**config, "salt": "short"}}
    path.write_text(json.dumps({"channels": {good["channelId"]: good, odd["channelId"]: odd}}))
    store = FileSessionStore(path)
    assert [c.channel_id for c in store.channels()] == [good["channelId"]]
    store.put(store.channels()[0].replace(charged=5))
    kept = json.loads(path.read_text())["channels"]
    assert kept[odd["channelId"]] == odd and kept[good["channelId"]]["charged"] == "5"
    assert SessionSettings(deposit="$1.50").deposit == 1_500_000
    assert SessionSettings(deposit=7).deposit == 7
    with pytest.raises(TypeError):
        SessionSettings(deposit=1.5)  # type: ignore[arg-type]
    shown = repr(SessionSettings(deposit="1", rpc_urls={"base": "https://rpc.example/v2/SECRETKEY"}))
    assert "$1.00" in shown and "SECRETKEY" not in shown


class _LosesPaidAnswers(httpx.AsyncBaseTransport):
    """A real transport; while ``losing``, a paid request reaches the server but its answer never comes back."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.losing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if self.losing and "payment-signature" in request.headers:
            raise httpx.ReadError("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_call_after_a_lost_answer_pays_on_from_what_the_server_charged(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """The server charged a voucher whose answer never reached us: it holds that voucher, so the next call owes up to
    it and follows the corrective 402 (a voucher is recorded before it leaves). The same call's own refused voucher
    is never taken as charged (test_sdk_against_a_malicious_server.py), but this one was sent by a call before."""
    payer = base_chain.new_payer(1_000_000)
    wire = _LosesPaidAnswers()
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET) as gw:
        async with session_client(gw, payer, transport=wire) as client:
            assert [cumulative(r) for r in await pay(client, 1)] == [PRICE]
            wire.losing = True
            with pytest.raises(TransientError):
                await client.get("/session")
            wire.losing = False
            served = await client.get("/session")
    assert served.status_code == 200 and cumulative(served) == 3 * PRICE
