"""Idempotent retries through a real gateway (docs/threat-model.md T13, with T1, T2, T17): a client whose paid response
was lost retries with the same ``Idempotency-Key`` and payment and gets the stored answer: one upstream call, one
charge."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain, RedisServer
from gateway.x402 import reasons
from tests.e2e.helpers import Balances, assert_402, assert_error, fire_together, receipt_of
from tests.idempotency.conftest import PRICE, idempotent_gateway, pay
from tests.support.gateway import DEFAULT_ROUTES, running_gateway
from tests.support.servers import Behaviour, RecordingUpstream

KEY = "3f1c8a52-6b0e-4e3a-9d0b-5d0c2a7e1f44"
BODY = b'{"prompt": "hello"}'


def post(gw: Any, path: str, headers: dict[str, str], body: bytes = BODY, **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + path, headers=headers, content=body, timeout=kw.pop("timeout", 30), **kw)


def same_answer(a: httpx.Response, b: httpx.Response) -> bool:
    ignore = {"date", "server", "idempotent-replayed", "connection", "transfer-encoding"}
    strip = lambda r: sorted((k, v) for k, v in r.headers.multi_items() if k not in ignore)  # noqa: E731
    return a.status_code == b.status_code and a.content == b.content and strip(a) == strip(b)


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_retry_with_same_key_payment_and_body_gets_the_stored_answer_with_one_upstream_call_and_one_charge(
    base_chain: DevChain, store_url: str, path: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, path)
        headers = {name: value, "Idempotency-Key": KEY}
        first = post(gw, path, headers)
        assert first.status_code == 200, first.text
        assert "idempotent-replayed" not in first.headers
        assert receipt_of(first)["success"] is True
        for _ in range(3):  # "the first answer was lost": retry
            again = post(gw, path, headers)
            assert again.headers.get("idempotent-replayed") == "true"
            assert same_answer(first, again), (first.headers, again.headers)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_without_a_key_the_retry_of_a_paid_request_is_refused_as_replay(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        assert post(gw, "/paid", {name: value}).status_code == 200
        assert_402(post(gw, "/paid", {name: value}), reasons.PAYMENT_ALREADY_USED)
        # A key sent only on the retry finds no record: the payment layer refuses the spent payment.
        assert_402(post(gw, "/paid", {name: value, "Idempotency-Key": KEY}), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize(
    ("path", "body"), [("/paid", b'{"prompt": "goodbye"}'), ("/paid?x=1", BODY), ("/paid-before", BODY)]
)
def test_same_key_and_payment_with_a_different_request_is_422_and_never_reaches_the_upstream(
    base_chain: DevChain, store_url: str, path: str, body: bytes
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        assert post(gw, "/paid", headers).status_code == 200
        assert_error(post(gw, path, headers, body), 422, "idempotency_key_reused")
        assert post(gw, "/paid", headers).headers.get("idempotent-replayed") == "true"  # the original still replays
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_a_concurrent_duplicate_while_the_first_is_in_flight_is_409_then_replays(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    upstream = RecordingUpstream(Behaviour(delay=1.5, body=b"slow answer"))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(post(gw, "/paid", headers)))
        first.start()
        assert gw.upstream.wait_for_requests(1)
        duplicate = post(gw, "/paid", headers)
        assert_error(duplicate, 409, "idempotency_key_in_flight")
        assert duplicate.headers.get("retry-after")
        first.join(30)
        assert results[0].status_code == 200
        assert results[0].content == b"slow answer"
        replay = post(gw, "/paid", headers)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.content == b"slow answer"
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_fifty_concurrent_requests_with_one_key_and_payment_reach_the_upstream_once(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        responses = fire_together(gw.url, "POST", "/paid", {name: value, "Idempotency-Key": KEY}, 50)
        served = [r for r in responses if r.status_code == 200 and "idempotent-replayed" not in r.headers]
        replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
        refused = [r for r in responses if r.status_code == 409]
        assert len(served) == 1
        assert len(served) + len(replayed) + len(refused) == 50
        assert all(r.json()["error"] == "idempotency_key_in_flight" for r in refused)
        assert all(r.content == served[0].content for r in replayed)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_upstream_500_stores_nothing_and_the_retry_reaches_the_upstream_and_succeeds_once(
    base_chain: DevChain, store_url: str, path: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    upstream = RecordingUpstream(Behaviour(status=500, body=b"boom"))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, path)
        headers = {name: value, "Idempotency-Key": KEY}
        failed = post(gw, path, headers)
        assert failed.status_code == 500
        assert "idempotent-replayed" not in post(gw, path, headers).headers  # reached the upstream again: 500
        assert len(gw.upstream.requests) == 2
        gw.upstream.behaviour = Behaviour(body=b"fixed")
        ok = post(gw, path, headers)
        assert ok.status_code == 200, ok.text
        assert "idempotent-replayed" not in ok.headers
        replay = post(gw, path, headers)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.content == b"fixed"
        assert len(gw.upstream.requests) == 3
        balances.assert_charged_once(PRICE)


def test_a_different_payment_with_the_same_key_does_not_see_the_first_answer(
    base_chain: DevChain, store_url: str
) -> None:
    alice, mallory = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        a_balances, m_balances = Balances(gw, alice.address), Balances(gw, mallory.address)
        a_name, a_value = pay(gw, alice)
        gw.upstream.behaviour = Behaviour(body=b"alice's answer")
        assert post(gw, "/paid", {a_name: a_value, "Idempotency-Key": KEY}).content == b"alice's answer"
        gw.upstream.behaviour = Behaviour(body=b"mallory's answer")
        m_name, m_value = pay(gw, mallory)
        mine = post(gw, "/paid", {m_name: m_value, "Idempotency-Key": KEY})
        assert mine.status_code == 200
        assert mine.content == b"mallory's answer"
        assert "idempotent-replayed" not in mine.headers
        # The same key with no payment, or with a forged one, gets no stored answer either.
        assert post(gw, "/paid", {"Idempotency-Key": KEY}).status_code == 402
        assert post(gw, "/paid", {a_name: a_value + "x", "Idempotency-Key": KEY}).status_code in (400, 402)
        assert len(gw.upstream.requests) == 2
        assert a_balances.moved() == (PRICE, 2 * PRICE)  # pay-to got both payments
        assert m_balances.moved() == (PRICE, 2 * PRICE)


def test_the_stored_answer_survives_a_gateway_restart(
    base_chain: DevChain, store_url: str, request: pytest.FixtureRequest
) -> None:
    payer = base_chain.new_payer(1_000_000)
    upstream = RecordingUpstream(Behaviour(body=b"kept"))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        assert post(gw, "/paid", headers).content == b"kept"
    if store_url.startswith("redis"):  # the Redis server restarts too (AOF, fsync always)
        server: RedisServer = request.getfixturevalue("redis_server")
        server.stop()
        server.start()
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw2:
        again = post(gw2, "/paid", headers)
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.content == b"kept"
    assert len(upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_redis_down_is_503_with_no_upstream_call_and_no_charge_then_the_key_works_once(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=redis_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        redis_server.stop()
        try:
            down = post(gw, "/paid", headers)
            assert_error(down, 503, "store_unavailable")
            assert down.headers.get("retry-after")
            assert gw.upstream.requests == []
            balances.assert_unchanged()
        finally:
            redis_server.start()
        ok = post(gw, "/paid", headers)
        assert ok.status_code == 200, ok.text
        assert "idempotent-replayed" not in ok.headers
        assert post(gw, "/paid", headers).headers.get("idempotent-replayed") == "true"
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 256, b"tab\tinside", "caf\u00e9".encode("latin-1"), [b"one", b"two"]],
    ids=["empty", "256-chars", "control-char", "non-ascii", "two-headers"],
)
def test_an_invalid_idempotency_key_is_400_and_leaves_the_payment_usable(
    base_chain: DevChain, store_url: str, key: bytes | list[bytes]
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        keys = key if isinstance(key, list) else [key]
        headers = [(name.encode(), value.encode()), *((b"Idempotency-Key", k) for k in keys)]
        with httpx.Client(timeout=30) as client:
            refused = client.post(gw.url + "/paid", headers=headers, content=BODY)
        assert_error(refused, 400, "invalid_idempotency_key")
        assert gw.upstream.requests == []
        balances.assert_unchanged()
        assert post(gw, "/paid", {name: value, "Idempotency-Key": "k" * 255}).status_code == 200
        balances.assert_charged_once(PRICE)


def test_oversized_request_body_is_413_before_payment_and_upstream(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with idempotent_gateway(base_chain, store_url=store_url, max_body_bytes=1000) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        assert_error(post(gw, "/paid", headers, b"x" * 1001), 413, "payload_too_large")

        def chunked() -> Any:
            yield b"x" * 600
            yield b"x" * 600

        assert_error(post(gw, "/paid", headers, chunked()), 413, "payload_too_large")  # type: ignore[arg-type]
        assert gw.upstream.requests == []
        balances.assert_unchanged()
        assert post(gw, "/paid", headers, b"x" * 1000).status_code == 200


def test_an_answer_over_the_storage_cap_is_served_streaming_but_not_stored(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    upstream = RecordingUpstream(Behaviour(big_body=200_000))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream, max_stored_body_bytes=100_000) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        first = post(gw, "/paid", headers)
        assert first.status_code == 200
        assert len(first.content) == 200_000
        # Documented limit: too big to keep, so the retry meets the payment layer's replay refusal.
        assert_402(post(gw, "/paid", headers), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_a_paid_answer_streams_to_the_client_before_the_upstream_finishes_and_is_then_stored(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    gate = threading.Event()
    upstream = RecordingUpstream(Behaviour(chunks=[b"first;", b"second;", b"third"], gate=gate))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", gw.url + "/paid", headers=headers, content=BODY) as r,
        ):
            assert r.status_code == 200
            chunks = r.iter_raw()
            assert next(chunks) == b"first;"  # the upstream is still held at its gate
            gate.set()
            rest = b"".join(chunks)
        assert rest == b"second;third"
        replay = post(gw, "/paid", headers)
        assert replay.headers.get("idempotent-replayed") == "true"
        assert replay.content == b"first;second;third"
        assert replay.headers["content-length"] == str(len(replay.content))
        assert len(gw.upstream.requests) == 1


def test_a_client_that_times_out_retries_with_the_same_key_and_gets_the_answer_paid_once(
    base_chain: DevChain, store_url: str
) -> None:
    # The response is lost in transit: the client gives up while the upstream works. The layer hides that
    # disconnect from the payment layer and the proxy, so the paid answer completes and is stored for the retry.
    payer = base_chain.new_payer(1_000_000)
    upstream = RecordingUpstream(Behaviour(delay=1.0, body=b"worth the wait"))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        with pytest.raises(httpx.ReadTimeout):
            post(gw, "/paid", headers, timeout=0.3)
        deadline = time.monotonic() + 20
        while (retry := post(gw, "/paid", headers)).status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("idempotent-replayed") == "true"
        assert retry.content == b"worth the wait"
        assert len(gw.upstream.requests) == 1
        assert not gw.upstream.requests[0].aborted
        balances.assert_charged_once(PRICE)


def test_requests_without_payment_or_on_free_routes_pass_through_untouched_and_stream(
    base_chain: DevChain, store_url: str
) -> None:
    gate = threading.Event()
    upstream = RecordingUpstream(Behaviour(chunks=[b"first;", b"second"], gate=gate))
    with idempotent_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        # free route, with a key and even a payment header: streamed, first chunk before the upstream finishes
        headers = {"Idempotency-Key": KEY, "X-PAYMENT": "whatever"}
        with httpx.Client(timeout=30) as client, client.stream("GET", gw.url + "/free", headers=headers) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            assert next(chunks) == b"first;"
            gate.set()
            assert b"".join(chunks) == b"second"
        assert "idempotent-replayed" not in r.headers
        # the same again is not a replay: nothing was stored
        gw.upstream.behaviour = Behaviour(body=b"again")
        assert httpx.get(gw.url + "/free", headers=headers).content == b"again"
        # an invalid key on a free route is not ours to refuse
        assert httpx.get(gw.url + "/free", headers={"Idempotency-Key": "x" * 300}).status_code == 200
        # a priced route without a payment header: the payment layer's challenge, untouched
        challenge = httpx.post(gw.url + "/paid", headers={"Idempotency-Key": KEY})
        assert_402(challenge, reasons.PAYMENT_REQUIRED)
        assert "idempotent-replayed" not in challenge.headers
        assert len(gw.upstream.requests) == 3


def test_without_the_layer_the_gateway_behaves_as_before(base_chain: DevChain, store_url: str) -> None:
    # Control: the same key does nothing without the layer (the retry is a replay refusal).
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url, routes=DEFAULT_ROUTES, idempotency={"enabled": False}) as gw:
        name, value = pay(gw, payer)
        headers = {name: value, "Idempotency-Key": KEY}
        assert post(gw, "/paid", headers).status_code == 200
        assert_402(post(gw, "/paid", headers), reasons.PAYMENT_ALREADY_USED)
