"""A receipt store that cannot answer fails closed: 503, nothing served, nothing charged (docs/threat-model.md T17).

Redis: stopped mid-test (after the gateway started, or in the middle of a paid request) -> 503
``store_unavailable``; restarted -> the same payment works exactly once, at once (an interrupted request's claim
outcome is applied as soon as Redis answers: gateway/engine/deferred.py), and money moves at most once.

SQLite: an unusable store file is refused at start-up (the gateway never listens, so it can never serve a request
it cannot record); a store file corrupted under a running gateway -> 503 at request time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain, RedisServer
from gateway.errors import StoreUnavailable
from gateway.http.app import build_app
from gateway.x402 import reasons
from tests.e2e.helpers import (
    Balances,
    HookedUpstream,
    RpcTap,
    assert_402,
    assert_error,
    authorization_used,
    decode_payment,
    receipt_of,
)
from tests.support.gateway import GatewayUnderTest, gateway_config, running_gateway
from tests.support.servers import Behaviour, serve_asgi

PRICE = 100_000


def pay(gw: GatewayUnderTest, payer: Any, path: str) -> tuple[str, str]:
    challenge = httpx.post(gw.url + path)
    assert challenge.status_code == 402
    return gw.sign(payer, challenge)


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_redis_stopped_is_503_nothing_served_nothing_charged_then_the_payment_works_once(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str, path: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=redis_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, path)
        redis_server.stop()
        try:
            for _ in range(2):
                down = httpx.post(gw.url + path, headers={name: value}, timeout=30)
                assert_error(down, 503, "store_unavailable")
                assert down.headers.get("retry-after")
            # The unpaid challenge needs no store: clients can still learn the price.
            assert httpx.post(gw.url + path).status_code == 402
            assert gw.upstream.requests == []
            balances.assert_unchanged()
            assert not authorization_used(base_chain, payer.address, decode_payment(value)[0]["nonce"])
        finally:
            redis_server.start()
        ok = httpx.post(gw.url + path, headers={name: value}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert receipt_of(ok)["success"] is True
        assert_402(httpx.post(gw.url + path, headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_redis_stopped_while_upstream_works_is_503_never_charged_and_once_back_the_payment_works_once(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str
) -> None:
    # The claim is taken, then Redis dies while the upstream answers. Settlement must be recorded before it is
    # broadcast, so it cannot happen: the client gets a 503 and not the content; no money moves. The claim could
    # not be released then; it is released as soon as Redis is back (gateway/engine/deferred.py), so the very next
    # presentation of the same payment is served once, and not "in flight" until the claim's lease lapses.
    payer = base_chain.new_payer(1_000_000)
    upstream = HookedUpstream(behaviour=Behaviour(body=b"SECRET CONTENT"))
    with running_gateway(base_chain, store_url=redis_url, upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid")
        upstream.on_request = redis_server.stop
        try:
            response = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
            assert_error(response, 503, "store_unavailable")
            assert b"SECRET CONTENT" not in response.content
            assert len(gw.upstream.requests) == 1
            balances.assert_unchanged()
            assert not authorization_used(base_chain, payer.address, decode_payment(value)[0]["nonce"])
        finally:
            redis_server.start()
        retry = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert retry.status_code == 200, retry.text
        assert retry.content == b"SECRET CONTENT"
        assert_402(httpx.post(gw.url + "/paid", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 2
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_redis_stopped_as_the_settlement_leaves_is_503_and_once_back_the_payment_is_served_without_paying_again(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str, path: str
) -> None:
    # Redis dies between recording the settlement's hash and hearing it was mined: the money moves, the store
    # cannot say so, the client gets a 503 and not the content. Once Redis is back the payment is recorded as
    # paid-but-unserved, and the same payment is served (once) without moving money again.
    payer = base_chain.new_payer(1_000_000)
    tap = RpcTap(base_chain.url)
    upstream = HookedUpstream(behaviour=Behaviour(body=b"SECRET CONTENT"))
    with serve_asgi(tap) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(base_chain, store_url=redis_url, upstream=upstream, networks=networks) as gw:
            balances = Balances(gw, payer.address)
            name, value = pay(gw, payer, path)
            tap.before_broadcast = redis_server.stop
            try:
                response = httpx.post(gw.url + path, headers={name: value}, timeout=30)
                assert_error(response, 503, "store_unavailable")
                assert b"SECRET CONTENT" not in response.content
                assert authorization_used(base_chain, payer.address, decode_payment(value)[0]["nonce"])
                balances.assert_charged_once(PRICE)
            finally:
                redis_server.start()
            served_before = len(gw.upstream.requests)
            retry = httpx.post(gw.url + path, headers={name: value}, timeout=30)
            assert retry.status_code == 200, retry.text
            assert retry.content == b"SECRET CONTENT"
            assert receipt_of(retry)["success"] is True
            assert_402(httpx.post(gw.url + path, headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
            assert len(gw.upstream.requests) == served_before + 1
            assert tap.transactions_broadcast() == 1
            balances.assert_charged_once(PRICE)


# uvicorn's server thread ends with SystemExit(3) on a failed lifespan start-up: that is the behaviour under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_sqlite_store_path_that_is_a_directory_fails_at_start_up(base_chain: DevChain, tmp_path: Path) -> None:
    # Documented choice: an unusable SQLite store stops the gateway from starting (it never listens), rather than
    # answering 503 to every paid request.
    store_dir = tmp_path / "receipts.db"
    store_dir.mkdir()
    with (
        pytest.raises(RuntimeError, match="did not start"),
        running_gateway(base_chain, store_url=f"sqlite:///{store_dir}"),
    ):
        pytest.fail("the gateway started on a store it cannot use")


@pytest.mark.parametrize("content", [b"this is not a database" * 200, b""], ids=["garbage", "directory"])
async def test_sqlite_store_unusable_raises_store_unavailable_at_start_up(
    base_chain: DevChain, tmp_path: Path, content: bytes
) -> None:
    target = tmp_path / "receipts.db"
    if content:
        target.write_bytes(content)
    else:
        target.mkdir()
    config = gateway_config(
        [base_chain], upstream_url="http://127.0.0.1:9", store_url=f"sqlite:///{target}", pay_to="0x" + "11" * 20
    )
    app = build_app(config)
    with pytest.raises(StoreUnavailable) as caught:
        await app.startup()
    assert caught.value.reason == "store_unavailable"
    assert caught.value.status == 503
    await app.shutdown()


def test_sqlite_store_corrupted_under_a_running_gateway_is_503(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    db = tmp_path / "receipts.db"
    with running_gateway(base_chain, store_url=f"sqlite:///{db}") as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid")
        for path in tmp_path.iterdir():
            if path.name.startswith("receipts.db") and path.is_file():  # not the lock files' directory
                with path.open("r+b") as fh:  # in place: the gateway's open handles see the damage
                    size = max(path.stat().st_size, 4096)
                    fh.write(b"\xde\xad\xbe\xef" * (size // 4))
        response = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert_error(response, 503, "store_unavailable")
        assert gw.upstream.requests == []
        balances.assert_unchanged()


def test_chain_rpc_outage_is_503_nothing_served_then_the_payment_works_once(
    base_chain: DevChain, tmp_path: Path
) -> None:
    # docs/threat-model.md T18, the chain's side of fail-closed: no RPC answer -> 503 chain_unavailable, never a 402 or
    # a free answer; the claim is released, so the same payment works once the RPC is back.
    payer = base_chain.new_payer(1_000_000)
    tap = RpcTap(base_chain.url)
    with serve_asgi(tap) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02, "rpc_timeout": 2.0}}
        with running_gateway(base_chain, store_url=f"sqlite:///{tmp_path / 'r.db'}", networks=networks) as gw:
            balances = Balances(gw, payer.address)
            name, value = pay(gw, payer, "/paid")
            tap.down = True
            down = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
            assert_error(down, 503, "chain_unavailable")
            assert gw.upstream.requests == []
            balances.assert_unchanged()
            tap.down = False
            ok = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
            assert ok.status_code == 200, ok.text
            assert_402(httpx.post(gw.url + "/paid", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
            assert len(gw.upstream.requests) == 1
            balances.assert_charged_once(PRICE)
