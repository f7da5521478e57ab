"""An attacker's review of sessions, run against a real gateway (anvil with the contracts at their canonical
addresses, a real SQLite or Redis store): each attack is sent the way a hostile or confused client would send it,
and the test checks what matters (docs/threat-model.md T1, T2, T26, T44-T49): nothing is served unpaid, nothing
is charged twice or above the price, a refund moves exactly the unclaimed remainder, and every refusal names its
reason (a fault of ours would be a 5xx, never a 402).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header, encode_header
from tests.sessions.crafted import CraftedChannel, corrective, other_account, session_offer
from tests.sessions.test_a_withdrawal_cannot_take_back_what_was_charged import relayer_nonce
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000  # atomic units: every route's price, the step of each voucher
MIN_DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]},
    {"route": "GET /slow", "price": "0.001", "schemes": ["batch-settlement"]},
    {
        "route": "GET /metered-header",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"header": "x-usage-cost", "unit": "atomic"},
    },
    {
        "route": "GET /metered-json",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"json": "usage.total_tokens", "unit_price": "0.000001"},
    },
]
# No claims unless a test asks for them; a pending withdrawal stops new charges at once (margin = the delay).
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600, "withdraw_margin": 900}


@dataclass
class ScriptedUpstream:
    """Answers each path as the attack needs, and records what reached it:

    * ``/metered-header?cost=a&cost=b``: one ``x-usage-cost`` header per ``cost`` value, verbatim;
    * ``/metered-json?usage=<json text>``: ``{"usage": {"total_tokens": <that text>}}``; ``?nest=n``: ``[`` n
      times, then ``]`` n times;
    * ``/slow``: waits until :attr:`release` is set (:attr:`entered` says it arrived);
    * anything else: 200 ``{"ok": true}``.
    """

    seen: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (path, query, client's usage headers)
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for p, _, _ in self.seen if path is None or p == path)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, query = scope["path"], scope["query_string"].decode()
        usage_headers = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-usage-cost"]
        with self._lock:
            self.seen.append((path, query, usage_headers))
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        headers = [(b"content-type", b"application/json")]
        body = b'{"ok": true}'
        if path == "/slow":
            self.entered.set()
            await asyncio.to_thread(self.release.wait, 30)
        elif path == "/metered-header":
            headers += [(b"x-usage-cost", v.encode()) for v in params.get("cost", [])]
        elif path == "/metered-json" and "nest" in params:  # a JSON answer nested deeper than any parser goes
            depth = int(params["nest"][0])
            body = b"[" * depth + b"]" * depth
        elif path == "/metered-json":
            body = b'{"usage": {"total_tokens": ' + params["usage"][0].encode() + b"}}"
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def upstream() -> ScriptedUpstream:
    return ScriptedUpstream()


@pytest.fixture(scope="module")
def gw(
    base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory, upstream: ScriptedUpstream
) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("attacks-on-sessions"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=QUIET, upstream=upstream) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def offer(gw: GatewayUnderTest) -> dict[str, Any]:
    return session_offer(httpx.get(gw.url + "/session"))


def get(gw: GatewayUnderTest, path: str, headers: dict[str, str], **params: Any) -> httpx.Response:
    return httpx.get(gw.url + path, headers=headers, params=params, timeout=60)


def reason_of(r: httpx.Response) -> str:
    doc = decode_header(r.headers["payment-required"]) if r.status_code == 402 else r.json()
    return str(doc["error"])


def receipt(r: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = decode_header(r.headers["payment-response"])
    return doc


def charged_of(r: httpx.Response) -> int:
    return int(receipt(r)["extra"]["channelState"]["chargedCumulativeAmount"])


def refused(
    gw: GatewayUnderTest,
    upstream: ScriptedUpstream,
    headers: dict[str, str],
    status: int,
    reason: str,
    path: str = "/session",
) -> httpx.Response:
    before = upstream.count()
    r = get(gw, path, headers)
    assert r.status_code == status, (r.status_code, r.headers, r.text[:400])
    assert reason_of(r) == reason, (r.status_code, r.headers, r.text[:400])
    assert upstream.count() == before  # nothing reached the upstream
    return r


def served(gw: GatewayUnderTest, upstream: ScriptedUpstream, headers: dict[str, str], cumulative: int) -> None:
    before = upstream.count()
    r = get(gw, "/session", headers)
    assert r.status_code == 200, r.text[:400]
    assert charged_of(r) == cumulative
    assert upstream.count() == before + 1


def open_channel(
    gw: GatewayUnderTest, chain: DevChain, offer: dict[str, Any], deposit: int = MIN_DEPOSIT, **overrides: Any
) -> CraftedChannel:
    """A fresh payer's channel holding ``deposit``, one request charged (cumulative ``PRICE``)."""
    ch = CraftedChannel.from_offer(chain.new_payer(1_000_000), offer, **overrides)
    r = get(gw, "/session", ch.header(ch.deposit(deposit, voucher_max=PRICE)))
    assert r.status_code == 200, r.text
    return ch


def envelope(payload: dict[str, Any], accepted: dict[str, Any], version: int = 2) -> str:
    return encode_header({"x402Version": version, "accepted": accepted, "payload": payload})


# ------------------------------------------------------------------------------------- one proof, two ways


def test_a_voucher_presented_under_x_payment_or_in_a_v1_envelope_buys_nothing_and_stays_good(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer)
    payload = ch.paying(2 * PRICE)
    v2 = envelope(payload, offer)
    refused(gw, upstream, {"X-PAYMENT": v2}, 402, reasons.UNSUPPORTED_SCHEME)
    v1 = encode_header({"x402Version": 1, "scheme": "batch-settlement", "network": "base", "payload": payload})
    refused(gw, upstream, {"X-PAYMENT": v1}, 402, reasons.UNSUPPORTED_SCHEME)
    refused(gw, upstream, {"PAYMENT-SIGNATURE": v1}, 402, reasons.UNSUPPORTED_SCHEME)
    refused(gw, upstream, {"PAYMENT-SIGNATURE": envelope(payload, offer, 1)}, 402, reasons.UNSUPPORTED_VERSION)
    # none of that charged anything: the voucher is still the next one, once
    served(gw, upstream, {"PAYMENT-SIGNATURE": v2}, 2 * PRICE)
    refused(gw, upstream, {"X-PAYMENT": v2}, 402, reasons.UNSUPPORTED_SCHEME)
    refused(gw, upstream, {"PAYMENT-SIGNATURE": v2}, 402, reasons.SESSION_CUMULATIVE_MISMATCH)


def test_an_exact_payment_and_a_voucher_on_one_request_pay_once(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer)
    exact_payer = base_chain.new_payer(1_000_000)
    name, exact = gw.sign(exact_payer, httpx.get(gw.url + "/session"))
    assert name == "PAYMENT-SIGNATURE"
    voucher = ch.header(ch.paying(2 * PRICE))["PAYMENT-SIGNATURE"]
    # the session under PAYMENT-SIGNATURE, an exact authorization under X-PAYMENT: the session pays, exact is unused
    served(gw, upstream, {"PAYMENT-SIGNATURE": voucher, "X-PAYMENT": exact}, 2 * PRICE)
    assert base_chain.balance(exact_payer.address) == 1_000_000
    # the other way round: exact pays, the voucher is not charged (the channel's next voucher is still 3 * PRICE)
    before = upstream.count()
    later = ch.header(ch.paying(3 * PRICE))["PAYMENT-SIGNATURE"]
    r = get(gw, "/session", {"PAYMENT-SIGNATURE": exact, "X-PAYMENT": later})
    assert r.status_code == 200 and upstream.count() == before + 1
    assert base_chain.balance(exact_payer.address) == 1_000_000 - PRICE
    served(gw, upstream, {"PAYMENT-SIGNATURE": later}, 3 * PRICE)


def test_the_accepted_copy_never_sets_the_terms(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    """``accepted`` is the client's echo: a lower amount, another payTo or asset in it changes nothing; the
    voucher's step is the route's price and its channel's terms are checked against ours."""
    ch = open_channel(gw, base_chain, offer)
    cheap = {**offer, "amount": "1", "payTo": other_account().address, "asset": other_account().address}
    r = refused(
        gw,
        upstream,
        {"PAYMENT-SIGNATURE": envelope(ch.paying(PRICE + 1), cheap)},
        402,
        reasons.SESSION_CUMULATIVE_MISMATCH,
    )
    assert int(corrective(r)["channelState"]["chargedCumulativeAmount"]) == PRICE
    served(gw, upstream, {"PAYMENT-SIGNATURE": envelope(ch.paying(2 * PRICE), cheap)}, 2 * PRICE)
    other_network = {**offer, "network": "eip155:137"}
    refused(
        gw,
        upstream,
        {"PAYMENT-SIGNATURE": envelope(ch.paying(3 * PRICE), other_network)},
        402,
        reasons.NETWORK_MISMATCH,
    )
    served(gw, upstream, ch.header(ch.paying(3 * PRICE)), 3 * PRICE)


# ------------------------------------------------------------------------------------------------ vouchers


@pytest.mark.parametrize("off_by", [-1, 1])
def test_a_voucher_one_unit_off_the_price_gets_the_corrective_402(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream, off_by: int
) -> None:
    ch = open_channel(gw, base_chain, offer)
    r = refused(gw, upstream, ch.header(ch.paying(2 * PRICE + off_by)), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    assert int(corrective(r)["channelState"]["chargedCumulativeAmount"]) == PRICE
    served(gw, upstream, ch.header(ch.paying(2 * PRICE)), 2 * PRICE)


def test_one_amount_in_any_accepted_encoding_is_one_voucher(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer)
    payload = ch.paying(2 * PRICE)
    as_int = {**payload, "voucher": {**payload["voucher"], "maxClaimableAmount": 2 * PRICE}}
    padded = {**payload, "voucher": {**payload["voucher"], "maxClaimableAmount": "000" + str(2 * PRICE)}}
    upper = {
        **payload,
        "voucher": {**payload["voucher"], "signature": payload["voucher"]["signature"].upper().replace("0X", "0x")},
    }
    served(gw, upstream, ch.header(padded), 2 * PRICE)
    for again in (payload, as_int, padded, upper):
        refused(gw, upstream, ch.header(again), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    for value in (
        hex(3 * PRICE),
        "3e3",
        "3000.0",
        3000.0,
        "-3000",
        " 3000",
        "3000 ",
        "\uff13\uff10\uff10\uff10",
        str(2**128),
    ):
        bad = {**payload, "voucher": {**payload["voucher"], "maxClaimableAmount": value}}
        refused(gw, upstream, ch.header(bad), 400, reasons.INVALID_PAYMENT_HEADER)
    for value in (str(2**53), str(2**128 - 1)):  # well-formed, beyond what a channel can hold here
        huge = ch.paying(int(value))
        refused(gw, upstream, ch.header(huge), 402, reasons.SESSION_VOUCHER_PAYLOAD)
    served(gw, upstream, ch.header(ch.paying(3 * PRICE)), 3 * PRICE)


def test_a_voucher_signed_by_the_payer_when_an_authorizer_is_named_buys_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    session_key = Account.create()
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), offer, payer_authorizer=session_key.address)
    deposit = ch.deposit(MIN_DEPOSIT, voucher_max=PRICE)  # its voucher signed by the payer, not the authorizer
    refused(gw, upstream, ch.header(deposit), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    assert ch.onchain(base_chain).balance == 0  # refused before anything was deposited
    deposit["voucher"] = ch.voucher(PRICE, signer=session_key)
    assert get(gw, "/session", ch.header(deposit)).status_code == 200
    refused(gw, upstream, ch.header(ch.paying(2 * PRICE)), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    served(gw, upstream, ch.header(ch.paying(2 * PRICE, signer=session_key)), 2 * PRICE)
    # and the other way round: the payer is its own authorizer; a session key's voucher is no one's
    own = open_channel(gw, base_chain, offer)
    refused(gw, upstream, own.header(own.paying(2 * PRICE, signer=session_key)), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    served(gw, upstream, own.header(own.paying(2 * PRICE)), 2 * PRICE)


def test_a_voucher_or_channel_of_another_chain_buys_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer)
    # the same channel's voucher signed under another chain id's domain: not the payer's signature here
    polygon = CraftedChannel.from_offer(ch.payer, {**offer, "network": "eip155:137"}, salt=ch.salt)
    crossed = polygon.paying(2 * PRICE, channel_id=ch.id)
    refused(gw, upstream, ch.header(crossed), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    # the channel as it is on the other chain (its own id there), presented for this network
    refused(gw, upstream, ch.header(polygon.paying(2 * PRICE)), 402, reasons.SESSION_CHANNEL_ID_MISMATCH)
    served(gw, upstream, ch.header(ch.paying(2 * PRICE)), 2 * PRICE)


# ------------------------------------------------------------------------------------------------ deposits


def test_one_deposit_authorization_sent_twice_at_once_deposits_once(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    headers = ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=PRICE))
    before = upstream.count()
    from tests.support.concurrency import fire_together

    answers = fire_together(gw.url, "GET", "/session", headers, 6)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [402] * 5, [(r.status_code, r.text[:200]) for r in answers]
    assert {reason_of(r) for r in answers if r.status_code == 402} <= {
        reasons.SESSION_CHANNEL_BUSY,
        reasons.SESSION_CUMULATIVE_MISMATCH,
    }
    assert upstream.count() == before + 1
    assert base_chain.balance(payer.address) == 1_000_000 - MIN_DEPOSIT
    assert ch.onchain(base_chain).balance == MIN_DEPOSIT
    served(gw, upstream, ch.header(ch.paying(2 * PRICE)), 2 * PRICE)


def test_a_deposit_authorization_for_another_amount_or_channel_deposits_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    other = CraftedChannel.from_offer(payer, offer)  # the same payer's other channel
    more = ch.authorization(MIN_DEPOSIT)
    more["amount"] = str(10 * MIN_DEPOSIT)  # signed for MIN_DEPOSIT
    refused(gw, upstream, ch.header(ch.deposit_with(more, voucher_max=PRICE)), 402, reasons.SESSION_DEPOSIT_SIGNATURE)
    theirs = other.authorization(MIN_DEPOSIT)  # bound to the other channel by its nonce
    refused(gw, upstream, ch.header(ch.deposit_with(theirs, voucher_max=PRICE)), 402, reasons.SESSION_DEPOSIT_SIGNATURE)
    assert base_chain.balance(payer.address) == 1_000_000
    # an amount no channel here can hold is refused as the deposit's fault (the voucher is fine)
    for amount in (2**53, 2**128 - 1):
        huge = ch.deposit(amount, voucher_max=PRICE)
        refused(gw, upstream, ch.header(huge), 402, reasons.SESSION_DEPOSIT_PAYLOAD)
    # a far-future validBefore is the payer's choice: it only ever credits this channel, once
    far = ch.deposit(MIN_DEPOSIT, voucher_max=PRICE, valid_before=2**48)
    assert get(gw, "/session", ch.header(far)).status_code == 200
    assert base_chain.balance(payer.address) == 1_000_000 - MIN_DEPOSIT


def test_a_deposit_into_a_channel_being_withdrawn_is_refused_before_it_is_sent(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    """Within ``withdraw_margin`` of a withdrawal's end the channel takes no new charge: a deposit sent for such a
    request would be gas we pay for a refusal, and a cooperative refund of it more gas, again and again, for a
    payer who is never charged. The deposit is refused before anything is sent."""
    ch = open_channel(gw, base_chain, offer)
    receipt_ = ch.call_as_payer(base_chain, "initiateWithdraw", MIN_DEPOSIT - PRICE)
    assert int(receipt_["status"], 16) == 1
    payer_before, txs = base_chain.balance(ch.payer.address), relayer_nonce(base_chain)
    top_up = ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=2 * PRICE))
    refused(gw, upstream, top_up, 402, reasons.SESSION_WITHDRAWING)
    assert relayer_nonce(base_chain) == txs  # no deposit sent
    assert base_chain.balance(ch.payer.address) == payer_before
    refused(gw, upstream, ch.header(ch.paying(2 * PRICE)), 402, reasons.SESSION_WITHDRAWING)


# ------------------------------------------------------------------------------------------------- refunds


def refund(gw: GatewayUnderTest, ch: CraftedChannel, charged: int, amount: int | None = None) -> httpx.Response:
    return get(gw, "/session", ch.header(ch.refund(charged, amount)))


def test_a_refund_moves_the_unclaimed_remainder_once_and_is_never_counted_again(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer, deposit=3 * MIN_DEPOSIT)
    served(gw, upstream, ch.header(ch.paying(2 * PRICE)), 2 * PRICE)
    payer = base_chain.balance(ch.payer.address)
    before = upstream.count()
    r = refund(gw, ch, 2 * PRICE, MIN_DEPOSIT)  # a partial refund first
    assert r.status_code == 200, r.text
    assert receipt(r)["amount"] == str(MIN_DEPOSIT)
    r = refund(gw, ch, 2 * PRICE)  # then the rest
    assert r.status_code == 200, r.text
    assert receipt(r)["amount"] == str(2 * MIN_DEPOSIT - 2 * PRICE)
    assert upstream.count() == before  # a refund never reaches the upstream
    assert base_chain.balance(ch.payer.address) == payer + 3 * MIN_DEPOSIT - 2 * PRICE
    state = ch.onchain(base_chain)
    assert (state.balance, state.total_claimed) == (2 * PRICE, 2 * PRICE)
    txs = relayer_nonce(base_chain)
    # again, in every form: nothing is left to refund, and no transaction is sent for it
    refused(gw, upstream, ch.header(ch.refund(2 * PRICE)), 402, reasons.SESSION_REFUND_NO_BALANCE)
    refused(gw, upstream, ch.header(ch.refund(2 * PRICE, PRICE)), 402, reasons.SESSION_REFUND_NO_BALANCE)
    refused(gw, upstream, ch.header(ch.refund(PRICE)), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    # vouchers that count the refunded money again, or replay an old one
    refused(gw, upstream, ch.header(ch.paying(3 * PRICE)), 402, reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE)
    refused(gw, upstream, ch.header(ch.paying(2 * PRICE)), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    assert relayer_nonce(base_chain) == txs
    assert base_chain.balance(ch.payer.address) == payer + 3 * MIN_DEPOSIT - 2 * PRICE
    # the channel goes on after a new deposit, from what was charged
    r = get(gw, "/session", ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=3 * PRICE)))
    assert r.status_code == 200 and charged_of(r) == 3 * PRICE


def test_a_refund_waits_for_the_request_in_flight_and_returns_what_that_one_left(
    gw: GatewayUnderTest, base_chain: DevChain, offer: dict[str, Any], upstream: ScriptedUpstream
) -> None:
    ch = open_channel(gw, base_chain, offer)
    upstream.entered.clear()
    upstream.release.clear()
    slow: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: slow.append(get(gw, "/slow", ch.header(ch.paying(2 * PRICE)))))
    worker.start()
    try:
        assert upstream.entered.wait(30)
        payer = base_chain.balance(ch.payer.address)
        refused(gw, upstream, ch.header(ch.refund(PRICE)), 402, reasons.SESSION_CHANNEL_BUSY)
        refused(gw, upstream, ch.header(ch.refund(2 * PRICE)), 402, reasons.SESSION_CHANNEL_BUSY)
        assert base_chain.balance(ch.payer.address) == payer
    finally:
        upstream.release.set()
        worker.join(60)
    assert slow[0].status_code == 200 and charged_of(slow[0]) == 2 * PRICE
    r = refund(gw, ch, 2 * PRICE)
    assert r.status_code == 200, r.text
    assert receipt(r)["amount"] == str(MIN_DEPOSIT - 2 * PRICE)
    assert base_chain.balance(ch.payer.address) == payer + MIN_DEPOSIT - 2 * PRICE


# ------------------------------------------------------------------------------------------------ metering


def metered_run(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: ScriptedUpstream, path: str, cases: list[tuple[Any, int]]
) -> None:
    """Each case: what the upstream reports (query parameters), and the charge it must cost. Every answer is
    served, charged exactly that (the ceiling at most), and the cumulative moves by exactly that."""
    offer = session_offer(httpx.get(gw.url + path))
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), offer)
    r = get(gw, path, ch.header(ch.deposit(100 * PRICE, voucher_max=PRICE)), **cases[0][0])
    charged = 0
    for n, (params, expected) in enumerate(cases):
        if n:
            r = get(gw, path, ch.header(ch.paying(charged + PRICE)), **params)
        assert r.status_code == 200, (params, r.status_code, r.text[:300])
        assert "x-usage-cost" not in r.headers
        doc = receipt(r)
        assert int(doc["extra"]["chargedAmount"]) == expected, params
        charged += expected
        assert int(doc["extra"]["channelState"]["chargedCumulativeAmount"]) == charged, params


def test_a_usage_header_is_charged_within_the_price_whatever_it_says(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: ScriptedUpstream
) -> None:
    cases: list[tuple[Any, int]] = [({"cost": "250"}, 250), ({"cost": "0"}, 0), ({"cost": "12.5"}, 13)]
    cases += [({"cost": v}, PRICE) for v in ("1000", "1001", "5000", str(10**40), "9" * 30 + "." + "9" * 30)]
    # unreadable reports charge the fallback (the ceiling here)
    bad = ("-5", "-0.5", "abc", "NaN", "nan", "Infinity", "-Infinity", "1e3", "1E-3", "0x10", "", "+5", "5 5", "\u0665")
    cases += [({"cost": v}, PRICE) for v in bad]
    cases += [({"cost": ["1", "2"]}, PRICE), ({"cost": ["7", "7"]}, PRICE), ({}, PRICE)]
    metered_run(gw, base_chain, upstream, "/metered-header", cases)


def test_a_usage_header_sent_by_the_client_is_never_read_nor_passed_to_the_upstream(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: ScriptedUpstream
) -> None:
    # Passed on, an upstream that echoes request headers into its answer would let the client name its own charge.
    before = len(upstream.seen)
    offer = session_offer(httpx.get(gw.url + "/metered-header"))
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), offer)
    headers = {**ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=PRICE)), "x-usage-cost": "1"}
    r = get(gw, "/metered-header", headers)  # the upstream reports nothing: the fallback, not the client's 1
    assert r.status_code == 200 and receipt(r)["extra"]["chargedAmount"] == str(PRICE)
    headers = {**ch.header(ch.paying(2 * PRICE)), "x-usage-cost": "1"}
    r = get(gw, "/metered-header", headers, cost="600")
    assert r.status_code == 200 and receipt(r)["extra"]["chargedAmount"] == "600"
    with upstream._lock:
        reached = [usage for path, _, usage in upstream.seen[before:] if path == "/metered-header"]
    assert len(reached) == 2 and reached == [[], []]


def test_a_usage_in_the_json_answer_is_charged_within_the_price_whatever_it_says(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: ScriptedUpstream
) -> None:
    cases: list[tuple[Any, int]] = [({"usage": "10"}, 10), ({"usage": "2.5"}, 3), ({"usage": "0"}, 0)]
    # above the price: the price, however large the number (an integer too large for a float included)
    cases += [({"usage": v}, PRICE) for v in ("1001", "1e300", "1" + "0" * 400, "9" * 4000)]
    # unreadable: the fallback (the ceiling here)
    bad = ("-3", "-1" + "0" * 400, '"10"', "NaN", "Infinity", "-Infinity", "1e400", "null", "true", "[10]", '{"n": 10}')
    cases += [({"usage": v}, PRICE) for v in bad]
    metered_run(gw, base_chain, upstream, "/metered-json", cases)


# ----------------------------------------------------------------------------------- restarts, claims, fleets


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_voucher_replayed_after_a_restart_or_a_claim_is_refused(
    base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    store_url = sqlite_url(tmp_path) if store == "sqlite" else str(request.getfixturevalue("redis_url"))
    claims = {**QUIET, "claim_interval": 0.2, "claim_after": 1.0, "settle_interval": 0.2}
    upstream = ScriptedUpstream()
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=QUIET, upstream=upstream) as gw:
        pay_to = gw.pay_to
        offer = session_offer(httpx.get(gw.url + "/session"))
        ch = open_channel(gw, base_chain, offer)
        last = ch.header(ch.paying(2 * PRICE))
        served(gw, upstream, last, 2 * PRICE)
    with running_gateway(
        base_chain, store_url=store_url, routes=ROUTES, sessions=claims, upstream=upstream, pay_to=pay_to
    ) as gw:
        for replay in (last, ch.header(ch.paying(PRICE)), ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=PRICE))):
            r = refused(gw, upstream, replay, 402, reasons.SESSION_CUMULATIVE_MISMATCH)
            assert int(corrective(r)["channelState"]["chargedCumulativeAmount"]) == 2 * PRICE
        deadline = time.monotonic() + 30
        while ch.onchain(base_chain).total_claimed != 2 * PRICE:  # the claimer claims what the last life charged
            assert time.monotonic() < deadline
            time.sleep(0.1)
        refused(gw, upstream, last, 402, reasons.SESSION_CUMULATIVE_MISMATCH)
        served(gw, upstream, ch.header(ch.paying(3 * PRICE)), 3 * PRICE)
        deadline = time.monotonic() + 30
        while base_chain.balance(pay_to) != 3 * PRICE:  # claimed and swept: exactly what was charged
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert upstream.count() == 3


FLEET_CONFIG = """
[upstream]
url = "{upstream}"
read_timeout = 60.0

[store]
url = "{store}"
heartbeat_seconds = 1.0

[payment]
pay_to = "{pay_to}"
relayer_key_env = "TEST_RELAYER_KEY"

[rate_limits]
enabled = false

[networks.base]
rpc_urls = ["{rpc}"]
receipt_poll_interval = 0.02

[sessions]
authorizer_key_env = "TEST_AUTHORIZER_KEY"
withdraw_delay = 900
min_deposit = "0.01"
claim_interval = 0.2
claim_after = 1.0
settle_interval = 0.2

[[routes]]
route = "GET /session"
price = "0.001"
schemes = ["batch-settlement"]

[[routes]]
route = "GET /metered-json"
price = "0.001"
schemes = ["batch-settlement"]
meter = {{ json = "usage.total_tokens", unit_price = "0.000001" }}
"""


@contextlib.contextmanager
def fleet(base_chain: DevChain, redis_url: str, tmp_path: Path, upstream: ScriptedUpstream, n: int) -> Iterator[Any]:
    """``n`` real ``x402-gateway serve`` processes on one Redis, each with a relayer of its own."""
    from gateway.dev.chain import set_eth_balance
    from tests.support.gateway import AUTHORIZER_KEY
    from tests.support.processes import serve_processes
    from tests.support.servers import serve_asgi

    pay_to = Account.create().address
    keys = []
    for _ in range(n):
        relayer = Account.create()
        set_eth_balance(base_chain.anvil, relayer.address, 10**19)
        keys.append(relayer.key.to_0x_hex())
    with serve_asgi(upstream) as upstream_url, pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_AUTHORIZER_KEY", AUTHORIZER_KEY)
        config = tmp_path / "gateway.toml"
        text = FLEET_CONFIG.format(upstream=upstream_url, store=redis_url, pay_to=pay_to, rpc=base_chain.url)
        config.write_text(text)
        with serve_processes(config, tmp_path / "logs", keys) as procs:
            yield pay_to, procs


def test_a_json_answer_nested_too_deep_to_parse_is_unreadable_usage_not_a_crash(
    base_chain: DevChain, redis_url: str, tmp_path: Path
) -> None:
    """The meter reads up to 1 MiB of the upstream's JSON. An answer nested 200,000 deep must not overflow the
    parser's stack (the process's recursion limit is raised by a dependency, so no RecursionError comes first): it
    is an unreadable usage (the fallback is charged), and the gateway lives on."""
    upstream = ScriptedUpstream()
    with fleet(base_chain, redis_url, tmp_path, upstream, 1) as (_, procs):
        url = procs[0].url + "/metered-json"
        ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), session_offer(httpx.get(url)))
        r = httpx.get(url, headers=ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=PRICE)), params={"usage": "7"})
        assert r.status_code == 200 and charged_of(r) == 7
        deep: httpx.Response | None = None
        with contextlib.suppress(httpx.HTTPError):  # a crashed gateway closes the connection: no answer
            deep = httpx.get(url, headers=ch.header(ch.paying(7 + PRICE)), params={"nest": 200_000}, timeout=60)
        assert deep is not None, f"no answer; the gateway's log ends:\n{procs[0].log.read_text()[-2000:]}"
        assert deep.status_code == 200, deep.text[:300]
        assert receipt(deep)["extra"]["chargedAmount"] == str(PRICE)  # the fallback: the ceiling
        r = httpx.get(url, headers=ch.header(ch.paying(7 + 2 * PRICE)), params={"usage": "3"}, timeout=60)
        assert r.status_code == 200 and charged_of(r) == 7 + PRICE + 3


def test_vouchers_refunds_and_claims_racing_on_two_processes_charge_and_refund_exactly(
    base_chain: DevChain, redis_url: str, tmp_path: Path
) -> None:
    """Two ``serve`` processes on one Redis, their claimers claiming as often as they can: rounds of the next voucher
    sent eight times at once through both, and, in the last rounds, full refunds racing those vouchers. Whatever
    wins each race: the upstream served exactly what was charged, one request per price, every refund returned
    exactly the unclaimed remainder once, and ``pay_to`` ends with exactly the sum charged."""
    from tests.support.concurrency import fire_together

    upstream = ScriptedUpstream()
    with fleet(base_chain, redis_url, tmp_path, upstream, 2) as (pay_to, procs):
        urls = [p.url for p in procs]
        offer = session_offer(httpx.get(urls[0] + "/session"))
        payer = base_chain.new_payer(1_000_000)
        ch = CraftedChannel.from_offer(payer, offer)
        deposit = 5 * MIN_DEPOSIT
        r = httpx.get(urls[1] + "/session", headers=ch.header(ch.deposit(deposit, voucher_max=PRICE)), timeout=60)
        assert r.status_code == 200, r.text
        charged, refunded = PRICE, 0
        for round_ in range(12):
            racing_refunds = round_ >= 6 and not refunded
            headers = [ch.header(ch.paying(charged + PRICE))] * (4 if racing_refunds else 8)
            headers += [ch.header(ch.refund(charged))] * (4 if racing_refunds else 0)
            answers = fire_together(urls, "GET", "/session", headers, len(headers))
            ok = [r for r in answers if r.status_code == 200]
            assert len(ok) <= 1, [(r.status_code, r.text[:200]) for r in answers]
            for r in answers:
                if r.status_code != 200:
                    assert r.status_code == 402, r.text[:300]
                    assert reason_of(r) in {
                        reasons.SESSION_CHANNEL_BUSY,
                        reasons.SESSION_CUMULATIVE_MISMATCH,
                        reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE,
                        reasons.SESSION_REFUND_NO_BALANCE,
                    }, reason_of(r)
            for r in ok:
                doc = receipt(r)
                if doc.get("transaction"):  # the refund won
                    assert int(doc["amount"]) == deposit - charged
                    refunded = int(doc["amount"])
                else:
                    charged += PRICE
                    assert int(doc["extra"]["channelState"]["chargedCumulativeAmount"]) == charged
            assert upstream.count() == charged // PRICE
        if not refunded:  # the vouchers won every race: the refund comes after them
            r = httpx.get(urls[0] + "/session", headers=ch.header(ch.refund(charged)), timeout=60)
            assert r.status_code == 200, r.text
            refunded = int(receipt(r)["amount"])
        assert refunded == deposit - charged
        for url in urls:  # nothing is left to refund, nor to pay with
            r = httpx.get(url + "/session", headers=ch.header(ch.refund(charged)), timeout=60)
            assert (r.status_code, reason_of(r)) == (402, reasons.SESSION_REFUND_NO_BALANCE)
            r = httpx.get(url + "/session", headers=ch.header(ch.paying(charged + PRICE)), timeout=60)
            assert (r.status_code, reason_of(r)) == (402, reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE)
        assert upstream.count() == charged // PRICE
        assert base_chain.balance(payer.address) == 1_000_000 - deposit + refunded
        deadline = time.monotonic() + 30
        while base_chain.balance(pay_to) != charged:
            assert time.monotonic() < deadline, (base_chain.balance(pay_to), charged)
            time.sleep(0.1)
        state = ch.onchain(base_chain)
        assert (state.balance, state.total_claimed) == (charged, charged)
