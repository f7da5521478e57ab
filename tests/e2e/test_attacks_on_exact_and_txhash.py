"""Attacks on the money invariant through the ``exact`` and tx-hash paths, as an outside acceptance run would try
them: a served request is paid exactly once, for ever, and nothing is served for free (docs/threat-model.md T1-T4,
T9, T13, T21, T26, T27, T30, T33, T34).

Real components only: anvil (the session Base chain), the receipt store on a SQLite file or a real redis-server,
gateways on real sockets. Each attack counts what matters: upstream calls, and the payer's and pay-to's balances.
"""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.dev.chain import DEV_KEYS, DevChain, RedisServer, send_transaction, set_eth_balance
from gateway.dev.contracts import deploy_contract
from gateway.x402 import reasons
from tests.e2e import craft
from tests.e2e.helpers import Balances, assert_402, decode_payment, error_of, receipt_of
from tests.support.gateway import GatewayUnderTest, running_gateway
from tests.support.processes import funded_relayer_keys
from tests.support.servers import raw_http
from tests.txhash.helpers import TRANSFER_SELECTOR, erc20_transfer, key_of, new_tx_payer, proof
from tests.txhash.helpers import pay as pay_on_chain

PRICE = 100_000
THIRD_PARTY_KEY = DEV_KEYS[5]
ROUTES: list[dict[str, Any]] = [
    {"route": "POST /paid", "price": "0.10", "settlement": "after", "tx_hash": True},
    {"route": "POST /paid-before", "price": "0.10", "settlement": "before", "tx_hash": True},
    {"route": "GET /item", "price": "0.10", "tx_hash": True},
]


@pytest.fixture
def gw(base_chain: DevChain, store_url: str) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES) as gw:
        yield gw


def forget(store_url: str, *prefixes: str) -> int:
    """Delete the receipt records whose keys start with one of ``prefixes``: the last writes a store failover lost
    (its identity marker, written long before, survives)."""
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            return sum(conn.execute("DELETE FROM receipts WHERE key LIKE ?", (p + "%",)).rowcount for p in prefixes)
    client = redis.Redis.from_url(store_url)
    try:
        keys = [k for p in prefixes for k in client.scan_iter(f"x402:{p}*")]
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def challenge(gw: GatewayUnderTest, method: str = "POST", path: str = "/paid") -> httpx.Response:
    response = httpx.request(method, gw.url + path, timeout=30)
    assert response.status_code == 402, response.text
    return response


def signed(gw: GatewayUnderTest, payer: Any, *, path: str = "/paid", method: str = "POST") -> tuple[str, str]:
    return gw.sign(payer, challenge(gw, method, path))


# ------------------------------------------------------------------------ one payment across gateways and stores


def test_a_payment_settled_by_one_instance_is_not_new_money_to_another_after_its_record_is_lost(
    base_chain: DevChain, redis_url: str
) -> None:
    # Two instances on one Redis, each with its own relayer key (as the README recommends). Instance A settles
    # and serves a payment; a failover then loses the last writes (its claim and effect records, not the store's
    # identity marker). Instance B must not take A's settlement for a third party's execution and serve again.
    # Failed before: B knew only its own relayer and served it (and A's settlement as a tx-hash proof) again; every
    # instance now records its relayers in the store (gateway/engine/relayers.py).
    key_a, key_b = funded_relayer_keys(base_chain, 2)
    payer = base_chain.new_payer(1_000_000)
    with (
        running_gateway(base_chain, store_url=redis_url, routes=ROUTES, relayer_key=key_a) as a,
        running_gateway(base_chain, store_url=redis_url, routes=ROUTES, relayer_key=key_b, pay_to=a.pay_to) as b,
    ):
        balances = Balances(a, payer.address)
        name, value = signed(a, payer)
        served = httpx.post(a.url + "/paid", headers={name: value}, timeout=30)
        assert served.status_code == 200, served.text
        assert forget(redis_url, "exact:", "tx:", "slot:") >= 1
        again = httpx.post(b.url + "/paid", headers={name: value}, timeout=30)
        assert_402(again, reasons.PAYMENT_ALREADY_USED)
        tx = receipt_of(served)["transaction"]
        as_proof = httpx.post(b.url + "/paid", headers=proof(b, payer, tx), timeout=30)
        assert_402(as_proof, reasons.PAYMENT_ALREADY_USED)
        assert len(a.upstream.requests) + len(b.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


# ------------------------------------------------------------------------------- one authorization, many spellings


def _sig_variants(signature: str) -> dict[str, str]:
    """The same (r, s) under another ``v`` spelling, and the EIP-2 twin (s' = n - s, v flipped): two signatures
    ecrecover maps to one signer. USDC refuses the high-s twin; either way it is the same authorization."""
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    raw = bytes.fromhex(signature[2:])
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    twin_s = (n - s).to_bytes(32, "big")
    twin_v = 55 - v if v >= 27 else 1 - v
    return {
        "v as 0/1": "0x" + (r + s.to_bytes(32, "big") + bytes([v - 27 if v >= 27 else v])).hex(),
        "high-s twin": "0x" + (r + twin_s + bytes([twin_v])).hex(),
    }


def _raw_doc(text: str) -> str:
    """A header value from JSON text written by hand (duplicate keys survive only this way)."""
    return base64.b64encode(text.encode()).decode("ascii")


def test_one_authorization_in_every_spelling_and_under_every_signature_pays_once(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    name, value = signed(gw, payer)
    auth, sig, doc = decode_payment(value)
    v1 = craft.v1_envelope(auth, sig)
    served = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": craft.encode(v1)}, timeout=30)
    assert served.status_code == 200, served.text
    mixed_case = {**auth, "from": payer.address.lower(), "to": gw.pay_to.upper().replace("0X", "0x")}
    spellings: dict[str, dict[str, str]] = {
        "v2 header": {name: value},
        "v1 document, url-safe, unpadded": {"X-PAYMENT": craft.encode(v1, urlsafe=True, padding=False)},
        "pretty JSON, keys reversed": {name: craft.encode(craft.reversed_keys(doc), compact=False)},
        "mixed-case addresses": {"X-PAYMENT": craft.encode(craft.v1_envelope(mixed_case, sig))},
        "numbers as JSON numbers": {
            "X-PAYMENT": craft.encode(
                craft.v1_envelope({**auth, **{k: int(auth[k]) for k in ("value", "validAfter", "validBefore")}}, sig)
            )
        },
        "both headers, same payment": {name: value, "X-PAYMENT": craft.encode(v1)},
    }
    for label, spelled in _sig_variants(sig).items():
        spellings[label] = {"X-PAYMENT": craft.encode(craft.v1_envelope(auth, spelled))}
    for label, headers in spellings.items():
        again = httpx.post(gw.url + "/paid", headers=headers, timeout=30)
        assert again.status_code == 402, (label, again.status_code, again.text)
        assert error_of(again) == reasons.PAYMENT_ALREADY_USED, (label, again.text)
    # The same price on another route, another method: the money is the key, not the request.
    for method, path in (("POST", "/paid-before"), ("GET", "/item"), ("HEAD", "/item")):
        again = httpx.request(method, gw.url + path, headers={name: value}, timeout=30)
        assert again.status_code == 402, (method, path, again.status_code)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_a_high_s_twin_is_refused_unspent_and_v_as_0_or_1_settles(gw: GatewayUnderTest, base_chain: DevChain) -> None:
    # USDC refuses high-s signatures on chain, so the gateway does too, before anything moves; v = 0/1 is
    # normalised to 27/28 in the settlement, so it settles.
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    auth = craft.authorization(payer.address, gw.pay_to, PRICE)
    sig = craft.sign_for(payer, auth, base_chain)
    variants = _sig_variants(sig)
    twin = httpx.post(
        gw.url + "/paid", headers={"X-PAYMENT": craft.encode(craft.v1_envelope(auth, variants["high-s twin"]))}
    )
    assert_402(twin, reasons.INVALID_SIGNATURE)
    balances.assert_unchanged()
    low_v = craft.encode(craft.v1_envelope(auth, variants["v as 0/1"]))
    served = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": low_v}, timeout=30)
    assert served.status_code == 200, served.text
    again = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": craft.encode(craft.v1_envelope(auth, sig))})
    assert_402(again, reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_duplicate_json_keys_are_read_one_way_by_every_layer(gw: GatewayUnderTest, base_chain: DevChain) -> None:
    # The document is parsed once; the last of two equal keys wins, for the checks, the claim key and the
    # settlement alike: a value that says one amount to one layer and another to the next cannot exist.
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    auth = craft.authorization(payer.address, gw.pay_to, PRICE)
    sig = craft.sign_for(payer, auth, base_chain)

    def document(value_keys: str) -> str:
        rest = ",".join(f'"{k}":"{auth[k]}"' for k in ("from", "to", "validAfter", "validBefore", "nonce"))
        head = '{"x402Version":1,"scheme":"exact","network":"base","payload":{"signature":"' + sig + '",'
        return _raw_doc(head + '"authorization":{' + rest + "," + value_keys + "}}}")

    cheap_last = httpx.post(
        gw.url + "/paid", headers={"X-PAYMENT": document(f'"value":"{PRICE}","value":"1"')}, timeout=30
    )
    assert_402(cheap_last, reasons.VALUE_MISMATCH)
    balances.assert_unchanged()
    price_last = httpx.post(
        gw.url + "/paid", headers={"X-PAYMENT": document(f'"value":"1","value":"{PRICE}"')}, timeout=30
    )
    assert price_last.status_code == 200, price_last.text
    again = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": craft.encode(craft.v1_envelope(auth, sig))})
    assert_402(again, reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_two_different_payments_on_one_request_charge_only_the_one_that_is_read(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    # PAYMENT-SIGNATURE is read first; the X-PAYMENT beside it is neither charged nor consumed.
    first, second = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    b1, b2 = Balances(gw, first.address), Balances(gw, second.address)
    name, value = signed(gw, first)
    _, other = gw.sign(second, challenge(gw), version=1)
    served = httpx.post(gw.url + "/paid", headers={name: value, "X-PAYMENT": other}, timeout=30)
    assert served.status_code == 200, served.text
    assert receipt_of(served)["payer"].lower() == first.address.lower()
    assert (b1.moved()[0], b2.moved()[0]) == (PRICE, 0)
    later = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": other}, timeout=30)
    assert later.status_code == 200, later.text
    assert len(gw.upstream.requests) == 2
    assert b2.moved()[0] == PRICE


# ------------------------------------------------------------------------ one transfer, exact and by its hash


MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11"


def _multicall(calls: list[tuple[str, bytes]]) -> bytes:

    selector = keccak(text="aggregate3((address,bool,bytes)[])")[:4]
    return selector + abi_encode(["(address,bool,bytes)[]"], [[(to, False, data) for to, data in calls]])


def test_a_third_partys_multicall_batch_pays_each_authorization_once_and_only_to_its_payer(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:

    b, c = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    paid: dict[str, tuple[str, str]] = {}
    calls = []
    for who in (b, c):
        name, value = signed(gw, who)
        auth, sig, _ = decode_payment(value)
        paid[who.address] = (name, value)
        calls.append((base_chain.usdc, craft.transfer_with_authorization_calldata(auth, sig)))
    before = gw.balance(gw.pay_to)
    receipt = send_transaction(base_chain.anvil, THIRD_PARTY_KEY, MULTICALL3, _multicall(calls))
    tx = str(receipt["transactionHash"])
    assert gw.balance(gw.pay_to) - before == 2 * PRICE
    stranger = new_tx_payer(base_chain, 0)
    assert_402(httpx.post(gw.url + "/paid", headers=proof(gw, stranger, tx), timeout=30), reasons.BINDING_MISMATCH)
    assert_402(httpx.post(gw.url + "/paid", headers=proof(gw, c, tx), timeout=30), reasons.BINDING_MISMATCH)
    for who in (b, c):
        name, value = paid[who.address]
        served = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert served.status_code == 200, served.text
    # The proof names the batch's first transfer to us (B's): B's, already paid as B's authorization.
    assert_402(httpx.post(gw.url + "/paid", headers=proof(gw, b, tx), timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 2
    assert gw.balance(gw.pay_to) - before == 2 * PRICE


ECHO_RUNTIME = bytes.fromhex("366000600037366000f3")  # return(calldata): answers every call with its own input


def test_a_contracts_transfer_is_not_vouched_for_by_a_fallback_that_echoes_the_call(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    # A contract paid pay_to. Its fallback answers any call with the call's own bytes, so isValidSignature's answer
    # starts with isValidSignature's selector, the ERC-1271 magic value, without any check. The USDC contract (and
    # OpenZeppelin's SignatureChecker) compare the whole returned word; so must the gateway, or anyone can spend
    # such a contract's transfer with a binding of their own.

    contract = Account.create().address
    funder = new_tx_payer(base_chain)
    erc20_transfer(base_chain, funder, contract, PRICE)
    base_chain.rpc("anvil_setBalance", [contract, hex(10**18)])
    base_chain.rpc("anvil_impersonateAccount", [contract])
    try:
        data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [gw.pay_to, PRICE])
        tx = base_chain.rpc(
            "eth_sendTransaction", [{"from": contract, "to": base_chain.usdc, "data": "0x" + data.hex()}]
        )
    finally:
        base_chain.rpc("anvil_stopImpersonatingAccount", [contract])
    base_chain.rpc("anvil_setCode", [contract, "0x" + ECHO_RUNTIME.hex()])
    thief = new_tx_payer(base_chain, 0)
    stolen = httpx.post(gw.url + "/paid", headers=proof(gw, thief, tx), timeout=30)
    assert_402(stolen, reasons.BINDING_MISMATCH)
    # The same contract named as an authorization's payer: refused for its signature, as the token would.
    base_chain.mint(contract, PRICE)
    auth = craft.authorization(contract, gw.pay_to, PRICE)
    forged = craft.encode(craft.v1_envelope(auth, craft.sign_for(thief, auth, base_chain)))
    assert_402(httpx.post(gw.url + "/paid", headers={"X-PAYMENT": forged}, timeout=30), reasons.INVALID_SIGNATURE)
    assert gw.upstream.requests == []


def test_a_genuine_contract_wallet_still_pays_by_authorization_and_by_transfer(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    # The other side of the check above: a wallet whose isValidSignature returns the magic value is believed.

    owner = new_tx_payer(base_chain, 0)
    wallet = deploy_contract(base_chain.anvil, "TestWallet1271", ["address"], [owner.address])
    base_chain.mint(wallet, 1_000_000)
    set_eth_balance(base_chain.anvil, owner.address, 10**18)
    balances = Balances(gw, wallet)
    auth = craft.authorization(wallet, gw.pay_to, PRICE)
    by_authorization = craft.encode(craft.v1_envelope(auth, craft.sign_for(owner, auth, base_chain)))
    served = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": by_authorization}, timeout=30)
    assert served.status_code == 200, served.text
    transfer = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [gw.pay_to, PRICE])
    execute = keccak(text="execute(address,uint256,bytes)")[:4] + abi_encode(
        ["address", "uint256", "bytes"], [base_chain.usdc, 0, transfer]
    )
    tx = str(send_transaction(base_chain.anvil, key_of(owner), wallet, execute)["transactionHash"])
    served = httpx.post(gw.url + "/paid", headers=proof(gw, owner, tx), timeout=30)
    assert served.status_code == 200, served.text
    assert_402(httpx.post(gw.url + "/paid", headers=proof(gw, owner, tx), timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 2
    balances.assert_charged_once(2 * PRICE)


# --------------------------------------------------------------------------- the request that the payment buys


def test_every_spelling_of_a_priced_path_or_method_is_priced_and_reaches_nothing_unpaid(gw: GatewayUnderTest) -> None:
    for path in ("/item", "/item/", "//item", "/Item", "/ITEM", "/%69tem", "/item;x=1", "/item?x=1", "/./item",
                 "/x/../item"):  # fmt: skip
        for method in ("GET", "HEAD"):
            response = httpx.request(method, gw.url + path, timeout=30)
            assert response.status_code in (400, 402), (method, path, response.status_code)
    for line in (b"get /item HTTP/1.1", b"GET  /item HTTP/1.1", b"GET /item  HTTP/1.1", b"Get /item HTTP/1.1"):
        status, _, _ = raw_http(gw.url, line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert status in (0, 400, 402), (line, status)
    assert gw.upstream.requests == []


def test_idempotency_keys_never_make_one_payment_buy_two_answers(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, idempotency={"enabled": True}) as gw:
        balances = Balances(gw, payer.address)
        name, value = signed(gw, payer)
        auth, sig, _ = decode_payment(value)
        first = httpx.post(gw.url + "/paid", headers={name: value, "Idempotency-Key": "k1"}, timeout=30)
        assert first.status_code == 200, first.text
        replayed = httpx.post(gw.url + "/paid", headers={name: value, "Idempotency-Key": "k1"}, timeout=30)
        assert replayed.headers.get("idempotent-replayed") == "true"
        reencoded = craft.encode(craft.v1_envelope(auth, sig))
        for headers in (
            {name: value, "Idempotency-Key": "k2"},  # another key, the same payment
            {"X-PAYMENT": reencoded, "Idempotency-Key": "k1"},  # the same key, the payment spelled otherwise
        ):
            assert_402(httpx.post(gw.url + "/paid", headers=headers, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_a_redis_that_restarted_empty_serves_no_proof_again_before_the_next_heartbeat(base_chain: DevChain) -> None:
    # docs/threat-model.md T30: Redis restarts without persistence while the gateway runs. The identity check runs
    # with the heartbeat (here: rarely); a payment presented again in between must not find a store that forgot it.

    server = RedisServer(persistent=False)
    server.start()
    try:
        with running_gateway(base_chain, store_url=server.url, routes=ROUTES, store={"heartbeat_seconds": 300}) as gw:
            payer, tx = pay_on_chain(base_chain, gw)
            served = httpx.post(gw.url + "/paid", headers=proof(gw, payer, tx), timeout=30)
            assert served.status_code == 200, served.text
            server.stop()
            server.start()
            again = httpx.post(gw.url + "/paid", headers=proof(gw, payer, tx), timeout=30)
            assert again.status_code == 503, (again.status_code, again.text)
            assert error_of(again) == reasons.STORE_IDENTITY_LOST
            assert len(gw.upstream.requests) == 1
    finally:
        server.cleanup()
