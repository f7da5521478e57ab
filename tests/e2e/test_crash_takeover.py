"""Paid but unanswered recovers fast: a gateway process killed (kill -9) while serving a paid request leaves a
claim with a live lease (minutes); the next process takes it over as soon as the dead one's heartbeat lapses, and
the retry of the same payment is served without paying again; a settlement whose outcome was unknown is
reconciled by the very next retry (docs/threat-model.md T31)."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DevChain, set_eth_balance, start_dev_chain
from gateway.x402 import reasons
from tests.e2e.helpers import HookedUpstream, RpcTap
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.processes import serve_processes
from tests.support.servers import Behaviour, RecordingUpstream, serve_asgi

PRICE = 100_000


def write_config(path: Path, *, upstream_url: str, store_url: str, chain: DevChain, pay_to: str) -> None:
    path.write_text(
        f"""
[upstream]
url = "{upstream_url}"
read_timeout = 60.0

[store]
url = "{store_url}"
heartbeat_seconds = 2.0

[payment]
pay_to = "{pay_to}"
relayer_key_env = "TEST_RELAYER_KEY"

[networks.base]
rpc_urls = ["{chain.url}"]
receipt_poll_interval = 0.02

[[routes]]
route = "POST /paid"
price = "0.10"
settlement = "before"
"""
    )


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_payment_whose_gateway_was_killed_mid_request_is_served_by_the_next_one_at_once(
    base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    store_url = sqlite_url(tmp_path) if store == "sqlite" else str(request.getfixturevalue("redis_url"))
    upstream = RecordingUpstream(Behaviour(delay=30.0))  # holds the response start: the request is not served yet
    pay_to = Account.create().address
    relayer = Account.create()
    set_eth_balance(base_chain.anvil, relayer.address, 10**19)
    key = relayer.key.to_0x_hex()
    with serve_asgi(upstream) as upstream_url:
        config = tmp_path / "gateway.toml"
        write_config(config, upstream_url=upstream_url, store_url=store_url, chain=base_chain, pay_to=pay_to)
        payer = base_chain.new_payer(1_000_000)
        before = base_chain.balance(pay_to)
        with serve_processes(config, tmp_path / "first", [key]) as (killed,):
            first = killed.url
            signer = GatewayUnderTest(url=first, config=None, upstream=upstream, chains={}, pay_to=pay_to)  # type: ignore[arg-type]
            name, value = signer.sign(payer, httpx.post(first + "/paid"))

            def doomed() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(first + "/paid", headers={name: value}, timeout=60)

            threading.Thread(target=doomed, daemon=True).start()
            assert upstream.wait_for_requests(1, timeout=30)  # settled ("before"), now waiting for the upstream
            assert base_chain.balance(pay_to) == before + PRICE
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(10)
        upstream.reset()
        with serve_processes(config, tmp_path / "second", [key]) as (survivor,):
            second = survivor.url
            served = None
            for _ in range(60):  # the lease would hold it for minutes; the dead process's heartbeat lapses in ~2 s
                r = httpx.post(second + "/paid", headers={name: value}, timeout=30)
                if r.status_code == 200:
                    served = r
                    break
                assert r.status_code == 409, (r.status_code, r.text)
                time.sleep(0.5)
            assert served is not None, "the claim of the killed process was never taken over"
            assert len(upstream.requests) == 1
            assert base_chain.balance(pay_to) == before + PRICE  # charged once, served once
            again = httpx.post(second + "/paid", headers={name: value}, timeout=30)
            assert again.status_code == 402


def test_a_settlement_whose_outcome_was_unknown_is_resolved_by_the_very_next_retry(tmp_path: Path) -> None:
    # The settlement was broadcast but not mined within settle_timeout: 503 settlement_pending, the claim kept with
    # its transaction hash. The retry must not wait out the lease (minutes) to learn the outcome: it takes the
    # claim over and reconciles by hash at once (pending: 409 settlement_pending; mined: served, charged once).
    chain = start_dev_chain(8453)
    try:
        with running_gateway(chain, store_url=sqlite_url(tmp_path), payment={"settle_timeout": 1.0}) as gw:
            payer = chain.new_payer(1_000_000)
            before = chain.balance(gw.pay_to)
            name, value = gw.sign(payer, httpx.post(gw.url + "/paid-before"))
            chain.rpc("evm_setAutomine", [False])
            first = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
            assert first.status_code == 503 and first.json()["error"] == reasons.SETTLEMENT_PENDING, first.text
            pending = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
            assert pending.status_code == 409 and pending.json()["error"] == reasons.SETTLEMENT_PENDING, pending.text
            chain.rpc("evm_mine", [])
            served = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
            assert served.status_code == 200, served.text
            assert len(gw.upstream.requests) == 1
            assert chain.balance(gw.pay_to) == before + PRICE
    finally:
        chain.stop()


def test_a_request_whose_claim_was_taken_over_is_not_served_as_well(base_chain: DevChain, tmp_path: Path) -> None:
    # Request 1 holds a paid claim while its upstream is slow; its lease lapses (a trickling body, a stalled
    # process) and request 2 with the same payment takes the claim over and is served. When request 1's upstream
    # finally answers, the claim is no longer its own: it is refused, never served too (one payment, one answer).
    store_url = sqlite_url(tmp_path)
    upstream = HookedUpstream()
    with running_gateway(base_chain, store_url=store_url, upstream=upstream) as gw:
        payer = base_chain.new_payer(1_000_000)
        before = base_chain.balance(gw.pay_to)
        name, value = gw.sign(payer, httpx.post(gw.url + "/paid-before"))
        release, arrived = threading.Event(), threading.Event()

        def hold() -> None:
            arrived.set()
            release.wait(30)

        upstream.on_request = hold
        first: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: first.append(httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=60))
        )
        worker.start()
        assert arrived.wait(30)  # paid ("before") and now with the upstream
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute("UPDATE receipts SET lease_until = 0")  # the lease lapsed
        second = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert second.status_code == 200, second.text
        release.set()
        worker.join(30)
        assert first and first[0].status_code == 409, first[0].text if first else "no answer"
        assert base_chain.balance(gw.pay_to) == before + PRICE


def test_a_claim_with_a_recorded_settlement_is_kept_when_the_chain_cannot_be_asked(tmp_path: Path) -> None:
    # The settlement left but its outcome is unknown (503); the retry takes the claim over while the RPC is down.
    # That retry fails (503) but must not give the claim back: with its recorded hash gone, the mined settlement
    # would look like someone else's and the payer would be charged and refused. Once the chain answers: served.
    chain = start_dev_chain(8453)
    tap = RpcTap(chain.url)
    try:
        with serve_asgi(tap) as rpc_url:
            networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
            with running_gateway(
                chain, store_url=sqlite_url(tmp_path), networks=networks, payment={"settle_timeout": 1.0}
            ) as gw:
                payer = chain.new_payer(1_000_000)
                before = chain.balance(gw.pay_to)
                name, value = gw.sign(payer, httpx.post(gw.url + "/paid-before"))
                chain.rpc("evm_setAutomine", [False])
                first = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
                assert first.status_code == 503, first.text
                tap.down = True
                during = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
                assert during.status_code in (503, 409), during.text
                tap.down = False
                chain.rpc("evm_mine", [])
                served = None
                for _ in range(40):
                    r = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
                    if r.status_code == 200:
                        served = r
                        break
                    assert r.status_code in (409, 503), r.text  # never a 402: the money moved for this claim
                    time.sleep(0.25)
                assert served is not None
                assert tap.transactions_broadcast() == 1
                assert chain.balance(gw.pay_to) == before + PRICE
    finally:
        chain.stop()
